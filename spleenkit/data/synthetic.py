"""Synthetic abdominal CT phantoms with spleen labels, written in the MSD Task09 layout.

Each case is drawn in millimetres in the patient's frame (``l`` towards the patient's left,
``a`` anterior, ``s`` superior) and rendered on the voxel grid of its NIfTI affine, so a case
stored with flipped axes (LPS-like, as many MSD headers are) shows the same anatomy in world
space. Organs are signed-distance fields blended with one voxel of partial volume, which gives
smooth boundaries; the label is exactly the spleen's inside. Hounsfield units follow a
portal-venous CT: enhancing spleen and liver ~80-130 HU, muscle ~50, fat ~-100, air -1000,
bone several hundred. The same seed gives byte-identical files.
"""

from __future__ import annotations

import functools
import gzip
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spleenkit.errors import BadInputError
from spleenkit.io import write_bytes

log = logging.getLogger(__name__)

#: Slice spacings (mm) and how often each is drawn; MSD Task09 spans about 1.5-8 mm.
SLICE_SPACINGS: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0)
SLICE_WEIGHTS: tuple[float, ...] = (0.1, 0.1, 0.15, 0.15, 0.2, 0.3)
#: Voxel orderings the cases cycle through: RAS+, LPS-like (x and y flipped), LAS (x flipped).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")
#: Adult spleen volumes (mL); the generator draws its targets from the narrower SPLEEN_TARGET_ML.
SPLEEN_VOLUME_ML = (100.0, 400.0)
SPLEEN_TARGET_ML = (120.0, 370.0)
#: gzip level for the .nii.gz files (1 is nibabel's default: fast, a little larger).
GZIP_LEVEL = 1

Field = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
Box = tuple[tuple[float, float], tuple[float, float], tuple[float, float]]


