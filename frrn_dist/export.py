"""A trained FRRN as files anyone can load: model.safetensors (weights and BN statistics) + model.json (how to
rebuild it), and ONNX of the eval graph.

Loading never executes code from a file: safetensors holds only tensors and a JSON header (a pickle, e.g.
DeepSpeed's *_model_states.pt, can run arbitrary code when loaded, which is why evaluation reads these files).

Imports: onnx, onnxruntime, safetensors, torch, frrn_dist.model.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from frrn_dist.model import FRRN

MODEL_FILE = "model.safetensors"
META_FILE = "model.json"
META_KEY = "frrn_dist"  # the same meta also sits in the safetensors header, so a lone .safetensors is enough
REQUIRED_META = ("arch", "num_classes", "upsample", "input_hw")
BUILD_KEYS = ("base_channels", "lanes")  # optional FRRN constructor arguments, passed on when the meta has them


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not match the architecture; the message names the file."""


def _replace_atomically(write, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates its file 0600; a shared model should be readable
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_model(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write `directory`/model.safetensors (state_dict with BN buffers, fp32, contiguous) and model.json (meta:
    arch, num_classes, upsample, input_hw [h, w], step, ...). Each file is written whole or not at all; model.json
    goes last, so a folder with it is complete. Returns the .safetensors path."""
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise ValueError(f"save_model: meta lacks {missing} (needed to rebuild the model)")
    model = getattr(model, "module", model)  # a DeepSpeed engine or DDP wrapper holds the FRRN in .module
    # clone: safetensors refuses tensors that share storage; fp32 so a bf16 run still exports a portable model
    state = {
        k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous().clone()
        for k, v in model.state_dict().items()
    }
    meta = {**meta, "input_hw": [int(v) for v in meta["input_hw"]], "format": "frrn-dist-model/1"}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / MODEL_FILE

    def write_weights(path: Path) -> None:
        try:
            save_file(state, str(path), metadata={META_KEY: json.dumps(meta)})
        except SafetensorError as e:  # e.g. a full disk; an OSError is what callers of a file write expect
            raise OSError(f"{weights}: {e}") from e

    _replace_atomically(write_weights, weights)
    _replace_atomically(lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"), directory / META_FILE)
    return weights


def resolve_checkpoint(path: str | Path) -> Path:
    """run dir -> checkpoints/latest -> tag dir -> model.safetensors; a checkpoints dir or tag dir or the file
    itself work too. Raises CheckpointError saying what was looked for."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"{p}: no such checkpoint (give a run dir, its checkpoints/ dir, a tag dir or a .safetensors)"
        )
    if p.is_file():
        if p.suffix != ".safetensors":
            raise CheckpointError(
                f"{p}: not a .safetensors file (DeepSpeed .pt files are not loaded: give the tag dir)"
            )
        return p
    if (p / MODEL_FILE).is_file():
        return p / MODEL_FILE
    if (p / "checkpoints").is_dir():
        p = p / "checkpoints"
    if (p / "latest").is_file():
        tag = (p / "latest").read_text().strip()
        if not (p / tag / MODEL_FILE).is_file():
            raise CheckpointError(f"{p / tag}: named by {p / 'latest'} but has no {MODEL_FILE} (written by save_model)")
        return p / tag / MODEL_FILE
    raise CheckpointError(f"{p}: no {MODEL_FILE}, no 'latest' file and no checkpoints/ folder: not a checkpoint")


def read_meta(weights: Path) -> dict[str, Any]:
    """model.json beside the weights, else the copy in the safetensors header."""
    meta_path = weights.with_name(META_FILE)
    try:
        if weights.name == MODEL_FILE and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
        else:
            with safe_open(str(weights), framework="pt") as f:
                header = (f.metadata() or {}).get(META_KEY)
            if header is None:
                raise CheckpointError(f"{weights}: no {META_FILE} beside it and no model meta in its header")
            meta = json.loads(header)
    except (SafetensorError, json.JSONDecodeError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable ({type(e).__name__}: {e})") from e
    missing = [k for k in REQUIRED_META if k not in meta]
    if missing:
        raise CheckpointError(f"{meta_path if meta_path.is_file() else weights}: model meta lacks {missing}")
    return meta


def build_model(meta: dict[str, Any]) -> FRRN:
    """An untrained FRRN shaped as the meta says."""
    extra = {k: meta[k] for k in BUILD_KEYS if k in meta}
    try:
        return FRRN(meta["arch"], int(meta["num_classes"]), upsample=meta["upsample"], **extra)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"model meta {meta}: cannot build the model ({e})") from e


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[FRRN, dict[str, Any]]:
    """(model in eval mode on `device`, meta) from a run dir, checkpoints dir, tag dir or .safetensors file."""
    weights = resolve_checkpoint(path)
    meta = read_meta(weights)
    model = build_model(meta)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{weights}: unreadable ({type(e).__name__}: {e})") from e
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    reshaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or reshaped:
        what = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(unexpected)} unexpected (e.g. {unexpected[0]})"] if unexpected else []
        if reshaped:
            k = reshaped[0]
            what += [
                f"{len(reshaped)} of another shape (e.g. {k}: {tuple(state[k].shape)} vs {tuple(expected[k].shape)})"
            ]
        name = f"FRRN-{meta['arch']} with {meta['num_classes']} classes"
        raise CheckpointError(f"{weights}: does not match {name}: tensors {', '.join(what)}")
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def export_onnx(model: nn.Module, path: str | Path, input_hw: tuple[int, int] | list[int], opset: int = 17) -> Path:
    """The eval graph (running BN statistics) as ONNX: input "image" float (N, 3, h, w) RGB in [0, 1], output
    "logits" (N, classes, h, w); the batch size is dynamic, h and w fixed to input_hw. Written atomically."""
    import onnx

    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    h, w = (int(v) for v in input_hw)
    example = torch.rand(1, 3, h, w, device=next(model.parameters()).device)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: Path) -> None:
        # the TorchScript exporter: the torch.export-based default (dynamo=True) needs onnxscript, not installed
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation and constant-folding notes, not about our graph
            torch.onnx.export(
                model, (example,), str(tmp), dynamo=False, input_names=["image"], output_names=["logits"],
                dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}}, opset_version=opset,
            )  # fmt: skip
        onnx.checker.check_model(str(tmp))

    try:
        _replace_atomically(write, path)
    finally:
        model.train(was_training)
    return path


