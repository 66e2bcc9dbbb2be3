"""Export a trained model for use outside this project: safetensors weights + model.json (+ ONNX, checked).

    python launch/export.py --checkpoint runs/frrnA-paper-256x512 --out exported/frrnA --onnx

Rebuild anywhere with this package: `from frrn_dist.export import load_model; model, meta = load_model(DIR)`,
or run model.onnx with onnxruntime: input "image" float (N, 3, h, w) RGB in [0, 1], output "logits".
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist.evaluate import parse_hw  # noqa: E402
from frrn_dist.export import main  # noqa: E402


def hw(text: str) -> tuple[int, int]:
    try:
        return parse_hw(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Write model.safetensors + model.json (and with --onnx, model.onnx checked against PyTorch "
        "with onnxruntime on a random input).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, a tag dir or a .safetensors")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also export the eval graph to model.onnx and check it")
    p.add_argument("--input-hw", type=hw, help="ONNX input HxW (default: the size the model was trained at)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest ONNX-vs-PyTorch logit difference allowed, relative to the largest logit")  # fmt: skip
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(args.checkpoint, args.out, onnx=args.onnx, input_hw=args.input_hw, tolerance=args.tolerance)
    except ValueError as e:  # bad input or a failed check: one line, non-zero exit
        raise SystemExit(f"export: {e}") from None
