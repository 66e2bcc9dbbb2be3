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

from frrn_dist import cli  # noqa: E402
from frrn_dist.export import main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "Write model.safetensors + model.json (and with --onnx, model.onnx checked against PyTorch with "
        "onnxruntime on a random input).",
        __doc__,
    )
    cli.add_checkpoint(p)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also export the eval graph to model.onnx and check it")
    cli.add_input_hw(p, "ONNX input HxW (default: the size the model was trained at)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest ONNX-vs-PyTorch logit difference allowed, relative to the largest logit")  # fmt: skip
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run_command(
        "export", main, args.checkpoint, args.out, onnx=args.onnx, input_hw=args.input_hw, tolerance=args.tolerance
    )
    cli.skip_gc_at_exit()
