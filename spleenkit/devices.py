"""Device and precision choice: the one place that decides where tensors live and in which dtype.

Mixed precision means something on every device: float16 with a gradient scaler on CUDA,
bfloat16 autocast on the CPU (where float16 autocast is slow and a scaler is not needed).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


# --------------------------------------------------------------------------- precision choice
@dataclass(frozen=True)
class Precision:
    """The autocast dtype for a device (None: float32), why it was chosen, and the CPU's capability."""

    dtype: torch.dtype | None
    reason: str
    capability: str = ""


def _cpu_has_native_bf16() -> tuple[bool, str]:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX), and the capability's name."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    for flag, name in (("amx_bf16", "AMX_BF16"), ("avx512_bf16", "AVX512_BF16")):
        if flag in flags:
            return True, name
    return False, "AVX2" if "avx2" in flags else "unknown"


def choose_precision(device: torch.device, requested: bool | None = None, *, purpose: str = "training") -> Precision:
    """The mixed-precision dtype for ``purpose`` on ``device``: float16 on CUDA, bfloat16 on a CPU that
    computes it natively, float32 (``dtype=None``) otherwise. ``requested``: None picks the fastest
    correct choice, True forces mixed precision, False is float32."""
    import torch

    if requested is False:
        return Precision(None, f"float32 for {purpose}, as requested")
    if device.type == "cuda":
        return Precision(torch.float16, f"float16 autocast with a gradient scaler for {purpose} on the GPU", "CUDA")
    native, capability = _cpu_has_native_bf16()
    if native or requested:
        why = "computes it natively" if native else "has no native bfloat16 (forced: slower than float32 here)"
        return Precision(torch.bfloat16, f"bfloat16 autocast for {purpose}: this CPU {why}", capability)
    return Precision(None, "this CPU has no native bfloat16: float32, which is faster here", capability)
