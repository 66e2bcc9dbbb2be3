"""FRRN-A/B against frrn-spec.md: counts, structure, init, shapes, the bilinear grid, pooling, checkpointing."""

from __future__ import annotations

import copy
import math
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from frrn_dist.model import (
    FRRN,
    FRRU,
    RU,
    CheckpointSafeSyncBatchNorm,
    _swap_batchnorm,
    convert_sync_batchnorm,
    count_parameters,
    max_pool,
    theano_upsample2x,
    upsample2x,
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # With other processes on the 2 cores, 2 OpenMP threads spin-wait on each other: a 32x64 step took 12 s
    # instead of 1 s. One thread is steady on a busy machine and costs about 1.5x on an idle one.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


@pytest.fixture(scope="module")
def model_a() -> FRRN:
    torch.manual_seed(0)
    return FRRN("A")


# --- counts and structure (frrn-spec §1, §3) ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "arch, params, convs, bns, conv_biases",
    [("A", 17_746_803, 67, 48, 563), ("B", 24_755_699, 79, 56, 691)],
)
def test_parameter_counts_match_the_authors(arch, params, convs, bns, conv_biases):
    model = FRRN(arch, 19)
    conv_list = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert count_parameters(model) == params
    assert len(conv_list) == convs
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bns
    assert sum(m.bias.numel() for m in conv_list if m.bias is not None) == conv_biases


def test_biases_bn_settings_and_widths(model_a):
    # a bias only on the FRRU 1x1 back into the residual stream and on the classifier (frrn-spec §1.1)
    for name, m in model_a.named_modules():
        if isinstance(m, nn.Conv2d):
            has_bias = name.endswith("to_residual") or name == "head.classifier"
            assert (m.bias is not None) == has_bias, name
        if isinstance(m, nn.BatchNorm2d):
            assert (m.eps, m.momentum) == (1e-4, 0.1), name
    split_conv, split_bn = model_a.stem.split
    assert (split_conv.in_channels, split_conv.out_channels, split_conv.kernel_size) == (48, 32, (1, 1))
    assert isinstance(split_bn, nn.BatchNorm2d)
    # first head RU: 96 + 32 = 128 in, with a bias-free 1x1 projection; the other RUs have none
    head_ru = model_a.head.units[0]
    assert head_ru.conv1.in_channels == 128 and head_ru.proj.kernel_size == (1, 1) and head_ru.proj.bias is None
    rus = [m for m in model_a.modules() if isinstance(m, RU)]
    assert len(rus) == 6 and sum(ru.proj is not None for ru in rus) == 1
    # chained units: only the first FRRU of a stage sees the previous stage's width (pitfall 1)
    widths = [(u.conv1.in_channels - 32, u.conv1.out_channels, u.scale) for s in model_a.stages for u in s.units]
    assert widths == [
        (48, 96, 2), (96, 96, 2), (96, 96, 2),
        (96, 192, 4), (192, 192, 4), (192, 192, 4), (192, 192, 4),
        (192, 384, 8), (384, 384, 8), (384, 384, 16), (384, 384, 16),
        (384, 192, 8), (192, 192, 8), (192, 192, 4), (192, 192, 4), (192, 96, 2), (96, 96, 2),
    ]  # fmt: skip


def test_he_uniform_init(model_a):
    for name, m in model_a.named_modules():
        if not isinstance(m, nn.Conv2d):
            continue
        # gain sqrt(2) where a ReLU follows (after BN): the stem conv, every conv1, the FRRU conv2 (not the RU's)
        gain_relu = name == "stem.conv" or name.endswith("conv1") or (name.startswith("stages") and "conv2" in name)
        fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
        bound = math.sqrt((6 if gain_relu else 3) / fan_in)
        w = m.weight.detach().abs()
        assert w.max() <= bound + 1e-7, name
        if w.numel() >= 1000:  # uniform: the largest of many draws is close to the bound
            assert w.max() > 0.95 * bound, name
        if m.bias is not None:
            assert torch.all(m.bias == 0), name


# --- shapes and the size error -----------------------------------------------------------------------------------


