"""Resumable checkpoints of a training run: save on every rank, `latest` written last, resume from it on any number
of ranks, and refuse a config the checkpoint cannot serve. Also a CLI to look at them (`--help`).

    runs/<name>/checkpoints/step00001000/             DeepSpeed's files (mp_rank_00_model_states.pt, and with ZeRO 1/2
                                                      zero_pp_rank_<r>_mp_rank_00_optim_states.pt, one per rank)
                                                      + config.yaml (the run's config it was written under)
                                                      + checkpoint.json (step, epoch, world size, ZeRO stage)
                                                      + model.safetensors + model.json (written last: tag complete)
    runs/<name>/checkpoints/step00001000/universal/   the same state in DeepSpeed's universal layout (one folder
                                                      per parameter, any number of ranks): made by the first resume
                                                      on another number of ranks, or by `convert`
    runs/<name>/checkpoints/latest                    the tag a restart resumes from, replaced atomically after a save
    runs/<name>/config_changes.jsonl                  one line per resume that changed the config or the rank count

ZeRO 1/2 shard Adam's state by rank, so a checkpoint of N ranks loads on M != N ranks only through the universal
layout. It is made once, at resume time, by rank 0 while the others wait, into `universal.partial/` and renamed
when whole: an interrupted conversion leaves the original in charge and is redone. Resume-time rather than
save-time because it is needed only when the rank count changes (measured for FRRN-A in the README).

Imports: torch, deepspeed (its ds_to_universal, inside the function that converts), omegaconf, safetensors,
frrn_dist.distributed, frrn_dist.export.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from frrn_dist import distributed as dist
from frrn_dist.export import save_model

log = logging.getLogger("frrn_dist")

MODEL_STATES = "mp_rank_00_model_states.pt"
SHARDS = "zero_pp_rank_*_mp_rank_00_optim_states.pt"
INFO_FILE = "checkpoint.json"
UNIVERSAL = "universal"
CHANGES_FILE = "config_changes.jsonl"

# What torch.save's zip writer raises (as RuntimeError) when the disk or quota is full (seen in test_faults.py).
_WRITE_ERRORS = ("PytorchStreamWriter", "unexpected pos", "file write failed")


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, or None when there is no complete checkpoint yet."""
    path = ckpt_dir / "latest"
    return path.read_text().strip() if path.is_file() else None


def _shards(tag_dir: Path) -> int:
    """ZeRO 1/2 optimizer shards in a tag: the number of ranks that wrote it (0 for ZeRO 0)."""
    return len(list(tag_dir.glob(SHARDS)))


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
            _write_tag_info(engine, ckpt_dir / tag, client_state)
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


def _write_tag_info(engine, tag_dir: Path, client_state: dict[str, Any]) -> None:
    # What `inspect` and a resume need without unpickling 70+ MB, and the config the weights were trained under
    # (the run's config.yaml is rewritten by every start, this copy stays with the checkpoint).
    info = {
        "step": engine.global_steps,
        "epoch": client_state.get("epoch"),
        "world_size": dist.get_world_size(),
        "zero_stage": engine.zero_optimization_stage(),
        "images_per_step": engine.train_batch_size(),
    }
    (tag_dir / INFO_FILE).write_text(json.dumps(info, indent=1) + "\n")
    config = tag_dir.parent.parent / "config.yaml"
    if config.is_file():
        shutil.copyfile(config, tag_dir / "config.yaml")


def _prune(ckpt_dir: Path, tag: str, keep: int) -> None:
    # Only complete checkpoints (model.json is written last) at or below `tag` count towards `keep`; a partial tag
    # left by a crash is removed, so it never outlives a good checkpoint.
    for p in ckpt_dir.glob("step*"):
        if p.is_dir() and not (p / "model.json").is_file():
            shutil.rmtree(p, ignore_errors=True)
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir() and p.name < tag)
    for old in tags[: max(0, len(tags) - max(0, keep - 1))]:
        shutil.rmtree(old, ignore_errors=True)


def tag_info(tag_dir: Path) -> dict[str, Any]:
    """step, epoch, world_size, zero_stage, complete, universal, size_bytes of one tag folder.

    From checkpoint.json; a tag saved before it existed is read from DeepSpeed's model-states file (memory-mapped).
    Complete = model.json (the last file of a save) and every rank's optimizer shard are there.
    """
    info: dict[str, Any] = {"step": None, "epoch": None, "world_size": None, "zero_stage": None}
    if (tag_dir / INFO_FILE).is_file():
        info.update(json.loads((tag_dir / INFO_FILE).read_text()))
    elif (tag_dir / MODEL_STATES).is_file():
        import torch

        try:
            states = torch.load(tag_dir / MODEL_STATES, map_location="cpu", mmap=True, weights_only=False)
            info.update(
                step=states.get("global_steps"),
                epoch=states.get("epoch"),
                world_size=states.get("dp_world_size"),
                zero_stage=(states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0),
            )
        except Exception:  # a truncated file of an interrupted save: reported as incomplete
            pass
    shards = _shards(tag_dir)
    info["complete"] = (tag_dir / "model.json").is_file() and shards in (0, info["world_size"])
    info["universal"] = (tag_dir / UNIVERSAL / "zero" / "optimizer_state.pt").is_file()
    info["size_bytes"] = disk_bytes(tag_dir)
    return info


