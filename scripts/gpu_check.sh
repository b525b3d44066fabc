#!/usr/bin/env bash
# Check the GPU path on a machine with GPUs: the multi-GPU training (NCCL, DDP, SyncBatchNorm, distributed
# evaluation, failure handling; the CPU tests in tests/test_distributed.py cover the same code with gloo), then
# every notebook run by the notebook runner with the full profile's device settings (the device the kit picks:
# the GPU; mixed precision; 04's and 08's windows, 07's loader workers) on the small synthetic dataset, with the
# quick recipe so that it takes minutes. No notebook has run on a GPU before this check.
#
#   scripts/gpu_check.sh [WORK_DIR]       (about 6-8 minutes on one GPU; uses every GPU, at most 8)
#
# 06 reads the real example CT: set SPLEENKIT_EXAMPLE_DIR, or put its files in data/totalseg-example (no
# internet needed then); without it 06 is left out and the summary says so. SPLEENKIT_GPU_CHECK_NOTEBOOKS=0
# skips the notebooks. Exits non-zero at the first check that fails; prints one line per check and a summary.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=${1:-$(mktemp -d -t spleenkit-gpu-check-XXXX)}
mkdir -p "$work"
gpus=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ "$gpus" -lt 1 ]]; then
    echo "no CUDA GPU visible: nothing to check here (the CPU path is checked by tests/test_distributed.py)" >&2
    exit 1
fi
nproc=$(( gpus > 8 ? 8 : gpus ))
echo "== $nproc GPU process(es); work folder $work"
python -c "import torch, torch.distributed as d; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'nccl', '.'.join(map(str, torch.cuda.nccl.version())) if d.is_nccl_available() else 'missing')"

echo "== synthetic data"
spleenkit data synth --out "$work/data" --cases 10 --matrix 128 --force >/dev/null

run() {  # torchrun with the kit, output kept in a log
    local name=$1; shift
    local started=$SECONDS
    if python -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m spleenkit "$@" \
            >"$work/$name.log" 2>&1; then
        echo "ok   $name ($(( SECONDS - started )) s)"
    else
        echo "FAIL $name (see $work/$name.log)"; tail -n 30 "$work/$name.log"; exit 1
    fi
}

echo "== training on $nproc GPU(s): NCCL, DDP, SyncBatchNorm, mixed precision"
run train-syncbn train --data "$work/data" --out "$work/run" --preset quick --epochs 3 --val-interval 1 \
    --device cuda --distributed --sync-bn --timeout-s 300
python - "$work/run" <<'PY'
import json, math, sys
from pathlib import Path
run = Path(sys.argv[1])
manifest = json.loads((run / "manifest.json").read_text())
shared = manifest["parameters"]["distributed"]
assert shared["backend"] == "nccl", shared
assert shared["sync_batchnorm"] is True, shared
lines = (run / "metrics.jsonl").read_text().splitlines()
assert len(lines) == 3 and all(math.isfinite(json.loads(l)["loss"]) for l in lines), lines
print("ok   manifest: backend nccl, SyncBatchNorm, 3 finite epochs; peak MiB per rank:",
      manifest.get("peak_memory_mib_per_rank"))
PY

echo "== training with linear learning-rate scaling, cache off (DistributedSampler)"
run train-sampler train --data "$work/data" --out "$work/run-sampler" --preset quick --epochs 2 --cache-rate 0 \
    --scale-lr linear --device cuda --distributed --timeout-s 300

echo "== evaluation: $nproc GPU(s) against one"
run evaluate-distributed evaluate --model "$work/run/model.pt" --data "$work/data" --split all \
    --out "$work/eval-distributed" --no-save-predictions --device cuda --distributed
spleenkit evaluate --model "$work/run/model.pt" --data "$work/data" --split all --out "$work/eval-single" \
    --no-save-predictions --device cuda >"$work/evaluate-single.log" 2>&1
python - "$work/eval-single/per_case.csv" "$work/eval-distributed/per_case.csv" <<'PY'
import sys
from spleenkit.metrics import read_rows_csv
single, multi = (read_rows_csv(p) for p in sys.argv[1:3])
assert [(r["case"], r["space"]) for r in single] == [(r["case"], r["space"]) for r in multi]
worst = max(abs(a["dice"] - b["dice"]) for a, b in zip(single, multi))
assert worst <= 1e-4, f"Dice differs by up to {worst}"
print(f"ok   distributed evaluation matches one GPU (largest Dice difference {worst:.2e})")
PY

if [[ "$nproc" -ge 2 ]]; then
    echo "== a crashing rank ends the job"
    started=$SECONDS
    if SPLEENKIT_CRASH_RANK=1 python -m torch.distributed.run --standalone --nproc_per_node="$nproc" -m spleenkit \
            train --data "$work/data" --out "$work/run-crash" --preset quick --epochs 1 --device cuda \
            --distributed --timeout-s 60 >"$work/crash.log" 2>&1; then
        echo "FAIL crash: the job exited 0"; exit 1
    fi
    grep -q "rank 1 of $nproc" "$work/crash.log" || { echo "FAIL crash: the failing rank is not named"; exit 1; }
    echo "ok   crash: non-zero exit naming rank 1 after $(( SECONDS - started )) s"
else
    echo "(one GPU: the crash check needs two processes and is skipped)"
fi
if [[ "${SPLEENKIT_GPU_CHECK_NOTEBOOKS:-1}" != "0" ]]; then
    echo "== the notebooks on the GPU: the full profile's device settings, synthetic phantoms, quick recipe"
    # the full profile (notebooks/profiles/full.yaml) without its hours: the same device and loader settings
    cat >"$work/gpu-notebooks.yaml" <<YAML
description: the full profile's device settings on the synthetic phantoms, quick recipe (scripts/gpu_check.sh)
execution_timeout: 600
shared:
  preset: quick
  data_dir: $work/notebook-data/synthetic
  runs_dir: $work/notebook-runs
  device: auto
notebooks:
  "01":
    source: synthetic
  "04":
    patch_size: null
  "07":
    patch_size: null
    spacing: null
    num_workers: 4
  "08":
    patch_size: null
    validation_overlap: 0.5
YAML
    only=()
    if [[ -z "${SPLEENKIT_EXAMPLE_DIR:-}" && ! -f data/totalseg-example/ct.nii.gz ]]; then
        echo "(no example CT: SPLEENKIT_EXAMPLE_DIR unset and data/totalseg-example/ct.nii.gz missing; 06 left out)"
        only=(--only $(spleenkit notebooks list --paths | xargs -n1 basename | grep -v '^06_' | cut -c1-2))
    fi
    started=$SECONDS
    if spleenkit notebooks run --profile "$work/gpu-notebooks.yaml" --out "$work/notebooks" "${only[@]}" \
            --set example_dir="$PWD/data/totalseg-example" >"$work/notebooks.log" 2>&1; then
        echo "ok   notebooks on the GPU ($(( SECONDS - started )) s):"
    else
        echo "FAIL notebooks on the GPU (see $work/notebooks.log)"; tail -n 60 "$work/notebooks.log"; exit 1
    fi
    sed -n '/^notebook /,/^total/p' "$work/notebooks.log"
    python - "$work/notebooks/summary.json" <<'PY'
import json, sys
summary = json.load(open(sys.argv[1]))
devices = {n["notebook"]: n["parameters"].get("device") for n in summary["notebooks"]}
print("     device parameter per notebook:", devices)
PY
fi
echo "== all GPU checks passed ($work)"
