#!/usr/bin/env bash
# Effective tokens/s on GSM8K per dataset.batching mode (2 GPUs, same samples per step). Results under $OUT.
# Run from the repo root on the GPU machine:  MODES="padded balanced packed" bash benchmarks/gpu_batching.sh
set -u
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
DATA=${DATA:-$PWD/gpu-data/gsm8k_train_alpaca.json}
MODEL=${MODEL:-/tmp/models/llama-1b}
STEPS=${STEPS:-40}
MODES=${MODES:-padded balanced packed}
GPUS=${GPUS:-2}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --size 1b --out "$MODEL" --corpus "$DATA" 2>&1 | tail -1
python3 -m unsloth_mgpu_cli prepare benchmarks/recipes/gsm8k_qlora.yaml model.name="$MODEL" dataset.path="$DATA" \
  distributed.num_gpus=$GPUS > "$OUT/prepare.txt" 2>&1; tail -8 "$OUT/prepare.txt"
for b in $MODES; do
  python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml model.name="$MODEL" dataset.path="$DATA" \
    distributed.num_gpus=$GPUS training.max_steps=$STEPS dataset.batching=$b output.dir=/tmp/batch-$b \
    logging.progress=false --overwrite > "$OUT/train-$b.log" 2>&1
  echo "batching $b exit=$?"; grep -E "failed|Error" "$OUT/train-$b.log" | tail -5
  cp /tmp/batch-$b/metrics.jsonl "$OUT/metrics-$b.jsonl" 2>/dev/null
done
python3 - "$OUT" $MODES <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
for b in sys.argv[2:]:
    f = out / f"metrics-{b}.jsonl"
    if not f.exists():
        print(f"{b}: no metrics"); continue
    m = [json.loads(l) for l in f.read_text().splitlines()][2:]  # logged every 5 steps: skip warm-up/compile
    tok = sum(r["tokens_per_second"] for r in m) / max(1, len(m))
    eff = sum(r["tokens"] for r in m) / max(1, sum(r["compute_tokens"] for r in m))
    print(f"{b:9s} steady effective tokens/s {tok:,.0f}; real/processed tokens {eff:.1%}; peak GB {m[-1]['peak_memory_gb']}")
PY
