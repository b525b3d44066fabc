"""The offline interactive viewer: three planes, a slider each and a mask-outline toggle (ipywidgets and the kit's
matplotlib figure), driven as a student's mouse would: move a slider, untick the outline, see the picture change."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest
from matplotlib.figure import Figure

from spleenkit import environment, visualization
from spleenkit.errors import BadInputError
from spleenkit.visualization import SliceViewer, show_3d, slice_viewer


@pytest.fixture
def ct() -> tuple[np.ndarray, np.ndarray]:
    """A small volume whose slices all differ (a gradient along each axis plus a bright block) and a spleen mask."""
    x, y, z = np.meshgrid(np.arange(24), np.arange(20), np.arange(16), indexing="ij")
    image = (x * 6 + y * 4 + z * 10 - 100).astype(np.float32)
    mask = np.zeros(image.shape, bool)
    mask[14:21, 4:12, 5:11] = True
    image[mask] += 60
    return image, mask


def test_moving_a_slider_and_toggling_the_outline_change_the_picture(ct: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = ct
    viewer = slice_viewer(image, mask, spacing=(2.0, 2.0, 3.0))
    assert isinstance(viewer, SliceViewer)
    assert viewer.centre == (17, 8, 8)  # starts at the spleen's centre
    assert [viewer.sliders[plane].max for plane in ("sagittal", "coronal", "axial")] == [23, 19, 15]
    first = bytes(viewer.image.value)
    assert first.startswith(b"\x89PNG")

    viewer.sliders["axial"].value = 2  # as the slider does when released
    moved = bytes(viewer.image.value)
    assert moved != first and viewer.centre == (17, 8, 2)
    assert "slice 2" in viewer.figure().axes[0].get_title()

    viewer.overlay.value = False  # untick "outline the spleen"
    plain = bytes(viewer.image.value)
    assert plain != moved
    assert not viewer.figure().axes[1].collections  # no contour drawn
    viewer.overlay.value = True
    assert bytes(viewer.image.value) == moved  # the same view again


def test_without_a_mask_the_toggle_is_off_and_disabled(ct: tuple[np.ndarray, np.ndarray]) -> None:
    viewer = slice_viewer(ct[0], spacing=(1.0, 1.0, 1.0))
    assert viewer.overlay.disabled and not viewer.overlay.value
    assert viewer.centre == (12, 10, 8)  # the volume's centre
    assert "application/vnd.jupyter.widget-view+json" in viewer._repr_mimebundle_()


def test_show_3d_offers_the_slice_viewer_live_and_a_figure_in_a_headless_run(
        ct: tuple[np.ndarray, np.ndarray], monkeypatch: pytest.MonkeyPatch) -> None:
    image, mask = ct
    monkeypatch.setattr(environment, "is_interactive", lambda: False)  # papermill, CI: never a widget
    assert isinstance(show_3d(image, mask), Figure)
    monkeypatch.setattr(environment, "is_interactive", lambda: True)  # JupyterLab, Binder, Colab
    monkeypatch.setitem(sys.modules, "itkwidgets", None)  # not installed: import fails
    viewer = show_3d(image, mask, spacing=(2.0, 2.0, 3.0))
    assert isinstance(viewer, SliceViewer) and viewer.voxel == (2.0, 2.0, 3.0)
    assert isinstance(show_3d(image, mask, renderer="itk"), SliceViewer)  # asked for, not loadable: slices
    fake = types.ModuleType("itkwidgets")
    fake.view = lambda **kwargs: "itk viewer"  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "itkwidgets", fake)
    assert isinstance(show_3d(image, mask), SliceViewer)  # loadable but not asked for
    assert show_3d(image, mask, renderer="itk") == "itk viewer"
    with pytest.raises(BadInputError, match="renderer 'vtk'"):
        show_3d(image, mask, renderer="vtk")


def test_the_viewer_turns_a_file_to_ras_like_the_figures(ct: tuple[np.ndarray, np.ndarray]) -> None:
    image, mask = ct
    flipped = np.diag([-2.0, 2.0, 3.0, 1.0])  # x stored right-to-left
    viewer = visualization.SliceViewer(image[::-1], mask[::-1], affine=flipped)
    assert np.array_equal(viewer.volume, image) and viewer.voxel == (2.0, 2.0, 3.0)
