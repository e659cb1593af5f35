#!/usr/bin/env bash
# The GPU must-show of the sharded mode (issue #13), NOT RUN YET: written on CPU-only sessions.
# A full fine-tune of a random 8B Llama (bf16 weights 15 GB + grads 15 GB + AdamW 30 GB: ~64 GB per replica)
# against a memory cap of 56 GB per GPU (max_memory_fraction 0.4 of a 141 GB H200): a replica does not fit,
# two shards do. Shows: suggest/auto choose fsdp; ddp's measured peak exceeds the cap, fsdp's stays under it;
# both log the same losses (bf16: to ~1e-2).
# Case 2 (QLoRA, NOT RUN YET either): the same 8B with 4-bit weights. Forecast at micro-batch 4, seq 512,
# checkpointing: a 4-bit replica needs ~6.4 GB per GPU, two NF4 shards ~4.9 GB; the cap is 0.04 x 141 = 5.6 GB.
# ddp runs bitsandbytes 4-bit (Unsloth's fused kernels), fsdp torchao NF4 shards (PEFT's forward): the losses
# agree only to quantisation noise (~1e-2), the speeds differ. Shows peak memory per GPU and tokens/s of each.
# Run from the repo root on the 2 x H200 machine:   bash benchmarks/gpu_fsdp.sh      (results under $OUT)
# Only case 2:                                       CASES=qlora bash benchmarks/gpu_fsdp.sh
set -u
OUT=${OUT:-outputs/gpu-fsdp}; mkdir -p "$OUT"
DATA=${DATA:-$PWD/gpu-data/gsm8k_train_alpaca.json}
MODEL=${MODEL:-/tmp/models/llama-8b}
STEPS=${STEPS:-20}
CAP=${CAP:-0.4}
QCAP=${QCAP:-0.04}
CASES=${CASES:-"full qlora"}
[ -f "$MODEL/config.json" ] || python3 benchmarks/make_model.py --size 8b --out "$MODEL" --corpus "$DATA" 2>&1 | tail -1
COMMON=(model.name="$MODEL" dataset.path="$DATA" model.load_in_4bit=false lora=null training.optimizer=adamw
  training.micro_batch_size=4 memory.gradient_checkpointing=true memory.max_memory_fraction=$CAP
  distributed.num_gpus=2 training.max_steps=$STEPS logging.steps=1 logging.progress=false output.save_steps=0)
if [[ " $CASES " == *" full "* ]]; then
# 1. the generator: a replica does not fit 56 GB, shards do (expects "strategy": "fsdp")
python3 -m unsloth_mgpu_cli suggest --model "$MODEL" --gpus 2 --gpu-memory 56GB --method full --seq-len 512 \
  --optimizer adamw --json > "$OUT/suggest.json"; echo "suggest exit=$?"
python3 -c "import json; d=json.load(open('$OUT/suggest.json')); print('suggest strategy', d['strategy'], d['predicted_peak_gb'], 'GB')"
# 2. strategy auto resolves to fsdp at the cap (resolved recipe), then trains sharded
for s in auto ddp fsdp; do
  python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml "${COMMON[@]}" distributed.strategy=$s \
    output.dir=/tmp/fsdp-$s --overwrite > "$OUT/train-$s.log" 2>&1
  echo "strategy $s exit=$?"; grep -E "failed|Error|auto:" "$OUT/train-$s.log" | tail -8
  grep "strategy" /tmp/fsdp-$s/recipe.resolved.yaml
  cp /tmp/fsdp-$s/metrics.jsonl "$OUT/metrics-$s.jsonl" 2>/dev/null
done
python3 - "$OUT" "$CAP" <<'PY'
import json, sys, pathlib
out, cap = pathlib.Path(sys.argv[1]), float(sys.argv[2]) * 141
rows = {}
for s in ("auto", "ddp", "fsdp"):
    f = out / f"metrics-{s}.jsonl"
    rows[s] = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
    if rows[s]:
        peak = max(max(r["peak_memory_gb"]) for r in rows[s])
        tps = sum(r["tokens_per_second"] for r in rows[s][3:]) / max(1, len(rows[s][3:]))
        print(f"{s}: peak {peak:.1f} GB per GPU (cap {cap:.1f}: {'within' if peak <= cap else 'OVER'}), {tps:,.0f} tokens/s")
if rows["ddp"] and rows["fsdp"]:
    d = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["ddp"], rows["fsdp"]))
    print(f"max |loss ddp - loss fsdp| over {len(rows['fsdp'])} steps: {d:.4f}")
PY
fi

# ---- case 2: QLoRA whose 4-bit replica exceeds the per-GPU cap; NF4 shards fit it ----
if [[ " $CASES " == *" qlora "* ]]; then
QCOMMON=(model.name="$MODEL" dataset.path="$DATA" model.load_in_4bit=true training.optimizer=adamw
  training.micro_batch_size=4 memory.gradient_checkpointing=true memory.max_memory_fraction=$QCAP
  model.max_seq_length=512 distributed.num_gpus=2 training.max_steps=$STEPS logging.steps=1 logging.progress=false
  output.save_steps=0)
python3 -m unsloth_mgpu_cli suggest --model "$MODEL" --gpus 2 --gpu-memory 6GB --method qlora --seq-len 512 \
  --optimizer adamw --json > "$OUT/suggest-qlora.json"; echo "suggest qlora exit=$?"
python3 -c "import json; d=json.load(open('$OUT/suggest-qlora.json')); print('suggest qlora strategy', d['strategy'], d['predicted_peak_gb'], 'GB')"
for s in auto ddp fsdp; do
  python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml "${QCOMMON[@]}" distributed.strategy=$s \
    output.dir=/tmp/qlora-$s --overwrite > "$OUT/train-qlora-$s.log" 2>&1
  echo "qlora strategy $s exit=$?"; grep -E "failed|Error|auto:|4-bit:" "$OUT/train-qlora-$s.log" | tail -8
  grep "strategy" /tmp/qlora-$s/recipe.resolved.yaml
  cp /tmp/qlora-$s/metrics.jsonl "$OUT/metrics-qlora-$s.jsonl" 2>/dev/null
done
python3 - "$OUT" "$QCAP" <<'PY'
import json, sys, pathlib
out, cap = pathlib.Path(sys.argv[1]), float(sys.argv[2]) * 141
rows = {}
for s in ("auto", "ddp", "fsdp"):
    f = out / f"metrics-qlora-{s}.jsonl"
    rows[s] = [json.loads(l) for l in f.read_text().splitlines()] if f.exists() else []
    if rows[s]:
        peaks = [max(r["peak_memory_gb"][i] for r in rows[s]) for i in range(len(rows[s][0]["peak_memory_gb"]))]
        tps = sum(r["tokens_per_second"] for r in rows[s][3:]) / max(1, len(rows[s][3:]))
        state = "within" if max(peaks) <= cap else "OVER"
        print(f"qlora {s}: peak per GPU {', '.join(f'{p:.2f}' for p in peaks)} GB (cap {cap:.1f}: {state}), {tps:,.0f} tokens/s")
if rows["ddp"] and rows["fsdp"]:
    d = max(abs(a["loss"] - b["loss"]) for a, b in zip(rows["ddp"], rows["fsdp"]))
    print(f"qlora: max |loss ddp (bitsandbytes) - loss fsdp (NF4)| over {len(rows['fsdp'])} steps: {d:.4f}")
PY
fi
