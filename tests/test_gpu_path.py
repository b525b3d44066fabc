"""The GPU path of the notebooks and the package: every sliding window says where its windows run (``sw_device``) and
where the stitched volume lives (``device``), every device the notebooks name comes from the kit's ``pick_device``,
and the in-view code runs with the network on another device than the data.

A network on a GPU cannot take CPU data: a sliding window without ``sw_device`` stops there with a device mismatch
(06's exercise did, until its solution said where things live). Where a GPU is present the last test runs that code
for real with the network on it and the data on the CPU. On a machine without one it runs the same code on the CPU
and records the arguments MONAI's ``sliding_window_inference`` receives: that each window goes to the network's
device (``sw_device`` is the device ``pick_device`` gave the network, stated, not left to follow the data) and the
stitched volume to the CPU. By MONAI's contract that is what makes the GPU run work; what it cannot show (float16
kernels, GPU memory) is left to ``scripts/gpu_check.sh`` on a GPU machine.
"""

from __future__ import annotations

import ast
import inspect
import json
from pathlib import Path
from typing import Any

import nbformat
import pytest
import torch

from spleenkit.course import find_exercises
from spleenkit.notebooks import list_notebooks

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = [*list_notebooks(REPO / "notebooks"), *list_notebooks(REPO / "student")]
WINDOWS = ("sliding_window_inference", "SlidingWindowInferer")
MONAI_DEVICE_USERS = (*WINDOWS, "SupervisedTrainer", "SupervisedEvaluator")


def _python(source: str) -> ast.Module:
    from IPython.core.inputtransformer2 import TransformerManager

    return ast.parse(TransformerManager().transform_cell(source))


def _called(node: ast.Call) -> str:
    return node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")


def _dict_keys(tree: ast.AST) -> dict[str, set[str]]:
    """Name -> the string keys of a dict literal assigned to it (for calls written as ``f(**window)``)."""
    found: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            keys = {key.value for key in node.value.keys if isinstance(key, ast.Constant)}
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = keys
    return found


def stated_keywords(call: ast.Call, dicts: dict[str, set[str]]) -> set[str]:
    """The keyword arguments a call states, with those of a ``**name`` dict literal."""
    names = {keyword.arg for keyword in call.keywords if keyword.arg}
    for keyword in call.keywords:
        if keyword.arg is None and isinstance(keyword.value, ast.Name):
            names |= dicts.get(keyword.value.id, set())
    return names


def windows_without_devices(source: str, where: str) -> tuple[int, list[str]]:
    """How many sliding windows a source makes, and those that do not state both ``sw_device`` and ``device``."""
    tree = _python(source)
    dicts = _dict_keys(tree)
    calls = [node for node in ast.walk(tree) if isinstance(node, ast.Call) and _called(node) in WINDOWS]
    missing = [f"{where}:{call.lineno}: {_called(call)} without {' and '.join(sorted(absent))}" for call in calls
               if (absent := {"sw_device", "device"} - stated_keywords(call, dicts))]
    return len(calls), missing


def _notebook_source(path: Path) -> str:
    """A notebook's code cells as one program (so that a dict made in one cell is seen where another uses it)."""
    from IPython.core.inputtransformer2 import TransformerManager

    cells = nbformat.read(path, as_version=4).cells
    return "\n".join(TransformerManager().transform_cell(cell.source) for cell in cells if cell.cell_type == "code")


def test_the_check_tells_a_window_that_states_its_devices_from_one_that_does_not() -> None:
    bare = "sliding_window_inference(inputs=x, roi_size=r, sw_batch_size=4, predictor=net)"
    half = "SlidingWindowInferer(roi_size=r, sw_device=d)"
    through_a_dict = "window = {'sw_device': d, 'device': cpu}\nmonai.inferers.sliding_window_inference(x, **window)"
    assert windows_without_devices(bare, "a")[1] == ["a:1: sliding_window_inference without device and sw_device"]
    assert windows_without_devices(half, "b")[1] == ["b:1: SlidingWindowInferer without device"]
    assert windows_without_devices(through_a_dict, "c") == (1, [])


