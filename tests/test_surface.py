"""The notebook-facing surface: every lesson imports the kit from the package root, and every name there resolves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import spleenkit

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_of(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(cell["source"]) for cell in cells if cell["cell_type"] == "code")


def test_every_name_of_the_surface_resolves_to_its_module() -> None:
    for name, module in spleenkit.SURFACE.items():
        value = getattr(spleenkit, name)
        assert getattr(sys.modules[module], name) is value, name


def test_an_unknown_name_is_an_attribute_error() -> None:
    try:
        spleenkit.no_such_function  # noqa: B018
    except AttributeError as error:
        assert "no_such_function" in str(error)
    else:
        raise AssertionError("an unknown name resolved")


def test_importing_the_package_imports_neither_torch_nor_monai() -> None:
    code = "import sys, spleenkit; print('torch' in sys.modules, 'monai' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_notebooks_import_the_kit_from_the_package_root_only() -> None:
    assert NOTEBOOKS
    for notebook in NOTEBOOKS:
        code = code_of(notebook)
        deep = re.findall(r"^\s*(?:from|import) spleenkit\.(?!cli\b)[\w.]+", code, flags=re.MULTILINE)
        assert not deep, f"{notebook.name} imports a module path: {deep}"
        for match in re.finditer(r"^\s*from spleenkit import \(?([^)\n]+)", code, flags=re.MULTILINE):
            for name in (part.strip() for part in match.group(1).split(",")):
                if name:
                    assert name in spleenkit.SURFACE, f"{notebook.name} imports {name!r}, not on the surface"
