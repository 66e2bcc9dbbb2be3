"""Memory planner: the largest micro-batch of FRRN that fits in a device's memory, from measured activation bytes.

    python -m frrn_dist.plan --arch A --hw 256x512 --memory 8GiB [--checkpointing unit] [--precision bf16]

One training step (forward, bootstrapped loss, backward) of the same architecture, checkpointing and precision is
run at the requested size, once with 1 and once with 2 images, and two things are measured:
- bytes saved for backward (torch.autograd.graph.saved_tensors_hooks, unique storages, parameters excluded);
- the peak of live tensor bytes over the whole step (every op's outputs followed until freed): saved tensors plus
  what the backward and the checkpoint recomputes hold at their worst moment. This is what has to fit.
The step runs under FakeTensorMode: every op produces tensors with the real shapes, dtypes and layouts but computes
nothing, so FRRN-B at 512x1024 in bf16 costs seconds on a CPU (tests/test_plan.py checks fake and real bytes agree).
peak(n) = step_fixed + n * per_image, fitted from n = 1 and 2. The rest is stated, not measured:
- parameters, gradients and Adam's two moments: 16 bytes per parameter (fp32 and torch_autocast bf16 both keep fp32
  parameters; DeepSpeed ZeRO-1/2 would shard the optimizer part across ranks: not counted here);
- `reserve_bytes` (default 0.75 GiB) for the CUDA context, cuDNN workspaces and library handles;
- `margin` (default 10 %) on activation bytes for the caching allocator's rounding and fragmentation.
CPU autocast and CUDA autocast put the same layers (convolutions) in bf16, so the bf16 bytes carry over to GPUs.

Imports: torch, tqdm, frrn_dist.{loss, model}.
"""

from __future__ import annotations

import argparse
import re
import weakref

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only
from torch.utils.weak import WeakIdKeyDictionary
from tqdm import tqdm

from frrn_dist.loss import bootstrapped_cross_entropy
from frrn_dist.model import CHECKPOINTING_MODES, FRRN, count_parameters

PRECISIONS = ("fp32", "bf16")
GiB = 2**30
STATE_BYTES_PER_PARAM = 16  # fp32 weight + fp32 grad + Adam exp_avg + exp_avg_sq
RESERVE_BYTES = 3 * GiB // 4
MARGIN = 0.10


class PlanError(ValueError):
    """A size or memory amount the planner cannot use."""


class _LiveBytes(TorchDispatchMode):
    """Follows every tensor storage that ops create while active; `peak` is the most bytes alive at once.

    Storages that exist before (parameters, gradients, inputs) are listed in `known` and never counted.
    """

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self.live = self.peak = 0
        self._storages = WeakIdKeyDictionary()
        for t in known:
            self._storages[t.untyped_storage()] = None

    def _freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def _track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        if storage in self._storages:
            return
        nbytes = storage.nbytes()
        self._storages[storage] = weakref.ref(storage, lambda _, n=nbytes: self._freed(n))
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out


def measure_step_bytes(
    model: FRRN, *, hw: tuple[int, int], micro_batch_size: int, precision: str = "fp32", channels_last: bool = False
) -> dict[str, int]:
    """One training step of `model` on random data: bytes saved for backward and peak live bytes (module doc).

    Works on a real model or on one built under FakeTensorMode (then call it inside the same mode). The parameters
    get zeroed gradients first: a real loop keeps them, and they are counted as state, not here.
    """
    if precision not in PRECISIONS:
        raise PlanError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    model.train()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.rand(micro_batch_size, 3, *hw).contiguous(memory_format=fmt)  # NHWC input -> NHWC activations
    labels = torch.randint(0, model.num_classes, (micro_batch_size, *hw))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    known = [x, labels, *model.parameters(), *(p.grad for p in model.parameters()), *model.buffers()]
    # storages by identity (fake storages have no data pointer); `keep` stops ids from being reused meanwhile
    skip = {id(t.untyped_storage()) for t in known}
    saved: dict[int, int] = {}
    keep = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if id(storage) not in skip:  # weights saved by convs are parameters, not activations
            saved[id(storage)] = storage.nbytes()
            keep.append(storage)
        return t

    with _LiveBytes(known) as live:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = bootstrapped_cross_entropy(logits, labels)
        del keep[:]
        loss.backward()
        del loss, logits
    return {"saved_bytes": sum(saved.values()), "peak_bytes": live.peak}


