"""The GPU rules of the training loop, checked on CPU through `frrn_dist.train.main` itself.

- Gradients are the mean over ranks and accumulation steps: 2 ranks x micro-batch b equal 1 rank x b x 2
  accumulation steps, with plain SGD, whose update doubles if the gradient does (Adam's would barely move).
- Ordinary micro-steps issue no host synchronisation (counted by frrn_dist.syncs, itself checked to count).
- A non-finite loss on one rank stops both, with no checkpoint after the first non-finite step.
- A rank's empty last evaluation batch leaves val/loss finite.
- Collectives run at world size 1 and refuse a tensor off the compute device.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from frrn_dist.config import load_config
from frrn_dist.data.loaders import build_loader
from frrn_dist.loop import evaluate
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.metrics import CityscapesMetrics
from frrn_dist.syncs import HostSyncCounter
from frrn_dist.train import build_model

from .procs import ROOT, _env, run_train, tiny, train_cmd

# Whole frames in order, no randomness: rank r's first batch of 3 is the 1-rank run's micro-batch r.
EXACT = (
    "optim.optimizer=sgd",
    "optim.momentum=0",
    "optim.lr=0.05",
    "data.shuffle=false",
    "data.translate_px=0",
    "data.gamma_z=0",
    "data.flip=false",
    "train.micro_batch_size=3",
    "train.max_steps=3",
    "train.save_every_steps=3",
    "train.eval_every_steps=0",
)


@pytest.fixture(scope="module")
def sgd_runs(shard_dir, tmp_path_factory):
    """FRRN-A trained 3 SGD steps by train.main: 2 ranks x 3 images, and 1 rank x 3 images x 2 accumulation
    steps, under ZeRO 0 and 2; the 2-rank ZeRO 0 run also counts its host synchronisations."""
    out = tmp_path_factory.mktemp("sgd")
    for stage in (0, 2):
        zero = f"train.zero_stage={stage}"
        run_train(tiny(shard_dir, out, f"two{stage}", *EXACT, zero, f"train.count_host_syncs={stage == 0}"), ranks=2)
        run_train(tiny(shard_dir, out, f"one{stage}", *EXACT, zero, "train.grad_accum_steps=2"), ranks=1)
    return out


def _weights(run: Path) -> dict[str, torch.Tensor]:
    """Trainable parameters of the final checkpoint (BN running statistics differ by design: 2 ranks average
    theirs, 1 rank applies the momentum twice)."""
    state = load_file(run / "checkpoints/step00000003/model.safetensors")
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_two_ranks_equal_one_rank_with_accumulation_through_main(sgd_runs, stage):
    cfg = load_config(None, ["data.shard_dir=unused", "data.input_hw=[32,64]"])
    torch.manual_seed(cfg.train.seed)  # as build_engine: the initial weights every run starts from
    init = {k: v for k, v in build_model(cfg.model).state_dict().items()}
    two, one = _weights(sgd_runs / f"two{stage}"), _weights(sgd_runs / f"one{stage}")
    assert two.keys() == one.keys()
    moved = sum(float((two[k] - init[k]).norm() ** 2) for k in two) ** 0.5
    apart = sum(float((two[k] - one[k]).norm() ** 2) for k in two) ** 0.5
    # A gradient summed instead of averaged (or averaged twice) changes the SGD update by `moved` or more.
    assert moved > 0.05, moved
    assert apart < 1e-3 * moved, (apart, moved)
    for k in two:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=f"stage {stage}: {k}")


@pytest.mark.slow
def test_ordinary_micro_steps_issue_no_host_syncs(sgd_runs):
    ranks = json.loads((sgd_runs / "two0/host_syncs.json").read_text())
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["micro_steps"] >= 2 for r in ranks), ranks  # steps 2 and 3 of each rank were watched
    assert [r["host_syncs"] for r in ranks] == [0, 0], ranks[0]["first"]


def test_sync_counter_counts_reads_made_by_our_code():
    """The positive control: the same counter sees the reads CityscapesMetrics.compute() makes (.cpu(), int()),
    and none of a read made outside frrn_dist."""
    counter = HostSyncCounter(torch.device("cpu"))
    try:
        metrics = CityscapesMetrics()
        metrics.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 4, dtype=torch.long))
        counter.resume()
        torch.ones(3).sum().item()  # this test's own read: not frrn_dist's
        assert counter.count == 0
        metrics.compute()
        counter.pause()
    finally:
        counter.close()
    assert counter.count >= 2 and "metrics.py" in counter.first_stack
    assert torch.Tensor.item is torch._C.TensorBase.item  # close() put torch back


NAN_WORKER = textwrap.dedent(
    """
    import sys
    import frrn_dist.loop as loop
    from frrn_dist import distributed as dist
    from frrn_dist.config import parse_args
    from frrn_dist.train import main

    real = loop.forward_loss

    def forward_loss(engine, *args):  # rank 1's loss is NaN from optimizer step 3 on
        loss = real(engine, *args)
        return loss * float("nan") if dist.get_global_rank() == 1 and engine.global_steps >= 2 else loss

    loop.forward_loss = forward_loss
    main(parse_args(sys.argv[1:])[1])
    """
)


@pytest.mark.slow
def test_non_finite_loss_on_one_rank_stops_both_before_any_later_save(shard_dir, tmp_path):
    worker = tmp_path / "nan_worker.py"
    worker.write_text(NAN_WORKER)
    # Saves at 2 and 4, the ranks agree only at 4: the step-4 save must not happen.
    overrides = tiny(shard_dir, tmp_path, "nan", "train.max_steps=8", "train.save_every_steps=2",
                     "train.log_every_steps=4", "train.eval_every_steps=0")  # fmt: skip
    proc = subprocess.run(
        train_cmd(overrides, 2, script=worker), capture_output=True, text=True, env=_env(), cwd=ROOT, timeout=300
    )
    assert proc.returncode != 0
    said = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "non-finite" in ln]
    assert len(said) == 1 and "between steps 2 and 4" in said[0], said
    ckpt = tmp_path / "nan/checkpoints"
    assert (ckpt / "latest").read_text().strip() == "step00000002"
    assert not (ckpt / "step00000004").exists()
    weights = load_file(ckpt / "step00000002/model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_empty_last_eval_batch_gives_a_finite_loss(shard_dir):
    # 4 val frames over 3 ranks, one per batch: rank 0's slice has 1 frame, its second batch is empty.
    loader = build_loader(shard_dir, "val", recipe="eval", input_hw=(32, 64), micro_batch_size=1, rank=0,
                          world_size=3, num_threads=1)  # fmt: skip
    assert [len(b) for b in loader] == [1, 0]
    cfg = load_config(None, ["data.shard_dir=unused", "data.input_hw=[32,64]"])
    results, _ = evaluate(build_model(cfg.model), loader, BootstrappedCrossEntropy(), precision="fp32")
    assert results["images"] == 1 and torch.isfinite(torch.tensor(results["loss"])) and results["loss"] > 0


def test_collectives_run_at_world_size_one_and_refuse_tensors_off_the_device():
    script = textwrap.dedent(
        """
        import torch
        from frrn_dist import distributed as dist
        dist.init_distributed("cpu")
        t = torch.ones(2)
        assert dist.all_reduce_sum(t) is t and dist.get_world_size() == 1
        assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
        try:
            dist.all_reduce_sum(torch.ones(2, device="meta"))
        except RuntimeError as e:
            print("refused:", e)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=_env(), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "refused: all_reduce_sum: tensor on meta, collectives need cpu" in proc.stdout
