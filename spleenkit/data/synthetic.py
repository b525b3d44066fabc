"""Synthetic abdominal CT phantoms with spleen labels, written in the MSD Task09 layout.

Each case is drawn in millimetres in the patient's frame (``l`` towards the patient's left,
``a`` anterior, ``s`` superior) and rendered on the voxel grid of its NIfTI affine, so a case
stored with flipped axes (LPS-like, as many MSD headers are) shows the same anatomy in world
space. A case is first described (:class:`Body`, the tissues' Hounsfield units, the spleen's
plan) and then painted organ by organ, from the table and the body wall inwards: lung bases and
heart, bowel, liver, stomach, pancreas, kidneys, bladder, spine, pelvis, vessels, ribs and
finally the spleen, whose inside is exactly the label. Organs are signed-distance fields
blended with partial volume, which gives smooth boundaries.

The cases vary as real abdominal CTs do, so that a network trained on them has to find the
spleen by its shape and place: field of view (lung bases or the spleen's middle down to the
upper abdomen or the pelvis), patient size, arms raised or beside the trunk, slice spacing
1.5-8 mm, contrast phase (non-contrast, arterial, portal venous) with random per-tissue
shifts as in SynthSeg, oral contrast or not, bias, streaks and noise; spleens of 50-800 mL.
The same seed gives byte-identical files.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from spleenkit import __version__
from spleenkit.errors import BadInputError
from spleenkit.io import clean_stale_temporaries, temporary_name, write_bytes

log = logging.getLogger(__name__)

#: Slice spacings (mm) and how often each is drawn; MSD Task09 spans about 1.5-8 mm.
SLICE_SPACINGS: tuple[float, ...] = (1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0)
SLICE_WEIGHTS: tuple[float, ...] = (0.08, 0.08, 0.12, 0.14, 0.16, 0.26, 0.08, 0.08)
#: At most this many slices (MSD's longest case has 168): thin-slice scans cover a shorter range.
MAX_SLICES = 170
#: At most this much of the body along the slices (mm): about MSD's longest scans (168 slices of 2.5 mm).
MAX_SCAN_LENGTH_MM = 420.0
#: The reconstruction diameter's range (mm): MSD's 512 x 512 at 0.6-0.9 mm.
FIELD_OF_VIEW_MM = (310.0, 460.0)
#: In-plane matrix of the default dataset: 256 x 256, about 1.2-1.8 mm voxels over a 310-460 mm field of view.
#: MSD's 512 x 512 (0.6-0.9 mm) takes ``matrix=512``: four times slower to draw and load, and no better for
#: the recipes here, which resample to 1.5 mm or coarser before the network sees a voxel.
DEFAULT_MATRIX = 256
#: Voxel orderings the cases cycle through: RAS+, LPS-like (x and y flipped), LAS (x flipped).
ORIENTATIONS: tuple[str, ...] = ("RAS", "LPS", "LAS")
#: Spleen volumes (mL) the phantoms span, from small to splenomegaly; drawn log-uniformly.
SPLEEN_VOLUME_ML = (50.0, 800.0)
SPLEEN_TARGET_ML = (60.0, 750.0)
#: Contrast phases and how often each is drawn.
PHASES: tuple[str, ...] = ("non-contrast", "arterial", "portal venous")
PHASE_WEIGHTS: tuple[float, ...] = (0.4, 0.15, 0.45)
#: Typical Hounsfield units of the soft tissues in each phase (in the order of PHASES).
TISSUE_HU: dict[str, tuple[float, float, float]] = {
    "spleen": (45.0, 120.0, 115.0),
    "liver": (55.0, 75.0, 105.0),
    "kidney_cortex": (32.0, 190.0, 170.0),
    "kidney_medulla": (32.0, 90.0, 125.0),
    "pancreas": (40.0, 110.0, 95.0),
    "blood": (42.0, 230.0, 150.0),  # aorta and arteries
    "vein": (42.0, 120.0, 150.0),  # portal, splenic and hepatic veins, vena cava
    "muscle": (50.0, 55.0, 58.0),
    "bowel_wall": (40.0, 95.0, 85.0),
    "heart": (42.0, 200.0, 140.0),
}
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
        f = np.asarray(field(L, A, S), dtype=np.float32)  # a shape constant along s stays 2-D: cheaper
        alpha = np.clip(0.5 - f / np.float32(self.blur), 0.0, 1.0)
        value = hu(L, A, S) if callable(hu) else np.float32(hu)
        region = self.image[sl]
        change = value - region
        change *= alpha
        region += change
        if mask is not None:
            mask[sl] |= np.broadcast_to(f < 0, region.shape)


# --------------------------------------------------------------------------- one case: the scan's grid
@dataclass(frozen=True)
class CaseGeometry:
    """Grid of one case: matrix, spacing (mm), orientation code and the world affine."""

    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    orientation: str
    affine: np.ndarray


def draw_slice_spacing(rng: np.random.Generator, slice_spacing: float | None = None) -> float:
    """The slice spacing of one case (mm): ``slice_spacing`` if given, else drawn from SLICE_SPACINGS."""
    return float(slice_spacing) if slice_spacing else float(rng.choice(SLICE_SPACINGS, p=SLICE_WEIGHTS))


def _grid(rng: np.random.Generator, matrix: int, dz: float, orientation: str, fov: float, s_top: float,
          s_bottom: float) -> tuple[CaseGeometry, np.ndarray, np.ndarray, np.ndarray]:
    """The voxel grid and the patient-frame coordinate of each index."""
    inplane = fov / matrix
    nz = max(8, int(round((s_top - s_bottom) / dz)))
    shape = (matrix, matrix, nz)
    # world (RAS) centre of the volume, in scanner coordinates, and where the patient's midline lies:
    # patients are rarely exactly in the middle of the field of view
    centre = np.array([rng.uniform(-20, 20), rng.uniform(-200, -150), (s_top + s_bottom) / 2 + 400.0])
    patient = centre + np.array([rng.uniform(-0.05, 0.05) * fov, rng.uniform(-0.02, 0.05) * fov, 0.0])
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


# --------------------------------------------------------------------------- one case: what the scan shows
def draw_tissues(rng: np.random.Generator) -> dict[str, float]:
    """Hounsfield units of every tissue of one case: a contrast phase, then random shifts per tissue.

    The phase gives the typical values (:data:`TISSUE_HU`); every soft tissue then moves a little and,
    in about a third of the cases, a lot (each on its own, as SynthSeg randomises its tissues), so that
    a network cannot find the spleen by its brightness alone and must learn its shape and place.
    """
    phase = int(rng.choice(len(PHASES), p=PHASE_WEIGHTS))
    spread = 30.0 if rng.random() < 0.35 else 8.0
    hu = {name: float(np.clip(values[phase] + rng.normal(0, spread), -15, 240)) for name, values in TISSUE_HU.items()}
    hu["phase"] = float(phase)
    hu["fat"] = rng.uniform(-120, -80)
    hu["lung"] = rng.uniform(-900, -800)
    hu["fluid"] = rng.uniform(-5, 25)
    hu["cortex"] = rng.uniform(450, 900)  # cortical bone
    hu["marrow"] = rng.uniform(120, 300)  # cancellous bone
    hu["bowel_content"] = rng.uniform(150, 450) if rng.random() < 0.35 else hu["fluid"]  # oral contrast or not
    hu["texture"] = rng.uniform(12, 25) if phase == 1 else rng.uniform(2, 7)  # arterial spleen: mottled
    return hu


@dataclass(frozen=True)
class Body:
    """The patient: outline, wall, levels (mm, ``s`` = 0 near the splenic hilum) and the visceral cavity."""

    half_w: float  # half the left-right width of the trunk
    half_d: float  # half its anterior-posterior depth
    fat: float  # subcutaneous fat
    muscle: float  # abdominal wall muscle
    dome: float  # top of the right hemidiaphragm
    dome_l: float  # top of the left one
    k_dome: float  # curvature of the domes
    spine_a: float  # anterior position of the vertebral bodies' centre
    vb_r: float  # vertebral body radius
    crest: float  # iliac crests
    hip: float  # centre of the femoral heads
    s_top: float  # the scan's extent
    s_bottom: float
    arm_r: float  # radius of the arms when they lie beside the trunk; 0 when they are raised

    @property
    def cav_half_w(self) -> float:
        return self.half_w - self.fat - self.muscle

    @property
    def cav_half_d(self) -> float:
        return self.half_d - self.fat - self.muscle

    @property
    def cav_front(self) -> float:
        return self.half_d - 1.3 * self.fat - self.muscle

    @property
    def cav_back(self) -> float:  # the deepest the cavity goes, beside the spine (for bounding boxes)
        return self.spine_a - 50

    def outline(self, L, A, S):
        return cylinder_2d((0.0, 0.0), (self.half_w, self.half_d), power=2.4)(L, A, S)

    def under_fat(self, L, A, S):  # the fat is thicker in front than behind
        return self.outline(L, A, S) + self.fat * (1.0 + 0.3 * A / np.sqrt(L**2 + A**2 + 1.0))

    def cavity(self, L, A, S):  # behind, the spine and its muscles bulge in at the midline
        back = self.spine_a - 8 - 42.0 * (1 - np.exp(-((L / 36.0) ** 2))) - A
        return np.maximum(self.under_fat(L, A, S) + self.muscle, back)

    def diaphragm(self, L, A, S):  # > 0 below the diaphragm (abdomen), in mm of height
        right = self.dome - self.k_dome * ((L + 45) ** 2 + (A - 5) ** 2)
        left = self.dome_l - self.k_dome * ((L - 50) ** 2 + (A + 5) ** 2)
        return np.maximum(right, left) - S

    def below_diaphragm(self, f: Field) -> Field:
        return lambda L, A, S: np.maximum(f(L, A, S), -self.diaphragm(L, A, S))

    def in_abdomen(self, f: Field, margin: float = 1.0) -> Field:
        """``f`` clipped to the visceral cavity below the diaphragm."""
        return self.below_diaphragm(intersect(f, offset(self.cavity, -margin)))


def draw_body(rng: np.random.Generator, dz: float) -> Body:
    """Patient size and the scan's range: from the lung bases (or the spleen's middle) down to the
    upper abdomen or the pelvis; thin slices cover less, as in MSD (at most MAX_SLICES slices and
    MAX_SCAN_LENGTH_MM)."""
    width = rng.uniform(250, 370)  # left-right trunk width (mm)
    depth = width * rng.uniform(0.68, 0.82)
    fat = rng.uniform(6, 10) + width * rng.uniform(0.0, 0.08)
    muscle = rng.uniform(8, 14)
    dome = rng.uniform(55, 80)
    crest = -rng.uniform(140, 175)
    hip = crest - rng.uniform(95, 115)
    s_top = dome + rng.uniform(-45, 60)
    s_bottom = rng.uniform(-120, -80) if rng.random() < 0.35 else hip - rng.uniform(20, 80)
    s_bottom = max(s_bottom, s_top - MAX_SLICES * dz, s_top - MAX_SCAN_LENGTH_MM)
    arm_r = rng.uniform(32, 45) if rng.random() < 0.3 else 0.0
    spine_a = -depth / 2 + 0.7 * fat + rng.uniform(46, 56)
    return Body(width / 2, depth / 2, fat, muscle, dome, dome - rng.uniform(8, 20), rng.uniform(0.006, 0.009),
                spine_a, rng.uniform(16, 19), crest, hip, s_top, s_bottom, arm_r)


def field_of_view(rng: np.random.Generator, body: Body) -> float:
    """The reconstruction diameter (mm): the trunk with a margin and, when they are down, part or all of
    the arms (scans often cut them off at the edges); 310-460 mm, so 0.6-0.9 mm voxels at 512 x 512 as in MSD."""
    arms = (4 * body.arm_r + 30) * rng.uniform(0.2, 1.0) if body.arm_r else 0.0
    return float(np.clip(2 * body.half_w + rng.uniform(10, 45) + arms, *FIELD_OF_VIEW_MM))


# --------------------------------------------------------------------------- the spleen's plan
@dataclass(frozen=True)
class Spleen:
    """Where the spleen lies: its (sampled) shape, centre, semi-axes, bounding box and neighbours' anchors."""

    shape: Field  # signed distance, before clipping by the wall and the diaphragm
    inside: Field  # the spleen as painted: clipped
    centre: np.ndarray
    axes: np.ndarray  # length, width along the wall, thickness
    box: Box
    bottom: float  # lowest point (mm)
    hilum: np.ndarray
    normal: np.ndarray  # inward normal of the wall where it lies

    def outside(self, gap: float) -> Field:
        """Negative more than ``gap`` mm away from the spleen: keeps neighbours from overlapping it."""
        return lambda L, A, S: gap - self.shape(L, A, S)