def plan_micro_batch(
    arch: str = "A",
    *,
    hw: tuple[int, int],
    memory_bytes: int,
    checkpointing: str = "off",
    precision: str = "fp32",
    num_classes: int = 19,
    reserve_bytes: int = RESERVE_BYTES,
    margin: float = MARGIN,
) -> dict:
    """Largest micro-batch of FRRN-`arch` at `hw` that fits in `memory_bytes` (0 if not even one image does).

    Returns the measured and derived figures: saved_bytes_per_image, peak_bytes_per_image (what the plan uses),
    step_fixed_bytes (measured per-step bytes that do not grow with images, e.g. bf16 weight copies), state_bytes,
    reserve_bytes, fixed_bytes (their sum), bytes_per_image (peak x (1 + margin)), max_micro_batch_size.
    """
    mult = FRRN.size_multiple_of(arch)
    if hw[0] % mult or hw[1] % mult or min(hw) <= 0:
        raise PlanError(f"FRRN-{arch} input {hw[0]}x{hw[1]}: height and width must be positive multiples of {mult}")
    if checkpointing not in CHECKPOINTING_MODES:
        raise PlanError(f"checkpointing must be one of {CHECKPOINTING_MODES}, got {checkpointing!r}")
    with FakeTensorMode():
        model = FRRN(arch, num_classes, checkpointing=checkpointing)
        one, two = (
            measure_step_bytes(model, hw=hw, micro_batch_size=n, precision=precision, channels_last=True)
            for n in (1, 2)
        )
    peak_per_image = two["peak_bytes"] - one["peak_bytes"]
    step_fixed = max(0, one["peak_bytes"] - peak_per_image)
    state = STATE_BYTES_PER_PARAM * count_parameters(model)
    fixed = state + step_fixed + reserve_bytes
    per_image = peak_per_image * (1 + margin)
    return {
        "arch": arch,
        "hw": tuple(hw),
        "checkpointing": checkpointing,
        "precision": precision,
        "memory_bytes": int(memory_bytes),
        "saved_bytes_per_image": two["saved_bytes"] - one["saved_bytes"],
        "peak_bytes_per_image": peak_per_image,
        "step_fixed_bytes": step_fixed,
        "state_bytes": state,
        "reserve_bytes": reserve_bytes,
        "fixed_bytes": fixed,
        "margin": margin,
        "bytes_per_image": round(per_image),
        "max_micro_batch_size": max(0, int((memory_bytes - fixed) // per_image)),
    }


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_UNITS |= {u + "ib": v for u, v in _UNITS.items() if u not in ("", "b")}
_UNITS |= {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_memory(text: str) -> int:
    """'8GiB' / '8G' (binary) or '8GB' (decimal) or plain bytes -> bytes."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise PlanError(f"--memory {text!r}: expected a number with a unit such as 8GiB, 80G, 16GB or 512MiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_hw(text: str) -> tuple[int, int]:
    """'256x512' -> (256, 512)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise PlanError(f"{text!r}: expected HEIGHTxWIDTH in pixels, e.g. 256x512")
    return int(m.group(1)), int(m.group(2))


def format_table(plans: list[dict]) -> str:
    """Markdown table of plans (one row each)."""
    mib = 2**20
    rows = [
        "| arch | input | checkpointing | precision | saved for backward / image | peak / image | fixed "
        "(state+step+reserve) | memory | max micro-batch |",
        "|---|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for p in plans:
        rows.append(
            f"| {p['arch']} | {p['hw'][0]}x{p['hw'][1]} | {p['checkpointing']} | {p['precision']} "
            f"| {p['saved_bytes_per_image'] / mib:,.0f} MiB | {p['peak_bytes_per_image'] / mib:,.0f} MiB "
            f"| {p['fixed_bytes'] / mib:,.0f} MiB | {p['memory_bytes'] / GiB:,.1f} GiB | {p['max_micro_batch_size']} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m frrn_dist.plan",
        description="Largest FRRN micro-batch that fits in a device's memory. Runs one training step at --hw with 1 "
        "and 2 images (shapes only, under FakeTensorMode: seconds on a CPU), measures bytes saved for backward and "
        "the peak of live tensor bytes, and adds 16 bytes/parameter (weights, grads, Adam), a reserve for the CUDA "
        "context and a margin for the allocator. Without --checkpointing/--precision every combination is shown.",
    )
    ap.add_argument("--arch", choices=("A", "B"), default="A", help="FRRN variant (default A)")
    ap.add_argument("--hw", required=True, help="input HEIGHTxWIDTH in pixels, e.g. 256x512 (A) or 512x1024 (B)")
    ap.add_argument("--memory", required=True, help="device memory, e.g. 8GiB, 80G (binary) or 16GB (decimal)")
    ap.add_argument("--checkpointing", choices=CHECKPOINTING_MODES, help="activation checkpointing (default: all)")
    ap.add_argument("--precision", choices=PRECISIONS, help="fp32, or bf16 autocast (default: both)")
    ap.add_argument("--num-classes", type=int, default=19, help="output classes (default 19)")
    ap.add_argument(
        "--reserve", default="0.75GiB", help="memory kept back for the CUDA context and workspaces (default 0.75GiB)"
    )
    ap.add_argument("--margin", type=float, default=MARGIN, help="fraction added to activation bytes (default 0.1)")
    args = ap.parse_args(argv)
    try:
        hw, memory, reserve = parse_hw(args.hw), parse_memory(args.memory), parse_memory(args.reserve)
        modes = [args.checkpointing] if args.checkpointing else list(CHECKPOINTING_MODES)
        precisions = [args.precision] if args.precision else list(PRECISIONS)
        combos = [(precision, mode) for precision in precisions for mode in modes]
        plans = [
            plan_micro_batch(
                args.arch,
                hw=hw,
                memory_bytes=memory,
                checkpointing=mode,
                precision=precision,
                num_classes=args.num_classes,
                reserve_bytes=reserve,
                margin=args.margin,
            )
            for precision, mode in tqdm(combos, desc="measuring", unit="plan", leave=False)
        ]
    except PlanError as e:
        raise SystemExit(f"plan: {e}") from None
    print(
        f"FRRN-{args.arch} at {hw[0]}x{hw[1]} in {memory / GiB:.1f} GiB: peak bytes of one step measured with 1 and "
        f"2 images; fixed = {plans[0]['state_bytes'] / 2**20:.0f} MiB weights+grads+Adam + measured per-step bytes "
        f"+ {reserve / 2**20:.0f} MiB reserve; activations +{args.margin:.0%} margin."
    )
    print(format_table(plans))


if __name__ == "__main__":
    main()