# --------------------------------------------------------------------------- geometry helpers
def _rotation(angles: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """A rotation matrix from three angles in degrees (about l, a, s, applied in that order)."""
    ax, ay, az = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def ellipsoid(center: Sequence[float], axes: Sequence[float], angles: Sequence[float] = (0, 0, 0),
              wobble: Sequence[tuple[float, float, float, float, float]] = ()) -> Field:
    """Approximate signed distance (mm, negative inside) to a rotated ellipsoid, optionally lobulated.

    ``wobble`` holds (amplitude_mm, kl, ka, ks, phase) sine terms added to the distance.
    """
    c = np.asarray(center, dtype=np.float32)
    rot = _rotation(angles).T.astype(np.float32)  # world -> local
    inv = 1.0 / np.asarray(axes, dtype=np.float32)

    def field(L: np.ndarray, A: np.ndarray, S: np.ndarray) -> np.ndarray:
        d = (L - c[0], A - c[1], S - c[2])
        u = [rot[i, 0] * d[0] + rot[i, 1] * d[1] + rot[i, 2] * d[2] for i in range(3)]
        q2 = sum((u[i] * inv[i]) ** 2 for i in range(3))
        g2 = sum((u[i] * inv[i] ** 2) ** 2 for i in range(3))
        q = np.sqrt(q2)
        f = q * (q - 1.0) / (np.sqrt(g2) + 1e-6)
        for amp, kl, ka, ks, phase in wobble:
            f = f + amp * np.sin(kl * d[0] + ka * d[1] + ks * d[2] + phase)
        return f

    return field


def capsule(p0: Sequence[float], p1: Sequence[float], radius: float) -> Field:
    """Signed distance to a capsule (a segment thickened by ``radius``): tubes, vessels, bowel loops."""
    p = np.asarray(p0, dtype=np.float32)
    v = np.asarray(p1, dtype=np.float32) - p
    vv = float(v @ v) or 1.0

    def field(L: np.ndarray, A: np.ndarray, S: np.ndarray) -> np.ndarray:
        d = (L - p[0], A - p[1], S - p[2])
        t = np.clip((d[0] * v[0] + d[1] * v[1] + d[2] * v[2]) / vv, 0.0, 1.0)
        return np.sqrt((d[0] - t * v[0]) ** 2 + (d[1] - t * v[1]) ** 2 + (d[2] - t * v[2]) ** 2) - radius

    return field


def cylinder_2d(center: Sequence[float], axes: Sequence[float], power: float = 2.0) -> Field:
    """Signed distance (approximate) to an elliptic or super-elliptic prism along ``s``."""
    cl, ca = center
    al, aa = axes

    def field(L: np.ndarray, A: np.ndarray, S: np.ndarray) -> np.ndarray:
        x = np.abs(L - cl) / al
        y = np.abs(A - ca) / aa
        if power == 2.0:
            q = np.sqrt(x**2 + y**2)
            g = np.sqrt((x / al) ** 2 + (y / aa) ** 2) / np.maximum(q, 1e-6)
        else:
            q = (x**power + y**power) ** (1.0 / power)
            qp = np.maximum(q, 1e-6) ** (1.0 - power)
            g = qp * np.sqrt((x ** (power - 1) / al) ** 2 + (y ** (power - 1) / aa) ** 2)
        return (q - 1.0) / (g + 1e-6)

    return field


def _box(low: Sequence[float], high: Sequence[float]) -> Box:
    """A patient-frame box from its lowest and highest corner."""
    return tuple((float(a), float(b)) for a, b in zip(low, high, strict=True))  # type: ignore[return-value]


def union(*fields: Field) -> Field:
    """The shape covered by any of ``fields``."""

    def field(L, A, S):
        return functools.reduce(np.minimum, [f(L, A, S) for f in fields])

    return field


def intersect(*fields: Field) -> Field:
    """The shape common to all ``fields`` (also: one shape clipped by another)."""

    def field(L, A, S):
        return functools.reduce(np.maximum, [f(L, A, S) for f in fields])

    return field


def offset(f: Field, by: float) -> Field:
    """Grow (``by`` > 0) or shrink a shape by ``by`` millimetres."""
    return lambda L, A, S: f(L, A, S) - by


# --------------------------------------------------------------------------- the canvas
@dataclass
class Canvas:
    """A voxel grid with the patient-frame coordinate of every voxel along each axis."""

    image: np.ndarray  # float32 HU
    l: np.ndarray  # noqa: E741  (nx,) patient-left coordinate of each index along axis 0
    a: np.ndarray  # (ny,) anterior coordinate along axis 1
    s: np.ndarray  # (nz,) superior coordinate along axis 2
    blur: float  # partial-volume width (mm)
    _current: tuple[slice, ...] = field(default=(), init=False, repr=False)  # window being painted

    def _range(self, coords: np.ndarray, low: float, high: float) -> slice | None:
        inside = np.nonzero((coords >= low) & (coords <= high))[0]
        if inside.size == 0:
            return None
        return slice(int(inside[0]), int(inside[-1]) + 1)

    def window(self, box: Box | None) -> tuple[tuple[slice, slice, slice], tuple[np.ndarray, ...]] | None:
        """Index slices and broadcastable coordinates of the voxels inside a patient-frame box."""
        if box is None:
            box = ((-1e9, 1e9),) * 3
        ranges = [self._range(c, lo, hi) for c, (lo, hi) in zip((self.l, self.a, self.s), box, strict=True)]
        if any(r is None for r in ranges):
            return None
        sl = tuple(ranges)
        L = self.l[sl[0]][:, None, None]
        A = self.a[sl[1]][None, :, None]
        S = self.s[sl[2]][None, None, :]
        return sl, (L, A, S)

    def sample(self, field: Field, box: Box | None = None, outside: float = 1e3) -> np.ndarray:
        """``field`` evaluated once over the grid (``outside`` beyond ``box``), to reuse via :meth:`lookup`."""
        values = np.full(self.image.shape, outside, dtype=np.float32)
        win = self.window(box)
        if win is not None:
            sl, (L, A, S) = win
            values[sl] = field(L, A, S)
        return values

    def lookup(self, values: np.ndarray) -> Field:
        """A field that reads a sampled array over the window being painted (cheaper than recomputing)."""
        return lambda L, A, S: values[self._current]

    def paint(self, field: Field, hu: float | Callable[..., np.ndarray], box: Box | None = None,
              mask: np.ndarray | None = None) -> None:
        """Blend ``hu`` into the image where ``field`` < 0, with one voxel of partial volume.

        Only the voxels inside ``box`` are computed (a speed-up: the shape must lie within it).
        With ``mask``, the voxels inside the shape (``field`` < 0) are also set in that array.
        """
        win = self.window(box)
        if win is None:
            return
        sl, (L, A, S) = win
        self._current = sl
        f = np.broadcast_to(field(L, A, S), self.image[sl].shape)
        alpha = np.clip(0.5 - f / self.blur, 0.0, 1.0)
        value = hu(L, A, S) if callable(hu) else hu
        region = self.image[sl]
        region += alpha * (value - region)
        if mask is not None:
            mask[sl] |= f < 0


# --------------------------------------------------------------------------- one case
@dataclass(frozen=True)
class CaseGeometry:
    """Grid of one case: matrix, spacing (mm), orientation code and the world affine."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    affine: np.ndarray


def _grid(rng: np.random.Generator, matrix: int, slice_spacing: float | None, orientation: str,
          fov: float, s_top: float, s_bottom: float) -> tuple[CaseGeometry, np.ndarray, np.ndarray, np.ndarray]:
    """The voxel grid and the patient-frame coordinate of each index."""
    inplane = fov / matrix
    dz = slice_spacing if slice_spacing else float(rng.choice(SLICE_SPACINGS, p=SLICE_WEIGHTS))
    nz = max(8, int(round((s_top - s_bottom) / dz)))
    shape = (matrix, matrix, nz)
    # world (RAS) centre of the volume, in scanner coordinates, and where the patient's midline lies:
    # patients are rarely exactly in the middle of the field of view
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-200, -150), (s_top + s_bottom) / 2 + 400.0])
    patient = centre + np.array([rng.uniform(-6, 6), rng.uniform(-4, 8), 0.0])
    # nibabel's axis codes name where increasing index points: "RAS" has +x towards the right
    ras_sign = [1.0 if orientation[0] == "R" else -1.0,
                1.0 if orientation[1] == "A" else -1.0,
                1.0 if orientation[2] == "S" else -1.0]
    spacing = (inplane, inplane, dz)
    affine = np.eye(4)
    for axis in range(3):
        step = ras_sign[axis] * spacing[axis]
        affine[axis, axis] = step
        affine[axis, 3] = centre[axis] - step * (shape[axis] - 1) / 2
    affine = np.round(affine, 6)
    idx = [np.arange(n, dtype=np.float64) for n in shape]
    world = [affine[axis, axis] * idx[axis] + affine[axis, 3] for axis in range(3)]
    # patient frame: l = -x (RAS x points to the patient's right), a = y, s = z - 400
    l_coords = (-(world[0] - patient[0])).astype(np.float32)
    a_coords = (world[1] - patient[1]).astype(np.float32)
    s_coords = (world[2] - 400.0).astype(np.float32)
    geometry = CaseGeometry(shape, (round(inplane, 6), round(inplane, 6), dz), orientation, affine)
    return geometry, l_coords, a_coords, s_coords


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Gaussian noise with in-plane correlation like a CT reconstruction kernel (unit std)."""
    from scipy.ndimage import gaussian_filter

    noise = rng.standard_normal(shape, dtype=np.float32)
    if sigma > 0:
        noise = gaussian_filter(noise, sigma=(sigma, sigma, 0.0), mode="nearest", truncate=2.5)
        noise /= max(float(noise[::4, ::4, ::2].std()), 1e-6)
    return noise


def _texture(rng: np.random.Generator, amplitude: float, wavelength: float, terms: int = 4) -> Callable:
    """A smooth random HU modulation (sum of plane waves) for organ texture."""
    waves = []
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / (wavelength * rng.uniform(0.6, 1.4))
        waves.append((*(direction * k), rng.uniform(0, 2 * np.pi)))
    scale = amplitude / math.sqrt(terms / 2)

    def field(L, A, S):
        out = 0.0
        for kl, ka, ks, phase in waves:
            out = out + np.sin(kl * L + ka * A + ks * S + phase)
        return scale * out

    return field


def _wobble(rng: np.random.Generator, amplitude: float, wavelength: float, terms: int = 4) -> list:
    result = []
    for _ in range(terms):
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        k = 2 * np.pi / (wavelength * rng.uniform(0.7, 1.3))
        result.append((amplitude * rng.uniform(0.5, 1.0) / math.sqrt(terms), *(direction * k), rng.uniform(0, 6.3)))
    return result


@dataclass(frozen=True)
class Ribs:
    """Oblique rib tubes in the wall: their radius, the pitch between ribs and where the first lies (mm)."""

    radius: float
    pitch: float
    phase: float


@dataclass(frozen=True)
class Spine:
    """The vertebral column: body, discs, canal and posterior elements (patient frame, mm)."""

    a: float  # anterior coordinate of the vertebral body's centre
    radius: float  # of the vertebral body
    disc_pitch: float
    disc_phase: float
    canal_a: float  # centre of the spinal canal
    spinous_tip: float  # under the skin of the back

    def in_disc(self, S):
        """True at the levels of the intervertebral discs."""
        return np.cos(2 * np.pi * (S + self.disc_phase) / self.disc_pitch) > 0.8

    def posterior_elements(self, L, A, S):
        """Pedicles, laminae, spinous and transverse processes behind the canal."""
        canal_a, disc_phase, disc_pitch = self.canal_a, self.disc_phase, self.disc_pitch
        ring = np.abs(np.sqrt((L / 1.15) ** 2 + (A - canal_a) ** 2) - 10.5) - 3.0
        ring = np.maximum(ring, A - canal_a - 10)  # pedicles and laminae
        dz = np.mod(S + disc_phase, disc_pitch) / disc_pitch  # 0..1 through one vertebra
        half_length = (canal_a - self.spinous_tip) / 2
        spinous = np.maximum(np.abs(L) - 3.0, np.abs(A - (canal_a - half_length)) - half_length)
        spinous = np.maximum(spinous, (np.abs(dz - 0.55) - 0.3) * 40)
        transverse = np.maximum(np.abs(np.abs(L) - 22) - 12, np.abs(A - canal_a - 2) - 4)
        transverse = np.maximum(transverse, (np.abs(dz - 0.35) - 0.15) * 40)
        return functools.reduce(np.minimum, [ring, spinous, transverse])


@dataclass(frozen=True)
class Vessels:
    """The aorta (radius and centre) and the inferior vena cava (centre), as (l, a) in mm."""

    aorta_r: float
    aorta_c: tuple[float, float]
    ivc_c: tuple[float, float]


@dataclass(frozen=True)
class Body:
    """One patient: its random stream, canvas and grid, and the sizes every organ is placed against (mm).

    All that is drawn before the spleen is drawn by :func:`_plan_body`, in the order the random
    stream has always had, so that the same seed keeps giving the same files.
    """

    rng: np.random.Generator
    canvas: Canvas
    geometry: CaseGeometry
    fov: float  # field of view
    half_w: float  # half the left-right body width
    half_d: float  # half the anterior-posterior depth
    fat: float  # subcutaneous fat thickness
    muscle: float  # abdominal wall muscle thickness
    dome: float  # top of the right hemidiaphragm (s = 0 lies near the splenic hilum)
    dome_l: float  # top of the left hemidiaphragm
    k_dome: float  # curvature of both domes
    s_bottom: float  # lowest level of the scan
    table_top: float  # anterior coordinate of the table's top plate
    fat_hu: float  # subcutaneous fat
    visceral_hu: float  # visceral fat
    ribs: Ribs
    spine: Spine
    enhancement: float  # contrast timing varies between patients
    vessels: Vessels
    outline: Field = field(init=False, repr=False)  # the skin

    def __post_init__(self) -> None:
        object.__setattr__(self, "outline", cylinder_2d((0.0, 0.0), (self.half_w, self.half_d), power=2.4))

    @property
    def cav_half_w(self) -> float:
        """Half width of the visceral cavity (inside the muscle wall)."""
        return self.half_w - self.fat - self.muscle

    @property
    def cav_front(self) -> float:
        """Front of the visceral cavity."""
        return self.half_d - 1.3 * self.fat - self.muscle

    @property
    def cav_centre(self) -> float:
        """Anterior coordinate of the cavity's middle."""
        return (self.cav_front + self.spine.a - 24) / 2

    @property
    def cav_back(self) -> float:
        """The deepest the cavity goes, beside the spine (for bounding boxes)."""
        return self.spine.a - 50

    def under_fat(self, L, A, S):
        """Inside of the subcutaneous fat, which is thicker in front than behind."""
        return self.outline(L, A, S) + self.fat * (1.0 + 0.3 * A / np.sqrt(L**2 + A**2 + 1.0))

    def cavity(self, L, A, S):
        """The visceral cavity: inside the muscle, with the spine and its muscles bulging in from behind."""
        back = self.spine.a - 8 - 42.0 * (1 - np.exp(-((L / 36.0) ** 2))) - A
        return np.maximum(self.under_fat(L, A, S) + self.muscle, back)

    def diaphragm(self, L, A, S):
        """Height (mm) below the two domes: > 0 in the abdomen, < 0 in the chest."""
        right = self.dome - self.k_dome * ((L + 45) ** 2 + (A - 5) ** 2)
        left = self.dome_l - self.k_dome * ((L - 50) ** 2 + (A + 5) ** 2)
        return np.maximum(right, left) - S

    def below_diaphragm(self, f: Field) -> Field:
        """``f`` clipped to the abdomen."""
        return lambda L, A, S: np.maximum(f(L, A, S), -self.diaphragm(L, A, S))


def _plan_spine(rng: np.random.Generator, spine_a: float, half_d: float, fat: float) -> Spine:
    """Draw the vertebrae's size and the levels of their discs."""
    vb_r = rng.uniform(16, 19)
    disc_pitch = rng.uniform(30, 36)
    disc_phase = rng.uniform(0, disc_pitch)
    canal_a = spine_a - vb_r - 9
    spinous_tip = max(canal_a - 38, -half_d + 0.7 * fat + 12)  # under the skin of the back
    return Spine(spine_a, vb_r, disc_pitch, disc_phase, canal_a, spinous_tip)


def _plan_body(rng: np.random.Generator, grid_rng: np.random.Generator, matrix: int, slice_spacing: float | None,
               orientation: str) -> Body:
    """Draw the patient's size and grid, then its wall, diaphragm, ribs, spine, contrast and great vessels."""
    width = rng.uniform(205, 240)  # left-right body width (mm)
    depth = width * rng.uniform(0.70, 0.80)  # anterior-posterior
    fov = width + rng.uniform(16, 32)
    half_w, half_d = width / 2, depth / 2
    fat = rng.uniform(8, 22)  # subcutaneous fat
    muscle = rng.uniform(8, 13)  # abdominal wall muscle
    # levels (mm, superior +): s = 0 near the splenic hilum
    dome = rng.uniform(55, 75)  # top of the right hemidiaphragm
    s_top = dome + rng.uniform(10, 35)
    s_bottom = rng.uniform(-105, -80)
    geometry, l_c, a_c, s_c = _grid(grid_rng, matrix, slice_spacing, orientation, fov, s_top, s_bottom)
    blur = float(min(geometry.spacing[0], geometry.spacing[2]) * 1.0)
    canvas = Canvas(np.full(geometry.shape, -1000.0, dtype=np.float32), l_c, a_c, s_c, blur)
    table_top = -half_d - rng.uniform(1.0, 4.0)
    fat_hu = -105.0 + rng.uniform(-8, 8)
    spine_a = -half_d + 0.7 * fat + rng.uniform(46, 56)  # centre of the vertebral body
    dome_l = dome - rng.uniform(8, 20)  # the left dome lies lower
    k_dome = rng.uniform(0.006, 0.009)
    visceral_hu = -95.0 + rng.uniform(-8, 8)
    rib_r = rng.uniform(4.0, 5.0)
    pitch = rng.uniform(30, 38)
    ribs = Ribs(rib_r, pitch, rng.uniform(0, pitch))
    spine = _plan_spine(rng, spine_a, half_d, fat)
    enhancement = rng.uniform(0.85, 1.15)
    aorta_r = rng.uniform(10, 12.5)
    aorta_c = (rng.uniform(4, 12), spine_a + spine.radius + aorta_r + 1)
    ivc_c = (-rng.uniform(20, 28), spine_a + spine.radius + 13)
    return Body(rng, canvas, geometry, fov, half_w, half_d, fat, muscle, dome, dome_l, k_dome, s_bottom, table_top,
                fat_hu, visceral_hu, ribs, spine, enhancement, Vessels(aorta_r, aorta_c, ivc_c))


def _paint_wall_and_table(body: Body) -> None:
    """The table's two curved plates (with foam between), the skin, subcutaneous fat and muscle wall."""
    canvas, table_top, half_w = body.canvas, body.table_top, body.half_w
    table_w = min(body.fov / 2 - 4, half_w + 30)
    for top, thickness in ((table_top, 3.0), (table_top - 28.0, 4.0)):
        bend = 0.0025 if top == table_top else 0.002
        plate = (lambda t, th, b: lambda L, A, S: np.abs(A - (t - th / 2) - b * L**2) - th / 2)(
            top, thickness, bend)
        canvas.paint(intersect(plate, cylinder_2d((0.0, top), (table_w, 60.0))), 120.0,
                     ((-table_w, table_w), (top - 70, top + 20), (-1e9, 1e9)))
    canvas.paint(intersect(lambda L, A, S: np.abs(A - (table_top - 14) - 0.002 * L**2) - 10.0,
                           cylinder_2d((0.0, table_top), (table_w - 6, 60.0))), -880.0,
                 ((-table_w, table_w), (table_top - 40, table_top), (-1e9, 1e9)))
    canvas.paint(body.outline, 20.0)  # skin
    canvas.paint(offset(body.outline, -2.0), body.fat_hu)  # subcutaneous fat
    canvas.paint(body.under_fat, 48.0)  # muscle wall


def _paint_chest(body: Body) -> None:
    """Visceral fat in the cavity, then the lung bases and the heart above the diaphragm."""
    canvas, diaphragm, cavity = body.canvas, body.diaphragm, body.cavity
    canvas.paint(cavity, body.visceral_hu)  # visceral fat
    lung = intersect(offset(cavity, -2.0), lambda L, A, S: diaphragm(L, A, S) + 2.0)
    canvas.paint(lung, lambda L, A, S: -860.0 + 25 * np.sin(0.21 * L + 0.17 * A) * np.cos(0.13 * S))
    heart = intersect(ellipsoid((12.0, body.cav_front - 55, body.dome + 45), (65, 52, 50), (0, 0, 20)),
                      lambda L, A, S: diaphragm(L, A, S) + 1.0, offset(cavity, -3.0))
    heart_box = ((-60, 90), (body.cav_back, body.cav_front), (body.dome - 20, 1e9))
    canvas.paint(heart, 95.0, heart_box)
    canvas.paint(offset(heart, -9.0), 140.0, heart_box)


def _rib_field(body: Body) -> Field:
    """The ribs: oblique tubes in the wall, seen as ovals laterally and behind, ending at the costal margin."""
    outline, half_w, half_d = body.outline, body.half_w, body.half_d
    rib_r, pitch, phase = body.ribs.radius, body.ribs.pitch, body.ribs.phase
    ring_out = body.fat + body.muscle * 0.5
    slope = 0.45  # ribs run down towards the front

    def ribs(L, A, S):
        radial = outline(L, A, S) + ring_out
        angle = np.arctan2(L, A - 0.3 * half_d)  # 0 = anterior, +-pi = posterior
        arc = np.abs(angle) * half_w
        along = np.mod(S + slope * arc + phase, pitch) - pitch / 2
        tube = np.sqrt(radial**2 + (along / math.sqrt(1 + slope**2) * 1.6) ** 2) - rib_r
        sector = np.maximum(0.9 - np.abs(angle), np.abs(angle) - 2.7) * 40.0
        costal_margin = (-55 + 40 * np.cos(angle)) - S  # the rib cage ends lower at the sides
        return functools.reduce(np.maximum, [tube, sector, costal_margin])

    return ribs


def _paint_skeleton_and_vessels(body: Body) -> None:
    """Paraspinal muscles, psoas, vertebrae, canal, aorta, inferior vena cava and ribs, over the organs."""
    canvas, spine, vessels, enhancement = body.canvas, body.spine, body.vessels, body.enhancement
    spine_a, vb_r, in_disc = spine.a, spine.radius, spine.in_disc
    vert_box = ((-90, 90), (-body.half_d, spine_a + 45), (-1e9, 1e9))
    inner_wall = offset(body.outline, -body.fat)
    for side in (-1, 1):
        canvas.paint(intersect(ellipsoid((side * 30.0, spine_a - 42, 0.0), (28, 24, 1e4)), inner_wall), 52.0,
                     vert_box)
        psoas = ellipsoid((side * (vb_r + 10), spine_a + 4, -160.0), (14, 14, 160), (0, side * -6, 0))
        canvas.paint(psoas, 50.0, ((-90, 90), (spine_a - 40, spine_a + 40), (-1e9, 0)))
    vertebra = cylinder_2d((0.0, spine_a), (vb_r * 1.1, vb_r))
    canvas.paint(vertebra, lambda L, A, S: np.where(in_disc(S), 90.0, 620.0), vert_box)
    canvas.paint(offset(vertebra, -2.0), lambda L, A, S: np.where(in_disc(S), 90.0, 210.0), vert_box)
    canvas.paint(spine.posterior_elements, 520.0, vert_box)
    canvas.paint(cylinder_2d((0.0, spine.canal_a), (8.5, 7.5)), 15.0, vert_box)  # spinal canal (CSF)
    aorta_r = vessels.aorta_r
    canvas.paint(cylinder_2d(vessels.aorta_c, (aorta_r, aorta_r)), 165.0 * enhancement, vert_box)
    canvas.paint(body.below_diaphragm(cylinder_2d(vessels.ivc_c, (13, 9))), 125.0 * enhancement,
                 ((-60, 10), (spine_a, spine_a + 60), (-1e9, 1e9)))
    ribs = _rib_field(body)
    canvas.paint(ribs, 700.0)
    canvas.paint(offset(ribs, -1.5), 240.0)


# --------------------------------------------------------------------------- the spleen's frame and size
@dataclass(frozen=True)
class SpleenFrame:
    """Where the spleen lies against the posterolateral wall and its shape, before it is sized."""

    ratios: np.ndarray  # semi-axes (length, width along the wall, thickness) per unit of scale
    wall: np.ndarray  # (l, a) of the cavity wall where it lies
    normal: np.ndarray  # the wall's inward normal there
    centre_s: float  # its level
    tilt: float  # radians, lower pole forwards
    frame: np.ndarray  # rows: long, width and thickness axes
    bend: float  # curvature along the wall: a crescent
    notch: float  # depth of the hilum's medial groove
    wobble: list  # lobulation terms


@dataclass(frozen=True)
class Spleen:
    """The sized spleen: its clipped shape, its sampled raw shape, box, centre, semi-axes and landmarks."""

    shape: Field  # clipped by the wall and the diaphragm: exactly the label
    raw: Field  # the unclipped shape, read from a sampled array
    box: Box
    centre: np.ndarray
    axes: np.ndarray  # semi-axes: length, width, thickness
    centre_s: float
    bottom: float  # level of the lower pole
    normal: np.ndarray  # inward normal of the wall it lies against
    hilum: np.ndarray  # where the vessels enter

    def outside(self, gap: float) -> Field:
        """Negative where a neighbour may lie: ``gap`` mm or more from the spleen."""
        raw = self.raw
        return lambda L, A, S: gap - raw(L, A, S)


def _plan_spleen_frame(body: Body) -> SpleenFrame:
    """Draw the spleen's proportions and its place against the wall (the ribs) along the wall's inward normal."""
    rng = body.rng
    ratios = np.array([rng.uniform(1.0, 1.25), rng.uniform(0.58, 0.7), rng.uniform(0.32, 0.40)])
    theta = math.radians(rng.uniform(108, 125))  # angle from anterior towards the patient's left
    # the cavity wall there (a super-ellipse like the body) and its inward normal
    cav_half_w, cav_half_d = body.cav_half_w, body.half_d - body.fat - body.muscle
    sx, cy = math.sin(theta), math.cos(theta)
    wall = np.array([cav_half_w * abs(sx) ** (2 / 2.4), -cav_half_d * abs(cy) ** (2 / 2.4)])
    normal = -np.array([abs(wall[0] / cav_half_w) ** 1.4 / cav_half_w, -abs(wall[1] / cav_half_d) ** 1.4 / cav_half_d])
    normal /= np.linalg.norm(normal)  # inward
    tangent = np.array([normal[1], -normal[0]])  # along the wall, towards anterior
    if tangent[1] < 0:
        tangent = -tangent
    sp_centre_s = rng.uniform(-5, 15)
    tilt = math.radians(rng.uniform(12, 28))  # lower pole forwards
    e_thick = np.array([normal[0], normal[1], 0.0])
    e_width = np.array([tangent[0], tangent[1], 0.0])
    e_long = np.array([0.0, 0.0, 1.0])
    e_long, e_width = (math.cos(tilt) * e_long - math.sin(tilt) * e_width,
                       math.sin(tilt) * e_long + math.cos(tilt) * e_width)
    frame = np.stack([e_long, e_width, e_thick]).astype(np.float32)
    bend = rng.uniform(0.006, 0.010)  # follows the curve of the wall: a crescent
    notch = rng.uniform(0.25, 0.45)  # the hilum: a medial groove
    sp_wobble = _wobble(rng, rng.uniform(1.5, 3.0), 40.0, 4)
    return SpleenFrame(ratios, wall, normal, sp_centre_s, tilt, frame, bend, notch, sp_wobble)


def _spleen_at(plan: SpleenFrame, scale: float) -> tuple[Field, np.ndarray, np.ndarray]:
    """The spleen's shape, centre and semi-axes (length, width along the wall, thickness) at a size."""
    frame, bend, notch, sp_wobble = plan.frame, plan.bend, plan.notch, plan.wobble
    axes = (scale * plan.ratios).astype(np.float32)
    inv = 1.0 / axes
    centre = np.array([*(plan.wall + plan.normal * (axes[2] * 0.75)), plan.centre_s], dtype=np.float32)

    def shape(L, A, S):
        d = (L - centre[0], A - centre[1], S - centre[2])
        u = [frame[i, 0] * d[0] + frame[i, 1] * d[1] + frame[i, 2] * d[2] for i in range(3)]
        u[2] = u[2] - bend * (u[1] ** 2 + 0.5 * u[0] ** 2)
        # thinner towards the tips, with a groove where the vessels enter
        u[2] = u[2] * (1 + notch * np.exp(-(u[0] ** 2 + u[1] ** 2) / (0.2 * axes[1] ** 2)) * (u[2] > 0))
        q = np.sqrt(sum((u[i] * inv[i]) ** 2 for i in range(3)))
        g = np.sqrt(sum((u[i] * inv[i] ** 2) ** 2 for i in range(3)))
        f = q * (q - 1.0) / (g + 1e-6)
        for amp, kl, ka, ks, ph in sp_wobble:
            f = f + amp * np.sin(kl * d[0] + ka * d[1] + ks * d[2] + ph)
        return f

    return shape, centre, axes


def _spleen_volume_ml(body: Body, plan: SpleenFrame, scale: float, step: float = 4.0) -> float:
    """The spleen's volume once clipped by the wall and the diaphragm, on a coarse grid."""
    shape, centre, axes = _spleen_at(plan, scale)
    r = float(axes.max()) * 1.3 + 10
    L, A, S = (np.arange(c - r, c + r, step, dtype=np.float32) for c in centre)
    L, A, S = L[:, None, None], A[None, :, None], S[None, None, :]
    clipped = np.maximum(np.maximum(shape(L, A, S), body.cavity(L, A, S) + 0.5), -body.diaphragm(L, A, S))
    return float(np.count_nonzero(clipped < 0)) * step**3 / 1000


def _plan_spleen(body: Body) -> Spleen:
    """Draw the spleen's target volume and frame, then size it so that its visible part has that volume.

    The spleen's frame comes before the other organs: they are placed around it.
    """
    target_ml = body.rng.uniform(*SPLEEN_TARGET_ML)
    plan = _plan_spleen_frame(body)
    scale = (target_ml * 1000 / (4 / 3 * math.pi * plan.ratios.prod())) ** (1 / 3)
    for _ in range(2):
        scale *= (target_ml / max(_spleen_volume_ml(body, plan, scale), 1.0)) ** (1 / 3)
    spleen_shape, sp_centre, sp_axes = _spleen_at(plan, scale)
    r_max = float(sp_axes.max()) * 1.3 + 10
    spleen_box = tuple((float(c - r_max), float(c + r_max)) for c in sp_centre)
    spleen_bottom = float(sp_centre[2] - sp_axes[0] * math.cos(plan.tilt))
    canvas = body.canvas
    spleen_field = canvas.lookup(canvas.sample(spleen_shape, spleen_box))
    clipped = body.below_diaphragm(intersect(spleen_field, offset(body.cavity, -0.5)))
    normal = plan.normal
    hilum = sp_centre + np.array([*(normal * sp_axes[2] * 1.1), 0.0], dtype=np.float32)
    return Spleen(clipped, spleen_field, spleen_box, sp_centre, sp_axes, plan.centre_s, spleen_bottom, normal, hilum)


# --------------------------------------------------------------------------- the organs around the spleen
def _paint_bowel(body: Body, spleen: Spleen) -> None:
    """Small-bowel loops and the colon, with fluid, an enhancing wall and air-fluid levels."""
    rng, canvas, cavity, below_diaphragm = body.rng, body.canvas, body.cavity, body.below_diaphragm
    cav_half_w, spine_a, s_bottom = body.cav_half_w, body.spine.a, body.s_bottom
    loops = int(rng.integers(30, 45))
    for _ in range(loops):
        c0 = np.array([rng.uniform(-0.85, 0.85) * cav_half_w, rng.uniform(spine_a + 15, body.cav_front - 10),
                       rng.uniform(s_bottom - 10, spleen.centre_s - 30)])
        direction = rng.normal(size=3)
        direction /= np.linalg.norm(direction)
        c1 = c0 + direction * rng.uniform(20, 70)
        radius = rng.uniform(8, 13)
        tube = below_diaphragm(intersect(capsule(c0, c1, radius), offset(cavity, -3.0)))
        box = _box(np.minimum(c0, c1) - radius - 2, np.maximum(c0, c1) + radius + 2)
        canvas.paint(tube, 85.0 * body.enhancement, box)  # enhancing wall
        canvas.paint(offset(tube, -2.0), rng.uniform(5, 35), box)
        if rng.random() < 0.3:
            level = float(rng.uniform(c0[1], c0[1] + radius))
            canvas.paint(intersect(offset(tube, -2.0), lambda L, A, S, lv=level: lv - A),
                         -1000.0, box)
    colon_r = rng.uniform(14, 19)
    sp_centre, spleen_bottom = spleen.centre, spleen.bottom
    flexure = np.array([sp_centre[0] - 15, sp_centre[1] + spleen.axes[1] + colon_r, spleen_bottom + 15])
    colon_path = [
        np.array([-cav_half_w + colon_r + 6, spine_a + 20, s_bottom - 20]),
        np.array([-cav_half_w + colon_r + 8, spine_a + 30, -45.0]),
        np.array([0.0, body.cav_front - colon_r - 8, -40.0]),
        flexure,
        np.array([cav_half_w - colon_r - 6, spine_a + 20, spleen_bottom - 30]),
        np.array([cav_half_w - colon_r - 8, spine_a + 25, s_bottom - 20]),
    ]
    stool = _texture(rng, 1.0, 8.0, 12)
    for p0, p1 in zip(colon_path[:-1], colon_path[1:], strict=True):
        tube = below_diaphragm(intersect(capsule(p0, p1, colon_r), offset(cavity, -3.0)))
        box = _box(np.minimum(p0, p1) - colon_r - 2, np.maximum(p0, p1) + colon_r + 2)
        canvas.paint(tube, 70.0, box)
        canvas.paint(offset(tube, -2.0), lambda L, A, S: np.clip(-300.0 + 450 * stool(L, A, S), -950, 60), box)
        level = float((p0[1] + p1[1]) / 2 + rng.uniform(-2, 10))
        canvas.paint(intersect(offset(tube, -2.0), lambda L, A, S, lv=level: lv - A), -1000.0, box)


def _paint_liver(body: Body, spleen: Spleen) -> None:
    """The liver (right upper quadrant, its left lobe reaching across), its veins and the gallbladder."""
    rng, canvas, cavity, enhancement = body.rng, body.canvas, body.cavity, body.enhancement
    cav_centre, cav_front, dome = body.cav_centre, body.cav_front, body.dome
    liver_hu = 105.0 * enhancement + rng.uniform(-8, 8)
    liver_tex = _texture(rng, 5.0, 25.0)
    liver = body.below_diaphragm(intersect(
        union(ellipsoid((-rng.uniform(35, 50), cav_centre - 5, dome - 75), (rng.uniform(80, 95), 90, 85),
                        (0, rng.uniform(-10, 10), rng.uniform(-10, 10)), _wobble(rng, 3.0, 80)),
              ellipsoid((10.0, cav_front - 30, dome - 35), (rng.uniform(35, 50), 28, 38), (0, 0, -15))),
        offset(cavity, -1.0),
        spleen.outside(6.0),
    ))
    liver_box = ((-body.cav_half_w, 100), (body.cav_back, cav_front), (dome - 200, dome + 5))
    canvas.paint(liver, lambda L, A, S: liver_hu + liver_tex(L, A, S), liver_box)
    for _ in range(int(rng.integers(5, 9))):  # portal and hepatic veins
        p0 = np.array([rng.uniform(-80, -10), rng.uniform(cav_centre - 30, cav_centre + 40),
                       rng.uniform(-20, dome - 20)])
        p1 = p0 + rng.normal(scale=25, size=3)
        canvas.paint(intersect(capsule(p0, p1, rng.uniform(2.5, 5.5)), offset(liver, -3.0)),
                     liver_hu + 45 * enhancement, _box(np.minimum(p0, p1) - 8, np.maximum(p0, p1) + 8))
    gb = np.array([-rng.uniform(25, 45), cav_front - rng.uniform(25, 40), dome - rng.uniform(100, 120)])
    canvas.paint(intersect(ellipsoid(gb, (14, 13, 28), (20, 0, 0)), offset(liver, 6.0)), 12.0,
                 _box(gb - 35, gb + 35))


def _paint_stomach(body: Body, spleen: Spleen) -> None:
    """The stomach, medial and anterior to the spleen, with an air-fluid level (the patient is supine)."""
    rng, canvas = body.rng, body.canvas
    st_axes = np.array([rng.uniform(28, 36), rng.uniform(32, 42), rng.uniform(45, 60)])
    st_c = np.array([*(spleen.hilum[:2] + spleen.normal * (st_axes[0] * 0.8) + np.array([0.0, 15.0])),
                     spleen.centre_s + rng.uniform(5, 20)])
    stomach = body.below_diaphragm(intersect(
        ellipsoid(st_c, st_axes, (rng.uniform(-20, 0), 0, rng.uniform(-40, -10)), _wobble(rng, 2.0, 40)),
        offset(body.cavity, -2.0), spleen.outside(3.0)))
    st_box = _box(st_c - 75, st_c + 75)
    canvas.paint(stomach, 85.0 * body.enhancement, st_box)
    canvas.paint(offset(stomach, -3.5), rng.uniform(5, 25), st_box)
    st_level = float(st_c[1] + rng.uniform(-5, 25))
    canvas.paint(intersect(offset(stomach, -3.5), lambda L, A, S: st_level - A), -1000.0, st_box)


def _paint_pancreas(body: Body, spleen: Spleen) -> None:
    """The pancreas' body and tail running towards the splenic hilum, the splenic vein behind it."""
    canvas, enhancement, normal, aorta_a = body.canvas, body.enhancement, spleen.normal, body.vessels.aorta_c[1]
    pan_path = [np.array([-25.0, aorta_a + 28, -30.0]), np.array([15.0, aorta_a + 24, -20.0]),
                spleen.hilum + np.array([-normal[0] * 12, -normal[1] * 12 + 8, -8.0])]
    pan_r = body.rng.uniform(8, 11)
    for p0, p1 in zip(pan_path[:-1], pan_path[1:], strict=True):
        canvas.paint(body.below_diaphragm(capsule(p0, p1, pan_r)), 95.0 * enhancement,
                     _box(np.minimum(p0, p1) - 15, np.maximum(p0, p1) + 15))
        v0, v1 = p0 + np.array([0, -pan_r, 0]), p1 + np.array([0, -pan_r, 0])
        canvas.paint(capsule(v0, v1, 4.0), 150.0 * enhancement,
                     _box(np.minimum(v0, v1) - 8, np.maximum(v0, v1) + 8))


def _paint_kidneys(body: Body, spleen: Spleen) -> None:
    """Both kidneys (cortex, medulla, sinus fat); the left one just below the spleen."""
    rng, canvas, enhancement = body.rng, body.canvas, body.enhancement
    for side in (-1, 1):
        k_axes = np.array([rng.uniform(22, 27), rng.uniform(18, 24), rng.uniform(48, 58)])
        top = ((spleen.bottom + spleen.axes[0] * rng.uniform(0.3, 0.6)) if side > 0
               else body.dome - rng.uniform(120, 140))
        kc = np.array([side * rng.uniform(55, 66), body.spine.a + rng.uniform(0, 8), top - k_axes[2]])
        angles = (rng.uniform(-10, 10), side * rng.uniform(8, 18), side * rng.uniform(20, 35))
        kidney = intersect(ellipsoid(kc, k_axes, angles), offset(body.cavity, -1.0), spleen.outside(3.0))
        box = _box(kc - 75, kc + 75)
        canvas.paint(kidney, 175.0 * enhancement, box)
        canvas.paint(ellipsoid(kc, k_axes * (0.6, 0.55, 0.8), angles), 115.0 * enhancement, box)
        canvas.paint(ellipsoid(kc - np.array([side * k_axes[0] * 0.55, -5, 0]), (9, 8, 22), angles), -80.0, box)


def _paint_spleen(body: Body, spleen: Spleen) -> np.ndarray:
    """The spleen itself, painted last so that its voxels are exactly the label it returns."""
    rng = body.rng
    mask = np.zeros(body.geometry.shape, dtype=bool)
    sp_hu = 120.0 * body.enhancement + rng.uniform(-8, 8)
    sp_tex = _texture(rng, 5.0, 20.0)
    body.canvas.paint(spleen.shape, lambda L, A, S: sp_hu + sp_tex(L, A, S), spleen.box, mask=mask)
    return mask


def _add_noise(body: Body) -> np.ndarray:
    """Correlated noise, clipped to the scanner's range and rounded to int16 HU."""
    spacing = body.geometry.spacing
    noise_sd = body.rng.uniform(9, 16) * math.sqrt(3.0 / spacing[2]) ** 0.5
    image = body.canvas.image
    image += noise_sd * _smooth_noise(body.rng, body.geometry.shape, sigma=0.7 / max(spacing[0], 0.5))
    np.clip(image, -1024, 3071, out=image)
    return np.rint(image).astype(np.int16)


def render_case(seed: int, case: int, matrix: int = 256, slice_spacing: float | None = None,
                orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, CaseGeometry]:
    """Draw one phantom: int16 HU image, uint8 spleen label and the grid, all from (seed, case).

    The order of the steps is the order of the random draws: changing it changes every file.
    """
    # two streams: the anatomy does not change when only the grid (matrix, slices) does
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case), 1]))
    grid_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case), 2]))
    body = _plan_body(rng, grid_rng, matrix, slice_spacing, orientation or ORIENTATIONS[case % len(ORIENTATIONS)])
    _paint_wall_and_table(body)
    _paint_chest(body)
    spleen = _plan_spleen(body)
    _paint_bowel(body, spleen)
    _paint_liver(body, spleen)
    _paint_stomach(body, spleen)
    _paint_pancreas(body, spleen)
    _paint_kidneys(body, spleen)
    _paint_skeleton_and_vessels(body)  # over the organs
    label = _paint_spleen(body, spleen)
    return _add_noise(body), label.astype(np.uint8), body.geometry


