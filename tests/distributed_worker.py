"""What torchrun runs in tests/test_distributed.py: the kit, with a record of what each rank writes.

``distributed_worker.py cli ARGS...`` runs ``spleenkit ARGS``; ``distributed_worker.py train JSON``
runs ``spleenkit.training.train(**JSON)`` inside ``spleenkit.distributed.process_group`` (for preset
settings the CLI does not expose). Before that, an audit hook notes every path this rank opens
for writing, creates, renames or removes; at exit the list goes to ``$AUDIT_DIR/rank<RANK>.json``.
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_PATH_EVENTS = {"os.rename": 0, "os.mkdir": 0, "os.remove": 0, "os.rmdir": 0, "shutil.rmtree": 0}


def _audit(written: list[str]):
    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writing and isinstance(path, (str, bytes, os.PathLike)):
                written.append(os.fsdecode(path))
        elif event in _PATH_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
            written.append(os.fsdecode(args[0]))
            if event == "os.rename" and len(args) > 1:
                written.append(os.fsdecode(args[1]))

    return hook


def main() -> int:
    written: list[str] = []
    audit_dir = os.environ.get("AUDIT_DIR")
    if audit_dir:
        record = Path(audit_dir) / f"rank{os.environ.get('RANK', 'x')}.json"
        atexit.register(lambda: record.write_text(json.dumps(sorted({os.path.abspath(p) for p in written}))))
        sys.addaudithook(_audit(written))
    mode, *rest = sys.argv[1:]
    if mode == "cli":
        from spleenkit.cli import main as cli

        return cli(rest)
    if mode == "train":
        import logging

        from spleenkit.distributed import process_group
        from spleenkit.training import train

        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        settings = json.loads(rest[0])
        with process_group(device="cpu", timeout_s=settings.pop("timeout_s", 120)) as context:
            train(distributed=context, progress=False, **settings)
        return 0
    raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    sys.exit(main())
