#!/usr/bin/env bash
# Install the kit as each audience does, each into a fresh virtual environment, and check what it gets:
#   core       torch, then `pip install .`: the package, the command line, training, inference, DICOM
#   notebooks  torch, then `pip install ".[notebooks]"`
#   binder     what binder/ installs: torch, then binder/postBuild's extras
#   dev        what scripts/setup_env.sh installs: torch, then its editable install with the dev tools
# torch is installed first, pinned as scripts/setup_env.sh pins it. Each install must import, run
# `spleenkit --help` and `spleenkit info` without importing anything from Jupyter, find the bundle and
# the DICOM decoders, and pass `pip check`; the core must not hold JupyterLab at all. Ends with a table
# of each install's size and time.
#
#   bash scripts/check_installs.sh [core] [notebooks] [binder] [dev]    (default: all four)
#   SPLEENKIT_INSTALL_DIR=folder keeps the environments there (default: a temporary folder, removed)
set -euo pipefail
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"

# each install's pip argument, read from the file that does that install (one place for each fact)
torch_spec="$(sed -n 's/^TORCH_SPEC="${SPLEENKIT_TORCH:-\(torch==[^}]*\)}"$/\1/p' "$REPO_ROOT/scripts/setup_env.sh")"
binder_extras="$(grep -o '\-e "\.\[[a-z,]*\]"' "$REPO_ROOT/binder/postBuild" | grep -o '\[[a-z,]*\]')"
dev_extras="$(grep -o '\-e "$REPO_ROOT\[[a-z,]*\]"' "$REPO_ROOT/scripts/setup_env.sh" | grep -o '\[[a-z,]*\]')"
[[ -n "$torch_spec" && -n "$binder_extras" && -n "$dev_extras" ]] \
    || { echo "could not read torch's pin or the extras from setup_env.sh and binder/postBuild" >&2; exit 1; }

