"""The training loader: MONAI's ``ThreadDataLoader``, whose background thread is stopped however an epoch ends.

MONAI's ``ThreadBuffer`` (1.6.1, and earlier releases with the same code) starts its thread before the
``try`` whose ``finally`` stops it. An interrupt (Ctrl-C, or SIGTERM, which the command line raises the same
way) that arrives while ``Thread.start`` waits leaves the thread filling its buffer for ever; at exit the
interpreter ends it in the middle of a torch call and the process aborts ("terminate called without an active
exception", status -6) after the run had stopped cleanly and recorded why. This loader owns the buffer and stops
it in its own ``finally``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from monai.data import ThreadDataLoader
from monai.data.thread_buffer import ThreadBuffer


class TrainingLoader(ThreadDataLoader):
    """``ThreadDataLoader`` with the same batches, buffer and repeats; its thread never outlives the iteration."""

    def __iter__(self) -> Iterator[Any]:
        buffer = ThreadBuffer(super(ThreadDataLoader, self).__iter__(), self.buffer_size, self.buffer_timeout)
        try:
            for batch in buffer:
                for _ in range(self.repeats):
                    yield batch
        finally:
            buffer.stop()
