"""Worker for test_train.py: a few FRRN-A steps through the real DeepSpeed engine, parameters saved at the end.

Run with 2 ranks (micro-batch b, no accumulation) or 1 rank (micro-batch b, 2 accumulation steps). Micro-batch
(step, i) is the same tensor in both: rank r of the 2-rank run gets i = r, the 1-rank run gets i = 0 then 1.
"""

import argparse

import torch

from frrn_dist import distributed as dist
from frrn_dist.config import load_config
from frrn_dist.loss import BootstrappedCrossEntropy
from frrn_dist.train import build_engine, forward_loss

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--zero-stage", type=int, default=0)
args, _ = parser.parse_known_args()  # the deepspeed launcher appends --local_rank

device = dist.init_distributed("cpu")
rank, world = dist.get_global_rank(), dist.get_world_size()
accum = 2 // world
cfg = load_config(
    None,
    [
        "data.shard_dir=unused",
        "data.input_hw=[32,64]",
        "train.micro_batch_size=2",
        f"train.grad_accum_steps={accum}",
        f"train.zero_stage={args.zero_stage}",
    ],
)
engine = build_engine(cfg, device)
init = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
criterion = BootstrappedCrossEntropy(k_fraction=0.25)
for step in range(args.steps):
    for j in range(accum):
        g = torch.Generator().manual_seed(1000 * step + rank + j)
        images = torch.rand(2, 3, 32, 64, generator=g)
        labels = torch.randint(0, 19, (2, 32, 64), generator=g)
        labels[:, :4] = 255  # some void rows, as real labels have
        loss = forward_loss(engine, images, labels, criterion, "fp32")
        engine.backward(loss)
        engine.step()
assert engine.global_steps == args.steps
if rank == 0:
    final = {k: v.detach().clone() for k, v in engine.module.named_parameters()}
    torch.save({"init": init, "final": final}, args.out)
