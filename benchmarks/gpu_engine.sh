#!/usr/bin/env bash
# One GPU call: build a ~1B random Llama, doctor (+probe), then mgpu train on 1 and 2 GPUs over GSM8K.
# Run from the repo root on the GPU machine after the wheel install line; results under $OUT.
set -u
OUT=${OUT:-outputs/gpu}; mkdir -p "$OUT"
DATA=${DATA:-$PWD/gpu-data/gsm8k_train_alpaca.json}
MODEL=${MODEL:-/tmp/models/llama-1b}
STEPS=${STEPS:-60}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpus.txt"
python3 benchmarks/make_model.py --size 1b --out "$MODEL" --corpus "$DATA" 2>&1 | tail -1
COLUMNS=140 python3 -m unsloth_mgpu_cli doctor > "$OUT/doctor.txt" 2>&1; echo "doctor exit=$?" >> "$OUT/doctor.txt"
COLUMNS=140 python3 -m unsloth_mgpu_cli doctor --probe > "$OUT/doctor-probe.txt" 2>&1; echo "probe exit=$?" >> "$OUT/doctor-probe.txt"
tail -25 "$OUT/doctor-probe.txt"
for n in 1 2; do
  python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml model.name="$MODEL" dataset.path="$DATA" \
    distributed.num_gpus=$n training.max_steps=$STEPS output.dir=/tmp/run-$n logging.progress=false --overwrite \
    > "$OUT/train-$n.log" 2>&1
  echo "train $n GPU(s) exit=$?"; grep -E "^step|failed|Error" "$OUT/train-$n.log" | tail -8
  cp /tmp/run-$n/summary.json "$OUT/summary-$n.json" 2>/dev/null; cp /tmp/run-$n/metrics.jsonl "$OUT/metrics-$n.jsonl" 2>/dev/null
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
s = {n: json.loads((out / f"summary-{n}.json").read_text()) for n in (1, 2) if (out / f"summary-{n}.json").exists()}
for n, v in s.items():
    m = [json.loads(l) for l in (out / f"metrics-{n}.jsonl").read_text().splitlines()]
    steady = [r["tokens_per_second"] for r in m[2:]]  # logged every 5 steps: skip the first 10 (warm-up/compile)
    print(f"{n} GPU(s): steady tokens/s {sum(steady)/max(1,len(steady)):,.0f}; overall {v['tokens_per_second']:,.0f}; "
          f"first step {v['first_step_s']:.1f}s; loss {m[0]['loss']:.3f} -> {v['final_loss']:.3f}; peak GB {v['peak_memory_gb']}")
PY
