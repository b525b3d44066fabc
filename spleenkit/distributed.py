"""Data-parallel training and evaluation on several processes, with PyTorch's own engine.

``torchrun`` starts one process per GPU (or several CPU processes) and tells each its place in
the environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT ...). Every process holds
a full copy of the UNet wrapped in DistributedDataParallel (DDP), trains on its own share of the
training set and averages the gradients with the others after every backward pass, so all
copies stay identical. Only rank 0 writes files (logs, TensorBoard, checkpoints, metrics.jsonl,
manifest); validation Dice is gathered from every rank so that it is the same as on one process.

This module is the one place for process-group logic: :func:`init_process_group` /
:func:`process_group` (used by ``spleenkit train|evaluate --distributed`` and the bundle's
``multi_gpu_*.json``), the samplers and per-rank shares of the data, :func:`wrap_model`,
learning-rate scaling, the rank-0 rules, and :func:`launch_torchrun` for notebooks.
Nothing heavy is imported at module import time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from spleenkit.devices import pick_device
from spleenkit.errors import BadInputError, DistributedRunError
from spleenkit.presets import Preset
from spleenkit.processes import run_streaming

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

#: Collective timeout (seconds) when none is given: a rank that stops answering ends the job after this.
DEFAULT_TIMEOUT_S = 1800
#: Testing aid: a rank whose number equals this variable raises at its first training iteration
#: (and before its first case in distributed evaluation), to check that a failure ends the whole job.
CRASH_RANK_VARIABLE = "SPLEENKIT_CRASH_RANK"
#: Learning-rate rules for N processes: "none" keeps the preset's rate (as the bundle does),
#: "linear" multiplies it by N because the global batch is N times larger (Goyal et al., 2017).
LR_SCALING = ("none", "linear")
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


# --------------------------------------------------------------------------- the process group
def is_main_process() -> bool:
    """True on the process that writes files (rank 0, or the only process without torch.distributed); the kit's
    one rank test (a :class:`DistributedContext` answers the same for its own rank: ``is_main``)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@dataclass(frozen=True)
