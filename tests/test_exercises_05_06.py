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


def metric_means(include_background: bool = False, percentile: float | None = 95, spacing: bool = True):
    """The solution's function (with the slips switched on by the arguments)."""

    def my_metric_means(prediction_files, label_files):
        from monai.metrics import DiceMetric, HausdorffDistanceMetric
        from monai.transforms import AsDiscrete, LoadImage

        load, one_hot = LoadImage(ensure_channel_first=True), AsDiscrete(to_onehot=2)
        dice = DiceMetric(include_background=include_background, reduction="mean")
        hd95 = HausdorffDistanceMetric(include_background=False, percentile=percentile, reduction="mean")
        for prediction_file, label_file in zip(prediction_files, label_files, strict=True):
            predicted, truth = load(prediction_file), load(label_file)
            dice(y_pred=one_hot(predicted)[None], y=one_hot(truth)[None])
            hd95(y_pred=one_hot(predicted)[None], y=one_hot(truth)[None],
                 spacing=truth.pixdim.tolist() if spacing else None)
        return dice.aggregate().item(), hd95.aggregate().item()

    return my_metric_means


def test_metric_means_pass_the_solution(scored: dict) -> None:
    verdict = check("05-metric-means", metric_means(), **scored)
    assert verdict.status == "correct", verdict.message
    assert "summary.json" in verdict.message and "made up for the check" in verdict.message


@pytest.mark.parametrize("slip, hint", [({"include_background": True}, "include_background=False"),
                                        ({"percentile": None}, "percentile=95"),
                                        ({"spacing": False}, "in voxels")])
def test_metric_means_name_the_slip(scored: dict, slip: dict, hint: str) -> None:
    verdict = check("05-metric-means", metric_means(**slip), **scored)
    assert verdict.status == "wrong" and hint in verdict.message, verdict.message


def test_metric_means_reject_the_stub_the_printed_summary_and_nonsense(scored: dict) -> None:
    assert check("05-metric-means", None, **scored).status == "unanswered"
    original = scored["summary"]["original"]
    printed = (original["dice"]["mean"], original["hd95_mm"]["mean"])  # what format_summary prints above
    verdict = check("05-metric-means", printed, **scored)
    assert verdict.status == "wrong" and "expected a function" in verdict.message
    verdict = check("05-metric-means", lambda predictions, labels: printed, **scored)
    assert verdict.status == "wrong" and "made up for the check" in verdict.message
    resampled = scored["summary"]["resampled"]
    copied = {"summary": {**scored["summary"], "original": {**original, "dice": resampled["dice"]}}}
    verdict = check("05-metric-means", metric_means(), **{**scored, **copied})
    assert verdict.status == "wrong"
    assert "two numbers" in check("05-metric-means", lambda predictions, labels: 0.8, **scored).message


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


def window_count(image_shape, roi_size, overlap):
    import math

    steps = [max(1, int(size * (1 - overlap))) for size in roi_size]
    return math.prod(max(0, math.ceil((n - size) / step)) + 1 for n, size, step in zip(image_shape, roi_size, steps,
                                                                                         strict=True))


def test_windows_of_an_msd_sized_scan_and_of_shapes_the_student_never_saw() -> None:
    import math

    shape, roi = (273, 273, 113), (96, 96, 96)
    assert sliding_window_count(shape, roi, 0.5) == 5 * 5 * 2
    verdict = check("06-windows", window_count, image_shape=shape, roi_size=roi, overlap=0.5)
    assert verdict and "32 at overlap 0.25" in verdict.message and "1.56x" in verdict.message  # not 4x
    assert not check("06-windows", 50, image_shape=shape, roi_size=roi, overlap=0.5)  # the number, not a function
    typed_in = check("06-windows", lambda *args: 50, image_shape=shape, roi_size=roi, overlap=0.5)
    assert not typed_in and "(64, 64, 64)" in typed_in.message

    def rounded_down(image_shape, roi_size, overlap):
        steps = [max(1, int(size * (1 - overlap))) for size in roi_size]
        return math.prod(1 if n <= s else (n - s) // st + 1 for n, s, st in zip(image_shape, roi_size, steps,
                                                                                strict=True))

    verdict = check("06-windows", rounded_down, image_shape=shape, roi_size=roi, overlap=0.5)
    assert not verdict and "round the count up" in verdict.message


