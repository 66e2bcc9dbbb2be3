"""Segment RGB images of any size with a trained model.

    python launch/predict.py --checkpoint runs/frrnA-paper-256x512 --input photos/ --out predictions/
    python launch/predict.py --checkpoint RUN --input photos/ --out preds/ --scales 0.75,1.0,1.25 --flip

Writes, per image and at its own size: <stem>_labelIds.png (Cityscapes label ids, 8-bit), <stem>_color.png
(Cityscapes palette) and <stem>_overlay.png (palette over the image). Sub-folders of --input are mirrored.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist import cli  # noqa: E402
from frrn_dist.predict import FIT_MODES, main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "Segment images with a trained FRRN, optionally averaging test-time augmentation views: label-id PNGs, "
        "colour masks and overlays.",
        __doc__,
    )
    cli.add_checkpoint(p)
    p.add_argument("--input", required=True, help="an image, or a folder searched recursively for images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--fit", choices=FIT_MODES, default="resize",
                   help="resize: to the model's training input size and back (default); pad: keep the image's "
                   "scale, pad to a multiple of 16/32, crop after (one view only)")  # fmt: skip
    cli.add_views(
        p,
        "--fit resize: back to the image size by bilinear on logits (default; always with several views) or "
        "nearest on labels",
        None,
    )
    cli.add_input_hw(p, "network input HxW at scale 1.0 for --fit resize (default: the training size)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the colour mask (default 0.5)")
    cli.add_device(p)
    p.add_argument("--max-image-pixels", type=int, default=None,
                   help="refuse larger images (default: Pillow's decompression-bomb limit, about 89M "
                   "pixels)")  # fmt: skip
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run_command(
        "predict", main, args.checkpoint, args.input, args.out, fit=args.fit, resize=args.resize,
        scales=args.scales, flip=args.flip, input_hw=args.input_hw, alpha=args.alpha, device=args.device,
        max_image_pixels=args.max_image_pixels,
    )  # fmt: skip
    cli.skip_gc_at_exit()
