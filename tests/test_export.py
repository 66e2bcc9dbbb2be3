"""save_model / load_model / export_onnx: round trips, path forms, clear refusals, no code execution."""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from safetensors import safe_open

from frrn_dist.export import CheckpointError, load_model, save_model
from frrn_dist.model import FRRN
from tests.eval_helpers import INPUT_HW, make_run, run_cli


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("export"))


def tag_dir(run):
    return run / "checkpoints" / (run / "checkpoints" / "latest").read_text()


def test_saved_files_hold_weights_buffers_and_meta(run):
    tag = tag_dir(run)
    meta = json.loads((tag / "model.json").read_text())
    assert meta["arch"] == "A" and meta["input_hw"] == list(INPUT_HW) and meta["step"] == 7
    with safe_open(str(tag / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        assert json.loads(f.metadata()["frrn_dist"])["arch"] == "A"  # a lone .safetensors rebuilds too
        dtypes = {f.get_tensor(k).dtype for k in keys}
    model = FRRN("A")
    assert keys == set(model.state_dict())  # BN running_mean/var/num_batches_tracked included
    assert any(k.endswith("running_var") for k in keys)
    assert dtypes == {torch.float32, torch.int64}
    assert not list(tag.glob(".*tmp*"))  # temp names renamed away


def test_bf16_model_is_saved_as_fp32(tmp_path):
    model = FRRN("A").to(torch.bfloat16)
    path = save_model(model, tmp_path, {"arch": "A", "num_classes": 19, "upsample": "theano", "input_hw": [32, 64]})
    loaded, _ = load_model(path)
    assert next(loaded.parameters()).dtype == torch.float32
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v.float() if v.is_floating_point() else v), k


def test_every_path_form_loads_the_same_model(run, tmp_path):
    tag = tag_dir(run)
    lone = tmp_path / "elsewhere.safetensors"  # without model.json: the meta comes from the header
    shutil.copy(tag / "model.safetensors", lone)
    states = []
    for path in (run, run / "checkpoints", tag, tag / "model.safetensors", lone):
        model, meta = load_model(path)
        assert not model.training and meta["arch"] == "A"
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], s[k]) for s in states[1:] for k in states[0])
    torch.manual_seed(0)  # make_run's seed: the saved model is this one
    assert all(torch.equal(v, states[0][k]) for k, v in FRRN("A").state_dict().items() if "running" not in k)


def test_missing_and_incomplete_checkpoints_are_named(run, tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint") as e:
        load_model(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(e.value)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_model(tmp_path)
    bad_run = tmp_path / "r"
    shutil.copytree(run, bad_run)
    (bad_run / "checkpoints" / "latest").write_text("step99999999")
    with pytest.raises(CheckpointError, match="step99999999"):
        load_model(bad_run)
    truncated = tmp_path / "t" / "model.safetensors"
    truncated.parent.mkdir()
    truncated.write_bytes((tag_dir(run) / "model.safetensors").read_bytes()[:5000])
    shutil.copy(tag_dir(run) / "model.json", truncated.parent)
    with pytest.raises(CheckpointError, match="unreadable"):
        load_model(truncated)


def test_checkpoint_of_another_architecture_is_refused(run, tmp_path):
    for change, expect in (({"arch": "B"}, "does not match FRRN-B"), ({"num_classes": 20}, "another shape")):
        d = tmp_path / next(iter(change))
        shutil.copytree(tag_dir(run), d)
        meta = json.loads((d / "model.json").read_text())
        (d / "model.json").write_text(json.dumps({**meta, **change}))
        with pytest.raises(CheckpointError, match=expect) as e:
            load_model(d)
        assert str(d / "model.safetensors") in str(e.value)
    d = tmp_path / "unknown"
    shutil.copytree(tag_dir(run), d)
    (d / "model.json").write_text(json.dumps({**meta, "arch": "C"}))
    with pytest.raises(CheckpointError, match="cannot build"):
        load_model(d)


class _Boom:
    """Unpickling this writes a marker file: the proof that loading a pickle runs code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_loading_never_unpickles(run, tmp_path):
    marker = tmp_path / "code-ran"
    tag = tmp_path / "tag"
    shutil.copytree(tag_dir(run), tag)
    # DeepSpeed's own checkpoint file sits beside ours; a malicious one must never be read
    (tag / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(_Boom(marker)))
    load_model(tag)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="not a .safetensors"):
        load_model(tag / "mp_rank_00_model_states.pt")
    assert not marker.exists()


@pytest.mark.slow
def test_export_cli_writes_checked_onnx_that_matches_pytorch(run, tmp_path):
    out = tmp_path / "exported"
    r = run_cli("export.py", "--checkpoint", run, "--out", out, "--onnx")
    assert r.returncode == 0, r.stderr
    assert "onnxruntime matches" in r.stdout
    assert (out / "model.safetensors").is_file() and json.loads((out / "model.json").read_text())["step"] == 7
    onnx.checker.check_model(str(out / "model.onnx"))
    # an independent check here: onnxruntime on a batch of 3 (dynamic batch axis) against the PyTorch model
    model, _ = load_model(run)
    x = torch.rand(3, 3, *INPUT_HW, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x).numpy()
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": x.numpy()})
    assert got.shape == (3, 19, *INPUT_HW)
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())
    assert (got.argmax(1) == expected.argmax(1)).mean() > 0.999


def test_export_cli_refuses_a_missing_checkpoint_in_one_line(tmp_path):
    r = run_cli("export.py", "--checkpoint", tmp_path / "missing", "--out", tmp_path / "o")
    assert r.returncode != 0
    assert r.stderr.strip().count("\n") == 0 and str(tmp_path / "missing") in r.stderr
    assert not (tmp_path / "o").exists()
