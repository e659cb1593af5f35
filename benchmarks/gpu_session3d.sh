#!/usr/bin/env bash
# 2 x H200, the last 5 device minutes of session 2: ours balanced and padded on 2 GPUs at global batch 128
# (the 1-GPU runs of the same settings are in gpu_session3b.sh). Results under $OUT.
set -u
OUT=${OUT:-outputs/gpu3d}; mkdir -p "$OUT"
python3 benchmarks/run.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --out "$OUT" --only ours,ours-padded \
  --steps 30 --warmup 10 --global-batch 128 --micro-batch 64 --gpus 2 --budget-s 265 --timeout 100 --min-run-s 70 | tail -6
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
