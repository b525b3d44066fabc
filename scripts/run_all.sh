#!/usr/bin/env bash
# The main job: set up the environment, make the synthetic dataset, and execute every numbered
# notebook with papermill under the quick profile (CPU, minutes). Extra arguments go to
# `spleenkit notebooks run`, e.g. `bash scripts/run_all.sh --only 00 01` or `--profile full`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/setup_env.sh

echo "== synthetic dataset in data/synthetic"
spleenkit data synth --out data/synthetic
echo "== notebooks"
spleenkit notebooks run "$@"