# --------------------------------------------------------------------------- writing files
def nifti_bytes(data: np.ndarray, affine: np.ndarray, level: int = GZIP_LEVEL) -> bytes:
    """A gzipped NIfTI-1 file as bytes, with a fixed gzip header so equal data gives equal bytes."""
    import nibabel as nib

    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    return gzip.compress(img.to_bytes(), compresslevel=level, mtime=0)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def msd_description(training: list[str], test: list[str], description: str) -> dict:
    """A dataset.json with exactly the keys of MSD Task09's."""
    return {
        "name": "Spleen",
        "description": description,
        "reference": "Synthetic phantoms made by spleenkit (MSD Task09 layout: Memorial Sloan Kettering Cancer Center)",
        "licence": "CC-BY-SA 4.0",
        "release": "1.0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "spleen"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [{"image": f"./imagesTr/{n}", "label": f"./labelsTr/{n}"} for n in training],
        "test": [f"./imagesTs/{n}" for n in test],
    }


def _synthetic_description(manifest: Path) -> str | None:
    """The description in ``manifest`` if it is a synthetic dataset written by this module, else None."""
    try:
        description = json.loads(manifest.read_text()).get("description")
    except (OSError, ValueError, AttributeError):
        return None
    return description if isinstance(description, str) and description.startswith(_PREFIX) else None


