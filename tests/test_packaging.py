"""The environment files (conda, Binder) and the setup script install what pyproject.toml declares."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import tomllib
import yaml
from packaging.requirements import Requirement
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
