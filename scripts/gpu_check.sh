#!/usr/bin/env bash
# Check the multi-GPU path (NCCL, DDP, SyncBatchNorm, distributed evaluation, failure handling) on a
# machine with GPUs; the CPU tests (tests/test_distributed.py) cover the same code with gloo.
#
#   scripts/gpu_check.sh [WORK_DIR]       (about 2-4 minutes; uses every GPU, at most 8)
#
# Exits non-zero at the first check that fails; prints one line per check and a summary.
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
echo "== all GPU checks passed ($work)"