def _spleen_frame(rng: np.random.Generator, body: Body) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The wall point the spleen rests on, the inward normal there and the spleen's axes' frame."""
    theta = math.radians(rng.uniform(100, 135))  # angle from anterior towards the patient's left
    sx, cy = math.sin(theta), math.cos(theta)
    w, d = body.cav_half_w, body.cav_half_d
    wall = np.array([w * abs(sx) ** (2 / 2.4), -d * abs(cy) ** (2 / 2.4)])
    normal = -np.array([abs(wall[0] / w) ** 1.4 / w, -abs(wall[1] / d) ** 1.4 / d])
    normal /= np.linalg.norm(normal)  # inward
    tangent = np.array([normal[1], -normal[0]])  # along the wall, towards anterior
    if tangent[1] < 0:
        tangent = -tangent
    tilt = math.radians(rng.uniform(10, 35))  # lower pole forwards
    e_thick = np.array([normal[0], normal[1], 0.0])
    e_width = np.array([tangent[0], tangent[1], 0.0])
    e_long = np.array([0.0, 0.0, 1.0])
    e_long, e_width = (math.cos(tilt) * e_long - math.sin(tilt) * e_width,
                       math.sin(tilt) * e_long + math.cos(tilt) * e_width)
    return wall, normal, np.stack([e_long, e_width, e_thick]).astype(np.float32)


def _spleen_shape(rng: np.random.Generator, body: Body) -> tuple[Callable, float, np.ndarray]:
    """The spleen's shape as a function of its size (a crescent along the wall with a hilar groove), the
    volume to size it to (mL) and the wall's inward normal where it lies."""
    target_ml = float(np.exp(rng.uniform(*np.log(SPLEEN_TARGET_ML))))
    ratios = np.array([rng.uniform(0.95, 1.3), rng.uniform(0.5, 0.78), rng.uniform(0.28, 0.42)])
    ratios[0] *= (target_ml / 250.0) ** 0.12  # big spleens grow mostly downwards
    wall, normal, frame = _spleen_frame(rng, body)
    top_gap = rng.uniform(-5, 20)  # how far below the left dome the spleen's top lies
    bend = rng.uniform(0.004, 0.013)  # follows the curve of the wall: a crescent
    notch = rng.uniform(0.2, 0.55)  # the hilum: a medial groove
    wobble = _wobble(rng, rng.uniform(1.0, 5.0), rng.uniform(30, 50), 5)

    def at(scale: float) -> tuple[Field, np.ndarray, np.ndarray]:
        axes = (scale * ratios).astype(np.float32)
        top = body.dome_l - 25.0 - top_gap
        centre = np.array([*(wall + normal * (axes[2] * 0.75)), top - axes[0] * 0.85], dtype=np.float32)
        inv = 1.0 / axes

        def shape(L, A, S):
            d = (L - centre[0], A - centre[1], S - centre[2])
            u = [frame[i, 0] * d[0] + frame[i, 1] * d[1] + frame[i, 2] * d[2] for i in range(3)]
            u[2] = u[2] - bend * (u[1] ** 2 + 0.5 * u[0] ** 2)
            # thinner towards the tips, with a groove where the vessels enter
            u[2] = u[2] * (1 + notch * np.exp(-(u[0] ** 2 + u[1] ** 2) / (0.2 * axes[1] ** 2)) * (u[2] > 0))
            q = np.sqrt(sum((u[i] * inv[i]) ** 2 for i in range(3)))
            g = np.sqrt(sum((u[i] * inv[i] ** 2) ** 2 for i in range(3)))
            f = q * (q - 1.0) / (g + 1e-6)
            for amp, kl, ka, ks, ph in wobble:
                f = f + amp * np.sin(kl * d[0] + ka * d[1] + ks * d[2] + ph)
            return f

        return shape, centre, axes

    return at, target_ml, normal


