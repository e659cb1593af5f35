#!/usr/bin/env bash
# The open GPU must-shows, one device call (<= 10 min, 2 x H200) per stage. Results under $OUT/<stage>.
#   bash benchmarks/gpu_plan.sh scaling   # #11 + #4: ours balanced and TRL packed on 2 GPUs, ours on 1, ours padded on 2
#   bash benchmarks/gpu_plan.sh trl       # #11: TRL padding-free 1 and 2 GPUs, TRL packed 1 GPU; then pytest -m gpu
#   bash benchmarks/gpu_plan.sh verify    # session 3's fixes: ours 2 and 1 GPUs (scaling, step phases); 8B full
#                                         # fine-tune, strategy auto (fsdp); 1B bf16 full fine-tune under ddp (drift)
#   CASES=full  bash benchmarks/gpu_fsdp.sh   # #13: 8B full fine-tune over a per-GPU cap (own call)
#   CASES=qlora bash benchmarks/gpu_fsdp.sh   # #13: 8B QLoRA, NF4 shards (own call)
# Settings of every run: 1B model, GSM8K, global batch 128 (micro-batch 64), 30 steps, steady state after step 10
# (our steps settle from step 8 on: docs/BENCHMARKS.md). Each run is cold (own compile and data caches).
set -u
STAGE=${1:?usage: gpu_plan.sh scaling|trl}
OUT=${OUT:-outputs/plan}/$STAGE; mkdir -p "$OUT"
BENCH=(python3 benchmarks/run.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --global-batch 128 --micro-batch 64
  --steps 30 --warmup 10 --timeout 200 --min-run-s 100)
# A cold run spends ~70-110 s before its first step (import, load, compile); budgets below leave room for that.
case $STAGE in
  scaling)
    "${BENCH[@]}" --out "$OUT/a" --only ours,trl-pack --gpus 2 --budget-s 270 | tail -4
    "${BENCH[@]}" --out "$OUT/b" --only ours --gpus 1 --budget-s 130 | tail -3
    "${BENCH[@]}" --out "$OUT/c" --only ours-padded --gpus 2 --budget-s 115 | tail -3 ;;
  trl)
    "${BENCH[@]}" --out "$OUT/a" --only trl-pf --gpus 1,2 --budget-s 260 | tail -4
    "${BENCH[@]}" --out "$OUT/b" --only trl-pack --gpus 1 --budget-s 190 | tail -3
    timeout 100 python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  verify)
    "${BENCH[@]}" --out "$OUT/a" --only ours --gpus 2,1 --budget-s 190 --min-run-s 80 | tail -5
    STRATS=auto CASES=full OUT=$OUT/fsdp timeout 160 bash benchmarks/gpu_fsdp.sh | tail -8
    # bf16 full fine-tuning keeps Unsloth's norms in fp32 (mixed gradient buckets): replicas checked every 5 steps
    timeout 95 python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml model.name=/tmp/models/llama-1b \
      dataset.path="$PWD/gpu-data/gsm8k_train_alpaca.json" model.load_in_4bit=false lora=null distributed.num_gpus=2 \
      training.micro_batch_size=8 training.max_steps=20 distributed.verify_every=5 logging.progress=false \
      output.save_steps=0 output.dir=/tmp/full-1b --overwrite > "$OUT/full-1b-ddp.log" 2>&1
    echo "1b full ddp exit=$?"; grep -E "failed|differ|step time|throughput|final loss" "$OUT/full-1b-ddp.log" ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
cd "$OUT" && tar czf logs.tgz */logs && rm -rf */logs
