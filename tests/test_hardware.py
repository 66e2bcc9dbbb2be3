"""frrn_dist.hardware: precision and layout resolve to bf16/NHWC exactly where the hardware has it; peaks; FLOPs.

The branch this machine has runs for real (its flags read independently from /proc/cpuinfo); only the branches it
lacks get their capability query patched.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from frrn_dist import hardware
from frrn_dist.model import FRRN

CPUINFO = Path("/proc/cpuinfo")


def cpu_flags() -> set[str]:
    for line in CPUINFO.read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


needs_cpuinfo = pytest.mark.skipif(not CPUINFO.exists(), reason="needs Linux /proc/cpuinfo")
FLAGS = cpu_flags() if CPUINFO.exists() else set()
HAS_AMX = "amx_bf16" in FLAGS or "amx_tile" in FLAGS
HAS_BF16 = HAS_AMX or "avx512_bf16" in FLAGS


@pytest.fixture(autouse=True)
def fresh_probes(monkeypatch):
    monkeypatch.setattr(hardware, "_CACHE", {})  # every test probes for itself


def _no_probe():
    raise AssertionError("the probe ran although the capability query was conclusive")


@needs_cpuinfo
def test_cpu_precision_and_layout_on_this_machine_for_real():
    precision, reason = hardware.choose_precision(torch.device("cpu"))
    assert precision == ("bf16" if HAS_BF16 else "fp32"), reason
    cap = hardware.cpu_bf16_capability()
    assert cap["avx512_bf16"] == ("avx512_bf16" in FLAGS)  # torch's query agrees with the kernel's flags
    assert f"avx512_bf16 {'yes' if 'avx512_bf16' in FLAGS else 'no'}" in reason
    if HAS_BF16 and not HAS_AMX:  # avx512_bf16 alone is confirmed by the probe, which the reason quotes
        speedup, seconds = hardware.probe_cpu_bf16_speedup()
        assert speedup >= hardware.BF16_MIN_SPEEDUP and seconds < 2.0
        assert f"{speedup:.2f}x fp32" in reason
    for p in hardware.PRECISIONS:  # NHWC on every CPU with oneDNN, in both precisions
        channels_last, why = hardware.choose_channels_last("cpu", p)
        assert channels_last is torch.backends.mkldnn.is_available() and p in why


@pytest.mark.skipif(not HAS_BF16, reason="this machine has no bf16: its real branch is the test above")
def test_cpu_without_bf16_is_fp32_without_a_probe(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    monkeypatch.setattr(hardware, "probe_cpu_bf16_speedup", _no_probe)
    precision, reason = hardware.choose_precision("cpu")
    assert precision == "fp32" and "oneDNN bf16 no" in reason


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN here: its real branch runs above")
def test_cpu_without_onednn_is_nchw(monkeypatch):
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert hardware.choose_channels_last("cpu", "fp32")[0] is False
    assert hardware.choose_precision("cpu")[0] == "fp32"  # no oneDNN: no fast bf16 convolutions either


@pytest.mark.skipif(HAS_AMX, reason="this machine has AMX: its real branch is the test above")
def test_cpu_with_amx_is_bf16_without_a_probe(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(hardware, "probe_cpu_bf16_speedup", _no_probe)
    precision, reason = hardware.choose_precision("cpu")
    assert precision == "bf16" and "AMX yes" in reason


def test_cpu_whose_bf16_probe_is_slow_stays_fp32(monkeypatch):
    # an avx512_bf16 / emulating CPU whose bf16 convs measure slower: the measurement decides, not the flag
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(hardware, "probe_cpu_bf16_speedup", lambda: (0.3, 0.2))
    precision, reason = hardware.choose_precision("cpu")
    assert precision == "fp32" and "0.30x fp32" in reason


@pytest.mark.parametrize(
    "name, cc, precision, channels_last",
    [("NVIDIA H200", (9, 0), "bf16", True), ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16", True),
     ("Tesla V100-SXM2-16GB", (7, 0), "fp32", False), ("Tesla T4", (7, 5), "fp32", False)],
)  # fmt: skip
def test_cuda_choice_follows_compute_capability(monkeypatch, name, cc, precision, channels_last):
    # no GPU here: the CUDA queries are patched (the branch this machine does not have)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    got, reason = hardware.choose_precision(torch.device("cuda", 0))
    assert got == precision and f"{cc[0]}.{cc[1]}" in reason and name in reason
    assert hardware.choose_channels_last("cuda", got)[0] is channels_last
    assert hardware.choose_channels_last("cuda", "fp32")[0] is False


def test_bad_precision_is_a_clear_error():
    with pytest.raises(ValueError, match="'fp16'"):
        hardware.choose_channels_last("cpu", "fp16")


# ---------------------------------------------------------------------------------------------------------------
# peaks


@pytest.mark.parametrize(
    "name, precision, tf32, peak",
    [("NVIDIA A100-SXM4-80GB", "bf16", True, 312.0), ("NVIDIA A100-PCIE-40GB", "fp32", False, 19.5),
     ("NVIDIA A100-PCIE-40GB", "fp32", True, 156.0), ("NVIDIA H100 80GB HBM3", "bf16", True, 989.0),
     ("NVIDIA H100 PCIe", "bf16", True, 756.0), ("NVIDIA H200", "bf16", True, 989.0),
     ("NVIDIA H200", "fp32", False, 67.0), ("NVIDIA A10", "bf16", True, 125.0), ("NVIDIA L40S", "bf16", True, 362.0),
     ("NVIDIA GeForce RTX 4090", "bf16", True, 165.0)],
)  # fmt: skip
def test_gpu_peak_table_lookup(name, precision, tf32, peak):
    # the datasheet figures; what is tested is the name matching (A10 vs A100, H100 PCIe vs SXM)
    got, source = hardware.gpu_peak_tflops(name, precision, tf32=tf32)
    assert got == peak and name in source


def test_gpu_peak_unknown_or_missing():
    assert hardware.gpu_peak_tflops("NVIDIA A10G", "bf16")[0] is None  # not A10: a different chip
    peak, source = hardware.gpu_peak_tflops("Tesla V100-SXM2-16GB", "bf16")
    assert peak is None and "no bf16" in source


def test_cpu_matmul_peak_is_measured_once():
    peak, source = hardware.dense_peak_tflops("cpu", "fp32")
    assert 0 < peak < 1e3 and math.isfinite(peak) and "measured" in source
    assert hardware.dense_peak_tflops(torch.device("cpu"), "fp32")[0] == peak  # cached, not re-measured


# ---------------------------------------------------------------------------------------------------------------
# FLOPs


def test_flops_of_one_and_two_convs_by_hand():
    c_in, c_out, k, (h, w) = 3, 8, 3, (16, 24)
    one = 2 * c_in * c_out * k * k * h * w  # multiply-adds x 2 of a 'same' conv, no bias counted
    conv = nn.Conv2d(c_in, c_out, k, padding=1, bias=False)
    assert hardware.flops_per_image(conv, (h, w), backward=False) == one
    assert hardware.flops_per_image(conv, (h, w)) == 2 * one  # + weight gradient; the image needs no gradient
    two = 2 * c_out * 5 * 1 * h * w
    net = nn.Sequential(conv, nn.ReLU(), nn.Conv2d(c_out, 5, 1, bias=False))
    assert hardware.flops_per_image(net, (h, w)) == 2 * one + 3 * two  # the second conv also has an input gradient


def _conv_flops_by_hooks(model: nn.Module, hw) -> tuple[int, int]:
    """(forward FLOPs of every conv from its real output shape, those of the first conv): independent of torch's
    FlopCounterMode."""
    counts = []

    def count(m: nn.Conv2d, _, out: torch.Tensor) -> None:
        counts.append(2 * m.in_channels * m.out_channels * math.prod(m.kernel_size) * out[0, 0].numel())

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, *hw))
    for hook in hooks:
        hook.remove()
    return sum(counts), counts[0]


def test_frrn_a_flops_against_hooks_and_scaling():
    torch.manual_seed(0)
    model = FRRN("A", checkpointing="unit").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    small = hardware.flops_per_image(model, (32, 64))
    forward, first = _conv_flops_by_hooks(model.eval(), (32, 64))
    assert small == 3 * forward - first  # fwd + weight grads + input grads (all but the first conv)
    # checkpointing is not counted twice, and the count touched neither weights nor BN statistics
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert hardware.flops_per_image(FRRN("A"), (64, 128)) == 4 * small  # every conv is 'same': FLOPs ~ pixels
