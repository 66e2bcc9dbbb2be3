"""The memory planner: measured bytes behave as the plan assumes, the arithmetic holds, the CLI explains itself."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from frrn_dist.model import FRRN
from frrn_dist.plan import PlanError, main, measure_step_bytes, parse_hw, parse_memory, plan_micro_batch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    prev = torch.get_num_threads()  # see test_model.one_thread: 2 threads crawl on a shared 2-core machine
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def test_parse_memory_and_hw():
    assert parse_memory("8GiB") == parse_memory("8G") == 8 * 1024**3
    assert parse_memory("16GB") == 16 * 1000**3
    assert parse_memory("512 MiB") == 512 * 1024**2
    assert parse_memory("1.5GiB") == 3 * 1024**3 // 2
    assert parse_hw("256x512") == (256, 512)
    for bad in ("8 parsecs", "", "GiB"):
        with pytest.raises(PlanError, match="--memory"):
            parse_memory(bad)
    with pytest.raises(PlanError, match=r"'256\*512'.*HEIGHTxWIDTH"):
        parse_hw("256*512")


@pytest.mark.parametrize(
    "mode, precision", [("off", "fp32"), ("unit", "fp32"), pytest.param("stage", "bf16", marks=pytest.mark.slow)]
)
def test_fake_tensor_bytes_equal_a_real_run(mode, precision):
    # the planner measures under FakeTensorMode (shapes only); a real step must allocate and keep the same bytes
    kw = dict(hw=(32, 64), micro_batch_size=2, precision=precision, channels_last=True)
    torch.manual_seed(0)
    real = measure_step_bytes(FRRN("A", checkpointing=mode), **kw)
    with FakeTensorMode():
        fake = measure_step_bytes(FRRN("A", checkpointing=mode), **kw)
    assert real["peak_bytes"] > real["saved_bytes"] > 0
    assert fake["saved_bytes"] == real["saved_bytes"]
    assert fake["peak_bytes"] == pytest.approx(real["peak_bytes"], rel=1e-4)  # bf16: a few hundred bytes apart


def test_peak_grows_linearly_with_images():
    # The plan assumes peak(n) = fixed + n * per_image; check it with 3 images against the fit of 1 and 2.
    with FakeTensorMode():
        model = FRRN("A", checkpointing="unit")
        one, two, three = (measure_step_bytes(model, hw=(128, 256), micro_batch_size=n) for n in (1, 2, 3))
    for key in ("peak_bytes", "saved_bytes"):
        predicted = two[key] + (two[key] - one[key])
        assert abs(three[key] - predicted) / three[key] < 0.01, (key, one, two, three)


@pytest.fixture(scope="module")
def plans_fp32() -> dict[str, dict]:
    return {
        mode: plan_micro_batch("A", hw=(256, 512), memory_bytes=8 * 2**30, checkpointing=mode)
        for mode in ("off", "unit")
    }


def test_plan_arithmetic_and_checkpointing_lowers_the_peak(plans_fp32):
    plans = plans_fp32
    for p in plans.values():
        n = p["max_micro_batch_size"]
        assert p["fixed_bytes"] == p["state_bytes"] + p["step_fixed_bytes"] + p["reserve_bytes"]
        assert p["state_bytes"] == 16 * 17_746_803  # fp32 weights, grads, Adam m and v
        assert p["bytes_per_image"] == pytest.approx(p["peak_bytes_per_image"] * (1 + p["margin"]), abs=1)
        assert p["fixed_bytes"] + n * p["bytes_per_image"] <= p["memory_bytes"]
        assert p["fixed_bytes"] + (n + 1) * p["bytes_per_image"] > p["memory_bytes"]
    assert plans["unit"]["peak_bytes_per_image"] * 2 < plans["off"]["peak_bytes_per_image"]
    assert plans["unit"]["max_micro_batch_size"] > plans["off"]["max_micro_batch_size"]
    tiny = plan_micro_batch("A", hw=(1024, 2048), memory_bytes=2**30, checkpointing="off")
    assert tiny["max_micro_batch_size"] == 0


def test_bf16_keeps_fewer_bytes_than_fp32(plans_fp32):
    fp32 = plans_fp32["unit"]
    bf16 = plan_micro_batch("A", hw=(256, 512), memory_bytes=8 * 2**30, checkpointing="unit", precision="bf16")
    assert bf16["saved_bytes_per_image"] < 0.75 * fp32["saved_bytes_per_image"]
    assert bf16["max_micro_batch_size"] > fp32["max_micro_batch_size"]


def test_cli_prints_a_table(capsys):
    argv = ["--hw", "256x512", "--memory", "8GiB", "--checkpointing", "unit", "--precision", "fp32"]
    main(argv)
    out = capsys.readouterr().out
    assert "| A | 256x512 | unit | fp32 |" in out and "max micro-batch" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--hw", "250x512", "--memory", "8GiB"], "250x512.*multiples of 16"),
        (["--arch", "B", "--hw", "256x528", "--memory", "8GiB"], "256x528.*multiples of 32"),
        (["--hw", "256x512", "--memory", "eight"], "--memory 'eight'"),
        (["--hw", "256", "--memory", "8GiB"], "'256': expected HEIGHTxWIDTH"),
    ],
)
def test_cli_bad_input_is_one_clear_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)
