#!/usr/bin/env bash
# One GPU call (2 x H200): our engine in both batching modes on 1 and 2 GPUs, then the hook-mode example.
set -u
OUT=${OUT:-outputs/gpu2}; mkdir -p "$OUT"
python3 benchmarks/run.py --data gpu-data/gsm8k_train_alpaca.json --out "$OUT" --only ours,ours-pack --steps 40 \
  --warmup 10 --global-batch 32 --micro-batch 16 --gpus 1,2 --budget-s 330 --timeout 120 --min-run-s 50
for n in 1 2; do
  MGPU_LOG_DIR=/tmp/hook-logs-$n timeout 100 python3 examples/quick_start.py --model /tmp/models/llama-1b \
    --data gpu-data/gsm8k_train_alpaca.json --num-gpus $n --batch-size 16 --steps 30 --output /tmp/qs-$n \
    > "$OUT/hook-$n.log" 2>&1
  echo "hook n=$n exit=$?"; grep "^done:" "$OUT/hook-$n.log"
done
cd "$OUT" && tar czf logs.tgz logs hook-*.log && rm -rf logs hook-*.log