def plan_spleen(rng: np.random.Generator, body: Body, canvas: Canvas) -> Spleen:
    """Draw the spleen and size it so that its visible part (inside the wall, under the diaphragm) has a
    volume drawn from :data:`SPLEEN_TARGET_ML`; the other organs are then placed around it."""
    at, target_ml, normal = _spleen_shape(rng, body)

    def volume_ml(scale: float, step: float = 4.0) -> float:
        shape, centre, axes = at(scale)
        r = float(axes.max()) * 1.3 + 10
        L, A, S = (np.arange(c - r, c + r, step, dtype=np.float32) for c in centre)
        L, A, S = L[:, None, None], A[None, :, None], S[None, None, :]
        clipped = np.maximum(np.maximum(shape(L, A, S), body.cavity(L, A, S) + 0.5), -body.diaphragm(L, A, S))
        return float(np.count_nonzero(clipped < 0)) * step**3 / 1000

    ratios_volume = 4 / 3 * math.pi * float(np.prod(at(1.0)[2]))
    scale = (target_ml * 1000 / ratios_volume) ** (1 / 3)
    for _ in range(3):
        scale *= (target_ml / max(volume_ml(scale), 1.0)) ** (1 / 3)
    shape, centre, axes = at(scale)
    r_max = float(axes.max()) * 1.3 + 10
    box = tuple((float(c - r_max), float(c + r_max)) for c in centre)
    sampled = canvas.lookup(canvas.sample(shape, box))
    hilum = centre + np.array([*(normal * axes[2] * 1.1), 0.0], dtype=np.float32)
    bottom = float(centre[2] - axes[0] * 0.95)
    return Spleen(sampled, body.in_abdomen(sampled, 0.5), centre, axes, box, bottom, hilum, normal)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- painters, outside in
def paint_table(canvas: Canvas, rng: np.random.Generator, body: Body) -> None:
    """The scanner table under the patient: two curved plates with foam between them."""
    table_top = -body.half_d - rng.uniform(1.0, 4.0)
    table_w = body.half_w + 30
    for top, thickness, bend in ((table_top, 3.0, 0.0025), (table_top - 28.0, 4.0, 0.002)):
        def plate(L, A, S, t=top, th=thickness, b=bend):
            return np.abs(A - (t - th / 2) - b * L**2) - th / 2

        canvas.paint(intersect(plate, cylinder_2d((0.0, top), (table_w, 60.0))), rng.uniform(80, 200),
                     ((-table_w, table_w), (top - 70, top + 20), (-1e9, 1e9)))
    canvas.paint(intersect(lambda L, A, S: np.abs(A - (table_top - 14) - 0.002 * L**2) - 10.0,
                           cylinder_2d((0.0, table_top), (table_w - 6, 60.0))), -880.0,
                 ((-table_w, table_w), (table_top - 40, table_top), (-1e9, 1e9)))


