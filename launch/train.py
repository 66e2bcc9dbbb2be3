"""Train FRRN on Cityscapes shards with DeepSpeed.

    deepspeed launch/train.py --config configs/frrn_a.yaml [key=value ...]          # all GPUs of this node
    deepspeed -H launch/hostfile launch/train.py --config configs/frrn_b.yaml       # a cluster (see README)
    python launch/train.py --config configs/demo.yaml run.device=cpu                # one process

Re-running the same command resumes the run from its latest checkpoint (run.resume=true).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from frrn_dist.cli import skip_gc_at_exit  # noqa: E402
from frrn_dist.config import parse_args  # noqa: E402
from frrn_dist.data.loaders import LoaderError, RecipeError, ShardError  # noqa: E402
from frrn_dist.train import main  # noqa: E402

if __name__ == "__main__":
    _, cfg = parse_args(description=__doc__)
    try:
        main(cfg)
    except (LoaderError, RecipeError, ShardError) as e:  # bad data: one line naming the file, not a traceback
        raise SystemExit(f"error: {e}") from None
    skip_gc_at_exit()
