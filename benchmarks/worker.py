"""Run one benchmark task for one side in this process and write its result as JSON.

    python benchmarks/worker.py SIDE TASK PARAMS.json RESULT.json

SIDE is ``kit``, ``reference`` or ``levers`` (the kit's pieces, lever by lever); each run is its
own process, so that peak memory and start-up costs of one side never leak into the other.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path


def main(argv: list[str]) -> int:
    side, task, params_path, result_path = argv
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    started = time.perf_counter()
    params = json.loads(Path(params_path).read_text())
    import torch

    if params.get("threads"):
        torch.set_num_threads(int(params["threads"]))
    import_started = time.perf_counter()
    if side == "kit":
        import kit_side as module
    elif side == "reference":
        import reference as module
    elif side == "levers":
        import levers as module
    else:
        raise SystemExit(f"unknown side {side!r}")
    import monai  # noqa: F401  (both sides need it; counted apart from the task)

    import_seconds = time.perf_counter() - import_started
    result = module.TASKS[task](params)
    from common import peak_memory

    result.update(peak_memory())
    result.update(side=side, task=task, import_seconds=round(import_seconds, 3),
                  process_seconds=round(time.perf_counter() - started, 3), torch_threads=torch.get_num_threads())
    Path(result_path).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