def paint_wall(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Skin, subcutaneous fat, the muscle wall, the buttocks' muscles and the fat of the cavity."""
    canvas.paint(body.outline, 20.0)
    canvas.paint(offset(body.outline, -2.0), hu["fat"])
    canvas.paint(body.under_fat, hu["muscle"])
    inner_wall = offset(body.outline, -body.fat)
    for side in (-1, 1):  # back muscles beside the spine, gluteal muscles in the pelvis
        canvas.paint(intersect(ellipsoid((side * 30.0, body.spine_a - 42, 0.0), (28, 24, 1e4)), inner_wall),
                     hu["muscle"] + 2)
        glute = ellipsoid((side * body.half_w * 0.45, -body.half_d + body.fat + 35, body.hip + 30),
                          (body.half_w * 0.4, 40, 80))
        canvas.paint(intersect(glute, inner_wall), hu["muscle"], _box((-1e4, -1e4, body.hip - 60), (1e4, 1e4, 1e4)))
    canvas.paint(body.cavity, hu["fat"] + rng.uniform(0, 15))


def paint_arms(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Arms beside the trunk (when they are not raised above the head): fat, muscle and bone."""
    if not body.arm_r:
        return
    for side in (-1, 1):
        centre = (side * (body.half_w + rng.uniform(8, 25) + body.arm_r), rng.uniform(-15, 20))
        arm = cylinder_2d(centre, (body.arm_r, body.arm_r * rng.uniform(0.9, 1.1)))
        canvas.paint(arm, hu["fat"])
        canvas.paint(offset(arm, -rng.uniform(5, 12)), hu["muscle"])
        bone = cylinder_2d((centre[0] + rng.uniform(-8, 8), centre[1] + rng.uniform(-8, 8)), (9.0, 9.0))
        canvas.paint(bone, hu["cortex"])
        canvas.paint(offset(bone, -2.5), hu["marrow"] - 100)


def paint_chest(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Lung bases and the heart above the diaphragm."""
    above = ((-1e4, 1e4), (-1e4, 1e4), (body.dome - 140, 1e4))
    lung = intersect(offset(body.cavity, -2.0), lambda L, A, S: body.diaphragm(L, A, S) + 2.0)
    level = hu["lung"]
    canvas.paint(lung, lambda L, A, S: level + 25 * np.sin(0.21 * L + 0.17 * A) * np.cos(0.13 * S), above)
    heart = intersect(ellipsoid((12.0, body.cav_front - 55, body.dome + 45), (65, 52, 50), (0, 0, 20)),
                      lambda L, A, S: body.diaphragm(L, A, S) + 1.0, offset(body.cavity, -3.0))
    heart_box = ((-60, 90), (body.cav_back, body.cav_front), (body.dome - 20, 1e9))
    canvas.paint(heart, hu["muscle"] + 40, heart_box)
    canvas.paint(offset(heart, -9.0), hu["heart"], heart_box)


def _tube(canvas: Canvas, rng: np.random.Generator, body: Body, p0: np.ndarray, p1: np.ndarray, radius: float,
          wall: float, content: float | Callable, gas: float | None) -> None:
    """A bowel segment: enhancing wall, content, and air above ``gas`` (mm, anterior) if given."""
    tube = body.in_abdomen(capsule(p0, p1, radius), 3.0)
    box = _box(np.minimum(p0, p1) - radius - 2, np.maximum(p0, p1) + radius + 2)
    canvas.paint(tube, wall, box)
    canvas.paint(offset(tube, -2.0), content, box)
    if gas is not None:
        canvas.paint(intersect(offset(tube, -2.0), lambda L, A, S, lv=gas: lv - A), -1000.0, box)


def paint_small_bowel(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float],
                      spleen: Spleen) -> None:
    """Small-bowel loops filling the abdomen and the pelvis below the spleen: wall, fluid or oral contrast, gas."""
    top = spleen.centre[2] - 30
    low = max(body.s_bottom - 10, body.hip + 40)
    if low >= top:  # the scan ends above the bowel
        return
    loops = int(np.clip((top - low) / 2.0, 15, 120))  # the bowel fills most of the cavity
    for _ in range(loops):
        c0 = np.array([rng.uniform(-0.85, 0.85) * body.cav_half_w, rng.uniform(body.spine_a + 15, body.cav_front - 10),
                       rng.uniform(low, top)])
        direction = rng.normal(size=3)
        c1 = c0 + direction / np.linalg.norm(direction) * rng.uniform(20, 70)
        radius = rng.uniform(9, 15)
        content = hu["bowel_content"] if rng.random() < 0.7 else hu["fluid"]
        gas = float(rng.uniform(c0[1], c0[1] + radius)) if rng.random() < 0.3 else None
        _tube(canvas, rng, body, c0, c1, radius, hu["bowel_wall"], content, gas)


def paint_colon(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float], spleen: Spleen) -> None:
    """The colon framing the abdomen (its splenic flexure below the spleen) and the rectum, with stool and gas."""
    r = rng.uniform(14, 22)
    w, back, front = body.cav_half_w, body.spine_a, body.cav_front
    flexure = np.array([spleen.centre[0] - 15, spleen.centre[1] + spleen.axes[1] + r, spleen.bottom + 15])
    path = [np.array([-w + r + 6, back + 20, body.crest - 20]),
            np.array([-w + r + 8, back + 30, -45.0]),
            np.array([0.0, front - r - 8, rng.uniform(-80, -30)]),
            flexure,
            np.array([w - r - 6, back + 20, spleen.bottom - 30]),
            np.array([w - r - 8, back + 25, body.crest - 10]),
            np.array([rng.uniform(-20, 30), back + 45, body.crest - 60]),
            np.array([0.0, back + 25, body.hip - 20])]
    stool = _texture(rng, 1.0, 8.0, 12)
    air = rng.uniform(0.2, 0.8)  # how much of the stool is gas

    def content(L, A, S):
        return np.clip(-250.0 * air - 100 + 450 * stool(L, A, S), -950, 80)

    for p0, p1 in zip(path[:-1], path[1:], strict=True):
        gas = float((p0[1] + p1[1]) / 2 + rng.uniform(-2, 10)) if rng.random() < 0.6 else None
        _tube(canvas, rng, body, p0, p1, r, hu["bowel_wall"], content, gas)


