#!/usr/bin/env bash
# `make demo`: the whole pipeline on this machine's CPU, from nothing to scores and pictures.
#   synthetic Cityscapes-layout data -> WebDataset shards -> FRRN-A trained by DeepSpeed on 2 CPU ranks
#   -> official-protocol evaluation at full resolution -> sample pictures and an offline wandb run.
# Each stage skips work already done (data, shards); training always starts a fresh run folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
BIN=$(dirname "$PY")
DATA=data/demo
SHARDS=shards/demo
RUN=runs/demo
export OMP_NUM_THREADS=1 WANDB_SILENT=true PYTHONUNBUFFERED=1
SECONDS=0

echo "== 1/4 synthetic Cityscapes in $DATA"
$PY -m frrn_dist.synthetic --out "$DATA" --hw 256x512 --train 160 --val 24 --seed 0
echo "== 2/4 shards in $SHARDS"
$PY -m frrn_dist.shards --root "$DATA" --out "$SHARDS"
echo "== 3/4 training FRRN-A with DeepSpeed on 2 CPU ranks (configs/demo.yaml)"
rm -rf "$RUN"
"$BIN/deepspeed" --num_accelerators 2 launch/train.py --config configs/demo.yaml
echo "== 4/4 evaluation at full resolution (Cityscapes protocol): single scale, then with flipped views"
# Logits upsampled bilinearly to the 256x512 ground truth (the default, nearest on the label map, scores ~0.01 less).
$PY launch/evaluate.py --checkpoint "$RUN" --shards "$SHARDS" --split val --out "$RUN/eval-val" --resize bilinear
$PY launch/evaluate.py --checkpoint "$RUN" --shards "$SHARDS" --split val --out "$RUN/eval-val-flip" --flip | tail -n 3

echo
echo "demo finished in ${SECONDS}s"
echo "  scores:       $RUN/eval-val/metrics.json (tables above), with flipped views: $RUN/eval-val-flip/metrics.json"
echo "  pictures:     $RUN/samples/ (image | ground truth | prediction), $RUN/curves.png, $RUN/eval-val/*.png"
echo "  wandb (offline): $(ls -d $RUN/wandb/offline-run-* 2>/dev/null | head -1)  -> upload with: wandb sync $RUN/wandb"
