"""Device and precision choice: the one place that decides where tensors live and in which dtype.

Mixed precision means something on every device: float16 with a gradient scaler on CUDA,
bfloat16 autocast on the CPU (where float16 autocast is slow and a scaler is not needed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from spleenkit.errors import BadInputError

if TYPE_CHECKING:
    import torch


def pick_device(preference: str | None = "auto", local_rank: int | None = None) -> torch.device:
    """Return the device to compute on: CUDA (this process's local rank) when present, else CPU.

    ``preference`` may be "auto", "cpu", "cuda" or "cuda:N"; asking for CUDA on a machine
    without it is an error rather than a silent fall-back.
    """
    import torch

    preference = (preference or "auto").lower()
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    if preference == "cpu":
        return torch.device("cpu")
    if preference.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BadInputError(f"device {preference!r} was asked for but CUDA is not available on this machine")
        if preference == "cuda":
            rank = local_rank if local_rank is not None else int(os.environ.get("LOCAL_RANK", 0))
            return torch.device("cuda", rank % torch.cuda.device_count())
        return torch.device(preference)
    raise BadInputError(f"unknown device {preference!r}; use auto, cpu, cuda or cuda:N")


def amp_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The autocast dtype for ``device`` (float16 on CUDA, bfloat16 on CPU), or None when off."""
    import torch

    if not enabled:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool = True) -> Iterator[None]:
    """Autocast for the device's mixed-precision dtype; a no-op when ``enabled`` is False."""
    import torch

    dtype = amp_dtype(device, enabled)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def grad_scaler(device: torch.device, enabled: bool = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for float16 on CUDA (bfloat16 needs none)."""
    import torch

    return torch.amp.GradScaler(device.type, enabled=enabled and device.type == "cuda")


def memory_format(device: torch.device, channels_last: bool = True) -> torch.memory_format:
    """The tensor layout 3D convolutions run fastest in on ``device``: channels-last on the CPU
    (``channels_last=False``: PyTorch's default layout everywhere).

    oneDNN's 3D convolutions work in channels-last; in PyTorch's default layout every layer pays
    for reordering (benchmarks/: about 1.5x for float32 and 2-3x for bfloat16 on a CPU). On CUDA
    the kit keeps the default layout (not measured here).
    """
    import torch

    return torch.channels_last_3d if channels_last and device.type == "cpu" else torch.contiguous_format


def use_fast_layout(network: torch.nn.Module, device: torch.device, channels_last: bool = True) -> torch.nn.Module:
    """Store ``network``'s weights in :func:`memory_format` (in place; values unchanged); returns it.

    Convolutions then produce that layout all the way through, whatever the input's layout, and
    state dicts stay the same (layout is not part of a saved weight's meaning).
    """
    return network.to(memory_format=memory_format(device, channels_last))


def describe_device(device: torch.device) -> dict[str, object]:
    """Facts about the device for manifests and the welcome notebook."""
    import torch

    info: dict[str, object] = {"device": str(device), "cpu_threads": torch.get_num_threads(),
                               "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_count=torch.cuda.device_count())
    else:
        info["gpu_count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return info


# --------------------------------------------------------------------------- precision
#: CPU flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware.
NATIVE_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


def _native_bfloat16(cpuinfo: str = "/proc/cpuinfo") -> tuple[bool, str]:
    """Whether this CPU has bfloat16 in hardware, and a one-word label for it (AVX512_BF16, AVX2 ...)."""
    import torch

    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as stream:
            flags = next((set(line.partition(":")[2].split()) for line in stream
                          if line.partition(":")[0].strip() in {"flags", "Features"}), set())
    except OSError:
        flags = set()
    for flag in NATIVE_BFLOAT16_FLAGS:
        if flag in flags:
            return True, flag.upper()
    return False, str(torch.backends.cpu.get_cpu_capability())


@dataclass(frozen=True)
class Precision:
    """The precision a step runs in: ``dtype`` for autocast (None: float32), the ``capability`` it was
    chosen for, and ``reason``, one line a user can read."""

    dtype: Any  # torch.dtype | None
    reason: str
    capability: str

    @property
    def enabled(self) -> bool:
        """True when autocast is on (float16 or bfloat16)."""
        return self.dtype is not None

    @property
    def name(self) -> str:
        """float32, bfloat16 or float16."""
        return "float32" if self.dtype is None else str(self.dtype).removeprefix("torch.")


def choose_precision(device: torch.device | str, requested: bool | None = None, *,
                     purpose: str = "training") -> Precision:
    """The precision for ``purpose`` ("training" or "inference") on ``device``.

    ``requested`` None: the fastest correct choice (float16 on CUDA; on a CPU bfloat16 for training only
    where the CPU has it natively, float32 for inference); True forces mixed precision; False is float32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        if requested is False:
            return Precision(None, "mixed precision turned off: float32", "cuda")
        return Precision(torch.float16, "CUDA: float16 autocast with a gradient scaler", "cuda")
    native, label = _native_bfloat16()
    if requested is False:
        return Precision(None, "mixed precision turned off: float32", label)
    if requested is True:
        speed = "native on this CPU" if native else "this CPU has no native bfloat16: slower than float32 here"
        return Precision(torch.bfloat16, f"bfloat16 as asked ({speed}, {label})", label)
    if purpose == "inference":
        return Precision(None, "float32 on a CPU: the bundle's exact masks", label)
    if not native:
        return Precision(None, f"this CPU has no native bfloat16 ({label}): float32, which is faster here", label)
    return Precision(torch.bfloat16, f"this CPU has native bfloat16 ({label}): bfloat16 autocast", label)