def check_onnx(model: nn.Module, onnx_path: str | Path, images: torch.Tensor) -> tuple[float, float]:
    """(largest |PyTorch - onnxruntime| logit, largest |logit|) on `images` (N, 3, h, w): the export check."""
    import onnxruntime

    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        expected = model(images.to(next(model.parameters()).device)).float().cpu().numpy()
    model.train(was_training)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(["logits"], {"image": images.float().cpu().numpy()})
    if got.shape != expected.shape:
        raise ValueError(f"{onnx_path}: output shape {got.shape}, PyTorch gives {expected.shape}")
    return float(abs(got - expected).max()), float(abs(expected).max())


def main(
    checkpoint: str | Path,
    out: str | Path,
    *,
    onnx: bool = False,
    input_hw: tuple[int, int] | None = None,
    tolerance: float = 1e-4,
) -> dict[str, Path]:
    """The export command: model.safetensors + model.json into `out`, and with `onnx` a checked model.onnx."""
    model, meta = load_model(checkpoint)
    out = Path(out)
    paths = {"weights": save_model(model, out, meta), "meta": out / META_FILE}
    print(f"wrote {paths['weights']} and {paths['meta']} (FRRN-{meta['arch']}, step {meta.get('step')})")
    if onnx:
        h, w = input_hw or meta["input_hw"]
        if h % model.size_multiple or w % model.size_multiple:
            raise ValueError(f"input_hw {h}x{w}: FRRN-{meta['arch']} needs multiples of {model.size_multiple}")
        paths["onnx"] = export_onnx(model, out / "model.onnx", (h, w))
        # batch 2 also exercises the dynamic batch axis; a fixed seed makes the check repeatable
        images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(0))
        diff, scale = check_onnx(model, paths["onnx"], images)
        if diff > tolerance * max(scale, 1.0):
            paths["onnx"].unlink()
            raise ValueError(f"{out / 'model.onnx'}: onnxruntime differs from PyTorch by {diff:.3g} (logits up to "
                             f"{scale:.3g}); removed")  # fmt: skip
        print(f"wrote {paths['onnx']}: input 'image' (N, 3, {h}, {w}), output 'logits'; onnxruntime matches "
              f"PyTorch to {diff:.2g} (largest logit {scale:.3g})")  # fmt: skip
    return paths