def test_every_sliding_window_in_notebooks_package_and_bundle_states_where_it_runs() -> None:
    """Notebooks (instructor copies with their solutions, and student copies), the package, the bundle's configs."""
    found, missing = 0, []
    for path in NOTEBOOKS:
        count, absent = windows_without_devices(_notebook_source(path), path.relative_to(REPO).as_posix())
        found, missing = found + count, missing + absent
    for path in sorted((REPO / "spleenkit").rglob("*.py")):
        count, absent = windows_without_devices(path.read_text(), path.relative_to(REPO).as_posix())
        found, missing = found + count, missing + absent

    def configs(node: Any, where: str) -> None:
        nonlocal found
        if isinstance(node, dict):
            if node.get("_target_") == "SlidingWindowInferer":
                found += 1
                if {"sw_device", "device"} - set(node):
                    missing.append(f"{where}: SlidingWindowInferer without sw_device and device")
            for value in node.values():
                configs(value, where)
        elif isinstance(node, list):
            for value in node:
                configs(value, where)

    for path in sorted((REPO / "bundle" / "configs").glob("*.json")):
        configs(json.loads(path.read_text()), path.relative_to(REPO).as_posix())
    assert found >= 12, f"only {found} sliding windows found: is the search still looking in the right places?"
    assert not missing, "sliding windows that leave their devices to chance:\n" + "\n".join(missing)


def _devices_from_the_kit(tree: ast.AST) -> set[str]:
    """Names a notebook binds to ``pick_device(...)``."""
    return {target.id for node in ast.walk(tree) if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
            and _called(node.value) == "pick_device" for target in node.targets if isinstance(target, ast.Name)}


