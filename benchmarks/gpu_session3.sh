#!/usr/bin/env bash
# One GPU call on 1 x H200 (the 2-GPU kind was withheld this session): the three batching modes at the same
# settings (#4), then one balanced run under the torch profiler (#11). Results under $OUT.
set -u
OUT=${OUT:-outputs/gpu3}; mkdir -p "$OUT"
DATA=$PWD/gpu-data/gsm8k_train_alpaca.json
STEPS=${STEPS:-80}
python3 benchmarks/run.py --data "$DATA" --out "$OUT/modes" --only ours,ours-padded,ours-pack --steps "$STEPS" \
  --warmup 20 --global-batch 32 --micro-batch 16 --gpus 1 --budget-s 330 --timeout 110 --min-run-s 50 | tail -25
MGPU_PROFILE=$OUT/prof:30:32 timeout 120 python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml \
  model.name=/tmp/models/llama-1b dataset.path="$DATA" distributed.num_gpus=1 training.max_steps=34 \
  training.micro_batch_size=16 training.gradient_accumulation_steps=2 output.dir=/tmp/prof-run \
  logging.progress=false --overwrite > "$OUT/prof-train.log" 2>&1
echo "profile run exit=$?"; head -1 "$OUT/prof/profile-rank0.txt"
cd "$OUT" && tar czf logs.tgz modes/logs prof-train.log && rm -rf modes/logs prof-train.log