class DistributedContext:
    """Where this process stands in a job: its rank among all, its rank on this machine, its device."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int
    backend: str
    device: torch.device
    master: str = ""

    @property
    def is_main(self) -> bool:
        """True on rank 0, the only process that writes files."""
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        """JSON-friendly facts for manifests and logs."""
        return {"world_size": self.world_size, "nodes": max(1, self.world_size // max(1, self.local_world_size)),
                "processes_per_node": self.local_world_size, "backend": self.backend,
                "device_of_rank_0": str(self.device) if self.is_main else None, "master": self.master}

    def __str__(self) -> str:
        return (f"rank {self.rank} of {self.world_size} (node {self.node_rank}, local rank {self.local_rank}, "
                f"{self.device}, {self.backend})")


def torchrun_environment(environ: dict[str, str] | None = None) -> dict[str, Any]:
    """The ranks torchrun put in the environment; a clear error when the process was not started by it."""
    environ = dict(os.environ if environ is None else environ)
    missing = [name for name in _TORCHRUN_VARIABLES if not environ.get(name)]
    if missing:
        raise BadInputError(
            f"--distributed needs the environment torchrun sets ({', '.join(missing)} missing): launch with "
            "`torchrun --nproc_per_node=N -m spleenkit train --distributed ...` or, from Python, "
            "spleenkit.distributed.launch_torchrun([...])")
    try:
        rank, world_size, local_rank = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        local_world_size = int(environ.get("LOCAL_WORLD_SIZE", world_size))
        node_rank = int(environ.get("GROUP_RANK", environ.get("NODE_RANK", 0)))
    except ValueError as error:
        raise BadInputError(f"torchrun's rank variables are not integers ({error})") from None
    if not 0 <= rank < world_size or not 0 <= local_rank < local_world_size:
        raise BadInputError(f"inconsistent ranks: RANK={rank}, WORLD_SIZE={world_size}, LOCAL_RANK={local_rank}, "
                            f"LOCAL_WORLD_SIZE={local_world_size}")
    return {"rank": rank, "world_size": world_size, "local_rank": local_rank, "local_world_size": local_world_size,
            "node_rank": node_rank, "master": f"{environ['MASTER_ADDR']}:{environ['MASTER_PORT']}"}


def backend_for(device: torch.device | str) -> str:
    """The collective backend for a device: NCCL between GPUs, gloo between CPU processes."""
    import torch
    import torch.distributed as dist

    device = torch.device(device)
    if device.type == "cuda":
        if not dist.is_nccl_available():
            raise BadInputError("this PyTorch build has no NCCL: multi-GPU training needs a CUDA build with NCCL")
        return "nccl"
    return "gloo"


def init_process_group(device: str | torch.device | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                       backend: str | None = None) -> DistributedContext:
    """Join the job torchrun started: pick this rank's device, then open the process group.

    One device per local rank (``cuda:LOCAL_RANK``, or the CPU); NCCL on CUDA, gloo on the CPU.
    ``timeout_s`` bounds every collective: a rank that stops answering makes the others fail after
    it instead of hanging. Calling it again in the same process returns the existing group's context.
    """
    import datetime

    import torch
    import torch.distributed as dist

    env = torchrun_environment()
    if timeout_s is None or timeout_s <= 0:
        raise BadInputError(f"the collective timeout must be a positive number of seconds (got {timeout_s})")
    torch_device = device if isinstance(device, torch.device) else pick_device(device, local_rank=env["local_rank"])
    if torch_device.type == "cuda":
        if env["local_world_size"] > torch.cuda.device_count():
            raise BadInputError(f"{env['local_world_size']} processes per machine but only "
                                f"{torch.cuda.device_count()} GPU(s): use --nproc_per_node="
                                f"{torch.cuda.device_count()} (one process per GPU) or --device cpu")
        torch.cuda.set_device(torch_device)
    backend = backend or backend_for(torch_device)
    if not dist.is_initialized():
        options: dict[str, Any] = {}
        if backend == "nccl":
            options["device_id"] = torch_device  # binds this rank to its GPU and connects eagerly
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=float(timeout_s)), **options)
    context = DistributedContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                                 local_rank=env["local_rank"], local_world_size=env["local_world_size"],
                                 node_rank=env["node_rank"], backend=str(dist.get_backend()), device=torch_device,
                                 master=env["master"])
    log.info("process group ready: %s, collective timeout %g s", context, timeout_s)
    return context


def destroy_process_group(wait_for_others: bool = True) -> None:
    """Leave the process group (a no-op when none is open) and tell ignite, whose metrics would
    otherwise keep gathering across a group that no longer exists (e.g. a later run in the same process).

    ``wait_for_others``: meet the other ranks at a barrier first. A gloo rank that leaves while another
    is still busy can die at exit with "terminate called without an active exception" (3 of 8 bundle
    evaluations did, 0 of 8 with the barrier). After a failure, pass False: the job must end now.
    """
    import ignite.distributed as idist
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait_for_others:
            dist.barrier()
        dist.destroy_process_group()
    idist.sync()


def quiet_other_ranks(context: DistributedContext) -> None:
    """Let only rank 0 log information; the others show warnings and errors, prefixed with their rank."""
    if context.is_main:
        return
    root = logging.getLogger()
    root.setLevel(logging.WARNING)
    for handler in root.handlers:
        formatter = handler.formatter or logging.Formatter()
        style = getattr(formatter, "_fmt", None) or "%(levelname)s %(name)s: %(message)s"
        if not style.startswith("[rank"):
            handler.setFormatter(logging.Formatter(f"[rank {context.rank}] {style}",
                                                   datefmt=getattr(formatter, "datefmt", None)))


@contextlib.contextmanager
def process_group(device: str | torch.device | None = "auto", timeout_s: float = DEFAULT_TIMEOUT_S,
                  backend: str | None = None, quiet: bool = True) -> Iterator[DistributedContext]:
    """:func:`init_process_group` for a ``with`` block: a failure is logged with the rank that had it,
    and the group is always destroyed on the way out (clean shutdown, no dangling sockets)."""
    context = init_process_group(device, timeout_s, backend)
    if quiet:
        quiet_other_ranks(context)
    try:
        yield context
    except BaseException as error:
        log.error("rank %d of %d (node %d, local rank %d) failed: %s: %s", context.rank, context.world_size,
                  context.node_rank, context.local_rank, type(error).__name__, error)
        destroy_process_group(wait_for_others=False)
        raise
    destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes in the job (1 without a process group)."""
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


