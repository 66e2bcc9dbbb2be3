"""Everything about ranks lives here: process-group set-up, who is rank 0, and the collectives the loop needs.

Global rank picks the data shard and the rank-0 role (logging, wandb, files); local rank only picks the GPU.
Functions that run a collective say so: they must be called on every rank, or the job hangs.

Imports: deepspeed, torch.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

_DEVICE: torch.device | None = None  # this rank's compute device, set by init_distributed


def compute_device() -> torch.device:
    """This rank's compute device (cuda:LOCAL_RANK or cpu): where every tensor handed to a collective lives."""
    return _DEVICE if _DEVICE is not None else torch.device("cpu")


def get_global_rank() -> int:
    """Rank of this process over all nodes (0 when not distributed)."""
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))


def get_local_rank() -> int:
    """Rank of this process on its node; selects the GPU and nothing else."""
    return int(os.environ.get("LOCAL_RANK", 0))


def get_world_size() -> int:
    """Number of processes over all nodes (1 when not distributed)."""
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    """True on global rank 0, the only rank with side effects (wandb, pictures, printed tables)."""
    return get_global_rank() == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(device: str) -> torch.device:
    """Join (or, for a plain `python launch/train.py`, create) the process group; return this rank's device.

    Launchers (deepspeed, torchrun, srun via deepspeed) set RANK/WORLD_SIZE/MASTER_*; without them this is a
    1-process group on localhost, so the same code path runs everywhere. CPU uses gloo, GPU NCCL only (no gloo
    side group: a CPU tensor in a collective fails at once on one GPU as it would on 64).
    """
    import deepspeed

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("config: runtime.device=cuda but no CUDA device is visible (use runtime.device=cpu)")
        torch.cuda.set_device(get_local_rank())
        backend = "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed JIT-builds a shared-memory all-reduce op for CPU on first start (1-2 min). gloo carries our
        # collectives fine, so skip the build. `deepspeed.comm.torch` is shadowed by the torch package name,
        # hence sys.modules.
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None
        backend = "gloo"
    deepspeed.init_distributed(dist_backend=backend, verbose=False)
    global _DEVICE
    _DEVICE = torch.device("cuda", get_local_rank()) if device == "cuda" else torch.device("cpu")
    return _DEVICE


def barrier() -> None:
    """Collective: wait for every rank."""
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Collective: sum `tensor` in place over ranks (and return it).

    It runs whenever a process group exists, at world size 1 too, so a one-GPU NCCL run meets every rule a
    64-GPU run does: NCCL takes only tensors on this rank's CUDA device ("No backend type associated with device
    type cpu" otherwise). The check below says the same on the CPU twin, where gloo would accept anything.
    """
    if not dist.is_initialized():
        return tensor
    if _DEVICE is not None and tensor.device != _DEVICE:
        raise RuntimeError(f"all_reduce_sum: tensor on {tensor.device}, collectives need {_DEVICE}")
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Collective: every rank's `obj`, in rank order (pickled; NCCL moves it through the current CUDA device)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any) -> Any:
    """Collective: rank 0's `obj` on every rank (for paths and ids decided once)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def average_buffers(module: nn.Module) -> None:
    """Collective: average floating-point buffers (BatchNorm running mean/var) over ranks.

    DeepSpeed broadcasts parameters once at start and never touches buffers, so each rank's running statistics
    drift on its own data; averaging them before evaluation and saving makes every rank (and the checkpoint,
    which holds rank 0's copy) agree. Integer buffers (num_batches_tracked) are identical already.
    """
    if not dist.is_initialized():
        return
    world = get_world_size()
    for buf in module.buffers():
        if buf.is_floating_point():
            all_reduce_sum(buf).div_(world)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = get_global_rank()
        return True


def setup_logging(level: int = logging.INFO) -> logging.Logger:
    """The `frrn_dist` logger: INFO on rank 0, WARNING elsewhere, rank in every line (a stuck rank still speaks)."""
    log = logging.getLogger("frrn_dist")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[%(asctime)s rank%(rank)s] %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
        log.propagate = False
    log.setLevel(level if is_main_process() else logging.WARNING)
    return log


def cpus_per_rank() -> tuple[int, str]:
    """CPUs this rank may use, and where the number came from (for the log line).

    SLURM_CPUS_PER_TASK is per task already (one task per GPU); otherwise the process's CPU affinity, which the
    deepspeed launcher leaves at the whole node (unless --bind_cores_to_rank), shared by the node's ranks.
    """
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return int(os.environ["SLURM_CPUS_PER_TASK"]), "SLURM_CPUS_PER_TASK"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    # torchrun says LOCAL_WORLD_SIZE, the deepspeed launcher LOCAL_SIZE
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or ""
    local_ranks = int(local) if local.isdigit() else max(1, min(get_world_size(), cpus))
    return max(1, cpus // local_ranks), f"{cpus} CPUs in affinity / {local_ranks} rank(s) on this node"
