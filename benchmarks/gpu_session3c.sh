#!/usr/bin/env bash
# 1 x H200, global batch 128: ours balanced with dataset.pad_to_multiple_of=64, then TRL (padding-free, packed) with
# enough time to finish. Results under $OUT.
set -u
OUT=${OUT:-outputs/gpu3c}; mkdir -p "$OUT"
DATA=$PWD/gpu-data/gsm8k_train_alpaca.json
COMMON=(--data "$DATA" --global-batch 128 --micro-batch 64 --gpus 1 --min-run-s 60)
python3 benchmarks/run.py "${COMMON[@]}" --out "$OUT/pad64" --only ours --ours-set dataset.pad_to_multiple_of=64 \
  --steps 50 --warmup 15 --budget-s 200 --timeout 130 | tail -4
python3 benchmarks/run.py "${COMMON[@]}" --out "$OUT/trl" --only trl-pf,trl-pack --steps 30 --warmup 10 \
  --budget-s 400 --timeout 200 | tail -6
cd "$OUT" && tar czf logs.tgz pad64/logs trl/logs && rm -rf pad64/logs trl/logs
