"""One DeepSpeed rank for tests/test_elastic.py: trains, saves and resumes FRRN-A at 32x64 through frrn_dist.train's
own functions (setup_run, resume_deepspeed_keys, build_engine, resume) and frrn_dist.checkpoints.save_checkpoint,
on seeded synthetic batches, and writes Adam's full state as DeepSpeed gathers it over the ranks, so the test can
compare what one rank count saved with what another loaded.

    deepspeed --num_accelerators 2 tests/elastic_worker.py save SHARDS OUT --stages 1 2 --steps 2
    deepspeed --num_accelerators 3 tests/elastic_worker.py resume SHARDS OUT --stages 1 2 [--set key=value ...]

The runs are tests/procs.py's tiny() runs (so launch/train.py can resume them too) with train.zero_stage=<s>.
`save` also reads one batch of each rank's real train loader and saves the loaders' positions, as the loop does;
it writes OUT/zero<s>/saved_state.pt. `resume` (with --set overrides) loads OUT/zero<s>'s latest checkpoint,
writes the state it loaded, takes one optimizer step on batch(steps, rank) for each of its ranks and writes the
weights after it into OUT/zero<s>/resumed_<ranks>.pt. `resume` saves nothing: every resume starts from the same
checkpoint.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository

from frrn_dist import distributed as dist  # noqa: E402
from frrn_dist.checkpoints import resume_deepspeed_keys, save_checkpoint  # noqa: E402
from frrn_dist.config import load_config  # noqa: E402
from frrn_dist.loss import BootstrappedCrossEntropy  # noqa: E402
from frrn_dist.train import RunState, build_engine, build_loaders, resume, setup_run  # noqa: E402
from tests.procs import tiny  # noqa: E402

MICRO_BATCH, HW = 2, (32, 64)  # tiny()'s


def overrides(shards: str, out: str, stage: int, extra: list[str]) -> list[str]:
    return tiny(Path(shards), Path(out), f"zero{stage}", f"train.zero_stage={stage}", *extra)


def batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank `rank`'s micro-batch at optimizer step `step`: the same on any machine and for any world size."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return torch.rand(MICRO_BATCH, 3, *HW, generator=g), torch.randint(0, 19, (MICRO_BATCH, *HW), generator=g)


def criterion() -> BootstrappedCrossEntropy:
    return BootstrappedCrossEntropy(k=None, k_fraction=0.0625)  # the schema defaults, as train.main builds it


def train_step(engine, step: int) -> None:
    images, labels = batch(step, dist.get_global_rank())
    loss = criterion()(engine(images).float(), labels)
    engine.backward(loss)
    engine.step()


def full_state(engine) -> dict:
    """Collective: {param name: {fp32, exp_avg, exp_avg_sq}} over all ranks, and Adam's step(s).

    What deepspeed.utils.safe_get_full_optimizer_state does per parameter (each rank writes its fragment of the
    flat fp32 partition at the parameter's offset, a sum over ranks completes it), in one all-reduce per state
    instead of 181: a collective costs milliseconds on 2 shared cores.
    """
    params = dict(engine.module.named_parameters())
    offsets, total = {}, 0
    for name, p in params.items():
        offsets[name], total = total, total + p.numel()
    full = {}
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        flat = torch.zeros(total)
        for name, p in params.items():
            if p._hp_mapping is not None:  # this rank holds part of p's fp32 state (ZeRO 1/2)
                address = p._hp_mapping.lp_fragment_address
                fragment = p._hp_mapping.get_hp_fragment(None if key == "fp32" else key)
                flat.narrow(0, offsets[name] + address.start, address.numel).copy_(fragment.flatten())
        full[key] = dist.all_reduce_sum(flat)
    out = {
        name: {key: full[key].narrow(0, offsets[name], p.numel()).view_as(p).clone() for key in full}
        for name, p in params.items()
    }
    mine = {float(s["step"]) for s in engine.optimizer.optimizer.state.values()}  # ZeRO's flat partitions
    steps = sorted(set().union(*dist.all_gather_object(mine)))
    return {"params": out, "steps": steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=("save", "resume"))
    parser.add_argument("shards")
    parser.add_argument("out")
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides of a resume")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    for stage in args.stages:
        cfg = load_config(None, overrides(args.shards, args.out, stage, args.set))
        device, run_dir = setup_run(cfg)
        ckpt_dir = run_dir / "checkpoints"
        if args.mode == "save":
            engine = build_engine(cfg, device)
            for step in range(args.steps):
                train_step(engine, step)
            loader, _ = build_loaders(cfg, device, None)
            next(iter(loader))  # one batch in: a position the loaders of another rank count must not take
            client = RunState(data=dist.all_gather_object(loader.state()))
            meta = dict(arch="A", num_classes=19, upsample="theano", input_hw=list(HW), step=engine.global_steps)
            start = time.perf_counter()
            save_checkpoint(engine, ckpt_dir, client_state=vars(client), meta=meta, keep=2)
            if dist.is_main_process():  # for the README's save-time vs resume-time conversion comparison
                print(f"zero{stage}: save_checkpoint took {time.perf_counter() - start:.1f} s", flush=True)
            state = full_state(engine)
            if dist.is_main_process():
                torch.save(state, run_dir / "saved_state.pt")
            continue
        cfg.deepspeed.merge_with(resume_deepspeed_keys(ckpt_dir, dist.get_world_size()))
        engine = build_engine(cfg, device)
        resume(engine, ckpt_dir, cfg)
        loaded = full_state(engine)
        buffers = {k: v.clone() for k, v in engine.module.named_buffers()}
        train_step(engine, engine.global_steps)
        after = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
        if dist.is_main_process():
            result = dict(loaded=loaded, buffers=buffers, after=after, world_size=dist.get_world_size())
            torch.save(result, run_dir / f"resumed_{dist.get_world_size()}.pt")
        dist.barrier()


if __name__ == "__main__":
    main()
