"""The write-the-code exercises of notebooks 05 and 06: each check passes the solution's code and fails,
with a hint that names the slip, on a student stub and on the typical mistakes."""

from __future__ import annotations

import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from spleenkit.exercises import check, sliding_window_count
from spleenkit.metrics import mask_metrics, summarize
from spleenkit.predict import postprocessing
from spleenkit.presets import get_preset
from spleenkit.transforms import validation_transforms

pytestmark = pytest.mark.usefixtures("lenient")  # checks as a student meets them (conftest.py)


# --------------------------------------------------------------------------- 05: the metric objects
SPACING = (2.0, 2.0, 3.0)


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two cases on disk (prediction and label files, 2 x 2 x 3 mm voxels) and the summary the kit makes of them."""
    folder = tmp_path_factory.mktemp("scored")
    affine = np.diag([*SPACING, 1.0])
    predictions, labels, rows = {}, {}, []
    for index, shift in enumerate((1, 3)):
        label = np.zeros((24, 24, 16), np.uint8)
        label[6:16, 6:16, 4:10] = 1
        prediction = np.roll(label, shift, axis=0)
        prediction[20, 20, 14] = 1  # a stray voxel far away: HD and HD95 differ
        name = f"case_{index}"
        for kind, array, paths in (("pred", prediction, predictions), ("label", label, labels)):
            paths[name] = folder / f"{name}_{kind}.nii.gz"
            nib.save(nib.Nifti1Image(array, affine), paths[name])
        rows.append({"case": name, "space": "original", **mask_metrics(prediction, label, SPACING)})
        rows.append({"case": name, "space": "resampled", **mask_metrics(label, label, SPACING)})
    return {"predictions": predictions, "cases": labels, "summary": summarize(rows)}


def metric_means(scored: dict, include_background: bool = False, percentile: float | None = 95,
                 spacing: bool = True) -> tuple[float, float]:
    """The solution's code (with the slips switched on by the arguments)."""
    from monai.metrics import DiceMetric, HausdorffDistanceMetric
    from monai.transforms import AsDiscrete, LoadImage

    load, one_hot = LoadImage(ensure_channel_first=True), AsDiscrete(to_onehot=2)
    dice = DiceMetric(include_background=include_background, reduction="mean")
    hd95 = HausdorffDistanceMetric(include_background=False, percentile=percentile, reduction="mean")
    for name, label_path in scored["cases"].items():
        predicted, truth = load(scored["predictions"][name]), load(label_path)
        dice(y_pred=one_hot(predicted)[None], y=one_hot(truth)[None])
        hd95(y_pred=one_hot(predicted)[None], y=one_hot(truth)[None],
             spacing=truth.pixdim.tolist() if spacing else None)
    return dice.aggregate().item(), hd95.aggregate().item()


def test_metric_means_pass_the_solution(scored: dict) -> None:
    verdict = check("05-metric-means", metric_means(scored), **scored)
    assert verdict.status == "correct", verdict.message
    assert "summary.json" in verdict.message


@pytest.mark.parametrize("slip, hint", [({"include_background": True}, "include_background=False"),
                                        ({"percentile": None}, "percentile=95"),
                                        ({"spacing": False}, "in voxels")])
def test_metric_means_name_the_slip(scored: dict, slip: dict, hint: str) -> None:
    verdict = check("05-metric-means", metric_means(scored, **slip), **scored)
    assert verdict.status == "wrong" and hint in verdict.message, verdict.message


def test_metric_means_reject_the_stub_resampled_numbers_and_nonsense(scored: dict) -> None:
    assert check("05-metric-means", None, **scored).status == "unanswered"
    assert check("05-metric-means", (None, None), **scored).status == "unanswered"
    resampled = scored["summary"]["resampled"]
    verdict = check("05-metric-means", (resampled["dice"]["mean"], resampled["hd95_mm"]["mean"]), **scored)
    assert verdict.status == "wrong" and "resampled" in verdict.message
    assert "two numbers" in check("05-metric-means", 0.8, **scored).message


# --------------------------------------------------------------------------- 05: the post-processing chain
def chain(*, nearest: bool = False, order: str = "after", softmax: bool = True) -> object:
    """The solution's chain, with a slip when asked."""
    from monai.transforms import Activationsd, AsDiscreted, Compose, Invertd, KeepLargestConnectedComponentd

    preprocessing = validation_transforms("quick")
    steps = [Activationsd(keys="pred", softmax=True)] if softmax else []
    steps.append(Invertd(keys="pred", transform=preprocessing, orig_keys="image", nearest_interp=nearest,
                         to_tensor=True))
    keep, argmax = KeepLargestConnectedComponentd(keys="pred", applied_labels=[1]), AsDiscreted(keys="pred",
                                                                                                argmax=True)
    steps += [argmax, keep] if order == "after" else [keep, argmax]
    return Compose(steps), preprocessing


def test_largest_component_chain_passes_the_solution() -> None:
    written, preprocessing = chain()
    assert check("05-largest-component", written, preprocessing=preprocessing).status == "correct"
    assert postprocessing(largest_component=True, invert=preprocessing)  # what it is compared with


@pytest.mark.parametrize("slip, hint", [({"order": "before"}, "after argmax"),
                                        ({"nearest": True}, "nearest_interp"),
                                        ({"softmax": False}, "step 1 is Invertd, expected Activationsd")])
def test_largest_component_chain_names_the_slip(slip: dict, hint: str) -> None:
    written, preprocessing = chain(**slip)
    verdict = check("05-largest-component", written, preprocessing=preprocessing)
    assert verdict.status == "wrong" and hint in verdict.message, verdict.message


