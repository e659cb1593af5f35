#!/usr/bin/env bash
# 1 x H200: ours (balanced, padded) and TRL (padding-free, packed) at global batch 128 (#11: a batch large enough that
# each GPU's step is GPU work, not per-call overhead). Results under $OUT.
set -u
OUT=${OUT:-outputs/gpu3b}; mkdir -p "$OUT"
python3 benchmarks/run.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --out "$OUT" --only ours,ours-padded,trl-pf,trl-pack \
  --steps 50 --warmup 15 --global-batch 128 --micro-batch 64 --gpus 1 --budget-s 545 --timeout 140 --min-run-s 60 | tail -20
cd "$OUT" && tar czf logs.tgz logs && rm -rf logs