_PREFIX = "Synthetic abdominal CT phantoms with spleen labels (spleenkit"


def _description(cases: int, test_cases: int, seed: int, matrix: int, slice_spacing: float | None) -> str:
    from spleenkit import __version__

    slices = f"{slice_spacing:g} mm slices" if slice_spacing else "1.5-5 mm slices"
    return (f"{_PREFIX} {__version__}; seed {seed}, "
            f"{cases} labelled + {test_cases} test cases, {matrix}x{matrix} matrix, {slices})")


def _holds_this_set(out: Path, description: str, overwrite: bool) -> bool:
    """True if ``out`` already holds this very set; refuses a file, foreign files, or another set without overwrite."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise BadInputError("exists and is not a folder", out)
    existing = _synthetic_description(out / "dataset.json")
    if existing == description and not overwrite:
        return True
    if any(out.iterdir()):
        if existing is None:  # never delete what the kit did not make
            raise BadInputError("exists and holds files that are not a synthetic dataset made by spleenkit; "
                                "refusing to replace them: choose a new or empty folder", out)
        if not overwrite:
            raise BadInputError("exists and holds another synthetic dataset; choose another folder or "
                                "replace it (overwrite=True; --force on the command line)", out)
    return False


def _staging_folder(out: Path) -> Path:
    """A new hidden folder beside ``out`` to build the set in (renamed into place at the end)."""
    parent = out.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as error:
        raise BadInputError(f"cannot write here ({error.strerror})", parent) from error


def _write_case(staging: Path, seed: int, matrix: int, slice_spacing: float | None, job: tuple[int, bool]) -> None:
    """Render case ``job = (number, labelled)`` and write its image (and label) under ``staging``."""
    number, labelled = job
    image, label, geometry = render_case(seed, number, matrix, slice_spacing)
    name = f"spleen_{number}.nii.gz"
    folder = "imagesTr" if labelled else "imagesTs"
    write_bytes(staging / folder / name, nifti_bytes(image, geometry.affine))
    if labelled:
        write_bytes(staging / "labelsTr" / name, nifti_bytes(label, geometry.affine))
    log.debug("case %s: %s voxels at %s mm, %s, spleen %.0f mL", name, geometry.shape, geometry.spacing,
              geometry.orientation, label.sum() * float(np.prod(geometry.spacing)) / 1000)


def _move_into_place(staging: Path, out: Path) -> None:
    """Rename the finished set to ``out``, moving an old one aside first and deleting it only afterwards."""
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, trash / out.name)
        os.replace(staging, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(staging, out)


def write_synthetic_dataset(out_dir: str | os.PathLike[str], cases: int = 12, seed: int = 0, test_cases: int = 2,
                            matrix: int = 256, slice_spacing: float | None = None, overwrite: bool = False,
                            workers: int = 1) -> Path:
    """Write ``cases`` labelled and ``test_cases`` unlabelled phantoms in the MSD Task09 layout.

    Files are ``spleen_N.nii.gz`` (int16 images, uint8 labels) under imagesTr/, labelsTr/ and
    imagesTs/, with a dataset.json. The set is built in a temporary folder beside ``out_dir``
    and renamed into place at the end. If ``out_dir`` already holds the same set (same
    description in dataset.json), nothing is done; another synthetic set there is replaced
    only with ``overwrite``, and a folder holding anything else is never touched.
    ``matrix`` sets the in-plane size (256 gives about 0.85-1.05 mm voxels over the abdomen);
    ``slice_spacing`` fixes the slice spacing (else 1.5-5 mm, drawn per case).
    """
    if cases < 1 or test_cases < 0:
        raise BadInputError(f"need at least one labelled case and no negative test cases (got {cases}, {test_cases})")
    if matrix < 32:
        raise BadInputError(f"matrix {matrix} is too small; use 32 or more (256 is realistic)")
    out = Path(out_dir).absolute()
    description = _description(cases, test_cases, seed, matrix, slice_spacing)
    if _holds_this_set(out, description, overwrite):
        log.info("%s already holds this synthetic dataset; nothing to do", out)
        return out
    staging = _staging_folder(out)
    started = time.perf_counter()
    try:
        os.chmod(staging, 0o777 & ~_umask())
        for sub in ("imagesTr", "labelsTr", "imagesTs"):
            (staging / sub).mkdir()
        jobs = [(number, number <= cases) for number in range(1, cases + test_cases + 1)]
        make = functools.partial(_write_case, staging, seed, matrix, slice_spacing)
        if workers > 1:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(make, jobs))
        else:
            for job in jobs:
                make(job)
        names = [f"spleen_{n}.nii.gz" for n, labelled in jobs if labelled]
        tests = [f"spleen_{n}.nii.gz" for n, labelled in jobs if not labelled]
        payload = json.dumps(msd_description(names, tests, description), indent=4).encode()
        write_bytes(staging / "dataset.json", payload)
        _move_into_place(staging, out)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise BadInputError(f"cannot write the dataset ({error.strerror or error})", getattr(error, "filename", out)
                            or out) from error
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("wrote %d labelled and %d test phantoms to %s in %.1f s", cases, test_cases, out,
             time.perf_counter() - started)
    return out
