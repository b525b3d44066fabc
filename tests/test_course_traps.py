"""Traps a student or an instructor fell into with the notebooks, each held by a test that would have caught it.

- a notebook that sends the reader to the wrong next notebook ("Next: 02, training the UNet"; 02 is
  preprocessing) or credits the wrong one ("notebook 02 trains"; it is 03);
- ``source = "example"`` in 01 writing its one-case dataset.json over the synthetic dataset;
- 32³ patches in 04 and 07, whose 2-voxel deepest feature map breaks CPU bfloat16 gradients (see 03);
- "rerun with preset fast" on the 12 phantoms, which held out 9 and trained on 3;
- the bundle commands of 07 sitting silent until they finish.
"""

from __future__ import annotations

import ast
import re
import sys
import time
from pathlib import Path

import nbformat
import pytest

from spleenkit.data import split_datalist
from spleenkit.errors import BadInputError, SpleenkitError
from spleenkit.notebooks import list_notebooks, load_profile
from spleenkit.presets import get_preset

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = {path.name[:2]: path for path in list_notebooks(NOTEBOOK_DIR)}
SYNTHETIC_CASES = 12  # notebook 01's phantoms: write_synthetic_dataset(cases=12)

# what each notebook does, as the others describe it ("notebook 03 trains", "**05**, evaluating")
ROLES = {"train": {"03", "04", "08"}, "evaluat": {"05"}, "preprocess": {"02"}, "transform": {"02"},
         "segment": {"06"}, "fine-tun": {"07"}}
CLAIM = re.compile(r"(?:notebooks? |\*\*)(\d\d)(?:\*\*)?,? (" + "|".join(ROLES) + r")\w*", re.IGNORECASE)


def text_of(path: Path) -> str:
    return "\n".join(cell.source for cell in nbformat.read(path, as_version=4).cells)


def parameters(path: Path) -> dict[str, object]:
    """The defaults of a notebook's parameters cell."""
    notebook = nbformat.read(path, as_version=4)
    cell = next(c for c in notebook.cells if "parameters" in c.metadata.get("tags", []))
    values = {}
    for node in ast.parse(cell.source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            values[node.targets[0].id] = ast.literal_eval(node.value)
    return values


# --------------------------------------------------------------------------- pointers between notebooks
@pytest.mark.parametrize("number", sorted(NOTEBOOKS))
def test_a_notebook_credits_each_step_to_the_notebook_that_does_it(number: str) -> None:
    wrong = [f"{match.group(0)!r}: that is notebook {' or '.join(sorted(ROLES[match.group(2).lower()]))}"
             for match in CLAIM.finditer(text_of(NOTEBOOKS[number]))
             if match.group(1) not in ROLES[match.group(2).lower()]]
    assert not wrong, f"{NOTEBOOKS[number].name} points at the wrong notebook: {wrong}"


def test_the_claims_check_catches_the_old_wording() -> None:
    old = {"Next: **02**, training the UNet on this dataset.": "02",
           "the prediction below is mostly noise; notebook 02 trains properly": "02"}
    for sentence, number in old.items():
        match = CLAIM.search(sentence)
        assert match and match.group(1) == number and number not in ROLES[match.group(2).lower()]


@pytest.mark.parametrize("number", sorted(NOTEBOOKS)[:-1])
def test_next_names_the_following_notebook(number: str) -> None:
    """A summary's 'Next: ...' line, where there is one, sends the reader to the following notebook."""
    following = f"{int(number) + 1:02d}"
    for line in text_of(NOTEBOOKS[number]).splitlines():
        if line.startswith("Next"):
            assert following in line, f"{NOTEBOOKS[number].name}: {line!r} does not name notebook {following}"


# --------------------------------------------------------------------------- the example CT in 01
def test_data_notebook_gives_the_example_its_own_folder() -> None:
    path = NOTEBOOKS["01"]
    defaults = parameters(path)
    own = Path(str(defaults["example_dataset_dir"])).resolve()
    for profile in ("quick", "full"):
        shared = load_profile(profile, REPO)["shared"]
        assert own != Path(shared["data_dir"]).resolve(), f"the {profile} profile's data_dir is the example's folder"
    assert own != Path(str(defaults["data_dir"])).resolve()
    source = text_of(path)
    call = re.search(r"example_as_msd\((.*)\)", source)
    assert call and "example_dataset_dir" in call.group(1) and "data_dir" not in call.group(1).replace(
        "example_dataset_dir", ""), f"source 'example' must write to example_dataset_dir: {call and call.group(0)}"


def test_the_example_never_overwrites_another_dataset(example_ct_dir: Path, tmp_path: Path) -> None:
    from spleenkit.data import example_as_msd, load_datalist, write_synthetic_dataset

    synthetic = write_synthetic_dataset(tmp_path / "synthetic", cases=2, test_cases=0, matrix=32, slice_spacing=5.0)
    before = (synthetic / "dataset.json").read_bytes()
    with pytest.raises(BadInputError, match="another dataset"):
        example_as_msd(example_ct_dir, synthetic)
    assert (synthetic / "dataset.json").read_bytes() == before
    assert not (synthetic / "imagesTr" / "example_1.nii.gz").exists()
    # the synthetic writer still recognises its folder (it refused it after the old overwrite)
    assert write_synthetic_dataset(synthetic, cases=2, test_cases=0, matrix=32, slice_spacing=5.0) == synthetic
    assert len(load_datalist(synthetic)) == 2

    stray = tmp_path / "images-without-a-list"
    (stray / "imagesTr").mkdir(parents=True)
    (stray / "imagesTr" / "case_7.nii.gz").write_bytes(b"someone's scan")
    with pytest.raises(BadInputError, match="case_7"):
        example_as_msd(example_ct_dir, stray)

    own = tmp_path / "example"
    example_as_msd(example_ct_dir, own)
    example_as_msd(example_ct_dir, own, mask="spleen_b.nii.gz")  # again, with the other mask: its own folder
    assert len(load_datalist(own)) == 1
    assert [path.name for path in (own / "labelsTr").iterdir()] == ["example_1.nii.gz"]  # no temporary file left


# --------------------------------------------------------------------------- patch sizes in 04, 07 and 08
@pytest.mark.parametrize("number", ["04", "07", "08"])
def test_default_patches_keep_the_deepest_feature_map_above_two_voxels(number: str) -> None:
    patch = parameters(NOTEBOOKS[number])["patch_size"]
    overrides = load_profile("quick", REPO).get("notebooks", {}).get(number, {})
    patch = overrides.get("patch_size", patch)
    sides = [int(patch)] * 3 if isinstance(patch, int) else [int(side) for side in patch]
    assert all(side % 16 == 0 for side in sides), f"{sides}: the UNet halves each side four times"
    assert min(sides) // 16 >= 3, (f"{sides}: the deepest feature map is {min(sides) // 16} voxels; at 2 the CPU "
                                   "bfloat16 weight gradient is wrong (notebook 03), so use 48 or 64")