@pytest.mark.parametrize("hw", [(32, 64), (48, 80), (64, 128)])
def test_output_shapes_a(model_a, hw):
    with torch.no_grad():
        out = model_a.eval()(torch.rand(2, 3, *hw))
    assert out.shape == (2, 19, *hw) and out.dtype == torch.float32 and torch.isfinite(out).all()


def test_output_shapes_b():
    torch.manual_seed(0)
    model = FRRN("B", num_classes=7).eval()
    for hw in [(64, 128), (96, 64)]:
        with torch.no_grad():
            out = model(torch.rand(1, 3, *hw))
        assert out.shape == (1, 7, *hw) and torch.isfinite(out).all()


@pytest.mark.parametrize("arch, hw, multiple", [("A", (40, 64), 16), ("A", (64, 72), 16), ("B", (48, 64), 32)])
def test_size_not_a_multiple_is_a_clear_error(arch, hw, multiple):
    model = FRRN(arch)
    assert model.size_multiple == multiple
    with pytest.raises(ValueError, match=rf"{hw[0]}x{hw[1]}.*multiples of {multiple}"):
        model(torch.rand(1, 3, *hw))


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="'C'"):
        FRRN("C")
    with pytest.raises(ValueError, match="'bicubic'"):
        FRRN("A", upsample="bicubic")
    with pytest.raises(ValueError, match="'layer'"):
        FRRN("A", checkpointing="layer")


# --- sampling ops (frrn-spec §1.6) ------------------------------------------------------------------------------


def test_theano_upsample_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 1, 2, 2)
    # out[2i] = x[i], out[2i+1] = (x[i] + x[i+1]) / 2, the last row and column repeated
    expected = torch.tensor(
        [[1.0, 1.5, 2.0, 2.0], [2.0, 2.5, 3.0, 3.0], [3.0, 3.5, 4.0, 4.0], [3.0, 3.5, 4.0, 4.0]]
    ).view(1, 1, 4, 4)
    assert torch.equal(theano_upsample2x(x), expected)
    # and not PyTorch's grids (pitfall 7)
    assert not torch.allclose(upsample2x(x, "align_corners"), expected)
    assert not torch.allclose(upsample2x(x, "half_pixel"), expected)