def disk_bytes(folder: Path) -> int:
    """Bytes of the files under `folder`, a hard-linked file counted once."""
    seen = {(s.st_dev, s.st_ino): s.st_size for s in (p.stat() for p in folder.rglob("*") if p.is_file())}
    return sum(seen.values())


# ---------------------------------------------------------------------------------------------------------------
# the universal checkpoint (ZeRO 1/2 on another number of ranks)


def convert_to_universal(tag_dir: Path) -> float | None:
    """Make `tag_dir`/universal from a ZeRO 1/2 tag with DeepSpeed's ds_to_universal; seconds taken, or None when
    it was there already. Single process (rank 0, or the CLI); ValueError naming the folder if it cannot be done.

    Written into universal.partial/ and renamed when whole, so a kill leaves no folder that looks finished (a
    leftover universal.partial/ is deleted and the conversion redone). FRRN's 17-25 M parameters convert in
    seconds in this process, so no worker processes (ds_to_universal's default is 4 + 2).
    """
    out, tmp = tag_dir / UNIVERSAL, tag_dir / f"{UNIVERSAL}.partial"
    if (out / "zero" / "optimizer_state.pt").is_file():
        return None
    if not (tag_dir / "model.json").is_file():
        raise ValueError(f"{tag_dir}: not a complete checkpoint (no model.json), nothing to convert")
    if _shards(tag_dir) == 0:
        raise ValueError(f"{tag_dir}: a ZeRO 0 checkpoint holds its whole optimizer state and loads on any number "
                         "of ranks as it is; nothing to convert")  # fmt: skip
    from deepspeed.checkpoint import ds_to_universal

    start = time.perf_counter()
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)  # a folder without optimizer_state.pt is not one we renamed
    args = argparse.Namespace(
        input_folder=str(tag_dir), output_folder=str(tmp), num_extract_workers=1, num_merge_workers=1,
        keep_temp_folder=False, strict=True, inject_missing_state=True,  # FRRN has no tensor/pipeline parallelism
    )  # fmt: skip
    chatter = io.StringIO()  # its prints and progress bars; the last lines go into the error if it fails
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:
        last = (chatter.getvalue().strip().splitlines() or [""])[-1][-200:]
        raise ValueError(f"{tag_dir}: conversion to a universal checkpoint failed: {type(e).__name__}: {e} "
                         f"({last}); the checkpoint itself is untouched") from e  # fmt: skip
    (tag_dir / "latest_universal").unlink(missing_ok=True)  # its pointer file; we name the folder ourselves
    _link_instead_of_copy(tag_dir / MODEL_STATES, tmp / MODEL_STATES)
    os.replace(tmp, out)
    return time.perf_counter() - start


def _link_instead_of_copy(original: Path, copy: Path) -> None:
    # ds_to_universal copies the model-states file (FRRN-A: 71 MB); a hard link holds the same bytes for free.
    link = copy.with_name(copy.name + ".link")
    try:
        os.link(original, link)
        os.replace(link, copy)
    except OSError:
        link.unlink(missing_ok=True)  # another file system: keep the copy


def resume_deepspeed_keys(ckpt_dir: Path, world_size: int) -> dict[str, Any]:
    """Collective, before the engine is built: the extra DeepSpeed config keys for resuming from `latest`.

    A ZeRO 1/2 checkpoint of another number of ranks gets its universal twin (rank 0 converts, the others wait)
    and {"checkpoint": {"load_universal": True}}, which DeepSpeed reads at initialize; otherwise {}.
    """
    tag = dist.broadcast_object(latest_tag(ckpt_dir))
    if tag is None or _shards(ckpt_dir / tag) in (0, world_size):
        return {}
    tag_dir, error = ckpt_dir / tag, None
    if dist.is_main_process():
        try:
            seconds = convert_to_universal(tag_dir)
            files = [f.stat() for f in (tag_dir / UNIVERSAL).rglob("*") if f.is_file()]
            size_mb = sum(f.st_size for f in files if f.st_nlink == 1) / 1e6  # the linked model states are not new
            done = "already there" if seconds is None else f"converted in {seconds:.1f} s"
            log.info(f"{tag_dir / UNIVERSAL}: universal checkpoint of {tag} ({_shards(tag_dir)} ranks -> "
                     f"{world_size}), {done}, {size_mb:.0f} MB more on disk")  # fmt: skip
        except (ValueError, OSError) as e:
            error = str(e)
    error = dist.broadcast_object(error)  # also the others' wait for the conversion
    if error:
        raise SystemExit(error if dist.is_main_process() else 1)
    return {"checkpoint": {"load_universal": True}}


