"""What a resume may change: the effective config compared with the one its checkpoint was written under.

Keys whose change makes the checkpoint unusable stop the run with one line naming them (and a free run name);
the others are listed in the log and appended to `runs/<name>/config_changes.jsonl` with the step they apply
from; a changed images-per-step is said with what it means for the schedule. The README's resume table is the
human version of UNUSABLE and DATA_KEYS below.

Imports: omegaconf, frrn_dist.distributed, frrn_dist.checkpoints.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from frrn_dist import distributed as dist
from frrn_dist.checkpoints import CHANGES_FILE, latest_tag, tag_info

log = logging.getLogger("frrn_dist")

# Keys whose change makes the checkpoint unusable, and why (found by trying: README "Runs and resuming").
UNUSABLE = {
    "model.arch": "the weights belong to another network",
    "model.num_classes": "the classifier has another shape",
    "model.upsample": "the weights were trained with another upsampling grid",
    "optim.optimizer": "Adam's moments are not SGD's momentum",
}
# train.zero_stage 1 <-> 2 loads (same layout); 0 <-> 1/2 does not (DeepSpeed looks for files that are not there).
ZERO_REASON = "ZeRO 0 keeps the optimizer state in the model file, ZeRO 1/2 in per-rank shards"
# Not compared: written by the run itself (resolved "auto" keys; resume_deepspeed_keys' addition), or always true.
IGNORED = ("chosen", "run.resume", "deepspeed.checkpoint.load_universal")
ABSENT = "(absent)"  # a key one of the two configs does not have (the schema grew or shrank in between)
# Keys the loaders' saved position depends on (frrn_dist.data.loaders' `setup`): changed, the data restarts.
DATA_KEYS = ("data.", "train.micro_batch_size", "train.seed")
NOT_DATA = ("data.val_split", "data.num_threads")  # num_threads only matters to the "stream" backend


@dataclass
class ResumeCheck:
    """How the config of a resume differs from the one its checkpoint was written under."""

    tag: str
    step: int
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # dotted key -> (saved, now)
    world_size: tuple[int | None, int] = (None, 1)  # (saved, now)
    images_per_step: tuple[int | None, int] = (None, 1)
    factors: tuple[str, str] = ("", "")  # "micro x accum x ranks", saved and now
    stream: bool = False  # the "stream" backend, whose position also depends on data.num_threads

    def unusable(self) -> dict[str, str]:
        bad = {k: UNUSABLE[k] for k in self.changed if k in UNUSABLE}
        if "train.zero_stage" in self.changed and 0 in self.changed["train.zero_stage"]:
            bad["train.zero_stage"] = ZERO_REASON
        return bad

    def data_changed(self) -> list[str]:
        """Keys (and "ranks") for which the saved data position no longer applies."""
        keys = [k for k in self.changed if k.startswith(DATA_KEYS) and k not in NOT_DATA]
        if "data.num_threads" in self.changed and self.stream:
            keys.append("data.num_threads")
        return keys + (["ranks"] if self.world_size[0] != self.world_size[1] else [])


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}, leaving out IGNORED keys (an empty dict has no keys)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if any(f"{prefix}{key}" == k or f"{prefix}{key}".startswith(k + ".") for k in IGNORED):
            continue
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare_config(config: dict[str, Any], run_dir: Path, world_size: int) -> ResumeCheck | None:
    """The differences between `config` (the effective one, a plain dict) and the config the run's latest
    checkpoint was written under (its tag's config.yaml; for older tags the run's config.yaml, so call this
    before that is rewritten); None when there is no checkpoint or no saved config. Reads files only."""

    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir)
    saved_path = next((p for p in (ckpt_dir / str(tag) / "config.yaml", run_dir / "config.yaml") if p.is_file()), None)
    if tag is None or saved_path is None:
        return None
    saved, now = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path))), _flatten(config)
    info = tag_info(ckpt_dir / tag)
    pairs = {k: (saved.get(k, ABSENT), now.get(k, ABSENT)) for k in sorted(saved.keys() | now.keys())}
    changed = {k: (a, b) for k, (a, b) in pairs.items() if a != b}

    def per_step(c: dict[str, Any], ranks: int | None) -> int | None:
        return None if ranks is None else c["train.micro_batch_size"] * c["train.grad_accum_steps"] * ranks

    def factors(c: dict[str, Any], ranks: int | None) -> str:
        return f"{c['train.micro_batch_size']} x {c['train.grad_accum_steps']} x {ranks}"

    return ResumeCheck(
        tag=tag,
        step=info["step"] if info["step"] is not None else int(tag.removeprefix("step")),
        changed=changed,
        world_size=(info["world_size"], world_size),
        images_per_step=(per_step(saved, info["world_size"]), per_step(now, world_size)),
        factors=(factors(saved, info["world_size"]), factors(now, world_size)),
        stream=now.get("data.backend") == "stream",
    )


def check_resume_config(config: dict[str, Any], run_dir: Path, world_size: int) -> None:
    """Collective: stop (SystemExit, one line on rank 0) when the run's latest checkpoint cannot serve `config`;
    otherwise log what changed and append it to run_dir/config_changes.jsonl with the step it applies from."""
    message = _check(config, run_dir, world_size) if dist.is_main_process() else None
    message = dist.broadcast_object(message)
    if message:
        raise SystemExit(message if dist.is_main_process() else 1)


def _check(config: dict[str, Any], run_dir: Path, world_size: int) -> str | None:
    check = compare_config(config, run_dir, world_size)
    if check is None:
        return None
    bad = check.unusable()
    if bad:
        what = "; ".join(f"{_change(k, *check.changed[k])}: {why}" for k, why in bad.items())
        return (f"error: {run_dir / 'checkpoints' / check.tag} cannot be resumed with this config ({what}); "
                f"start a new run with run.name={_free_name(run_dir)}")  # fmt: skip
    (saved_world, _), (old_images, new_images) = check.world_size, check.images_per_step
    if check.changed:
        listed = ", ".join(_change(k, a, b) for k, (a, b) in check.changed.items())
        log.info(f"resume from {check.tag}: config changed: {listed} (recorded in {run_dir / CHANGES_FILE})")
    if old_images is not None and old_images != new_images:
        c = config["train"]
        log.info(
            f"resume from {check.tag}: images per optimizer step change {old_images} -> {new_images} (micro x "
            f"accum x ranks: {check.factors[0]} -> {check.factors[1]}). "
            f"optim.lr_drop_step ({config['optim']['lr_drop_step']}) and train.max_steps ({c['max_steps']}) count "
            f"optimizer steps, so each step from {check.step} on sees {new_images / old_images:.3g}x the images; "
            f"multiply the steps still to come by {old_images / new_images:.3g} to keep the schedule in images"
        )
    if check.changed or saved_world != world_size:
        record = {
            "step": check.step,
            "tag": check.tag,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "changed": {k: list(v) for k, v in check.changed.items()},
            "world_size": list(check.world_size),
            "images_per_step": list(check.images_per_step),
            "data_restarts": check.data_changed(),
        }
        with open(run_dir / CHANGES_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
    return None


def _change(key: str, saved: Any, now: Any) -> str:
    """ "optim.lr 0.001 -> 0.0005"."""
    a, b = (v if v is ABSENT else repr(v) for v in (saved, now))
    return f"{key} {a} -> {b}"


def _free_name(run_dir: Path) -> str:
    n = 2
    while (run_dir.parent / f"{run_dir.name}-{n}").exists():
        n += 1
    return f"{run_dir.name}-{n}"