# --------------------------------------------------------------------------- collectives the kit uses
def _collective_device() -> torch.device:
    import torch
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def barrier() -> None:
    """Wait until every rank gets here (a no-op in a single process)."""
    import torch.distributed as dist

    if world_size() > 1:
        dist.barrier()


def in_turn(work: Callable[[], T], context: DistributedContext | None, enabled: bool = True) -> T:
    """Run ``work`` on the processes of each machine one after another (local rank 0 first, the others waiting at a
    barrier), not all at once: for a step whose memory peaks, such as filling a cache, on a machine whose processes
    share little memory (a 2 GiB notebook session). Without a job, or with ``enabled`` False, it just runs."""
    if context is None or context.world_size == 1 or not enabled:
        return work()
    result: T | None = None
    for turn in range(context.local_world_size):
        if turn == context.local_rank:
            result = work()
        barrier()
    return result  # type: ignore[return-value]


def mean_over_ranks(value: float) -> float:
    """The mean of a number over all ranks (the number itself in a single process)."""
    import torch
    import torch.distributed as dist

    if world_size() == 1:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return float(tensor.item()) / world_size()


def broadcast_object(value: T, source: int = 0) -> T:
    """Rank ``source``'s value on every rank (e.g. a checkpoint only rank 0 read)."""
    import torch.distributed as dist

    if world_size() == 1:
        return value
    holder = [value]
    dist.broadcast_object_list(holder, src=source, device=_collective_device())
    return holder[0]


def gather_objects(value: T) -> list[T] | None:
    """Every rank's value, in rank order, on rank 0; None on the other ranks."""
    import torch.distributed as dist

    if world_size() == 1:
        return [value]
    gathered: list[Any] | None = [None] * world_size() if rank() == 0 else None
    if dist.get_backend() == "nccl":  # NCCL has no gather: all-gather and keep it on rank 0
        everything: list[Any] = [None] * world_size()
        dist.all_gather_object(everything, value)
        return everything if rank() == 0 else None
    dist.gather_object(value, gathered, dst=0)
    return gathered


def broadcast_buffers(network: torch.nn.Module, source: int = 0) -> None:
    """Copy rank ``source``'s buffers (BatchNorm running statistics) to every rank.

    DDP broadcasts them before each training forward, so after the last iteration of an epoch each
    rank holds its own update; validating with rank 0's buffers makes every rank score the weights
    rank 0 saves.
    """
    import torch.distributed as dist

    if world_size() == 1:
        return
    for buffer in unwrap_model(network).buffers():
        dist.broadcast(buffer.data, src=source)