def load_checkpoint(engine, ckpt_dir: Path, world_size: int) -> tuple[str, dict[str, Any]]:
    """Collective: resume weights, optimizer, step and client state from `ckpt_dir/latest`.

    ZeRO 0 keeps the whole optimizer state in one file and resumes on any number of ranks. A ZeRO 1/2 checkpoint
    of another rank count needs an engine built with resume_deepspeed_keys' load_universal: it reads the tag's
    universal twin, the weights and Adam's step and moments re-partitioned over this many ranks. DeepSpeed's
    universal load restores parameters only, so the BN running statistics come from the tag's model.safetensors.
    """
    tag = latest_tag(ckpt_dir)
    tag_dir = ckpt_dir / tag
    if engine.load_universal_checkpoint():
        path, client = engine.load_checkpoint(str(tag_dir), tag=UNIVERSAL)
        if path is not None:
            _load_buffers(engine.module, tag_dir / "model.safetensors")
    else:
        shards = _shards(tag_dir)
        if shards not in (0, world_size):
            raise SystemExit(
                f"{tag_dir}: written by {shards} ranks with ZeRO-sharded optimizer state, loaded on {world_size}: "
                "build the engine with resume_deepspeed_keys() (train.main does)"
            )
        path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise SystemExit(f"{tag_dir}: checkpoint named by {ckpt_dir / 'latest'} cannot be loaded")
    return path, client


def _load_buffers(module, weights: Path) -> None:
    import torch
    from safetensors.torch import load_file

    saved = load_file(str(weights))
    with torch.no_grad():
        for name, buf in module.named_buffers():
            buf.copy_(saved[name])


# ---------------------------------------------------------------------------------------------------------------
# the CLI


def _ckpt_dir(run: str) -> Path:
    path = Path(run)
    ckpt_dir = path if path.name == "checkpoints" else path / "checkpoints"
    if not ckpt_dir.is_dir():
        raise SystemExit(f"error: {path}: not a run folder (no checkpoints/ in it)")
    return ckpt_dir


def inspect(run: str) -> str:
    """A table of every tag of a run (the `inspect` command)."""
    ckpt_dir = _ckpt_dir(run)
    latest = latest_tag(ckpt_dir)
    rows = [("tag", "step", "epoch", "ranks", "ZeRO", "complete", "universal", "size")]
    for tag_dir in sorted(p for p in ckpt_dir.glob("step*") if p.is_dir()):
        i = tag_info(tag_dir)
        partial = (tag_dir / f"{UNIVERSAL}.partial").exists()
        rows.append((
            tag_dir.name + (" <- latest" if tag_dir.name == latest else ""),
            *(str(i[k]) if i[k] is not None else "?" for k in ("step", "epoch", "world_size", "zero_stage")),
            "yes" if i["complete"] else "no (interrupted save)",
            "yes" if i["universal"] else ("interrupted, redone when needed" if partial else "no"),
            f"{i['size_bytes'] / 1e6:.0f} MB",
        ))  # fmt: skip
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in rows]
    if len(rows) == 1:
        lines.append("(no checkpoints)")
    return f"{ckpt_dir} (latest: {latest or 'none'})\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m frrn_dist.checkpoints",
        description="Look at a run's checkpoints, and make the universal checkpoint that a ZeRO 1/2 run needs to\n"
        "resume on another number of ranks. A resume makes it by itself when the rank count changed; `convert`\n"
        "makes it ahead of time (e.g. before a requeued job gets fewer GPUs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  python -m frrn_dist.checkpoints inspect runs/frrnA-paper-256x512\n"
        "  python -m frrn_dist.checkpoints convert runs/frrnA-paper-256x512 --tag step00045000\n\n"
        "inspect: `complete` = every file of the save is there (model.json, written last, and every rank's ZeRO\n"
        "shard); `universal` = the tag's universal/ folder, which loads on any number of ranks.\n"
        "convert: writes TAG/universal.partial/ and renames it when whole; a ZeRO 0 tag needs nothing.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="every tag: step, epoch, ranks, ZeRO stage, completeness, universal, size")
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>) or its checkpoints/ folder")
    p = sub.add_parser("convert", help="make TAG/universal/ from a ZeRO 1/2 checkpoint (once; atomic)")
    p.add_argument("run", metavar="RUN", help="run folder (runs/<name>) or its checkpoints/ folder")
    p.add_argument("--tag", help="tag to convert (default: the one `latest` names)")
    args = parser.parse_args(argv)
    if args.command == "inspect":
        print(inspect(args.run))
        return
    ckpt_dir = _ckpt_dir(args.run)
    tag = args.tag or latest_tag(ckpt_dir)
    if tag is None or not (ckpt_dir / tag).is_dir():
        raise SystemExit(f"error: {ckpt_dir}: no checkpoint {tag or '(latest is missing)'}")
    if (ckpt_dir / tag / "model.json").is_file() and _shards(ckpt_dir / tag) == 0:
        print(f"{ckpt_dir / tag}: ZeRO 0, whole optimizer state in one file: loads on any number of ranks as it is")
        return
    try:
        seconds = convert_to_universal(ckpt_dir / tag)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    done = "was already there" if seconds is None else f"written in {seconds:.1f} s"
    print(f"{ckpt_dir / tag / UNIVERSAL}: {done}; a resume on any number of ranks loads it")


if __name__ == "__main__":
    sys.exit(main())
