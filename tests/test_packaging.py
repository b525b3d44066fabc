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


def pyproject_requirements() -> dict[str, Requirement]:
    """Every requirement of the package and of its optional extras, by canonical name."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        lines += extra
    requirements = [Requirement(line) for line in lines]
    own = canonicalize_name(project["name"])  # an extra that pulls in another extra ("spleenkit[export]")
    return {canonicalize_name(r.name): r for r in requirements if canonicalize_name(r.name) != own}


def environment_requirements(relative: str) -> dict[str, Requirement]:
    """The pip requirements listed in a conda environment file, by canonical name (pip options left out)."""
    data = yaml.safe_load((REPO / relative).read_text())
    pip_lists = [entry["pip"] for entry in data["dependencies"] if isinstance(entry, dict) and "pip" in entry]
    assert len(pip_lists) == 1, f"{relative}: expected one pip: list under dependencies"
    requirements = [Requirement(line) for line in pip_lists[0] if not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in requirements}


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
def test_environment_file_lists_the_same_packages_as_pyproject(relative: str) -> None:
    declared = pyproject_requirements()
    listed = environment_requirements(relative)
    missing = sorted(set(declared) - set(listed))
    extra = sorted(set(listed) - set(declared))
    assert not missing, f"{relative} lacks {missing}: add them to its pip: list as pyproject.toml declares them"
    assert not extra, f"{relative} lists {extra}, which pyproject.toml does not declare"
    for name, requirement in declared.items():
        if name == "torch":
            continue
        assert listed[name].specifier == requirement.specifier, (
            f"{relative}: {listed[name]} differs from pyproject.toml's {requirement}")
        assert listed[name].extras == requirement.extras, f"{relative}: extras of {name} differ from pyproject.toml"


@pytest.mark.parametrize("relative", ENVIRONMENT_FILES)
def test_torch_is_pinned_like_the_setup_script(relative: str) -> None:
    # a range or a bare name would let pip pull a CUDA build of several GB on a CPU machine
    pinned = environment_requirements(relative)["torch"]
    assert str(pinned) == setup_script_torch()
    (specifier,) = pinned.specifier
    assert specifier.operator == "=="
    assert pyproject_requirements()["torch"].specifier.contains(specifier.version), (
        "the pinned torch must satisfy pyproject.toml's torch requirement")


def test_binder_uses_the_cpu_wheel_index_and_postbuild_installs_the_kit() -> None:
    lines = yaml.safe_load((REPO / "binder/environment.yml").read_text())["dependencies"][-1]["pip"]
    assert any(line.startswith("--extra-index-url") and line.rstrip("/").endswith("/whl/cpu") for line in lines)
    post_build = REPO / "binder" / "postBuild"
    assert os.access(post_build, os.X_OK), "binder/postBuild must be executable (chmod +x; git keeps the mode)"
    text = post_build.read_text()
    assert text.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in text
    assert "pip install" in text and "-e ." in text
    assert "spleenkit data synth" in text


def test_scripts_install_torch_before_the_kit() -> None:
    text = (REPO / "scripts/setup_env.sh").read_text()
    torch_at = text.index('pip install -qq "$TORCH_SPEC"')
    kit_at = text.index('pip install -qq -e "$REPO_ROOT[dev]"')
    assert torch_at < kit_at
    for script in ("scripts/run_all.sh", "scripts/test.sh", ".ci/run"):
        assert os.access(REPO / script, os.X_OK), f"{script} must be executable"
    assert "bash scripts/test.sh" in (REPO / ".ci/run").read_text()


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