installs=("$@")
[[ ${#installs[@]} -gt 0 ]] || installs=(core notebooks binder dev)
for name in "${installs[@]}"; do
    [[ " core notebooks binder dev " == *" $name "* ]] \
        || { echo "unknown install '$name': core, notebooks, binder or dev" >&2; exit 2; }
done

if [[ -n "${SPLEENKIT_INSTALL_DIR:-}" ]]; then
    base="$SPLEENKIT_INSTALL_DIR"
    mkdir -p "$base"
else
    base="$(mktemp -d -t spleenkit-installs-XXXXXX)"
    trap 'rm -rf "$base"' EXIT
fi

# a plain install builds a wheel from a copy of the checkout's files (a build/ folder left in the checkout
# could add stale files to the wheel); the editable ones use the checkout itself, as binder/ and
# scripts/setup_env.sh do
rm -rf "$base/source"
mkdir -p "$base/source"
(cd "$REPO_ROOT" && git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - 2>/dev/null) | tar -C "$base/source" -xf -

declare -A INSTALL=(
    [core]="$base/source"
    [notebooks]="$base/source[notebooks]"
    [binder]="-e $REPO_ROOT$binder_extras"
    [dev]="-e $REPO_ROOT$dev_extras"
)

# run inside each environment, from a folder outside the checkout
read -r -d '' SMOKE <<'PY' || true
import contextlib, importlib.util, io, logging, sys
from importlib import metadata
from pathlib import Path

install, repo = sys.argv[1], Path(sys.argv[2])
import spleenkit
from spleenkit.cli import main

for args in (["--help"], ["info"]):
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(args)
        except SystemExit as exit_:
            status = exit_.code
    assert not status, f"spleenkit {' '.join(args)} exited with {status}"
logging.disable(logging.INFO)  # the command line turned on INFO logging; the encoders below chatter there
import spleenkit.dicom_seg, spleenkit.inference, spleenkit.training  # noqa: E401,F401
jupyter = sorted({m.split(".")[0] for m in sys.modules
                  if m.split(".")[0].startswith(("jupyter", "notebook", "nbformat", "nbclient", "papermill", "ipykernel",
                                                 "ipywidgets", "itkwidgets"))})
assert not jupyter, f"the command line and the training and inference modules imported {jupyter}"

def installed(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None

notebook_tools = ["jupyterlab", "notebook", "jupyter-server", "papermill", "nbval", "nbclient"]
if install == "core":
    present = [name for name in notebook_tools if installed(name)]
    assert not present, f"the core install holds {present}"
    package = Path(spleenkit.__file__).resolve()
    assert repo not in package.parents, f"imported the checkout ({package}), not the installed package"
else:
    missing = [name for name in ("jupyterlab", "papermill", "nbval", "ipykernel", "ipywidgets", "nbformat")
               if not installed(name)]
    assert not missing, f"{install} lacks {missing}"
wanted = {"binder": ["itkwidgets"], "dev": ["pytest", "ruff", "playwright", "onnx", "gdcm", "jpeg_ls"]}
for module in wanted.get(install, []):
    assert importlib.util.find_spec(module), f"{install} lacks {module}"
# (pytest comes with nbval, a notebook tool; the dev tools do not)
for module in {"binder": ["ruff", "repo2docker", "playwright", "onnx"],
               "notebooks": ["itkwidgets", "ruff", "repo2docker", "playwright", "onnx"]}.get(install, []):
    assert importlib.util.find_spec(module) is None, f"{install} should not hold {module}"

from spleenkit.bundle import bundle_source
assert (bundle_source() / "configs" / "metadata.json").is_file()

# compressed DICOM: every common transfer syntax has a decoder, and two of them round-trip here
import numpy as np
import pydicom.pixels
from pydicom.dataset import Dataset
from pydicom.uid import (ExplicitVRLittleEndian, JPEG2000Lossless, JPEGBaseline8Bit, JPEGLosslessSV1, JPEGLSLossless,
                         RLELossless)
for uid in (RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, JPEGBaseline8Bit):
    assert pydicom.pixels.get_decoder(uid).is_available, f"no decoder for {uid.name}"
pixels = (np.arange(64 * 48, dtype=np.int16).reshape(64, 48) % 2000) - 1000
for uid in (RLELossless, JPEG2000Lossless):
    ds = Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 64, 48, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.PixelData = pixels.tobytes()
    ds.compress(uid)
    assert np.array_equal(ds.pixel_array, pixels), f"{uid.name} did not round-trip"
print(f"{install}: ok (spleenkit {metadata.version('spleenkit')}, torch {metadata.version('torch')})")
PY

declare -A SECONDS_TAKEN SIZE SHOWN=([core]="." [notebooks]=".[notebooks]" [binder]="-e .$binder_extras"
                                   [dev]="-e .$dev_extras")
for name in "${installs[@]}"; do
    venv="$base/$name"
    rm -rf "$venv"
    echo "== $name: $PYTHON -m venv, pip install $torch_spec, then pip install ${INSTALL[$name]}"
    started=$(date +%s)
    "$PYTHON" -m venv "$venv"
    "$venv/bin/python" -m pip install -qq --upgrade pip
    "$venv/bin/python" -m pip install -qq "$torch_spec"
    # shellcheck disable=SC2086  # "-e PATH[extras]" is two arguments
    "$venv/bin/python" -m pip install -qq ${INSTALL[$name]}
    SECONDS_TAKEN[$name]=$(( $(date +%s) - started ))
    SIZE[$name]="$(du -sm "$venv" | cut -f1)"
    "$venv/bin/python" -m pip check
    "$venv/bin/spleenkit" --help >/dev/null
    (cd "$base" && "$venv/bin/python" -c "$SMOKE" "$name" "$REPO_ROOT")
done

echo
echo "| install | pip install | size of the environment (MB) | seconds to install |"
echo "| --- | --- | ---: | ---: |"
for name in "${installs[@]}"; do
    echo "| $name | \`${SHOWN[$name]}\` | ${SIZE[$name]} | ${SECONDS_TAKEN[$name]} |"
done
