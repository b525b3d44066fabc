"""Device and precision choice: the one place that decides where tensors live and in which dtype.

Mixed precision means something on every device, and is never slower than float32 where it runs:
float16 with a gradient scaler on CUDA; bfloat16 autocast on a CPU with native bfloat16 instructions
(AVX512-BF16 or AMX on x86, BF16 on Arm: a training step 1.3-1.9x faster than float32 there); float32 on a CPU
without them, where bfloat16 is emulated and about 20x slower. :func:`choose_precision` decides,
and says why in one line; training, evaluation, inference, the bundle and the benchmark ask it.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spleenkit.errors import BadInputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# CPU flags (Linux /proc/cpuinfo) that mean bfloat16 arithmetic in hardware
NATIVE_BFLOAT16_FLAGS = ("amx_bf16", "avx512_bf16", "bf16")


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
    """The autocast dtype for ``device`` when mixed precision is on (float16 on CUDA, bfloat16 on CPU),
    or None when off. Whether to turn it on is :func:`choose_precision`'s decision."""
    import torch

    if not enabled:
        return None
    return torch.float16 if device.type == "cuda" else torch.bfloat16


# --------------------------------------------------------------------------- what the CPU can do
@functools.cache
def cpu_capability() -> dict[str, Any]:
    """What this CPU offers for bfloat16: PyTorch's instruction set level, whether oneDNN runs bfloat16
    at all, and whether the CPU has bfloat16 in hardware (``native_bfloat16``: True, False, or None when
    the flags cannot be read, e.g. not on Linux). ``label`` names it in one word (AMX_BF16, AVX512_BF16,
    AVX512, AVX2, ...)."""
    import torch

    level = str(torch.backends.cpu.get_cpu_capability())
    try:
        onednn_bfloat16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        onednn_bfloat16 = False
    flags = _cpu_flags()
    # oneDNN may be held below what the CPU has (ONEDNN_MAX_CPU_ISA): then bfloat16 is not native for the kit
    native = None if flags is None else onednn_bfloat16 and any(flag in flags for flag in NATIVE_BFLOAT16_FLAGS)
    if onednn_bfloat16 and flags and "amx_bf16" in flags:
        label = "AMX_BF16"
    elif onednn_bfloat16 and flags and "avx512_bf16" in flags:
        label = "AVX512_BF16"
    else:
        label = level
    return {"label": label, "instruction_set": level, "onednn_bfloat16": onednn_bfloat16,
            "native_bfloat16": native}


def _cpu_flags(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> set[str] | None:
    """The CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where they cannot be read."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in {"flags", "Features"}:
            return set(value.split())
    return None


@dataclass(frozen=True)
class Precision:
    """The precision a step runs in: ``dtype`` for autocast (None: float32), the CPU or GPU ``capability``
    it was chosen for, and ``reason``, one line a user can read."""

    dtype: Any  # torch.dtype | None, kept untyped so that this module imports without torch
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

    def as_dict(self) -> dict[str, str]:
        """For the run manifest: the dtype's name, the capability and why."""
        return {"dtype": self.name, "capability": self.capability, "reason": self.reason}


def choose_precision(device: torch.device | str, requested: bool | None = None, *,
                     purpose: str = "training") -> Precision:
    """Decide the precision for ``purpose`` ("training" or "inference") on ``device``.

    ``requested`` None means "the fastest correct choice here": float16 on CUDA; on a CPU bfloat16 for
    training where the CPU has it natively (or, when the flags cannot be read, where a short measured
    step says it is faster), else float32; float32 for inference on a CPU (the bundle's exact masks,
    with batch norm folded). True forces mixed precision (warning where it will be slower); False is float32.
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if requested is False:
            return Precision(None, "mixed precision turned off: float32", name)
        return Precision(torch.float16, "CUDA: float16 autocast with a gradient scaler", name)
    if device.type != "cpu":  # another accelerator (mps, xpu ...): mixed precision as asked, not measured here
        dtype = None if requested is False else amp_dtype(device, True)
        return Precision(dtype, f"{device.type}: {'float32' if dtype is None else 'mixed precision as asked'}",
                         device.type)
    capability = cpu_capability()
    label = capability["label"]
    if requested is False:
        return Precision(None, "mixed precision turned off: float32", label)
    fast = bfloat16_is_faster()
    if requested is True:
        if not fast:
            log.warning("bfloat16 was asked for on a CPU without native bfloat16 (%s): expect it to be many times "
                        "slower than float32 here", label)
            return Precision(torch.bfloat16, f"bfloat16 as asked, though this CPU has no native bfloat16 ({label}): "
                                             "slower than float32 here", label)
        return Precision(torch.bfloat16, f"bfloat16 as asked (native on this CPU: {label})", label)
    if purpose == "inference":
        return Precision(None, "on a CPU the bundle's exact masks: batch norm folded into the convolutions "
                               "(--amp gives bfloat16)", label)
    if not fast:
        return Precision(None, f"this CPU has no native bfloat16 ({label}): float32, which is faster here", label)
    return Precision(torch.bfloat16, f"this CPU has native bfloat16 ({label}): bfloat16 autocast, faster than "
                                     "float32 for the UNet (a step 1.3-1.9x, as measured)", label)


def bfloat16_is_faster() -> bool:
    """Whether bfloat16 autocast pays on this CPU: its flags say so (hardware bfloat16), or, when they cannot
    be read but oneDNN runs bfloat16, a short measured comparison of one convolution step (once per process)."""
    capability = cpu_capability()
    if not capability["onednn_bfloat16"]:
        return False
    if capability["native_bfloat16"] is not None:
        return bool(capability["native_bfloat16"])
    return measured_bfloat16_speedup() > 1.0


@functools.cache
def measured_bfloat16_speedup(size: int = 32, channels: int = 16, repeats: int = 3) -> float:
    """float32 seconds / bfloat16 seconds for a Conv3d forward and backward on a ``size``^3 map in channels-last
    (the layout the kit trains in): the fastest of ``repeats`` each, alternated. About 0.1 s where bfloat16 is
    native; a second or two where it is emulated. Cached for the process."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, channels, size, size, size, generator=generator).contiguous(
        memory_format=torch.channels_last_3d)
    convolution = torch.nn.Conv3d(channels, channels, 3, padding=1).to(memory_format=torch.channels_last_3d)

    def step(dtype: torch.dtype | None) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
            output = convolution(inputs)
        output.float().mean().backward()
        return time.perf_counter() - start

    step(None), step(torch.bfloat16)  # warm-up: oneDNN picks its kernels on the first call
    times: dict[Any, list[float]] = {None: [], torch.bfloat16: []}
    for _ in range(repeats):
        for dtype in times:
            times[dtype].append(step(dtype))
    return min(times[None]) / max(min(times[torch.bfloat16]), 1e-9)