def test_theano_upsample_equals_replicate_pad_transposed_conv():
    # Theano's own recipe: replicate-pad 1, transposed conv with kernel [0.5, 1, 0.5]^2, stride 2, its pad formula
    torch.manual_seed(0)
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    k1 = torch.tensor([0.5, 1.0, 0.5], dtype=torch.float64)
    kernel = torch.outer(k1, k1).expand(3, 1, 3, 3)
    pad = 2 * 2 - (2 - 1) // 2 - 1
    ref = F.conv_transpose2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel, stride=2, padding=pad, groups=3,
                             output_padding=1)  # fmt: skip
    assert ref.shape == (2, 3, 6, 10)
    torch.testing.assert_close(theano_upsample2x(x), ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("s", [2, 4, 16, 32])
def test_max_pool_keeps_argmax_only_same_values_and_gradients(s):
    torch.manual_seed(s)
    # small integers: many ties, so the argmax rule must be max_pool2d's exactly
    x = torch.randint(0, 4, (2, 3, 2 * s, 3 * s)).double().requires_grad_()
    g = torch.randn(2, 3, 2, 3, dtype=torch.float64)
    ours = max_pool(x, s)
    # what backward keeps: one small integer per pooled value, not the input
    (kept,) = ours.grad_fn.saved_tensors
    assert kept.shape == ours.shape and kept.dtype == (torch.uint8 if s <= 16 else torch.int16)
    (grad_ours,) = torch.autograd.grad(ours, x, g)
    ref = F.max_pool2d(x, s, s)
    (grad_ref,) = torch.autograd.grad(ref, x, g)
    assert torch.equal(ours, ref) and torch.equal(grad_ours, grad_ref)


def test_frru_matches_the_spec_formula():
    torch.manual_seed(0)
    unit = FRRU(24, 40, scale=4).double().train()
    y, z = torch.randn(2, 24, 4, 6, dtype=torch.float64), torch.randn(2, 32, 16, 24, dtype=torch.float64)
    ref_unit = copy.deepcopy(unit)
    # frrn-spec §1.3, written out: z pooled directly from full resolution by s, [y, p] order, nearest x s back
    p = F.max_pool2d(z, 4, 4)
    t = torch.cat([y, p], 1)
    y_ref = F.relu(ref_unit.bn2(ref_unit.conv2(F.relu(ref_unit.bn1(ref_unit.conv1(t))))))
    z_ref = z + F.interpolate(ref_unit.to_residual(y_ref), scale_factor=4, mode="nearest")
    y_out, z_out = unit(y, z)
    torch.testing.assert_close(y_out, y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(z_out, z_ref, rtol=0, atol=1e-12)


def test_ru_matches_the_spec_formula():
    torch.manual_seed(0)
    ru = RU(8, 6).double()
    x = torch.randn(2, 8, 5, 7, dtype=torch.float64)
    ref = ru.bn2(ru.conv2(F.relu(ru.bn1(ru.conv1(x))))) + ru.proj(x)  # no ReLU after the sum
    torch.testing.assert_close(ru(x), ref, rtol=0, atol=1e-12)


def test_upsample_option_changes_the_network(model_a):
    x = torch.rand(1, 3, 32, 64)
    outs = {}
    with torch.no_grad():
        for mode in ("align_corners", "half_pixel", "theano"):  # theano last: the fixture's default again
            model_a.upsample = mode
            outs[mode] = model_a.eval()(x)
    assert all(s.upsample == "theano" for s in model_a.stages[4:]) and model_a.head.upsample == "theano"
    assert not torch.allclose(outs["theano"], outs["align_corners"])
    assert not torch.allclose(outs["theano"], outs["half_pixel"])
    built = FRRN("A", upsample="half_pixel").eval()  # the constructor option is the same switch
    built.load_state_dict(model_a.state_dict())
    with torch.no_grad():
        assert torch.equal(built(x), outs["half_pixel"])


# --- checkpointing --------------------------------------------------------------------------------------------


def _train_steps(model: FRRN, batches, *, lr: float = 0.05):
    """A few SGD steps; returns the first step's logits and gradients."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    first = None
    for x, labels in batches:
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits, labels, ignore_index=255).backward()
        if first is None:
            first = logits.detach().clone(), {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
    return first


def _batches(n_steps, hw, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.rand(2, 3, *hw, generator=g, dtype=dtype), torch.randint(0, 19, (2, *hw), generator=g))
        for _ in range(n_steps)
    ]


@pytest.mark.slow
def test_checkpointing_same_gradients_and_bn_statistics_float64():
    torch.manual_seed(0)
    base = FRRN("A").double()
    batches = _batches(2, (32, 64), torch.float64)
    results = {}
    for mode in ("off", "unit", "stage"):
        model = copy.deepcopy(base)
        model.checkpointing = mode
        results[mode] = (_train_steps(model, batches), model.state_dict())
    (ref_logits, ref_grads), ref_state = results["off"]
    for mode in ("unit", "stage"):
        (logits, grads), state = results[mode]
        torch.testing.assert_close(logits, ref_logits, rtol=1e-12, atol=1e-12)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-9, atol=1e-12, msg=f"{mode}: grad of {name}")
        for key, v in ref_state.items():  # weights after 3 steps and BN running statistics
            if key.endswith("num_batches_tracked"):
                assert state[key].item() == v.item() == 2, f"{mode}: {key} counted the recompute"
            else:
                torch.testing.assert_close(state[key], v, rtol=1e-9, atol=1e-12, msg=f"{mode}: {key}")


def test_checkpointing_keeps_less_for_backward():
    torch.manual_seed(0)
    x = torch.rand(1, 3, 32, 64)
    saved = {}
    model = FRRN("A")
    for mode in ("off", "unit", "stage"):
        model.checkpointing = mode
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        storages: dict[int, int] = {}

        def pack(t, storages=storages, params=params):
            if t.untyped_storage().data_ptr() not in params:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x).sum()
        saved[mode] = sum(storages.values())
    assert saved["unit"] * 3 < saved["off"] and saved["stage"] * 3 < saved["off"]


def test_checkpointing_is_off_in_eval_and_no_grad():
    torch.manual_seed(0)
    model = FRRN("A", checkpointing="unit").eval()
    x = torch.rand(1, 3, 32, 64)
    with torch.no_grad():
        out = model(x)
    model.checkpointing = "off"
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=0)


# --- SyncBatchNorm -------------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU message")
def test_sync_batchnorm_on_cpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="sync_bn=false"):
        convert_sync_batchnorm(FRRN("A"))


@pytest.mark.slow
def test_sync_batchnorm_swap_keeps_weights_and_recompute_guard():
    # Without a process group SyncBatchNorm normalises like BatchNorm2d, so the CPU can check the swap and its
    # recompute guard (the all-reduce itself needs GPUs).
    torch.manual_seed(0)
    base = FRRN("A").double()
    batches = _batches(1, (32, 64), torch.float64)
    ref = copy.deepcopy(base)
    _train_steps(ref, batches)
    synced = _swap_batchnorm(copy.deepcopy(base), CheckpointSafeSyncBatchNorm)
    assert sum(isinstance(m, CheckpointSafeSyncBatchNorm) for m in synced.modules()) == 48
    synced.checkpointing = "unit"
    _train_steps(synced, batches)
    for (key, v), w in zip(ref.state_dict().items(), synced.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-9, atol=1e-12, msg=key)


# --- DeepSpeed -------------------------------------------------------------------------------------------------

_DEEPSPEED_SCRIPT = textwrap.dedent(
    """
    import copy, torch, deepspeed
    import torch.nn.functional as F
    from frrn_dist.distributed import init_distributed
    from frrn_dist.loss import bootstrapped_cross_entropy
    from frrn_dist.model import FRRN

    init_distributed("cpu")
    torch.set_num_threads(1)  # see one_thread in test_model.py
    torch.manual_seed(0)
    # NHWC activations (bf16 convs are slow in NCHW on an AVX2 CPU), weights left alone for DeepSpeed's broadcast
    model = FRRN("A", checkpointing="unit", channels_last=True)
    plain = copy.deepcopy(model)
    plain.checkpointing = "off"
    config = {"train_micro_batch_size_per_gpu": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}},
              "torch_autocast": {"enabled": True, "dtype": "bfloat16"}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    ref_engine, *_ = deepspeed.initialize(model=plain, model_parameters=plain.parameters(), config=config)
    g = torch.Generator().manual_seed(0)
    steps = 2
    for step in range(steps):
        x = torch.rand(1, 3, 32, 64, generator=g)
        labels = torch.randint(0, 19, (1, 32, 64), generator=g)
        losses = []
        for eng in (engine, ref_engine):
            logits = eng(x)
            assert logits.dtype == torch.bfloat16, logits.dtype
            loss = bootstrapped_cross_entropy(logits, labels)
            eng.backward(loss)
            losses.append(loss.item())
        # the recompute replays the same bf16 ops: the same loss and gradients, not merely close ones
        assert abs(losses[0] - losses[1]) <= 1e-6 * abs(losses[1]), losses
        for (name, p), q in zip(ref_engine.module.named_parameters(), engine.module.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
        engine.step()
        ref_engine.step()
        print("step", step, losses)
    bn = engine.module.stem.bn
    assert bn.num_batches_tracked.item() == steps, bn.num_batches_tracked
    for (k, v), w in zip(ref_engine.module.state_dict().items(), engine.module.state_dict().values()):
        torch.testing.assert_close(w, v, rtol=1e-5, atol=1e-6, msg=k)
    print("OK")
    """
)


@pytest.mark.slow
def test_checkpointing_inside_a_deepspeed_engine_with_bf16_autocast(tmp_path):
    # A subprocess: init_distributed creates a process group and sets RANK/WORLD_SIZE for the whole interpreter.
    env_script = tmp_path / "ds_steps.py"
    env_script.write_text(_DEEPSPEED_SCRIPT)
    proc = subprocess.run([sys.executable, str(env_script)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
