"""Segment RGB images of any size with a trained model.

    python launch/predict.py --checkpoint runs/frrnA-paper-256x512 --input photos/ --out predictions/

Writes, per image and at its own size: <stem>_labelIds.png (Cityscapes label ids, 8-bit), <stem>_color.png
(Cityscapes palette) and <stem>_overlay.png (palette over the image). Sub-folders of --input are mirrored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist.evaluate import RESIZE_MODES, parse_hw  # noqa: E402
from frrn_dist.predict import FIT_MODES, main  # noqa: E402


def hw(text: str) -> tuple[int, int]:
    try:
        return parse_hw(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Segment images with a trained FRRN: label-id PNGs, colour masks and overlays.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, a tag dir or a .safetensors")
    p.add_argument("--input", required=True, help="an image, or a folder searched recursively for images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fit", choices=FIT_MODES, default="resize",
                   help="resize: to the model's training input size and back (default); pad: keep the image's "
                   "scale, pad to a multiple of 16/32, crop after")  # fmt: skip
    p.add_argument("--resize", choices=RESIZE_MODES, default="bilinear",
                   help="--fit resize: back to the image size by bilinear on logits (default) or nearest on "
                   "labels")  # fmt: skip
    p.add_argument("--input-hw", type=hw, help="network input HxW for --fit resize (default: the training size)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask (default 0.5)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="refuse larger images (default: Pillow's decompression-bomb limit, about 89M "
                   "pixels)")  # fmt: skip
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(
            args.checkpoint, args.input, args.out, fit=args.fit, resize=args.resize, input_hw=args.input_hw,
            alpha=args.alpha, device=args.device, max_image_pixels=args.max_image_pixels,
        )  # fmt: skip
    except ValueError as e:  # bad input: one line naming the file or value, non-zero exit
        raise SystemExit(f"predict: {e}") from None