def _is_the_cpu(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and _called(node) == "device" and len(node.args) == 1
            and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cpu")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[f"{p.parent.name}/{p.stem}" for p in NOTEBOOKS])
def test_every_device_a_notebook_moves_to_comes_from_pick_device(path: Path) -> None:
    """``.to(X)``, MONAI's ``device=``/``sw_device=`` (and a window dict's): X is a name bound to ``pick_device(...)``,
    or, for where a stitched volume lives, ``torch.device("cpu")``. No notebook names a GPU itself."""
    tree = _python(_notebook_source(path))
    from_the_kit = _devices_from_the_kit(tree)
    stated: list[tuple[int, str, ast.AST]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "to" and node.args:
            stated.append((node.lineno, ".to", node.args[0]))
        if isinstance(node, ast.Call) and _called(node) in MONAI_DEVICE_USERS:
            stated += [(node.lineno, keyword.arg, keyword.value) for keyword in node.keywords
                       if keyword.arg in ("device", "sw_device")]
        if isinstance(node, ast.Dict):
            stated += [(node.lineno, key.value, value) for key, value in zip(node.keys, node.values, strict=True)
                       if isinstance(key, ast.Constant) and key.value in ("device", "sw_device")]
    wrong = [f"line {line}: {what}={ast.unparse(value)}" for line, what, value in stated
             if not ((isinstance(value, ast.Name) and value.id in from_the_kit)
                     or (what == "device" and _is_the_cpu(value)))]
    assert not wrong, (f"{path.name}: devices not taken from pick_device ({sorted(from_the_kit) or 'none bound'}):\n"
                       + "\n".join(wrong))


# --------------------------------------------------------------------------- the code run, the network elsewhere
@pytest.fixture
def windows_seen(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Every call of MONAI's sliding_window_inference (function or SlidingWindowInferer), with its bound arguments."""
    import monai.inferers
    import monai.inferers.inferer
    import monai.inferers.utils

    original = monai.inferers.utils.sliding_window_inference
    signature = inspect.signature(original)
    seen: list[dict[str, Any]] = []

    def recorded(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        seen.append(dict(bound.arguments))
        return original(*args, **kwargs)

    for module in (monai.inferers, monai.inferers.utils, monai.inferers.inferer):
        monkeypatch.setattr(module, "sliding_window_inference", recorded)
    return seen


def _parameter_device(predictor: Any) -> torch.device | None:
    """The device of a network's weights, also through the kit's autocast wrapper and DDP-like wrappers."""
    for candidate in (predictor, getattr(predictor, "network", None), getattr(predictor, "__wrapped__", None)):
        if isinstance(candidate, torch.nn.Module):
            return next(candidate.parameters()).device
    closure = getattr(predictor, "__closure__", None) or ()
    for cell in closure:
        if isinstance(cell.cell_contents, torch.nn.Module):
            return next(cell.cell_contents.parameters()).device
    return None


def _solution_of(notebook: Path, exercise: str) -> str:
    cells = nbformat.read(notebook, as_version=4).cells
    for item in find_exercises(nbformat.read(notebook, as_version=4)):
        if item.exercise_id == exercise:
            return "\n".join(cells[index].source for index in item.solutions)
    raise AssertionError(f"{notebook.name} has no exercise {exercise}")


def _in_view_cell(notebook: Path, call: str) -> str:
    """The (non-solution) code cell of a notebook that calls ``call``."""
    cells = [cell for cell in nbformat.read(notebook, as_version=4).cells if cell.cell_type == "code"
             and f"{call}(" in cell.source and "solution" not in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{notebook.name}: expected one cell calling {call}, found {len(cells)}"
    return cells[0].source


def test_in_view_windows_and_the_kits_run_with_the_network_on_its_device_and_the_data_on_the_cpu(
        windows_seen: list[dict[str, Any]]) -> None:
    from spleenkit import build_unet, choose_precision, get_preset, make_inferer, pick_device, predict_logits
    from spleenkit.exercises import check
    from spleenkit.predict import autocast_inferer

    compute_device = pick_device("auto")  # what every notebook uses: the GPU where there is one
    recipe = get_preset("quick")
    torch.manual_seed(0)
    network = build_unet(recipe).to(compute_device).eval()
    image = torch.rand(1, 70, 64, 40)  # (channel, x, y, z) on the CPU, as the notebooks' resampled scans are
    on_the_cpu = torch.device("cpu")

    # 06, exercise 3: the solution as the instructor copy has it, on the CPU slab
    namespace: dict[str, Any] = {"torch": torch, "slab": image, "network": network, "recipe": recipe,
                                 "compute_device": compute_device}
    exec(_solution_of(REPO / "notebooks" / "06_inference_visualization.ipynb", "06-sliding-window"), namespace)
    assert namespace["my_logits"].device == on_the_cpu
    verdict = check("06-sliding-window", namespace["my_logits"], image=image, network=network, preset=recipe,
                    device=compute_device)
    assert verdict.status == "correct", verdict

    # 05, section 2: MONAI's evaluation of one case, the batch from a CPU DataLoader
    precision = choose_precision(compute_device, purpose="inference")
    namespace = {"torch": torch, "batch": {"image": image[None]}, "network": network, "preset": recipe,
                 "compute_device": compute_device, "precision": precision}
    exec(_in_view_cell(REPO / "notebooks" / "05_evaluation.ipynb", "sliding_window_inference"), namespace)
    assert namespace["batch"]["pred"].device == on_the_cpu

    # the kit: what evaluate_run, infer and the bundle run (make_inferer + predict_logits), and the evaluator's
    kit_logits = predict_logits(network, image, make_inferer(recipe, device=compute_device), compute_device, amp=False)
    assert kit_logits.device == on_the_cpu
    torch.testing.assert_close(kit_logits, namespace["batch"]["pred"][0].float(), rtol=1e-3, atol=1e-3)
    with torch.no_grad():
        autocast_inferer(make_inferer(recipe, device=compute_device, stitch_device="auto"), compute_device,
                         False)(image[None].to(compute_device), network)

    assert len(windows_seen) >= 4
    for call in windows_seen:
        inputs_device = call["inputs"].device
        network_device = _parameter_device(call["predictor"])
        assert call.get("sw_device") is not None and call.get("device") is not None, call.keys()
        assert torch.device(call["sw_device"]) == compute_device, "windows must run where pick_device put the network"
        assert network_device in (None, compute_device)
        if torch.device(call["device"]) == on_the_cpu:
            continue  # the stitched volume on the CPU, whatever the data's device
        assert inputs_device == compute_device, "the stitched volume stays beside the data only when both are there"
    if compute_device.type == "cuda":  # the real thing: the data stayed on the CPU while the network was on the GPU
        assert any(call["inputs"].device == on_the_cpu for call in windows_seen)


# --------------------------------------------------------------------------- 04 on one GPU
@pytest.mark.parametrize(("gpus", "expected"), [
    (0, (2, "cpu", "no GPU")),
    (1, (2, "cpu", "one GPU here")),  # a one-GPU Colab: still one process against two, both on the CPU
    (2, (2, "auto", "one process per GPU")),
    (4, (4, "auto", "one process per GPU")),
])
def test_the_data_parallel_lesson_compares_one_process_with_several_on_any_machine(
        monkeypatch: pytest.MonkeyPatch, gpus: int, expected: tuple[int, str, str]) -> None:
    from spleenkit import data_parallel_plan, distributed

    monkeypatch.setattr(distributed, "_gpu_count", lambda: gpus)
    plan = data_parallel_plan()
    assert (plan.processes, plan.device) == expected[:2] and expected[2] in plan.reason
    assert plan.processes >= 2
    assert data_parallel_plan(processes=2, device="cpu").device == "cpu"
    assert data_parallel_plan(processes=1).processes == 1


def test_a_data_parallel_plan_that_cannot_be_kept_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    from spleenkit import BadInputError, data_parallel_plan, distributed

    monkeypatch.setattr(distributed, "_gpu_count", lambda: 1)
    with pytest.raises(BadInputError, match="device='cuda' with 1 GPU"):
        data_parallel_plan(device="cuda")
    with pytest.raises(BadInputError, match="processes=2 on device='cuda': only 1 GPU"):
        data_parallel_plan(processes=2, device="cuda")
    with pytest.raises(BadInputError, match="processes=0"):
        data_parallel_plan(processes=0)


def test_the_plan_is_made_without_loading_torch_on_a_machine_without_gpu() -> None:
    """04's kernel asks before torchrun starts: loading PyTorch there would hold about 180 MB beside the workers."""
    import os
    import subprocess
    import sys

    code = ("import sys\nfrom spleenkit import data_parallel_plan\n"
            "print(data_parallel_plan().processes, 'torch' in sys.modules)")
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    if not Path("/dev/nvidia0").exists():
        assert out.split() == ["2", "False"], out


# --------------------------------------------------------------------------- the GPU check, ready for a GPU machine
def test_the_gpu_checks_notebook_profile_gives_every_notebook_parameters_it_declares(tmp_path: Path) -> None:
    """scripts/gpu_check.sh runs every notebook with the full profile's device settings: its profile must load and
    give each notebook only parameters it declares (a typo would only show on the GPU machine)."""
    import re

    from spleenkit.notebooks import load_profile, notebook_parameters

    script = (REPO / "scripts" / "gpu_check.sh").read_text()
    match = re.search(r'cat >"\$work/gpu-notebooks.yaml" <<YAML\n(.*?)\nYAML\n', script, re.DOTALL)
    assert match, "scripts/gpu_check.sh no longer writes its notebook profile"
    profile = tmp_path / "gpu-notebooks.yaml"
    profile.write_text(match.group(1).replace("$work", str(tmp_path)))
    settings = load_profile(str(profile), REPO)
    full = load_profile("full", REPO)
    for path in list_notebooks(REPO / "notebooks"):
        given = notebook_parameters(path, settings, {"example_dir": str(tmp_path / "example")})
        assert given.get("device", "auto") == "auto", "the device is the kit's choice, as in the full profile"
        for key in ("patch_size", "spacing", "num_workers", "validation_overlap"):  # the full profile's, not its epochs
            if key in notebook_parameters(path, full):
                assert given[key] == notebook_parameters(path, full)[key], (path.name, key)