def flip_left_right(image):
    from monai.transforms import Flip

    return Flip(spatial_axis=0)(image)


def test_the_flip_must_keep_the_header_true(example_ct_dir: Path) -> None:
    verdict = check("06-flip", flip_left_right, image=example_ct_dir / "ct.nii.gz",
                    mask=example_ct_dir / "spleen_a.nii.gz")
    assert verdict and "orientation_warnings finds nothing wrong" in verdict.message
    assert check("06-flip", None).status == "unanswered"
    slips = {lambda image: torch.flip(image, dims=[1]): "the header did not",  # what section 5 built
             lambda image: image.flip(0): "nothing changed",  # the channel axis
             lambda image: torch.flip(image, dims=[2]): "another axis",
             lambda image: image.numpy()[:, ::-1].copy(): "no header",
             lambda image: True: "no header"}  # the old exercise's answer
    for answer, words in slips.items():
        verdict = check("06-flip", answer)
        assert not verdict and words in verdict.message, (words, verdict.message)

    def origin_kept(image):
        flipped = torch.flip(image, dims=[1])
        flipped.affine[:, 0] = -flipped.affine[:, 0]  # the axis turned, the origin left where it was
        flipped.affine[3, 0] = 0
        return flipped

    verdict = check("06-flip", origin_kept)
    assert not verdict and "the origin did not move" in verdict.message


def test_notebook_06_counts_the_windows_it_talks_about() -> None:
    import nbformat

    path = Path(__file__).resolve().parents[1] / "notebooks" / "06_inference_visualization.ipynb"
    cells = nbformat.read(path, as_version=4).cells
    text = "\n".join(cell.source for cell in cells if cell.cell_type == "markdown")
    code = "\n".join(cell.source for cell in cells if cell.cell_type == "code" and "solution" not in cell.metadata.get(
        "tags", []))
    assert not re.search(r"~\s*\d+(\.\d+)?\s*x the windows", text), "a window ratio depends on the scan: count it"
    assert "sliding_window_count(ct_resampled.shape[1:]" in code


# --------------------------------------------------------------------------- 05: the volume error
def volume_error_ml(prediction_file, label_file):
    from monai.transforms import LoadImage

    load = LoadImage(ensure_channel_first=True)
    predicted, truth = load(prediction_file), load(label_file)
    return float((predicted > 0).sum() - (truth > 0).sum()) * float(truth.pixdim.prod()) / 1000


def test_the_volume_error_keeps_its_sign_on_files_of_the_check(scored: dict) -> None:
    case = "case_0"
    context = {"prediction_file": scored["predictions"][case], "label_file": scored["cases"][case]}
    verdict = check("05-volume-error", volume_error_ml, **context)
    assert verdict and "the worst case holds +0.01 mL" in verdict.message  # one stray voxel of 12 mm³
    assert check("05-volume-error", None, **context).status == "unanswered"
    slips = {lambda p, r: -volume_error_ml(p, r): "sign is reversed", lambda p, r: abs(volume_error_ml(p, r)):
             "keep the sign", lambda p, r: 1000 * volume_error_ml(p, r): "mm³",
             lambda p, r: volume_error_ml(p, r) / 0.012: "number of voxels"}
    for answer, words in slips.items():
        verdict = check("05-volume-error", answer, **context)
        assert not verdict and words in verdict.message, (words, verdict.message)
    assert not check("05-volume-error", 0.012, **context)  # the number of the table, typed in