# --------------------------------------------------------------------------- data: samplers and shares
def shard(items: Sequence[T], context: DistributedContext | None = None, *, even_divisible: bool = False,
          shuffle: bool = False, seed: int = 0) -> list[T]:
    """This rank's share of ``items`` (``monai.data.partition_dataset``): items rank, rank+N, rank+2N ...

    ``even_divisible=True`` repeats items from the start so that every rank gets as many (ranks must
    run the same number of training iterations); ``False`` splits exactly, for evaluation, so no
    case is counted twice.
    """
    from monai.data import partition_dataset

    size, index = (world_size(), rank()) if context is None else (context.world_size, context.rank)
    if size == 1:
        return list(items)
    if len(items) < size:
        raise BadInputError(f"{len(items)} item(s) cannot be shared among {size} processes: every process needs "
                            f"at least one (use fewer processes or more cases)")
    return list(partition_dataset(list(items), num_partitions=size, shuffle=shuffle, seed=seed,
                                  even_divisible=even_divisible)[index])


def train_sampler(dataset: Any, seed: int = 0, num_replicas: int | None = None, rank: int | None = None) -> Any:
    """A DistributedSampler giving each rank its share of the training set, reshuffled every epoch.

    The share is padded (even_divisible) so that all ranks run the same number of iterations; the
    MONAI/ignite workflow calls ``set_epoch`` at each epoch start, so the shuffle changes per epoch.
    ``num_replicas`` and ``rank`` default to the process group's (give both to build one rank's
    sampler without a process group, as notebook 04's exercise does).
    """
    from monai.data import DistributedSampler

    return DistributedSampler(dataset, even_divisible=True, num_replicas=num_replicas, rank=rank, shuffle=True,
                              seed=seed)


@dataclass
class TrainingShare:
    """What this rank trains and validates on, and how its loader gets its batches."""

    train_items: list[dict[str, str]]
    validation_items: list[dict[str, str]]
    partitioned: bool

    def describe(self) -> dict[str, Any]:
        """For the manifest: how the data was shared."""
        return {"training_share": "partitioned (each rank caches its own 1/N)" if self.partitioned
                else "DistributedSampler (every rank holds the whole set)",
                "train_items_per_rank": len(self.train_items),
                "validation_items_per_rank_0": len(self.validation_items)}


def share_training_data(train_items: Sequence[dict[str, str]], validation_items: Sequence[dict[str, str]],
                        context: DistributedContext | None, cache_rate: float, seed: int = 0) -> TrainingShare:
    """Split the datalists for this rank.

    With caching on, each rank gets a fixed 1/N of the training cases (padded to equal length) and
    caches only those, so the cache takes about 1/N of the RAM per process; the loader then shuffles
    within the share. Without a cache, every rank keeps the whole list and a DistributedSampler
    deals out a fresh 1/N every epoch. Validation cases are always split exactly (no duplicates).
    """
    if context is None or context.world_size == 1:
        return TrainingShare(list(train_items), list(validation_items), partitioned=False)
    validation = shard(validation_items, context, even_divisible=False)
    if cache_rate > 0:
        train = shard(train_items, context, even_divisible=True, shuffle=True, seed=seed)
        return TrainingShare(train, validation, partitioned=True)
    if len(train_items) < context.world_size:
        raise BadInputError(f"{len(train_items)} training case(s) cannot be shared among {context.world_size} "
                            "processes")
    return TrainingShare(list(train_items), validation, partitioned=False)


def workers_per_process(total: int, context: DistributedContext | None) -> int:
    """Split the machine's loader/caching workers among the processes on it."""
    if context is None:
        return total
    return max(1, total // max(1, context.local_world_size))


# --------------------------------------------------------------------------- the model
def wrap_model(network: torch.nn.Module, context: DistributedContext | None, sync_bn: bool = False) -> torch.nn.Module:
    """DistributedDataParallel around the network (already on ``context.device``).

    ``sync_bn`` turns BatchNorm into SyncBatchNorm (statistics over the global batch); PyTorch
    runs it only on GPUs, so asking for it on the CPU is an error.
    """
    import torch

    if context is None:
        if sync_bn:
            raise BadInputError("--sync-bn only makes sense with --distributed (several processes)")
        return network
    if sync_bn:
        check_sync_bn(context.device)
        if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in network.modules()):
            log.warning("--sync-bn: the network has no BatchNorm layer to synchronise")
        network = torch.nn.SyncBatchNorm.convert_sync_batchnorm(network)
    if context.world_size == 1:
        return network
    device_ids = [context.device.index] if context.device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=device_ids)