def test_largest_component_chain_rejects_the_stub_and_the_kit_chain_without_the_step() -> None:
    preprocessing = validation_transforms("quick")
    assert check("05-largest-component", None, preprocessing=preprocessing).status == "unanswered"
    verdict = check("05-largest-component", postprocessing(invert=preprocessing), preprocessing=preprocessing)
    assert verdict.status == "wrong" and "missing KeepLargestConnectedComponentd" in verdict.message


# --------------------------------------------------------------------------- 06: the sliding-window call
@pytest.fixture(scope="module")
def window_case() -> dict:
    """A tiny predictor (a 3x3x3 convolution: window borders change its output) and a slab longer than a window."""
    torch.manual_seed(0)
    network = torch.nn.Conv3d(1, 2, 3, padding=1)
    image = torch.rand(1, 40, 16, 16)
    preset = get_preset("quick").replace(validation_roi_size=(16, 16, 16))
    return {"image": image, "network": network, "preset": preset, "device": "cpu"}


def student_call(case: dict, **change: object) -> torch.Tensor:
    """The solution's call, with the arguments in ``change`` replaced (None: left out, MONAI's default)."""
    from monai.inferers import sliding_window_inference

    preset = case["preset"]
    arguments = {"roi_size": preset.validation_roi_size, "sw_batch_size": preset.sliding_window_batch_size,
                 "overlap": preset.sliding_window_overlap, "mode": "constant", **change}
    with torch.no_grad():
        return sliding_window_inference(inputs=case["image"][None], predictor=case["network"],
                                        **{k: v for k, v in arguments.items() if v is not None})


def test_sliding_window_call_passes_the_solution_whatever_the_batch_of_windows(window_case: dict) -> None:
    assert sliding_window_count((40, 16, 16), (16, 16, 16), 0.5) != sliding_window_count((40, 16, 16),
                                                                                         (16, 16, 16), 0.25)
    for sw_batch_size in (4, 1):
        verdict = check("06-sliding-window", student_call(window_case, sw_batch_size=sw_batch_size)[0], **window_case)
        assert verdict.status == "correct", verdict.message


@pytest.mark.parametrize("change, hint", [({"overlap": None}, "overlap 0.25"),
                                          ({"overlap": 0.0}, "no overlap"),
                                          ({"mode": "gaussian"}, "gaussian"),
                                          ({"roi_size": (96, 96, 96)}, "96-voxel window")])
def test_sliding_window_call_names_the_wrong_setting(window_case: dict, change: dict, hint: str) -> None:
    verdict = check("06-sliding-window", student_call(window_case, **change)[0], **window_case)
    assert verdict.status == "wrong" and hint in verdict.message, verdict.message


def test_sliding_window_call_catches_the_batch_axis_softmax_and_the_stub(window_case: dict) -> None:
    logits = student_call(window_case)
    assert "batch axis" in check("06-sliding-window", logits, **window_case).message
    assert "probabilities" in check("06-sliding-window", torch.softmax(logits[0], 0), **window_case).message
    assert check("06-sliding-window", None, **window_case).status == "unanswered"


def test_windows_of_an_msd_sized_scan() -> None:
    shape, roi = (273, 273, 113), (96, 96, 96)
    assert sliding_window_count(shape, roi, 0.5) == 5 * 5 * 2
    verdict = check("06-windows", 50, image_shape=shape, roi_size=roi, overlap=0.5)
    assert verdict and "32 at overlap 0.25" in verdict.message  # 1.6x, not 4x
    assert not check("06-windows", 4 * 32, image_shape=shape, roi_size=roi, overlap=0.5)


def test_notebook_06_counts_the_windows_it_talks_about() -> None:
    import nbformat

    path = Path(__file__).resolve().parents[1] / "notebooks" / "06_inference_visualization.ipynb"
    cells = nbformat.read(path, as_version=4).cells
    text = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code" and "solution" not in cell.metadata.get(
        "tags", []))
    assert not re.search(r"~\s*\d+(\.\d+)?\s*x the windows", text), "a window ratio depends on the scan: count it"
    assert "sliding_window_count(ct_resampled.shape[1:]" in code


def test_spot_the_flip_on_the_real_ct(example_ct_dir: Path) -> None:
    ct = nib.load(example_ct_dir / "ct.nii.gz")
    spleen = np.asanyarray(nib.load(example_ct_dir / "spleen_a.nii.gz").dataobj)
    mystery = nib.Nifti1Image(np.asanyarray(ct.dataobj)[::-1].copy(), ct.affine)  # voxels reversed, header kept
    assert check("06-header-lies", True, image=mystery, mask=spleen[::-1]).status == "correct"
    verdict = check("06-header-lies", False, image=mystery, mask=spleen[::-1])  # the typical slip: trust the header
    assert verdict.status == "wrong" and "orientation_warnings" in verdict.message
    assert check("06-header-lies", None, image=mystery, mask=spleen[::-1]).status == "unanswered"
    assert "True or False" in check("06-header-lies", "yes", image=mystery, mask=spleen[::-1]).message
    reverse_first_axis = np.diag([-1.0, 1, 1, 1])
    reverse_first_axis[0, 3] = ct.shape[0] - 1  # voxel i of the copy is voxel n-1-i of the original
    honest = nib.Nifti1Image(np.asanyarray(ct.dataobj)[::-1].copy(), ct.affine @ reverse_first_axis)
    assert check("06-header-lies", False, image=honest, mask=spleen[::-1]).status == "correct"
