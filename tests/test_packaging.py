"""The environment files (conda, Binder) and the setup script install what pyproject.toml declares."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
ENVIRONMENT_FILES = ["environment.yml", "binder/environment.yml"]


PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# what an install without JupyterLab must not hold: the notebook server and the notebook tools
NOTEBOOK_TOOLS = {"jupyterlab", "notebook", "jupyter-server", "papermill", "nbval", "nbclient", "nbformat", "ipykernel",
                  "ipywidgets"}
# what only the dev extra declares (Binder still gets pytest, which nbval, a notebook tool, needs)
DEV_TOOLS = {"pytest", "ruff", "jupyter-repo2docker", "playwright", "simpleitk", "python-gdcm", "pyjpegls", "onnx",
             "dcmqi"}


def requirements(*extras: str) -> dict[str, Requirement]:
    """The requirements of the core and of ``extras`` (an extra that names others, "spleenkit[export]", is
    followed), by canonical name."""
    project = PYPROJECT["project"]
    own = canonicalize_name(project["name"])
    lines, pending, seen = list(project["dependencies"]), list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in project["optional-dependencies"], f"pyproject.toml declares no extra {extra!r}"
        for line in project["optional-dependencies"][extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == own:
                pending += sorted(requirement.extras)
            else:
                lines.append(line)
    return {canonicalize_name(r.name): r for r in map(Requirement, lines)}


def environment_pip_lines(relative: str) -> list[str]:
    """The lines of the pip: list of a conda environment file."""
    data = yaml.safe_load((REPO / relative).read_text())
    pip_lists = [entry["pip"] for entry in data["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    assert len(pip_lists) == 1, f"{relative}: expected one pip: list under dependencies"
    return pip_lists[0]


def editable_extras(text: str, where: str) -> set[str]:
    """The extras of the one editable install of the checkout in ``text`` (-e ".[a,b]" or -e "$REPO_ROOT[a,b]")."""
    found = re.findall(r'-e "?(?:\.|\$REPO_ROOT)\[([a-z,]+)\]"?', text)
    assert len(found) == 1, f"{where} should install the checkout once, editable, with its extras: found {found}"
    return set(found[0].split(","))


def setup_script_torch() -> str:
    text = (REPO / "scripts/setup_env.sh").read_text()
    match = re.search(r'TORCH_SPEC="\$\{SPLEENKIT_TORCH:-(torch==[^}]+)\}"', text)
    assert match, "scripts/setup_env.sh must pin torch in TORCH_SPEC"
    return match.group(1)


@pytest.mark.parametrize("relative", ENVIRONMENT_FILES)
def test_environment_file_parses_and_names_python_and_pip(relative: str) -> None:
    data = yaml.safe_load((REPO / relative).read_text())
    assert data["name"] == "spleenkit"
    conda_packages = [entry for entry in data["dependencies"] if isinstance(entry, str)]
    assert "pip" in conda_packages
    assert any(entry.startswith("python=3.") for entry in conda_packages)


@pytest.mark.parametrize("relative", ENVIRONMENT_FILES)
def test_torch_is_pinned_like_the_setup_script(relative: str) -> None:
    # a range or a bare name would let pip pull a CUDA build of several GB on a CPU machine
    (pinned,) = [Requirement(line) for line in environment_pip_lines(relative) if line.startswith("torch")]
    assert str(pinned) == setup_script_torch()
    (specifier,) = pinned.specifier
    assert specifier.operator == "=="
    assert requirements()["torch"].specifier.contains(specifier.version), (
        "the pinned torch must satisfy pyproject.toml's torch requirement")


def test_environment_files_list_no_package_of_their_own() -> None:
    # pyproject.toml is the one list of packages: the environment files pin torch and install the kit's extras
    for relative in ENVIRONMENT_FILES:
        lines = [line for line in environment_pip_lines(relative) if not line.startswith(("--", "torch=="))]
        assert all(line.startswith("-e .[") for line in lines), f"{relative} lists packages itself: {lines}"
    assert editable_extras("\n".join(environment_pip_lines("environment.yml")), "environment.yml") == {"notebooks",
                                                                                                       "viewer"}


def test_the_core_holds_no_jupyter_and_reads_compressed_dicom() -> None:
    core = requirements()
    assert not NOTEBOOK_TOOLS & set(core), f"the core install would bring {sorted(NOTEBOOK_TOOLS & set(core))}"
    assert not DEV_TOOLS & set(core)
    # pydicom's pixel-data plugins: libjpeg (JPEG, JPEG lossless, JPEG-LS) and openjpeg (JPEG 2000); RLE is pydicom's
    assert {"torch", "monai", "pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "highdicom",
            "fire"} <= set(core)
    assert set(requirements("notebooks")) - set(core) == NOTEBOOK_TOOLS - {"notebook", "jupyter-server", "nbclient"}
    assert "nbclient" not in requirements("dev", "viewer"), "nbclient comes with papermill; the kit never imports it"


def test_the_command_line_and_training_import_nothing_from_jupyter() -> None:
    # what `spleenkit --help`, `spleenkit info` and `import spleenkit.training` load in a fresh interpreter
    code = (
        "import contextlib, io, sys\n"
        "from spleenkit.cli import main\n"
        "for args in (['--help'], ['info']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()):\n"
        "        try:\n"
        "            main(args)\n"
        "        except SystemExit:\n"
        "            pass\n"
        "import spleenkit.training, spleenkit.inference, spleenkit.dicom_seg\n"
        "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = set(result.stdout.split())
    assert "spleenkit" in loaded and "torch" in loaded
    prefixes = ("jupyter", "notebook", "nbformat", "nbclient", "papermill", "ipykernel", "ipywidgets", "itkwidgets")
    jupyter = sorted(name for name in loaded if name.startswith(prefixes))
    assert not jupyter, f"imported {jupyter}"


def test_binder_gets_the_notebooks_and_the_viewer_but_no_dev_tools() -> None:
    extras = editable_extras((REPO / "binder/postBuild").read_text(), "binder/postBuild")
    assert extras == {"notebooks", "viewer"}
    binder = requirements(*extras)
    assert NOTEBOOK_TOOLS - {"notebook", "jupyter-server", "nbclient"} <= set(binder)
    assert "itkwidgets" in binder
    assert not DEV_TOOLS & set(binder), f"Binder's image would carry {sorted(DEV_TOOLS & set(binder))}"


def test_the_setup_script_installs_everything_a_developer_needs() -> None:
    extras = editable_extras((REPO / "scripts/setup_env.sh").read_text(), "scripts/setup_env.sh")
    developer = requirements(*extras)
    assert (NOTEBOOK_TOOLS - {"notebook", "jupyter-server", "nbclient"}) | DEV_TOOLS <= set(developer)
    assert set(requirements(*PYPROJECT["project"]["optional-dependencies"])) == set(developer), (
        "a developer gets every extra")


def test_binder_uses_the_cpu_wheel_index_and_postbuild_installs_the_kit() -> None:
    lines = environment_pip_lines("binder/environment.yml")
    assert any(line.startswith("--extra-index-url") and line.rstrip("/").endswith("/whl/cpu") for line in lines)
    post_build = REPO / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable (chmod +x; git keeps the mode)"
    text = post_build.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "pip install" in text
    assert "spleenkit data synth" in text


def test_scripts_install_torch_before_the_kit() -> None:
    text = (REPO / "scripts/setup_env.sh").read_text()
    torch_at = text.index('pip install -qq "$TORCH_SPEC"')
    kit_at = text.index('pip install -qq -e "$REPO_ROOT[')
    assert torch_at < kit_at
    for script in ("scripts/run_all.sh", "scripts/test.sh", "scripts/check_installs.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), f"{script} must be executable"
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()


def test_the_install_check_reads_each_install_from_its_own_file() -> None:
    # scripts/check_installs.sh takes torch's pin and the extras from setup_env.sh and binder/postBuild: when it
    # cannot read them it stops with status 1 before doing anything; an unknown install name is status 2
    result = subprocess.run(["bash", str(REPO / "scripts/check_installs.sh"), "no-such-install"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown install 'no-such-install'" in result.stderr, result.stderr


def test_the_package_ships_its_type_hints_and_the_bundle() -> None:
    import setuptools

    tool = PYPROJECT["tool"]["setuptools"]
    declared = set(tool["packages"])
    found = set(setuptools.find_packages(where=str(REPO), include=["spleenkit", "spleenkit.*"]))
    assert found <= declared, f"pyproject.toml's packages lacks {sorted(found - declared)}"
    assert (REPO / "spleenkit" / "py.typed").is_file() and tool["package-data"]["spleenkit"] == ["py.typed"]
    # the bundle (bundle/ of the checkout) installs as spleenkit/_bundle: every file of it that git tracks
    assert tool["package-dir"] == {"spleenkit._bundle": "bundle"}
    patterns = tool["package-data"]["spleenkit._bundle"]
    tracked = subprocess.run(["git", "ls-files", "bundle"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked
    for name in tracked:
        relative = Path(name).relative_to("bundle")
        assert any(relative.match(pattern) and len(relative.parts) == len(Path(pattern).parts)
                   for pattern in patterns), f"{name} would not be installed with the package"
    assert "data-files" not in tool


# --------------------------------------------------------------------------- Binder, as repo2docker reads it
def test_repo2docker_builds_binder_environment_then_runs_post_build() -> None:
    # repo2docker's own rules, offline: --no-build prints the Dockerfile it would build, building nothing
    result = subprocess.run([sys.executable, "-m", "repo2docker", "--no-build", "--debug", "--user-id", "1000",
                             "--user-name", "jovyan", str(REPO)], capture_output=True, text=True, timeout=120)
    text = result.stdout + result.stderr
    assert result.returncode == 0, text[-3000:]
    python = yaml.safe_load((REPO / "binder/environment.yml").read_text())["dependencies"]
    version = next(entry for entry in python if isinstance(entry, str) and entry.startswith("python=")).split("=")[1]
    assert f"Building conda environment for python={version}" in text, "repo2docker must take binder/environment.yml"
    assert '--file "binder/environment.yml"' in text, "binder/ wins over the root's environment.yml"
    assert "RUN ./binder/postBuild" in text
    assert "requirements.txt" not in text and "apt.txt" not in text, "one description of the image: binder/"
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(requires).contains(f"{version}.0"), f"Binder's python {version} is outside {requires}"


def test_binder_files_are_the_kinds_repo2docker_knows_and_post_build_is_executable_in_git() -> None:
    known = {"environment.yml", "postBuild", "start", "apt.txt", "runtime.txt", "README.md"}
    assert {path.name for path in (REPO / "binder").iterdir()} <= known, (
        "binder/ holds a file repo2docker would act on unexpectedly (a Dockerfile replaces everything)")
    listed = subprocess.run(["git", "ls-files", "-s", "binder/postBuild"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    assert listed.startswith("100755"), "git must record binder/postBuild as executable (git update-index --chmod=+x)"
    assert (REPO / "binder/postBuild").read_text().startswith("#!"), "postBuild starts with a shebang line"


def test_binder_makes_the_quick_profiles_data_where_the_notebooks_look_by_default() -> None:
    # On Binder the notebooks run with their default parameters, i.e. the quick profile's data.
    import nbformat

    from spleenkit.notebooks import list_notebooks, load_profile

    match = re.search(r"spleenkit data synth --out (\S+)", (REPO / "binder/postBuild").read_text())
    assert match, "binder/postBuild makes the synthetic dataset"
    made = (REPO / match.group(1)).resolve()
    assert Path(load_profile("quick", REPO)["shared"]["data_dir"]) == made
    for path in list_notebooks(REPO / "notebooks"):
        cells = [c for c in nbformat.read(path, as_version=4).cells if "parameters" in c.metadata.get("tags", [])]
        default = re.search(r'^data_dir = "([^"]+)"', cells[0].source, re.MULTILINE) if cells else None
        if default:
            assert (REPO / "notebooks" / default.group(1)).resolve() == made, (
                f"{path.name}: data_dir defaults to {default.group(1)}, not the folder binder/postBuild fills")