def paint_liver(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float], spleen: Spleen) -> Field:
    """The liver (right upper quadrant, its left lobe reaching across), its veins and the gallbladder."""
    dome, centre_a = body.dome, (body.cav_front + body.spine_a - 24) / 2
    left_lobe = rng.uniform(30, 75)
    liver = body.in_abdomen(intersect(
        union(ellipsoid((-rng.uniform(35, 50), centre_a - 5, dome - 75),
                        (rng.uniform(80, 100), rng.uniform(65, 85), rng.uniform(75, 90)),
                        (0, rng.uniform(-10, 10), rng.uniform(-10, 10)), _wobble(rng, 3.0, 80)),
              ellipsoid((10.0, body.cav_front - 30, dome - 35), (left_lobe, 28, 38), (0, 0, -15))),
        spleen.outside(rng.uniform(3, 12))))
    texture = _texture(rng, hu["texture"], 25.0)
    level = hu["liver"]
    canvas.paint(liver, lambda L, A, S: level + texture(L, A, S),
                 ((-body.cav_half_w, 130), (body.cav_back, body.cav_front), (dome - 200, dome + 5)))
    for _ in range(int(rng.integers(5, 9))):  # portal and hepatic veins
        p0 = np.array([rng.uniform(-80, -10), rng.uniform(centre_a - 30, centre_a + 40), rng.uniform(-20, dome - 20)])
        p1 = p0 + rng.normal(scale=25, size=3)
        canvas.paint(intersect(capsule(p0, p1, rng.uniform(2.5, 5.5)), offset(liver, -3.0)), hu["vein"],
                     _box(np.minimum(p0, p1) - 8, np.maximum(p0, p1) + 8))
    gb = np.array([-rng.uniform(25, 45), body.cav_front - rng.uniform(25, 40), dome - rng.uniform(100, 120)])
    canvas.paint(intersect(ellipsoid(gb, (14, 13, 28), (20, 0, 0)), offset(liver, 6.0)), hu["fluid"],
                 _box(gb - 35, gb + 35))
    return liver


def paint_stomach(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float], spleen: Spleen) -> None:
    """The stomach medial and anterior to the spleen: wall, content (fluid, food or contrast) and a gas level."""
    axes = np.array([rng.uniform(25, 40), rng.uniform(28, 45), rng.uniform(40, 65)])
    centre = np.array([*(spleen.hilum[:2] + spleen.normal * (axes[0] * 0.8) + np.array([0.0, 15.0])),
                       spleen.centre[2] + rng.uniform(0, 25)])
    stomach = body.in_abdomen(intersect(
        ellipsoid(centre, axes, (rng.uniform(-20, 0), 0, rng.uniform(-40, -10)), _wobble(rng, 2.0, 40)),
        spleen.outside(rng.uniform(2, 6))), 2.0)
    box = _box(centre - 75, centre + 75)
    canvas.paint(stomach, hu["bowel_wall"], box)
    content = float(rng.choice([hu["fluid"], hu["bowel_content"], rng.uniform(-80, 40)]))
    canvas.paint(offset(stomach, -3.5), content, box)
    level = float(centre[1] + rng.uniform(-15, 30))
    canvas.paint(intersect(offset(stomach, -3.5), lambda L, A, S: level - A), -1000.0, box)


def paint_pancreas(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float],
                   spleen: Spleen) -> None:
    """Pancreas body and tail towards the splenic hilum, the splenic vein behind it."""
    front_of_aorta = body.spine_a + body.vb_r + 24
    path = [np.array([-25.0, front_of_aorta + 28, -30.0]), np.array([15.0, front_of_aorta + 24, -20.0]),
            spleen.hilum + np.array([-spleen.normal[0] * 12, -spleen.normal[1] * 12 + 8, -8.0])]
    r = rng.uniform(8, 11)
    for p0, p1 in zip(path[:-1], path[1:], strict=True):
        canvas.paint(body.below_diaphragm(intersect(capsule(p0, p1, r), spleen.outside(2.0))), hu["pancreas"],
                     _box(np.minimum(p0, p1) - 15, np.maximum(p0, p1) + 15))
        v0, v1 = p0 + np.array([0, -r, 0]), p1 + np.array([0, -r, 0])
        canvas.paint(capsule(v0, v1, 4.0), hu["vein"], _box(np.minimum(v0, v1) - 8, np.maximum(v0, v1) + 8))


def paint_kidneys(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float],
                  spleen: Spleen) -> None:
    """Kidneys: cortex, medulla, sinus fat; the left one just below the spleen, the right one lower."""
    for side in (-1, 1):
        axes = np.array([rng.uniform(22, 27), rng.uniform(18, 24), rng.uniform(45, 60)])
        top = spleen.bottom + spleen.axes[0] * rng.uniform(0.3, 0.7) if side > 0 else body.dome - rng.uniform(115, 145)
        centre = np.array([side * rng.uniform(55, 68), body.spine_a + rng.uniform(0, 10), top - axes[2]])
        angles = (rng.uniform(-10, 10), side * rng.uniform(8, 18), side * rng.uniform(20, 35))
        kidney = intersect(ellipsoid(centre, axes, angles), offset(body.cavity, -1.0), spleen.outside(3.0))
        box = _box(centre - 75, centre + 75)
        canvas.paint(kidney, hu["kidney_cortex"], box)
        canvas.paint(ellipsoid(centre, axes * (0.6, 0.55, 0.8), angles), hu["kidney_medulla"], box)
        canvas.paint(ellipsoid(centre - np.array([side * axes[0] * 0.55, -5, 0]), (9, 8, 22), angles), hu["fat"],
                     box)


