"""Compare training runs offline: curves on one figure, final scores and config differences as markdown + PNG.

python launch/compare.py runs/frrnA-paper-256x512 runs/frrnA-seed-256x512 --out reports/a-vs-seed
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist.cli import skip_gc_at_exit  # noqa: E402
from frrn_dist.compare import compare_runs  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Draw the loss and mIoU curves of several runs on one figure and tabulate their final scores "
        "and the config keys in which they differ (compare.md, curves.png, scores.png, config_diff.png).",
        epilog=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (runs/<name>/ with metrics.jsonl)")
    p.add_argument("--out", required=True, help="folder for the report")
    return p


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    try:
        paths = compare_runs(args.runs, args.out)
    except ValueError as e:  # bad input: one line naming the folder or file, non-zero exit
        raise SystemExit(f"compare: {e}") from None
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    skip_gc_at_exit()