def check_sync_bn(device: torch.device | str) -> None:
    """SyncBatchNorm needs CUDA devices; say so before anything starts."""
    import torch

    if torch.device(device).type != "cuda":
        raise BadInputError(f"--sync-bn needs GPUs: PyTorch's SyncBatchNorm only runs on CUDA modules, and this "
                            f"process trains on {device}; leave --sync-bn out on the CPU (each process then "
                            "normalises over its own batch)")


def unwrap_model(network: torch.nn.Module) -> torch.nn.Module:
    """The plain network inside DDP (what model.pt stores and what validation runs), else itself."""
    return getattr(network, "module", network)


def scale_learning_rate(preset: Preset, world: int, rule: str = "none") -> Preset:
    """The preset with its learning rate scaled for ``world`` processes: "none" keeps it (the
    bundle's choice), "linear" multiplies it by ``world`` (the global batch is ``world`` times larger)."""
    if rule not in LR_SCALING:
        raise BadInputError(f"unknown learning-rate scaling {rule!r}; use {' or '.join(LR_SCALING)}")
    if rule == "none" or world == 1:
        return preset
    return preset.replace(learning_rate=preset.learning_rate * world)


def describe_training(context: DistributedContext | None, preset: Preset, *, sync_bn: bool, scale_lr: str,
                      base_learning_rate: float, share: TrainingShare | None = None) -> dict[str, Any] | None:
    """The distributed settings of a training run, for its manifest (None for a single process)."""
    if context is None:
        return None
    return {**context.describe(), "sync_batchnorm": sync_bn, "lr_scaling": scale_lr,
            "base_learning_rate": base_learning_rate, "learning_rate": preset.learning_rate,
            "batch_per_process": preset.batch_size,
            "global_batch": preset.batch_size * context.world_size,
            "crops_per_step": preset.batch_size * preset.num_samples * context.world_size,
            **({} if share is None else share.describe())}


# --------------------------------------------------------------------------- a testing aid
def crash_requested(context: DistributedContext | None) -> bool:
    """True when ``SPLEENKIT_CRASH_RANK`` names this rank of a distributed job."""
    value = os.environ.get(CRASH_RANK_VARIABLE, "").strip()
    return context is not None and value.isdigit() and int(value) == context.rank


def distributed_map(function: Callable[[T], R], items: Sequence[T],
                    context: DistributedContext | None = None) -> Iterator[tuple[T, R]]:
    """Apply ``function`` to ``items`` shared among the ranks; yield ``(item, result)`` in the original
    order on rank 0, and nothing on the other ranks.

    Rank r handles items r, r+N, r+2N ... Results are gathered to rank 0 one round of N items at a
    time, so rank 0 never holds more than N results (e.g. N prediction masks) at once.
    """
    size, index = (world_size(), rank()) if context is None else (context.world_size, context.rank)
    if size == 1:
        for item in items:
            yield item, function(item)
        return
    if crash_requested(context):
        raise RuntimeError(f"deliberate crash of rank {index} ({CRASH_RANK_VARIABLE} is set; a testing aid)")
    for start in range(0, len(items), size):
        mine = start + index
        result = function(items[mine]) if mine < len(items) else None
        gathered = gather_objects(result)
        if gathered is None:
            continue
        for offset, value in enumerate(gathered):
            if start + offset < len(items):
                yield items[start + offset], value


# --------------------------------------------------------------------------- launching torchrun
def _no_gpu_here() -> bool:
    """True when this is plainly a machine without an NVIDIA GPU (Linux, no /dev/nvidia0, CUDA not pointed elsewhere
    and torch not loaded yet): then asking torch is not needed, and a notebook kernel need not load it (~180 MB)."""
    return (sys.platform.startswith("linux") and "torch" not in sys.modules and not Path("/dev/nvidia0").exists()
            and not os.environ.get("CUDA_VISIBLE_DEVICES"))