# --------------------------------------------------------------------------- the split of a small dataset
def _phantoms(count: int) -> list[dict[str, str]]:
    return [{"image": f"spleen_{n}.nii.gz", "label": f"spleen_{n}.nii.gz"} for n in range(1, count + 1)]


def test_a_recipe_made_for_msd_is_refused_on_the_phantoms_instead_of_training_on_three() -> None:
    with pytest.raises(BadInputError, match="leave only 3 to train on.*validation_cases"):
        split_datalist(_phantoms(SYNTHETIC_CASES), get_preset("fast").validation_cases)
    training, validation = split_datalist(_phantoms(SYNTHETIC_CASES), get_preset("quick").validation_cases)
    assert (len(training), len(validation)) == (9, 3)
    training, validation = split_datalist(_phantoms(41), get_preset("seed").validation_cases)  # MSD: 32/9
    assert (len(training), len(validation)) == (32, 9)
    assert [len(part) for part in split_datalist(_phantoms(2), 1)] == [1, 1]


def test_the_course_plan_suggests_only_presets_that_fit_the_synthetic_data() -> None:
    outline = (NOTEBOOK_DIR / "README.md").read_text()
    plan = outline[outline.index("## Two-day course"):]
    plan = plan[:plan.index("\n## ", 1)] if "\n## " in plan[1:] else plan
    suggested = re.findall(r"preset\s*=\s*\\?[\"'](\w[\w.-]*)", plan)
    for name in suggested:
        validation = get_preset(name).validation_cases
        assert validation <= SYNTHETIC_CASES - validation, (
            f"the two-day plan suggests preset {name!r} for the course data: it holds out {validation} of the "
            f"{SYNTHETIC_CASES} phantoms and would train on {SYNTHETIC_CASES - validation}")


# --------------------------------------------------------------------------- the bundle commands of 07
def test_bundle_commands_stream_their_output_while_they_run(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import spleenkit.bundle as bundle

    marker = tmp_path / "seen"
    # prints a line, then waits (up to 20 s) until the line has been shown: only a streaming reader ends it early
    script = ("import pathlib, sys, time\nprint('epoch 1 of 2', flush=True)\nstart = time.time()\n"
              f"while not pathlib.Path({str(marker)!r}).exists() and time.time() - start < 20:\n"
              "    time.sleep(0.05)\nprint('done')\n")
    monkeypatch.setattr(bundle, "bundle_command", lambda command, overrides=None, processes=2:
                        [sys.executable, "-c", script])

    class Screen:
        def __init__(self) -> None:
            self.lines: list[str] = []

        def write(self, text: str) -> int:
            self.lines.append(text)
            if "epoch 1" in text:
                marker.touch()
            return len(text)

        def flush(self) -> None:
            pass

    screen = Screen()
    monkeypatch.setattr(sys, "stdout", screen)
    started = time.perf_counter()
    output = bundle.run_command("train", {}, bundle_dir=tmp_path)
    elapsed = time.perf_counter() - started
    monkeypatch.undo()
    assert output.splitlines() == ["epoch 1 of 2", "done"]
    assert "".join(screen.lines).splitlines() == ["epoch 1 of 2", "done"]
    assert elapsed < 15, f"the first line was shown only when the command ended ({elapsed:.0f} s)"

    monkeypatch.setattr(bundle, "bundle_command", lambda command, overrides=None, processes=2:
                        [sys.executable, "-c", "print('loading'); raise SystemExit(3)"])
    monkeypatch.setattr(sys, "stdout", Screen())
    with pytest.raises(SpleenkitError, match=r"exit status 3(.|\n)*loading"):
        bundle.run_command("train", {}, bundle_dir=tmp_path)
