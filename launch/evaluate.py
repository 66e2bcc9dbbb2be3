"""Official Cityscapes scores of a trained model at full ground-truth resolution.

python launch/evaluate.py --checkpoint runs/frrnA-paper-256x512            # data from the run's config.yaml
python launch/evaluate.py --checkpoint RUN --cityscapes /data/cityscapes --write-predictions preds/
python launch/evaluate.py --checkpoint RUN --scales 0.75,1.0,1.25 --flip   # test-time augmentation, 6 views
deepspeed --num_accelerators 2 launch/evaluate.py --checkpoint RUN        # 2 ranks, same numbers
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist import cli  # noqa: E402
from frrn_dist.evaluate import main  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = cli.make_parser(
        "Score a checkpoint on a Cityscapes split exactly as cityscapesScripts does (mIoU, iIoU, category scores) "
        "at full ground-truth resolution, optionally averaging test-time augmentation views; write metrics.json "
        "(scores, views, seconds per image, peak memory), a confusion heat map, a per-class IoU chart and, on "
        "request, official-format prediction PNGs.",
        __doc__,
    )
    cli.add_checkpoint(p)
    p.add_argument("--config", help="training config naming data.shard_dir (default: the run's config.yaml)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--shards", help="shard folder made by `make shards` (default: data.shard_dir of the config)")
    src.add_argument("--cityscapes", help="Cityscapes folder with leftImg8bit/ and gtFine/ (no shards needed)")
    p.add_argument("--split", help="split to score (default: the config's data.val_split, else val)")
    cli.add_input_hw(p, "network input HxW at scale 1.0 (default: the size the model was trained at)")
    cli.add_views(
        p,
        "back to ground-truth size: nearest on the label map (default for one view, as the seed) or bilinear on "
        "the logits (always, with several views)",
        None,
    )
    p.add_argument("--write-predictions", metavar="DIR", help="also write <city>_<seq>_<frame>_pred.png label-id maps")
    p.add_argument("--out", help="report folder (default: RUN/eval-<split>/)")
    p.add_argument("--micro-batch-size", type=int, default=1, help="images per forward pass per rank")
    p.add_argument("--backend", choices=("dali", "torch", "stream"),
                   help="shard loader (default: the config's, else dali); stream reads http(s)/s3/gs URLs")  # fmt: skip
    cli.add_device(p)
    p.add_argument(
        "--workers", type=int, default=2, help="decoding processes (--cityscapes, --backend torch) or DALI threads"
    )
    p.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # from deepspeed
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    cli.run_command(
        "evaluate", main, args.checkpoint, config=args.config, shards=args.shards, cityscapes=args.cityscapes,
        split=args.split, input_hw=args.input_hw, resize=args.resize, scales=args.scales, flip=args.flip,
        write_predictions=args.write_predictions, out=args.out, micro_batch_size=args.micro_batch_size,
        backend=args.backend, device=args.device, num_workers=args.workers,
    )  # fmt: skip
    cli.skip_gc_at_exit()