def default_nproc() -> int:
    """Processes per machine for a launch: one per GPU when there are GPUs, else 2 CPU processes."""
    if _no_gpu_here():
        return 2
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    return 2


@dataclass(frozen=True)
class DataParallelPlan:
    """How many processes a data-parallel lesson launches here, on which device (``"auto"``: a GPU each; ``"cpu"``),
    and why, in a sentence a notebook can print."""

    processes: int
    device: str
    reason: str


def _gpu_count() -> int:
    if _no_gpu_here():
        return 0
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def data_parallel_plan(processes: int | None = None, device: str = "auto") -> DataParallelPlan:
    """The processes for comparing data-parallel training with one process on this machine.

    ``processes`` None: one process per GPU where there are two or more; otherwise two CPU processes, also on a
    machine with one GPU (a one-GPU Colab): data parallelism needs a device per process (NCCL will not put two
    processes on one GPU), and one GPU process against itself would compare nothing. The one-process run of the
    comparison then belongs on the plan's device too, so that like is compared with like. A given number of
    processes runs on the GPUs when there are that many (``device`` "auto" or "cuda"), else on the CPU.
    """
    if processes is not None and int(processes) < 1:
        raise BadInputError(f"processes={processes}: need at least one")
    gpus = 0 if str(device) == "cpu" else _gpu_count()
    wanted = str(device).split(":")[0] == "cuda"
    if processes is None:
        if gpus >= 2:
            return DataParallelPlan(gpus, device, f"{gpus} GPUs here: one process per GPU")
        if wanted:
            raise BadInputError(f"device={device!r} with {gpus} GPU(s): data parallelism needs a GPU per process; "
                                "use device='auto' (CPU processes stand in) or processes=1")
        why = ("one GPU here, and data parallelism needs a device per process: two CPU processes stand in, and the "
               "one-process run is on the CPU too, so that like is compared with like" if gpus == 1 else
               "no GPU here: two CPU processes stand in for two GPUs")
        return DataParallelPlan(2, "cpu", why)
    count = int(processes)
    if gpus >= count:
        return DataParallelPlan(count, device, f"{count} process(es), one GPU each")
    if wanted:
        raise BadInputError(f"processes={count} on device={device!r}: only {gpus} GPU(s) here, one per process")
    return DataParallelPlan(count, "cpu", f"{count} CPU process(es)" + (f" ({gpus} GPU(s) cannot give each "
                                                                       "process its own)" if gpus else ""))


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (for a rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def torchrun_command(args: Sequence[str], nproc: int | None = None, *, nnodes: int = 1,
                     node_rank: int | None = None, rdzv_endpoint: str | None = None,
                     rdzv_id: str = "spleenkit", rdzv_conf: str | None = None,
                     local_addr: str | None = None, program: Sequence[str] = ("-m", "spleenkit")) -> list[str]:
    """The ``torchrun`` command line that runs ``spleenkit ARGS --distributed`` on this machine.

    One machine: ``--standalone`` (torchrun finds a free port itself). Several machines: the same
    command on each, with ``nnodes`` and a c10d rendezvous at ``rdzv_endpoint`` (HOST:PORT of one of
    them); ``node_rank`` is optional with c10d (ranks are assigned as machines join). ``program`` is
    what each process runs (default the spleenkit CLI; a script path also works).
    """
    args = list(args)
    if tuple(program) == ("-m", "spleenkit"):
        if not args or args[0] not in ("train", "evaluate"):
            raise BadInputError("launch_torchrun runs `spleenkit train ...` or `spleenkit evaluate ...`; "
                                f"got {' '.join(args) or 'nothing'}")
        if "--distributed" not in args:
            args.append("--distributed")
    nproc = default_nproc() if nproc is None else int(nproc)
    if nproc < 1 or nnodes < 1:
        raise BadInputError(f"need at least one process and one machine (got nproc={nproc}, nnodes={nnodes})")
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        command += ["--standalone", "--nnodes=1"]
    else:
        if rdzv_endpoint is None:
            raise BadInputError("several machines need a rendezvous endpoint HOST:PORT (rdzv_endpoint)")
        command += [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}",
                    f"--rdzv-id={rdzv_id}"]
        if rdzv_conf:
            command.append(f"--rdzv-conf={rdzv_conf}")
        if node_rank is not None:
            command.append(f"--node-rank={node_rank}")
    if local_addr:
        command.append(f"--local-addr={local_addr}")
    return command + [*program, *args]


