"""torch.compile (inductor) of FRRN-A gives eager's logits, gradients and BN statistics.

fp32 and bf16 autocast, checkpointing off and unit, FRRN-A at 32x64, batch 2, one training step. The yardstick is
an fp64 eager run of the same weights: per parameter, the compiled gradient's relative error must stay within
ERROR_FACTOR times eager's own (+ a small floor). Eager fp32 itself is off by up to ~2% on the deep encoder's
parameters here (BN over 2x2x4 values at 1/16 resolution amplifies rounding); the inductor bug this caught
(frrn_dist/hardware.py, maybe_compile) put compiled errors at 20-80%.
Slow: inductor builds C++ kernels on 2 cores (see maybe_compile for the times).
"""

from __future__ import annotations

import copy

import pytest
import torch

from frrn_dist.hardware import maybe_compile
from frrn_dist.model import FRRN

HW, BATCH = (32, 64), 2
ERROR_FACTOR = 8.0
FLOOR = {"fp32": 1e-4, "bf16": 2e-2}  # relative error allowed whatever eager's own is


def _step(model, x, weights, bf16: bool):
    """One forward + backward of sum(logits * weights); (logits fp64, {name: grad fp64}, {name: buffer fp64})."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = model(x)
    (out.double() * weights).sum().backward()
    grads = {n: p.grad.double() for n, p in model.named_parameters()}
    bufs = {n: b.double() for n, b in model.named_buffers() if b.dtype.is_floating_point}
    return out.detach().double(), grads, bufs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_compile_off_returns_the_model_itself():
    model = FRRN("A")
    assert maybe_compile(model, False) is model


CASES = [("fp32", "off"), ("fp32", "unit"), ("bf16", "off"), ("bf16", "unit")]


@pytest.mark.slow
@pytest.mark.parametrize("precision, checkpointing", CASES)
def test_compiled_equals_eager(precision, checkpointing):
    torch.manual_seed(0)
    eager = FRRN("A", checkpointing=checkpointing).train()
    reference = copy.deepcopy(eager).double()
    compiled = maybe_compile(copy.deepcopy(eager), True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(BATCH, 3, *HW, generator=g, dtype=torch.float64)
    weights = torch.randn(BATCH, 19, *HW, generator=g, dtype=torch.float64)
    bf16 = precision == "bf16"

    ref = _step(reference, x, weights, bf16=False)
    got_eager = _step(eager, x.float(), weights, bf16)
    got_compiled = _step(compiled, x.float(), weights, bf16)

    floor = FLOOR[precision]
    for what, i in (("logits", 0), ("gradient", 1), ("BN statistics", 2)):
        items = {"": (got_eager[0], got_compiled[0], ref[0])} if i == 0 else {
            n: (got_eager[i][n], got_compiled[i][n], ref[i][n]) for n in ref[i]
        }  # fmt: skip
        for name, (e, c, r) in items.items():
            allowed = max(ERROR_FACTOR * _rel(e, r), floor)
            assert _rel(c, r) <= allowed, f"{what} {name}: compiled {_rel(c, r):.2e} from fp64, eager {_rel(e, r):.2e}"
