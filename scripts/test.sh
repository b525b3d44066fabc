#!/usr/bin/env bash
# The test command: set up the environment, then ruff and the whole pytest suite, which executes
# every notebook under the quick profile (tests/test_notebooks.py) and compares the kept outputs
# of the notebooks that have them with nbval. Extra arguments go to pytest (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh
export SPLEENKIT_NONINTERACTIVE=1
# executed copies of the notebooks stay here for inspection (CI keeps them as artifacts)
export SPLEENKIT_NOTEBOOK_ARTIFACTS="${SPLEENKIT_NOTEBOOK_ARTIFACTS:-$PWD/runs/test}"

echo "== ruff"
ruff check spleenkit tests
kept="$(spleenkit notebooks list --kept --paths)"
mapfile -t nbval_notebooks <<< "$kept"
[[ -n "$kept" ]] || nbval_notebooks=()
echo "== pytest (nbval compares the kept outputs of: ${nbval_notebooks[*]:-no notebook})"
status=0
python -m pytest tests "${nbval_notebooks[@]}" --nbval-lax --nbval-current-env --durations=15 "$@" || status=$?
if [[ $status -eq 5 ]]; then
    echo "pytest collected no tests: treating that as a failure" >&2
    exit 1
fi
echo "executed notebooks: $SPLEENKIT_NOTEBOOK_ARTIFACTS"
exit $status
