"""Official Cityscapes scores of a trained model at full ground-truth resolution.

python launch/evaluate.py --checkpoint runs/frrnA-paper-256x512            # data from the run's config.yaml
python launch/evaluate.py --checkpoint RUN --cityscapes /data/cityscapes --write-predictions preds/
deepspeed --num_accelerators 2 launch/evaluate.py --checkpoint RUN        # 2 ranks, same numbers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist.evaluate import RESIZE_MODES, main, parse_hw  # noqa: E402


def hw(text: str) -> tuple[int, int]:
    try:
        return parse_hw(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Score a checkpoint on a Cityscapes split exactly as cityscapesScripts does (mIoU, iIoU, "
        "category scores) at full ground-truth resolution; write metrics.json, a confusion heat map, a per-class "
        "IoU chart and, on request, official-format prediction PNGs.",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="run dir, its checkpoints/ dir, a tag dir or a .safetensors")
    p.add_argument("--config", help="training config naming data.shard_dir (default: the run's config.yaml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="shard folder made by `make shards` (default: data.shard_dir of the config)")
    src.add_argument("--cityscapes", help="Cityscapes folder with leftImg8bit/ and gtFine/ (no shards needed)")
    p.add_argument("--split", help="split to score (default: the config's data.val_split, else val)")
    p.add_argument("--input-hw", type=hw, help="network input HxW (default: the size the model was trained at)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="nearest",
                   help="back to ground-truth size: nearest on the label map (default, as the seed) or bilinear "
                   "on the logits")  # fmt: skip
    p.add_argument("--write-predictions", metavar="DIR", help="also write <city>_<seq>_<frame>_pred.png label-id maps")
    p.add_argument("--out", help="report folder (default: RUN/eval-<split>/)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="images per forward pass per rank")
    p.add_argument("--backend", choices=("dali", "torch"), help="shard loader (default: the config's, else dali)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--workers", type=int, default=2, help="decoding processes (--cityscapes, --backend torch) or DALI threads"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # from deepspeed
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        main(
            args.checkpoint, config=args.config, shards=args.shards, cityscapes=args.cityscapes, split=args.split,
            input_hw=args.input_hw, resize=args.resize, write_predictions=args.write_predictions, out=args.out,
            micro_batch_size=args.micro_batch_size, backend=args.backend, device=args.device, num_workers=args.workers,
        )  # fmt: skip
    except ValueError as e:  # bad input: one line naming the file or value, non-zero exit
        raise SystemExit(f"evaluate: {e}") from None
