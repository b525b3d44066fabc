# Sourced by run_all.sh and test.sh: use the active virtual environment, or create and activate
# .venv, then install the kit with everything a developer needs: the dev tools (tests, linters, and the
# notebooks and export extras) and the live 3D view (viewer). torch is installed FIRST and pinned: left
# to a plain `torch` or a version range, pip would pull a CUDA build of several GB on a machine without
# a local wheel.
# Installing is skipped when this environment already holds the kit for the current pyproject.toml.

TORCH_SPEC="${SPLEENKIT_TORCH:-torch==2.13.0}"
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

if [[ -z "${VIRTUAL_ENV:-}" && ( -z "${CONDA_PREFIX:-}" || "${CONDA_DEFAULT_ENV:-base}" == "base" ) ]]; then
    if [[ ! -x "$REPO_ROOT/.venv/bin/python" ]]; then
        echo "== creating a virtual environment in .venv"
        PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
        "$PYTHON" -m venv "$REPO_ROOT/.venv"
    fi
    # shellcheck disable=SC1091
    source "$REPO_ROOT/.venv/bin/activate"
fi

python - <<'PY'
import sys
if sys.version_info < (3, 10):
    sys.exit(f"spleenkit needs Python 3.10 or newer; this is {sys.version.split()[0]} ({sys.executable})")
PY

_stamp="$(python -c 'import sys; print(sys.prefix)')/.spleenkit-installed"
_wanted="$(cat "$REPO_ROOT/pyproject.toml" | sha256sum | cut -c1-16) $TORCH_SPEC $REPO_ROOT"
if [[ -f "$_stamp" && "$(cat "$_stamp")" == "$_wanted" ]] && python -c "import spleenkit, torch" 2>/dev/null; then
    echo "== environment ready: $(python -c 'import sys; print(sys.prefix)') (delete $_stamp to reinstall)"
else
    echo "== installing $TORCH_SPEC, then the kit with its dev tools and viewer (a few minutes the first time)"
    # -qq: pip reports errors only, so that the log shows what matters
    python -m pip install -qq --upgrade pip
    python -m pip install -qq "$TORCH_SPEC"
    python -m pip install -qq -e "$REPO_ROOT[dev,viewer]"
    echo "$_wanted" > "$_stamp"
fi
unset _stamp _wanted