_FAILURE = re.compile(r"rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)")
_RANK_ERROR = re.compile(r"rank (\d+) of (\d+) \(node \d+, local rank \d+\) failed: (.*)")


def failure_summary(output: str) -> str:
    """Which rank failed and why, read from torchrun's and the kit's messages in ``output``."""
    reasons = _RANK_ERROR.findall(output)
    if reasons:
        failed, size, why = reasons[0]
        return f"rank {failed} of {size} failed first: {why.strip()}"
    ranks = _FAILURE.findall(output)
    if ranks:
        return f"rank {ranks[0][0]} (local rank {ranks[0][1]}) failed; see its traceback above"
    return "a process failed; see the output above"


def launch_torchrun(args: Sequence[str], nproc: int | None = None, *, nnodes: int = 1,
                    node_rank: int | None = None, rdzv_endpoint: str | None = None, rdzv_id: str = "spleenkit",
                    rdzv_conf: str | None = None, local_addr: str | None = None,
                    program: Sequence[str] = ("-m", "spleenkit"), env: dict[str, str] | None = None,
                    cwd: str | os.PathLike[str] | None = None,
                    timeout_s: float | None = None, check: bool = True,
                    echo: bool | Callable[[str], Any] = True) -> subprocess.CompletedProcess[str]:
    """Run ``torchrun ... -m spleenkit ARGS --distributed`` and stream its output line by line.

    For notebooks: the workers' log appears live in the cell (``echo``: True writes each line to
    ``sys.stdout``, a function receives each line, False stays silent).
    ``nproc`` defaults to the number of GPUs, or 2 CPU processes. Returns the CompletedProcess with
    the whole output; with ``check`` a non-zero exit raises :class:`DistributedRunError` naming the
    rank that failed. An interrupt or ``timeout_s`` stops torchrun and all its workers.
    """
    command = torchrun_command(args, nproc, nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                               rdzv_id=rdzv_id, rdzv_conf=rdzv_conf, local_addr=local_addr, program=program)
    environment = dict(os.environ if env is None else env)
    environment.setdefault("PYTHONUNBUFFERED", "1")
    processes = default_nproc() if nproc is None else int(nproc)
    # torchrun would otherwise set 1 thread per process and print a banner about it
    environment.setdefault("OMP_NUM_THREADS", str(max(1, _cores() // processes)))
    # glibc gives every thread that allocates its own heap, and each keeps what was freed in it: with several
    # processes on one machine (a notebook's 2 GiB), two heaps per process are enough and hold less
    environment.setdefault("MALLOC_ARENA_MAX", "2")
    log.info("launching: %s", " ".join(command))
    child = run_streaming(command, cwd=cwd, env=environment, timeout_s=timeout_s, echo=echo)
    result = subprocess.CompletedProcess(command, child.returncode, child.output, None)
    if check and (child.timed_out or child.returncode != 0):
        if child.timed_out:
            raise DistributedRunError(f"torchrun did not finish within {timeout_s:g} s and was stopped",
                                      child.returncode, child.output)
        raise DistributedRunError(f"torchrun exited with status {child.returncode}: {failure_summary(child.output)}",
                                  child.returncode, child.output)
    return result