@functools.cache
def bf16_weight_gradient_ok(shape: tuple[int, int, int]) -> bool:
    """Whether this PyTorch computes a Conv3d weight gradient on a ``shape`` feature map correctly under
    CPU bfloat16 autocast (compared with float32 on small random data; no global random state used)."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.rand(2, 4, *shape, generator=generator)
    weight0 = torch.rand(4, 4, 3, 3, 3, generator=generator) - 0.5
    # the kit trains channels-last on the CPU (memory_format), where the error shows for other
    # shapes (e.g. 2x6x6): that layout is checked always; the default layout (slow to check, about 10 s
    # at 48^3 here) where the error is known to show, a side of 2 or less
    layouts = [torch.channels_last_3d] + ([torch.contiguous_format] if min(shape) <= 2 else [])
    for layout in layouts:
        gradients = []
        for dtype in (None, torch.bfloat16):
            weight = weight0.clone().contiguous(memory_format=layout).requires_grad_(True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype is not None):
                output = torch.nn.functional.conv3d(inputs.contiguous(memory_format=layout), weight, padding=1)
            output.float().pow(2).sum().backward()
            gradients.append(weight.grad)
        reference, mixed = gradients
        error = float((mixed - reference).abs().max() / reference.abs().max().clamp_min(1e-12))
        if not error < 0.05:  # bfloat16 itself is good to about 1 %
            return False
    return True


def cpu_bf16_training_ok(patch_size: Sequence[int], strides: Sequence[int] = (2, 2, 2, 2)) -> bool:
    """Whether bfloat16 training on this CPU gives correct gradients for the UNet's feature maps.

    PyTorch's oneDNN bfloat16 Conv3d weight gradient is wrong (errors of 50 % up to 1e36, not even
    reproducible) when the first spatial size of a feature map is 2, e.g. the bottom of the UNet
    for 32^3 patches; the kit checks the sizes it will use and trains in float32 where needed.
    """
    size = [int(d) for d in patch_size]
    shapes = {tuple(size)}
    for stride in strides:
        size = [max(1, -(-d // stride)) for d in size]
        shapes.add(tuple(size))
    return all(bf16_weight_gradient_ok(shape) for shape in sorted(shapes))  # type: ignore[arg-type]


def describe_precision(device: torch.device | str | None = None) -> dict[str, Any]:
    """What the kit will use on ``device`` (default: the one it picks): the CPU capability, and the precision
    for training and for inference with why. Shown by ``spleenkit info`` and the welcome notebook."""
    device = pick_device("auto") if device is None else device
    training, inference = choose_precision(device), choose_precision(device, purpose="inference")
    return {"device": str(device), "cpu": cpu_capability(),
            "training": training.as_dict(), "inference": inference.as_dict()}


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


def grad_scaler(device: torch.device, dtype: Any = True) -> torch.amp.GradScaler:
    """A gradient scaler that is active only for float16 on CUDA (bfloat16 needs none).

    ``dtype`` is the autocast dtype (None for float32) or, as before, a bool for "mixed precision on"."""
    import torch

    enabled = dtype is True or dtype == torch.float16
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
