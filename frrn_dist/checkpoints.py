"""Resumable checkpoints of a training run: save on every rank, `latest` written last, resume from it.

    runs/<name>/checkpoints/step00001000/   DeepSpeed's files (mp_rank_00_model_states.pt, ZeRO optimizer shards)
                                            + model.safetensors + model.json (written last: the tag is complete)
    runs/<name>/checkpoints/latest          the tag a restart resumes from, replaced atomically after a save

Imports: torch, deepspeed (through the engine it is handed), frrn_dist.distributed, frrn_dist.export.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from frrn_dist import distributed as dist
from frrn_dist.export import save_model

log = logging.getLogger("frrn_dist")

# What torch.save's zip writer raises (as RuntimeError) when the disk or quota is full (seen in test_faults.py).
_WRITE_ERRORS = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no complete checkpoint yet."""
    path = ckpt_dir / "latest"
    return path.read_text().strip() if path.is_file() else None


def _is_write_error(e: Exception) -> bool:
    """A failed file write (full disk, quota, I/O error), as opposed to CUDA out-of-memory or a NCCL failure,
    which are RuntimeErrors too and must surface as what they are."""
    if isinstance(e, OSError):
        return True
    return isinstance(e, RuntimeError) and any(s in str(e) for s in _WRITE_ERRORS)


def save_checkpoint(engine, ckpt_dir: Path, *, client_state: dict[str, Any], meta: dict[str, Any], keep: int) -> str:
    """Collective: a resumable DeepSpeed checkpoint plus an exported model, on every rank with the same tag.

    DeepSpeed's save has barriers inside: it hangs if called on rank 0 only. BN buffers are averaged first, since
    the checkpoint holds rank 0's copy and every rank gets that copy back on resume. `latest` is written by us,
    atomically and only after every file is complete, so a crash or a full disk mid-save leaves the previous
    checkpoint as the one a restart resumes from. A save at the step `latest` already holds (SIGTERM right after
    a periodic save) writes nothing: that checkpoint is complete, and rewriting it would risk the good copy.
    """
    tag = f"step{engine.global_steps:08d}"
    previous = dist.broadcast_object(latest_tag(ckpt_dir))  # rank 0's view: every rank takes the same branch
    if previous == tag:
        return tag
    dist.average_buffers(engine.module)
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
        if dist.is_main_process():
            save_model(engine.module, ckpt_dir / tag, meta)
    except (OSError, RuntimeError) as e:
        if not _is_write_error(e):
            raise  # out of memory, a communication error: not a disk problem, and the tag is not ours to delete
        # The launcher stops the other ranks when this one exits non-zero. Only this save's own tag is removed.
        if dist.is_main_process():
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).strip().splitlines() or [""])[0]
        raise SystemExit(
            f"{ckpt_dir / tag}: checkpoint could not be written ({reason or type(e).__name__}); the previous "
            f"checkpoint ({previous or 'none'}) is intact and a restart resumes from it"
        ) from None
    dist.barrier()  # every rank's files are complete
    if dist.is_main_process():
        tmp = ckpt_dir / "latest.tmp"
        tmp.write_text(tag)
        tmp.replace(ckpt_dir / "latest")
        _prune(ckpt_dir, tag, keep)
    dist.barrier()
    return tag


def _prune(ckpt_dir: Path, tag: str, keep: int) -> None:
    # Only complete checkpoints (model.json is written last) at or below `tag` count towards `keep`; a partial tag
    # left by a crash is removed, so it never outlives a good checkpoint.
    for p in ckpt_dir.glob("step*"):
        if p.is_dir() and not (p / "model.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name < tag)
    for old in tags[: max(0, len(tags) - max(0, keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path, world_size: int) -> tuple[str, dict[str, Any]]:
    """Collective: resume weights, optimizer, step and client state from `ckpt_dir/latest`.

    ZeRO 1/2 shard the optimizer state by rank, so a checkpoint written by N ranks cannot restore Adam's moments
    on M != N ranks; then the weights, the step and the schedule are resumed and the optimizer state restarts
    (said in the log). Stage 0 keeps the whole optimizer state in one file and resumes on any number of ranks.
    """
    tag = latest_tag(ckpt_dir)
    shards = len(list((ckpt_dir / tag).glob("zero_pp_rank_*_optim_states.pt")))
    same_world = shards in (0, world_size)
    if not same_world:
        log.warning(
            f"{ckpt_dir / tag}: written by {shards} ranks with a sharded (ZeRO) optimizer state, resumed on "
            f"{world_size}: weights, step and lr schedule are restored, Adam's moments restart from zero"
        )
    path, client = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=same_world, load_lr_scheduler_states=same_world
    )
    if path is None:
        raise SystemExit(f"{ckpt_dir / tag}: checkpoint named by {ckpt_dir / 'latest'} cannot be loaded")
    return path, client