def paint_bladder(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """The urinary bladder above the pubic bones, filled to a random degree."""
    centre = np.array([rng.uniform(-10, 10), body.cav_front - rng.uniform(35, 55), body.hip + rng.uniform(0, 25)])
    axes = np.array([rng.uniform(25, 55), rng.uniform(20, 40), rng.uniform(18, 40)])
    bladder = intersect(ellipsoid(centre, axes, (0, 0, 0), _wobble(rng, 2.0, 50)), offset(body.cavity, -3.0))
    box = _box(centre - axes - 10, centre + axes + 10)
    canvas.paint(bladder, hu["bowel_wall"], box)
    canvas.paint(offset(bladder, -2.5), hu["fluid"] if rng.random() < 0.85 else rng.uniform(200, 600), box)


def _bone(canvas: Canvas, hu: dict[str, float], shape: Field, box: Box, shell: float = 2.5) -> None:
    """A bone: cortex, then cancellous marrow inside."""
    canvas.paint(shape, hu["cortex"], box)
    canvas.paint(offset(shape, -shell), hu["marrow"], box)


def paint_spine(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Vertebrae (bodies, discs, arches, processes) down to the sacrum, the canal, and the psoas muscles."""
    vb_r, disc_pitch = body.vb_r, rng.uniform(30, 36)
    disc_phase = rng.uniform(0, disc_pitch)
    canal_a = body.spine_a - vb_r - 9
    spinous_tip = max(canal_a - 38, -body.half_d + 0.7 * body.fat + 12)  # under the skin of the back
    column = _box((-90, -body.half_d, body.crest - 25), (90, body.spine_a + 45, 1e9))

    def in_disc(S):
        return np.cos(2 * np.pi * (S + disc_phase) / disc_pitch) > 0.8

    def posterior_elements(L, A, S):
        ring = np.abs(np.sqrt((L / 1.15) ** 2 + (A - canal_a) ** 2) - 10.5) - 3.0
        ring = np.maximum(ring, A - canal_a - 10)  # pedicles and laminae
        dz = np.mod(S + disc_phase, disc_pitch) / disc_pitch  # 0..1 through one vertebra
        half_length = (canal_a - spinous_tip) / 2
        spinous = np.maximum(np.abs(L) - 3.0, np.abs(A - (canal_a - half_length)) - half_length)
        spinous = np.maximum(spinous, (np.abs(dz - 0.55) - 0.3) * 40)
        transverse = np.maximum(np.abs(np.abs(L) - 22) - 12, np.abs(A - canal_a - 2) - 4)
        transverse = np.maximum(transverse, (np.abs(dz - 0.35) - 0.15) * 40)
        return functools.reduce(np.minimum, [ring, spinous, transverse])

    for side in (-1, 1):
        psoas = capsule((side * (vb_r + 8), body.spine_a + 2, -10.0),
                        (side * (vb_r + 45), body.spine_a + 35, body.hip + 10), rng.uniform(12, 17))
        canvas.paint(psoas, hu["muscle"], _box((-120, body.spine_a - 40, body.hip - 20), (120, body.spine_a + 80, 0)))
    vertebra = cylinder_2d((0.0, body.spine_a), (vb_r * 1.1, vb_r))
    cortex, marrow = hu["cortex"], hu["marrow"]
    canvas.paint(vertebra, lambda L, A, S: np.where(in_disc(S), 90.0, cortex), column)
    canvas.paint(offset(vertebra, -2.0), lambda L, A, S: np.where(in_disc(S), 90.0, marrow), column)
    canvas.paint(posterior_elements, cortex * 0.85, column)
    canvas.paint(cylinder_2d((0.0, canal_a), (8.5, 7.5)), 15.0, column)  # spinal canal (CSF)


def paint_ribs(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Ribs: oblique tubes in the wall, seen as ovals laterally and behind, ending at the costal margin."""
    rib_r, pitch = rng.uniform(4.0, 5.5), rng.uniform(30, 38)
    phase, ring_out = rng.uniform(0, pitch), body.fat + body.muscle * 0.5
    slope, margin = 0.45, rng.uniform(-70, -40)  # ribs run down towards the front

    def ribs(L, A, S):
        radial = body.outline(L, A, S) + ring_out
        angle = np.arctan2(L, A - 0.3 * body.half_d)  # 0 = anterior, +-pi = posterior
        arc = np.abs(angle) * body.half_w
        along = np.mod(S + slope * arc + phase, pitch) - pitch / 2
        tube = np.sqrt(radial**2 + (along / math.sqrt(1 + slope**2) * 1.6) ** 2) - rib_r
        sector = np.maximum(0.9 - np.abs(angle), np.abs(angle) - 2.7) * 40.0
        costal_margin = (margin + 40 * np.cos(angle)) - S  # the rib cage ends lower at the sides
        return functools.reduce(np.maximum, [tube, sector, costal_margin])

    box = _box((-1e4, -1e4, margin - 50), (1e4, 1e4, 1e4))
    _bone(canvas, hu, ribs, box, 1.5)


def paint_pelvis(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Iliac wings, sacrum, hip joints (acetabulum and femoral heads and necks) and the pubic bones."""
    if body.s_bottom > body.crest + 10:
        return
    back, hip = body.spine_a, body.hip
    sacrum = ellipsoid((0.0, back - 5, body.crest - 55), (rng.uniform(36, 46), 15, 50), (-25, 0, 0))
    _bone(canvas, hu, sacrum, _box((-60, back - 60, body.crest - 120), (60, back + 40, body.crest + 10)))
    for side in (-1, 1):
        spread = rng.uniform(65, 85)
        angle = math.degrees(math.atan2(75.0, side * spread))
        centre = np.array([side * (spread + 5), back + 22, body.crest - 45])
        wing = ellipsoid(centre, (55, rng.uniform(6, 9), 50), (0, 0, angle), _wobble(rng, 1.5, 60, 3))
        wing_box = _box((-200, back - 80, body.crest - 110), (200, back + 110, body.crest + 15))
        inward = np.array([-side * 75.0, spread, 0.0]) / math.hypot(75.0, spread)  # medial and forwards
        layers = ((rng.uniform(12, 20), rng.uniform(10, 16)), (-rng.uniform(22, 32), rng.uniform(18, 28)))
        for shift, thickness in layers:
            muscle = ellipsoid(centre + inward * shift, (rng.uniform(45, 60), thickness, 48), (0, 0, angle))
            canvas.paint(intersect(muscle, offset(body.outline, -body.fat)), hu["muscle"], wing_box)  # iliacus, glutei
        _bone(canvas, hu, wing, wing_box)
        head = np.array([side * rng.uniform(80, 95), back + 45, hip])
        socket = ellipsoid(head + np.array([-side * 6, -5, 10]), (28, 32, 30))
        _bone(canvas, hu, socket, _box(head - 45, head + 45), 3.0)
        canvas.paint(ellipsoid(head, (25.5, 25.5, 25.5)), hu["muscle"] - 20, _box(head - 30, head + 30))
        neck = union(ellipsoid(head, (23.0, 23.0, 23.0)),
                     capsule(head, head + np.array([side * 35, -5, -70]), rng.uniform(13, 17)))
        _bone(canvas, hu, neck, _box(head - np.array([60, 40, 100]), head + np.array([60, 40, 30])))
        pubis = capsule(head + np.array([-side * 10, 15, -10]), np.array([side * 8, body.cav_front - 12, hip - 25]),
                        rng.uniform(8, 11))
        _bone(canvas, hu, pubis, _box((-130, back, hip - 60), (130, body.half_d, hip + 20)))


def paint_vessels(canvas: Canvas, rng: np.random.Generator, body: Body, hu: dict[str, float]) -> None:
    """Aorta down to its bifurcation into the iliac arteries, and the inferior vena cava."""
    r = rng.uniform(9, 13)
    aorta = (rng.uniform(4, 12), body.spine_a + body.vb_r + r + 1)
    column = _box((-90, -body.half_d, body.crest), (90, body.spine_a + 60, 1e9))
    canvas.paint(cylinder_2d(aorta, (r, r)), hu["blood"], column)
    canvas.paint(body.below_diaphragm(cylinder_2d((-rng.uniform(20, 28), body.spine_a + body.vb_r + 13), (13, 9))),
                 hu["vein"], column)
    for side in (-1, 1):
        p0 = np.array([aorta[0], aorta[1], body.crest + 5])
        p1 = np.array([side * 60.0, body.spine_a + 40, body.hip + 20])
        canvas.paint(capsule(p0, p1, r * 0.6), hu["blood"], _box(np.minimum(p0, p1) - 15, np.maximum(p0, p1) + 15))


def paint_spleen(canvas: Canvas, rng: np.random.Generator, spleen: Spleen, hu: dict[str, float],
                 mask: np.ndarray) -> None:
    """The spleen itself, last, so that its voxels are exactly the label."""
    texture = _texture(rng, hu["texture"], 20.0)
    level = hu["spleen"]
    canvas.paint(spleen.inside, lambda L, A, S: level + texture(L, A, S), spleen.box, mask=mask)


def finish_scan(rng: np.random.Generator, image: np.ndarray, geometry: CaseGeometry, body: Body,
                coords: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """What the scanner adds: a smooth bias (cupping, drift), streaks from dense objects, and noise."""
    L, A, S = (c.astype(np.float32) for c in coords)
    reach = max(body.half_w, 1.0)
    bias = (rng.uniform(-15, 15) * (L / reach)[:, None, None] + rng.uniform(-15, 15) * (A / reach)[None, :, None]
            - rng.uniform(0, 25) * (((L / reach) ** 2)[:, None, None] + ((A / reach) ** 2)[None, :, None])
            + rng.uniform(-10, 10) * np.sin(S / rng.uniform(80, 200))[None, None, :])
    image += bias.astype(np.float32)
    streaks = int(rng.integers(0, 4)) + (3 if body.arm_r else 0)
    if streaks:
        pattern = np.zeros(image.shape[:2], dtype=np.float32)
        for _ in range(streaks):
            theta, shift = rng.uniform(0, np.pi), rng.uniform(-0.5, 0.5) * body.half_d
            distance = L[:, None] * math.sin(theta) - A[None, :] * math.cos(theta) - shift
            pattern += rng.choice([-1.0, 1.0]) * rng.uniform(20, 70) * np.exp(-(distance / rng.uniform(1, 3)) ** 2)
        weight = (rng.random(image.shape[2]) < rng.uniform(0.2, 0.7)) * rng.uniform(0.3, 1.0, image.shape[2])
        image += pattern[:, :, None] * weight.astype(np.float32)[None, None, :]
    noise_sd = rng.uniform(6, 28) * math.sqrt(3.0 / geometry.spacing[2]) ** 0.5
    image += noise_sd * _smooth_noise(rng, geometry.shape, sigma=0.7 / max(geometry.spacing[0], 0.5))
    np.clip(image, -1024, 3071, out=image)
    return np.rint(image).astype(np.int16)


def render_case(seed: int, case: int, matrix: int = DEFAULT_MATRIX, slice_spacing: float | None = None,
                orientation: str | None = None) -> tuple[np.ndarray, np.ndarray, CaseGeometry]:
    """Draw one phantom: int16 HU image, uint8 spleen label and the grid, all from (seed, case).

    The body is described first (:func:`draw_body`, :func:`draw_tissues`, :func:`plan_spleen`), then
    painted organ by organ from the outside in; later painters cover earlier ones.
    """
    # two streams: the anatomy does not change when only the grid (matrix, slices) does
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case), 1]))
    grid_rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(case), 2]))
    orientation = orientation or ORIENTATIONS[case % len(ORIENTATIONS)]
    dz = draw_slice_spacing(grid_rng, slice_spacing)
    body = draw_body(rng, dz)
    hu = draw_tissues(rng)
    geometry, *coords = _grid(grid_rng, matrix, dz, orientation, field_of_view(rng, body), body.s_top, body.s_bottom)
    blur = float(0.5 * (geometry.spacing[0] + min(geometry.spacing[2], 3.0)))
    canvas = Canvas(np.full(geometry.shape, -1000.0, dtype=np.float32), *coords, blur)
    spleen = plan_spleen(rng, body, canvas)
    paint_table(canvas, rng, body)
    paint_wall(canvas, rng, body, hu)
    paint_arms(canvas, rng, body, hu)
    paint_chest(canvas, rng, body, hu)
    paint_small_bowel(canvas, rng, body, hu, spleen)
    paint_colon(canvas, rng, body, hu, spleen)
    paint_liver(canvas, rng, body, hu, spleen)
    paint_stomach(canvas, rng, body, hu, spleen)
    paint_pancreas(canvas, rng, body, hu, spleen)
    paint_kidneys(canvas, rng, body, hu, spleen)
    paint_bladder(canvas, rng, body, hu)
    paint_spine(canvas, rng, body, hu)
    paint_pelvis(canvas, rng, body, hu)
    paint_vessels(canvas, rng, body, hu)
    paint_ribs(canvas, rng, body, hu)
    mask = np.zeros(geometry.shape, dtype=bool)
    paint_spleen(canvas, rng, spleen, hu, mask)
    image = finish_scan(rng, canvas.image, geometry, body, tuple(coords))
    return image, mask.astype(np.uint8), geometry


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
    slices = f"{slice_spacing:g} mm slices" if slice_spacing else "1.5-8 mm slices"
    return (f"{_PREFIX} {__version__}; seed {seed}, "
            f"{cases} labelled + {test_cases} test cases, {matrix}x{matrix} matrix, {slices})")


#: The record of what the generator wrote (relative path -> sha256), kept in the dataset folder: ``--force`` removes
#: only these files, and a set whose files are missing or changed is repaired.
RECORD_NAME = ".spleenkit-synthetic.json"
_GENERATED = re.compile(r"(imagesTr|labelsTr|imagesTs)/spleen_(\d+)\.nii\.gz")


@dataclass
class _ExistingSet:
    """A synthetic set found in the output folder: its description, the files the generator wrote there, and
    those of them that are missing or no longer what was written."""

    description: str
    files: list[str]
    damaged: list[str]


def _digest(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing_set(out: Path) -> _ExistingSet | None:
    """What ``out`` holds: None when it is missing or empty; a folder holding files but no synthetic set (a file in
    its place, a user's folder) is refused, never touched."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise BadInputError("exists and is not a folder", out)
    try:
        record = json.loads((out / RECORD_NAME).read_text())
        recorded = record["files"] if isinstance(record.get("files"), dict) else None
    except (OSError, ValueError, AttributeError, KeyError):
        record, recorded = {}, None  # a set of an earlier version: the files dataset.json lists are the generator's
    description = _synthetic_description(out / "dataset.json")
    if description is None and recorded is not None and str(record.get("description", "")).startswith(_PREFIX):
        description = record["description"]  # dataset.json was removed: the record still names the set
    if description is None:
        if any(out.iterdir()):  # never delete what the kit did not make
            raise BadInputError("exists and holds files that are not a synthetic dataset made by spleenkit; "
                                "refusing to replace them: choose a new or empty folder", out)
        return None
    try:
        listed = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        listed = {}
    names = [entry for item in listed.get("training", []) if isinstance(item, dict) for entry in item.values()]
    names += [entry for entry in listed.get("test", []) if isinstance(entry, str)]
    files = sorted({str(name).removeprefix("./") for name in names} | set(recorded or {}))
    files = [name for name in files if _GENERATED.fullmatch(name) and (recorded is None or name in recorded)]
    damaged = [name for name in files if not (out / name).is_file()
               or (recorded is not None and _digest(out / name) != recorded[name])]
    if not (out / "dataset.json").is_file():
        damaged.append("dataset.json")
    return _ExistingSet(description, files, damaged)


def _damaged_cases(existing: _ExistingSet) -> list[int]:
    """The case numbers whose files must be written again."""
    return sorted({int(match[2]) for name in existing.damaged if (match := _GENERATED.fullmatch(name))})


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


def _move_into_place(staging: Path, out: Path, remove: Sequence[str] = ()) -> None:
    """Put the set built in ``staging`` at ``out``: a missing folder is renamed whole; into an existing one, the
    generator's earlier files named in ``remove`` go, then each new file is renamed over its place, dataset.json
    and the record last. Nothing else in ``out`` (a user's notes or runs) is touched."""
    if not out.exists():
        os.replace(staging, out)  # the whole new folder at once
        return
    for name in remove:
        (out / name).unlink(missing_ok=True)
    written = sorted((path for path in staging.rglob("*") if path.is_file()),
                     key=lambda path: (path.parent == staging, path.name))  # dataset.json and the record last
    for path in written:
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)


def write_synthetic_dataset(out_dir: str | os.PathLike[str], cases: int = 12, seed: int = 0, test_cases: int = 2,
                            matrix: int = DEFAULT_MATRIX, slice_spacing: float | None = None, overwrite: bool = False,
                            workers: int | None = None) -> Path:
    """Write ``cases`` labelled and ``test_cases`` unlabelled phantoms in the MSD Task09 layout.

    Files are ``spleen_N.nii.gz`` (int16 images, uint8 labels) under imagesTr/, labelsTr/ and
    imagesTs/, with a dataset.json and a record of what was written (:data:`RECORD_NAME`). The set is built in
    a temporary folder beside ``out_dir`` and moved into place at the end. If ``out_dir`` already holds the
    same set (same description in dataset.json), nothing is done, except that files of it which are missing or
    changed are drawn again (the same seed gives the same bytes); another synthetic set there is replaced only
    with ``overwrite``, and then only the files the generator wrote go (a user's files beside them stay); a
    folder holding anything else is never touched. A staging folder left by a killed run is removed.
    ``matrix`` sets the in-plane size (the default 256 gives about 1.2-1.8 mm voxels; 512 gives MSD's
    0.6-0.9 mm and is four times slower); ``slice_spacing`` fixes the slice spacing (else 1.5-8 mm, drawn
    per case). ``workers`` threads draw cases in parallel (default: the CPU count, at most 4); the
    files do not depend on it.
    """
    if cases < 1 or test_cases < 0:
        raise BadInputError(f"need at least one labelled case and no negative test cases (got {cases}, {test_cases})")
    if matrix < 32:
        raise BadInputError(f"matrix {matrix} is too small; use 32 or more (256 is realistic)")
    out = Path(out_dir).absolute()
    description = _description(cases, test_cases, seed, matrix, slice_spacing)
    with contextlib.suppress(OSError):
        clean_stale_temporaries(out)
    existing = _existing_set(out)
    numbers = list(range(1, cases + test_cases + 1))
    if existing is not None and existing.description == description and not overwrite:
        if not existing.damaged:
            log.info("%s already holds this synthetic dataset; nothing to do", out)
            return out
        numbers = _damaged_cases(existing)
        log.warning("%s: %d file(s) of the synthetic dataset are missing or changed (%s); drawing case(s) %s again",
                    out, len(existing.damaged), ", ".join(existing.damaged[:4]), ", ".join(map(str, numbers)))
    elif existing is not None and not overwrite:
        raise BadInputError("exists and holds another synthetic dataset; choose another folder or "
                            "replace it (overwrite=True; --force on the command line)", out)
    staging = temporary_name(out)
    started = time.perf_counter()
    try:
        staging.mkdir(0o777 & ~_umask(), parents=True)
        os.chmod(staging, 0o777 & ~_umask())
        _draw_cases(staging, [(number, number <= cases) for number in numbers], seed, matrix, slice_spacing, workers)
        names = [f"spleen_{n}.nii.gz" for n in range(1, cases + 1)]
        tests = [f"spleen_{n}.nii.gz" for n in range(cases + 1, cases + test_cases + 1)]
        write_bytes(staging / "dataset.json",
                    json.dumps(msd_description(names, tests, description), indent=4).encode())
        drawn = {path.relative_to(staging).as_posix(): _digest(path) for path in sorted(staging.rglob("*.nii.gz"))}
        files = {name: drawn.get(name) or _digest(out / name) for name in
                 [f"imagesTr/{n}" for n in names] + [f"labelsTr/{n}" for n in names] + [f"imagesTs/{n}" for n in tests]}
        write_bytes(staging / RECORD_NAME, (json.dumps({"description": description, "files": files}, indent=1)
                                            + "\n").encode())
        stale = [] if existing is None else [name for name in existing.files if name not in files]
        _move_into_place(staging, out, remove=stale)
    except OSError as error:
        raise BadInputError(f"cannot write the dataset ({error.strerror or error})", getattr(error, "filename", out)
                            or out) from error
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %s to %s in %.1f s", f"{cases} labelled and {test_cases} test phantoms"
             if len(numbers) == cases + test_cases else f"case(s) {', '.join(map(str, numbers))} again", out,
             time.perf_counter() - started)
    return out


def _draw_cases(staging: Path, jobs: list[tuple[int, bool]], seed: int, matrix: int, slice_spacing: float | None,
                workers: int | None) -> None:
    """Render ``jobs`` (case number, labelled) into ``staging``'s imagesTr/, labelsTr/ and imagesTs/."""
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (staging / sub).mkdir(exist_ok=True)
    make = functools.partial(_write_case, staging, seed, matrix, slice_spacing)
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    if workers > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(make, jobs))
    else:
        for job in jobs:
            make(job)
