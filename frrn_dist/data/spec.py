"""`LoaderSpec`: what every loader backend (DALI, torch fallback, stream) is built from, made once by build_loader.

Imports: torch, frrn_dist.data.recipes (types only); never loaders.py, fallback.py or stream.py, which all import
this.

A backend takes a LoaderSpec plus only what is its own (DALI: tars, indexes and its checkpoint bytes; the
fallback: the indexed samples; stream: the manifest's shard entries and the reading options). `LoaderBase` is
the surface the three share: len (batches per epoch, the same on every rank), `.epoch`, `.recipe`, and the place
in the epoch a checkpoint resumes at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from frrn_dist.data.recipes import Recipe


FULL_LABEL = "label.png"


def label_member(recipe: Recipe, components: list[str]) -> str:
    """The label member the loader decodes: the packed vote at the recipe's factor (`label.x4.png`, see
    frrn_dist.shards; the seed recipe cuts its crop out of `label.x2.png`) when the shards hold it, else the full
    map, which finish_batch votes down on the fly. Both give the same labels; the packed one decodes 1/f^2 of the
    pixels and votes nothing."""
    packed = f"label.x{recipe.factor}.png"
    if recipe.factor > 1 and packed in components:
        return packed
    return FULL_LABEL


def sample_components(image_ext: str, instances: bool, label_ext: str = FULL_LABEL, full_res: bool = False):
    """The members a loader reads from every sample: image, labels, json; the full-resolution label map too when
    scoring at full resolution reads it beside a packed vote; instance.png only for full-resolution scoring."""
    full = [FULL_LABEL] if full_res and label_ext != FULL_LABEL else []
    return [image_ext, label_ext, "json"] + full + (["instance.png"] if instances else [])


@dataclass(frozen=True)
class LoaderSpec:
    """One rank's loader, backend aside: recipe, sizes, sharding, randomness, device, and where it resumes.

    num_batches: batches per epoch on every rank (loaders.epoch_batches). drop_last: training (full batches,
    surplus dropped); False for evaluation. shuffle: already False when not drop_last. num_threads: DALI threads,
    or DataLoader workers for the PyTorch backends (0 = in this process). setup: what a checkpoint must match
    (state.pack_state); position: where that checkpoint left off ({} when starting fresh).
    """

    recipe: Recipe
    image_ext: str  # "jpg" or "png"
    micro_batch_size: int
    rank: int
    world_size: int
    seed: int  # rank r draws from seed + r
    num_batches: int
    drop_last: bool
    shuffle: bool
    full_res_targets: bool
    instances: bool  # full_res_targets and the split has instance.png
    device: str  # "cpu" or "cuda"
    device_id: int | None
    num_threads: int
    setup: dict
    position: dict
    label_ext: str = FULL_LABEL  # spec.label_member: the full map, or a vote packed at the recipe's factor

    @property
    def label_factor(self) -> int:
        """The factor finish_batch still votes the decoded labels down by (1 for a packed vote)."""
        return self.recipe.factor if self.label_ext == FULL_LABEL else 1

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device, self.device_id) if self.device == "cuda" else torch.device(self.device)


class LoaderBase:
    """len, .epoch and .recipe for every backend; _epoch and _done (batches handed out in it) from the spec."""

    def __init__(self, spec: LoaderSpec):
        self.spec, self.recipe = spec, spec.recipe
        self._epoch = int(spec.position.get("epoch", 0))
        self._done = int(spec.position.get("batches_done", 0))

    def __len__(self) -> int:
        return self.spec.num_batches

    @property
    def epoch(self) -> int:
        """Epochs completed since the loader (or the run it was checkpointed from) started."""
        return self._epoch
