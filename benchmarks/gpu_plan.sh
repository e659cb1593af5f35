#!/usr/bin/env bash
# The open GPU must-shows, one device call (<= 10 min, 2 x H200) per stage. Results under $OUT/<stage>.
# Run in session 3 (results in docs/BENCHMARKS.md): `scaling`, `trl`. In session 4: `8b`, `balance`, `final`, and
# `STRATS="auto ddp" CASES=full bash benchmarks/gpu_fsdp.sh` (#13: fsdp trains under the cap, ddp refused).
# In session 5: `s5a` (trace: cuDNN attention plans each new shape on the host), s5b (void: its pytest, killed by
# `timeout`, left a run on the GPUs; stage removed), `s5d` (4 x H200), `s5e` (the new defaults; device time ran
# out in its 1-GPU run).
# In session 6: `gputest` (the flat optimizer's CUDA test and the fsdp test passed), `s6a` (flat optimizer), `s6b`
# (metrics row written during the next step), `s6c` (TRL on the 8B at 2 GPUs), `N=1 s6d` (1-GPU host: reserved
# memory per step).
# In session 7 (only the 1-GPU kind lent): `s7a` (the look-ahead loop: its CUDA test ran out of time; 1B with and
# without it), `s7c` (the CUDA test passed; the 8B without it was cut after 3 steps).
# In session 8: `s7b` (1B x1.89, 8B x1.66 with GPU 0 slow), `gputest` (4 passed), `s8a` (8B x1.93; dmon: both
# sizes run power-capped), `N=1 s8b` (1-GPU kind: expandable segments, reserved 51.5 -> 17.5 GB, same speed).
# In session 9 (only the 1-GPU kind lent): `s9a` (the 1B at global batch 64 and 128, traced: one host sync per
# micro-batch in Unsloth's fused cross-entropy), `s9d` (cuBLAS vs cuBLASLt: no difference; its first run was cut),
# `K="flat or queued" T=330 gputest` (the GPU tier's 1-GPU tests with this session's code: 2 passed in 187 s).
# In session 11 (only the 1-GPU kind lent): `K="flat or queued" gputest` (2 passed), `bash benchmarks/gpu_stop_check.sh`
# (SIGNALS=2: a CUDA worker stuck at step 4 ends 4.5 s after the second Ctrl-C, exit 130; SIGNALS=1: one Ctrl-C
# saves step-5 and exits 130; the resource tracker's leaked-semaphore warning after SIGNALS=2 was then hidden, not
# re-run on a GPU: `stops` below checks it).
# In session 12 (only the 1-GPU kind lent): `stops` (second Ctrl-C: exit 130 after 5.0 s, 0 leaked-semaphore
# warnings; one Ctrl-C: step-5 saved, exit 130), `T=330 gputest` (2 passed, 3 skipped: they need 2 GPUs); then
# `outputs` (found: --overwrite refused the run's own .cache/, Unsloth's compiled modules, which CPU runs never
# write; modes 755/644 and the export marker as planned) and `T=320 gputest` (2 passed, 3 skipped).
# In session 13 (only the 1-GPU kind lent): `s13` (a stop while the worker loads the model: exit 130 before the first
# step; the 1B at 1 GPU 71,538 tokens/s against s8b's 71,421; the tier's 1-GPU tests: 2 passed), `s13b` (a one-GPU
# run's worker listened on the host's address: NCCL's bootstrap; on loopback with NCCL_SOCKET_IFNAME=lo), `s13c`
# (the launcher now sets it: every socket on 127.0.0.1; the tier's 1-GPU tests: 2 passed), `s13d` (the final code:
# doctor --probe ok over NCCL with 1 GPU, the tier's 1-GPU tests 2 passed in 238 s).
# In session 14 (only the 1-GPU kind lent): `s14` (the Python API examples on CUDA; tokens/s with evaluation on; its
# rendezvous Ctrl-C was sent too early and lost), `s14b` (Ctrl-C at the rendezvous: exit 130 after 2 s; the tier's
# 1-GPU tests: 2 passed, 3 skipped, 209 s), `s14c` (the final code: steady 18,753 against 628 tokens/s over a
# 40-step run whose first step took 23 s; the tier's 1-GPU tests: 2 passed, 3 skipped, 202 s).
# In session 15 (only the 1-GPU kind lent): `s15` (the 1B at 1 GPU 71,085 tokens/s; the quick start's exit), then
# `T=330 gputest` (2 passed, 3 skipped, 188 s).
# In session 16 (only the 1-GPU kind lent): `s16` (the loop split into methods: the 1B at 1 GPU 69,261 tokens/s, the GPU
# busy 99.3% of each step; doctor --probe ok), `T=400 gputest` (2 passed, 3 skipped, 158 s), `stops` (both as before),
# `s16b` (TRL on the 8B at 1 GPU: padding-free 3,828, packed 7,951 tokens/s).
# In session 17 (only the 1-GPU kind lent): `s17` (the Python API's fixes, doctor, summary and report on CUDA: all exit
# 0; the 1B at 1 GPU 69,540 tokens/s), `T=420 gputest` (2 passed, 3 skipped, 179 s).
# In session 18 (only the 1-GPU kind lent): `stops` and `T=250 gputest` with session 17's code (second Ctrl-C: exit
# 130 after 3.7 s, 0 leaked-semaphore warnings; one Ctrl-C: step-5 saved; 2 passed, 3 skipped, 149 s); then `s18`
# (Ctrl-C 0.2 s and 1.5 s after the worker started: exit 130 after 5.7 and 3.5 s, no traceback, no model load),
# `stops` (3.3 s; step-5 saved; 0 warnings) and `T=240 gputest` (2 passed, 3 skipped, 173 s) with this session's code.
# In session 20 (only the 1-GPU kind lent): `s20` (double SIGINT to the launcher alone: exit 130 after 0.5 s, to the
# group 0.81 s, no traceback; a cached hub id with downloads on where the hub's name cannot resolve: trained and
# exported with no retry; the tier's 1-GPU tests: 2 passed, 3 skipped, 148 s), `s20b` (the review's code: a chat
# run's adapter and export carry the ChatML template it trained with).
# In session 21 (only the 1-GPU kind lent): `s21` (the 1B with DoRA: 25,566 against LoRA's 68,406 tokens/s, peak 73.38
# against 16.55 GiB; warmup_ratio and min_lr_ratio as planned; DoRA's merged export and 16-bit quick start: exit 0),
# `T=330 s21b` (early stopping on CUDA: ended at step 6, its resume had nothing to do; 2 passed, 3 skipped, 209 s),
# `s21c` (output.keep_best on CUDA: the adapter is step 4's of 20, equal to best/ and to step 4's checkpoint).
# In session 22 (only the 1-GPU kind lent): `s22` (NEFTune on the 1B: 69,210 against 70,240 tokens/s; a sample's noise
# the same alone and packed on CUDA; the WSD schedule's rates; generate, fractional epochs and DoRA under fsdp: exit 0),
# `T=400 gputest` (2 passed, 3 skipped, 182 s), `s22b` (LoRA+ with adamw_8bit: 71,566 tokens/s, 224 tensors in 3
# kernels; NEFTune on packed rows 29,191 against 30,336 without it), `s22c` (lora.init_from with QLoRA: a frozen second
# stage gives back the first stage's adapter to 3.6e-12; one that trains on starts at the first stage's loss), `s22d`
# (a chat run with dataset.system_prompt, generate framing with it on CUDA; NEFTune under fsdp with evaluation: exit 0).
# In session 24 (only the 1-GPU kind lent): `s24` (packed rows attend per sample on this image: 27.2 ms per layer
# against 1.74 in torch 2.11's varlen_attn), `s24b` (with benchmarks/varlen_gqa: our packed 1B 69,975 tokens/s against
# 28,158; TRL padding-free 73,678 against session 3's 11,413), `s24c` (dataset.batching auto: its GPU test both ways;
# side by side with the kernel: ours auto/packed 81,931, balanced 71,252, TRL padding-free 65,546; an earlier call of
# the same stage: 67,429 against 64,123).
# In session 25 (only the 1-GPU kind lent): `s25` (packed_seq_lengths on the host: its GPU test passed without and with
# the kernel, host syncs per packed forward 10 -> 2; profiles of ours and TRL padding-free, slowed ~2x by the profiler),
# `s25b` (ours 70,973 tokens/s against 64,797 with session 24's code and TRL padding-free 61,543; ours at micro-batch
# 128: 90,594), then two run.py calls written out in docs/BENCHMARKS.md: s25c (both at micro-batch 128: ours 90,335,
# TRL 81,491) and s25d (packed rows bounded by tokens: ours at 64 x 2, one row per step, 91,398; balanced 69,326).
# In session 26 (only the 1-GPU kind lent): `s26` and `s26b` (lm_head on the labelled positions only, at 2dcd439: its
# GPU test passed, no gain: 0.234 vs 0.235 s per step; 87,028 vs 86,255 tokens/s with a 128k head; reverted), `s26c`
# (the data tokenised while the workers start: time to first step 41.3 and 44.2 s against 47.9), `T=330 gputest` at
# c1dd108 (4 passed, 3 skipped: they need 2 GPUs; 230 s).
# In session 27 (only the 1-GPU kind lent): `s27` (a small model of each family, QLoRA, 30 steps, then GGUF: Llama
# 2-style, Mistral and Qwen2 trained; Gemma 2 failed in Unsloth's block compile: InductorError), `s27b` (its traceback:
# the backward's compile; also with 16-bit LoRA, padded batches and in TRL + Unsloth), `K=gemma2 T=300 gputest` (the
# block compile off for Gemma 2 on CUDA: it trains, and the control with it forced on fails; 1 passed, 258 s).
# Next, in this order:
#   s24d on nvidia-h200-x2: #11's TRL comparison at 2 GPUs with the variable-length kernel on both sides, then s24e
#     (TRL at micro-batch 128 on 1 GPU, its faster setting)
#   s9b on nvidia-h200-x2, then gputest there: NCCL_SOCKET_IFNAME=lo (session 13) has not run on 2 GPUs
#   stops on 2 GPUs (~3 min): a failed rank's teardown on NCCL
#   gputest on nvidia-h200-x2: the whole tier (expandable segments and balance_speed never ran there)
#   CASES=qlora bash benchmarks/gpu_fsdp.sh   # #13: 8B QLoRA, NF4 shards (own call)
#   4/8 GPUs (#12), when lent: GPUS=8,4 s7d (ours) and s7e (TRL), then GPUS=2,1 where a pair is missing
# Settings of every run: 1B model, GSM8K, global batch 128 (micro-batch 64), 30 steps, steady state after step 10
# (our steps settle from step 8 on: docs/BENCHMARKS.md). Each run is cold (own compile and data caches).
set -u
STAGE=${1:?usage: gpu_plan.sh s27b|s27|s26c|s26b|s26|s25|s25b|s24e|s24d|s24c|s24b|s24|s22d|s22c|s22b|s22|s21c|s21b|s21|s20b|s20|s18|s17|s16b|s16|s15|s9d|s9b|s9a|s8b|s8a|s7a|s7b|s7c|s7d|s7e|s6a|s6b|s6c|s6d|s5a|s5d|s5e|scaling|trl|balance|final|steady|graphs|8b|profile|gputest|stops}
OUT=${OUT:-outputs/plan}/$STAGE; mkdir -p "$OUT"
BENCH=(python3 benchmarks/run.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --global-batch 128 --micro-batch 64
  --steps 30 --warmup 10 --timeout 200 --min-run-s 100)
# The 1B built locally (random weights, GSM8K-trained tokenizer), and `mgpu train` on it with 1 GPU at global batch 128
build_1b() {
  [ -f /tmp/models/llama-1b/config.json ] && return 0  # an earlier call on this machine built it (seed 0)
  python3 benchmarks/make_model.py --size 1b --out /tmp/models/llama-1b --corpus gpu-data/gsm8k_train_alpaca.json \
    > "$OUT/build.txt" 2>&1 || { echo "build failed"; tail -5 "$OUT/build.txt"; exit 1; }
}
# ours, then ours with gpu-data/$1's copies of unsloth_mgpu_cli files (the code before a change), then ours again (the
# pair's noise): $2... is the benchmark command; each run's results under $OUT/new, old, new2, without its logs
new_old_new() {
  local old=$1; shift
  "$@" --out "$OUT/new" | tail -3
  mkdir -p /tmp/keep && for f in gpu-data/"$old"/*.py; do cp "unsloth_mgpu_cli/${f##*/}" /tmp/keep/; done
  cp gpu-data/"$old"/*.py unsloth_mgpu_cli/
  "$@" --out "$OUT/old" | tail -3
  cp /tmp/keep/*.py unsloth_mgpu_cli/ && rm -rf /tmp/keep
  "$@" --out "$OUT/new2" | tail -3
  for r in new old new2; do rm -rf "$OUT/$r/logs"; done
}
ONE_B=(python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml model.name=/tmp/models/llama-1b
  dataset.path="$PWD/gpu-data/gsm8k_train_alpaca.json" distributed.num_gpus=1 training.micro_batch_size=64
  training.gradient_accumulation_steps=2)
# The quick start's first N rows as conversations (a user turn, then the assistant's), written to FILE
chat_data() {
  python3 - "$1" "$2" <<'PY'
import json, sys
rows = [json.loads(l) for l in open("recipes/data/quickstart.jsonl")][: int(sys.argv[1])]
with open(sys.argv[2], "w") as f:
    for r in rows:
        msgs = [{"role": "user", "content": f"{r['instruction']} {r['input']}"}, {"role": "assistant", "content": r["output"]}]
        f.write(json.dumps({"messages": msgs}) + "\n")
PY
}
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
  balance)
    # #11: each rank's GPU time in its micro-batches per step (metrics compute_s): rank imbalance and the share of
    # the step the slowest rank's micro-batches take (the rest: sync, optimizer, host work); 1B on 2 and 1 GPUs
    export TORCH_LOGS=recompiles
    "${BENCH[@]}" --steps 40 --warmup 15 --out "$OUT/a" --only ours --gpus 2,1 --budget-s 240 | tail -9 ;;
  final)
    # #11, session 4's last call: both sizes on 2 and 1 GPUs with the workers on their own cores and the garbage
    # collector on the loop's schedule (1B: 30 steps, steady after 10; 8B: 20 steps, steady after 6)
    timeout 190 "${BENCH[@]}" --steps 30 --warmup 10 --out "$OUT/a" --only ours --gpus 2,1 --budget-s 185 | tail -9
    timeout 295 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 20 --warmup 6 --timeout 135 --out "$OUT/b" \
      --only ours --gpus 2,1 --budget-s 290 | tail -9 ;;
  s8a)
    # #11, session 8: s7b's 8B on 2 GPUs ran rank 0's micro-batches at up to 1.18 s per step against rank 1's 0.8
    # (steps 12-22), and the 1-GPU run on GPU 0 varied from 1.5 to 1.96 s (s6d: 1.44 steady). Is it GPU 0 (clocks,
    # power, heat) or rank 0's host work? The same pair with the clocks logged, then 2 GPUs with rank 0 on GPU 1.
    nvidia-smi dmon -s pucv -o T -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!
    timeout 265 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 22 --warmup 7 --timeout 115 --min-run-s 80 \
      --out "$OUT/c" --only ours --gpus 1,2 --budget-s 260 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    nvidia-smi -q -d PERFORMANCE > "$OUT/perf-1.txt"
    BENCH_DEVICES=1,0 timeout 130 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 22 --warmup 7 --timeout 115 \
      --min-run-s 80 --out "$OUT/d" --only ours --gpus 2 --budget-s 125 | tail -3
    cp /tmp/mgpu-bench/ours-8b-2gpu/run/metrics.jsonl "$OUT/d/m2.jsonl"
    nvidia-smi -q -d PERFORMANCE > "$OUT/perf-2.txt"; kill $DMON
    cd "$OUT" && tar czf rest.tgz c d; rm -rf c d; exit 0 ;;
  s9d)
    # #11, session 9 (1-GPU kind): cuBLAS against cuBLASLt as PyTorch's BLAS on the 1B, 1 GPU, in the order
    # default, cuBLASLt, cuBLASLt, default (s9c: one pair, cuBLASLt first, -1.6% per step). 45 steps, steady after 15.
    R=(--steps 45 --warmup 15 --timeout 92 --min-run-s 60 --only ours --gpus 1)
    k=0
    for lt in 0 1 1 0; do
      k=$((k + 1))
      if [ $lt = 1 ]; then export TORCH_BLAS_PREFER_CUBLASLT=1; else unset TORCH_BLAS_PREFER_CUBLASLT; fi
      timeout 97 "${BENCH[@]}" "${R[@]}" --out "$OUT/r$k-lt$lt" --budget-s 95 | tail -1
      cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/r$k-lt$lt/m1.jsonl"
    done
    cd "$OUT" && tar czf rest.tgz r*; rm -rf r1* r2* r3* r4*; exit 0 ;;
  s9b)
    # #11, session 9, on nvidia-h200-x2, one call: the 1B pair (s7b: x1.89, median step x1.93) with this session's
    # defaults (expandable segments, distributed.balance_speed auto: `rank_speeds` in the metrics say whether it
    # acted), the 1-GPU run on GPU 1 (the pair's 1-GPU run is on GPU 0: do the chips differ?), then the GPU tests
    # of the new code on NCCL (balance_speed with a slowed rank; 2 GPUs = 1 GPU with expandable segments).
    nvidia-smi dmon -s pucv -o T -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!
    R=(--steps 50 --warmup 15 --timeout 100 --min-run-s 60 --only ours)
    timeout 215 "${BENCH[@]}" "${R[@]}" --out "$OUT/a" --gpus 2,1 --budget-s 210 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    BENCH_DEVICES=1 timeout 105 "${BENCH[@]}" "${R[@]}" --out "$OUT/g1" --gpus 1 --budget-s 100 | tail -3
    cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/g1/m1.jsonl"; kill $DMON
    timeout -k 10 "${T:-260}" python3 -m pytest -q -m gpu tests/test_gpu.py -k "${K:-slow_gpu or two_gpus}" \
      > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt"
    cd "$OUT" && tar czf rest.tgz a g1; rm -rf a g1; exit 0 ;;
  s9a)
    # #11, session 9 (the 1-GPU kind): in s7b each 2-GPU rank's micro-batch took 2.2 ms more than half a 1-GPU step
    # with the same padded tokens. The 1-GPU run at global batch 64 does a 2-GPU rank's work (one micro-batch of 64
    # per step) without NCCL; next to the 1-GPU run at 128 (two micro-batches): a cost per step, not per token,
    # shows as a larger time per padded token at 64. Both traced over steps 20-22 (left out of the comparison).
    for gb in 64 128; do
      MGPU_PROFILE="$OUT/p$gb:20:22:trace" timeout 150 "${BENCH[@]}" --global-batch $gb --steps 50 --warmup 15 \
        --timeout 140 --min-run-s 60 --out "$OUT/g$gb" --only ours --gpus 1 --budget-s 145 | tail -2
      cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/g$gb/m1.jsonl"
    done
    cd "$OUT" && tar czf rest.tgz g64 g128 p64 p128; rm -rf g64 g128 p64 p128; exit 0 ;;
  s8b)
    # #11, session 8: the 1B pair (s7b's runs: x1.89, median step x1.93) with the workers' CUDA allocator on
    # expandable segments (the new default), then the 2-GPU run again with torch's fixed segments. In s7b the 1B
    # reserved 51.5 GB for 17.2 GB of live tensors, and steps that grew the reserve ran 15-40 ms slow.
    # N=1 (the 1-GPU machine): the 1-GPU run with and without.
    N=${N:-2}; G=$([ "$N" = 1 ] && echo 1 || echo 2,1)
    nvidia-smi dmon -s pucv -o T -d 1 > "$OUT/dmon.txt" 2>&1 & DMON=$!
    timeout 215 "${BENCH[@]}" --steps 50 --warmup 15 --timeout 105 --min-run-s 60 --out "$OUT/a" --only ours \
      --gpus "$G" --budget-s 210 | tail -6
    for n in ${G//,/ }; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    PYTORCH_CUDA_ALLOC_CONF= timeout 110 "${BENCH[@]}" --steps 50 --warmup 15 --timeout 105 --min-run-s 60 \
      --out "$OUT/b" --only ours --gpus "$N" --budget-s 105 | tail -3
    cp /tmp/mgpu-bench/ours-1b-${N}gpu/run/metrics.jsonl "$OUT/b/m$N.jsonl"; kill $DMON
    cd "$OUT" && tar czf rest.tgz a b; rm -rf a b; exit 0 ;;
  s7d)
    # #12 when 4 or 8 GPUs are lent: ours on the 1B then the 8B at the GPU counts in GPUS (default "8,4"; e.g.
    # GPUS=4,1 on the 4-GPU machine), with the look-ahead loop. TRL at those counts: s7e.
    G=${GPUS:-8,4}
    timeout 230 "${BENCH[@]}" --steps 50 --warmup 15 --timeout 100 --min-run-s 55 --out "$OUT/a" --only ours \
      --gpus "$G" --budget-s 225 | tail -6
    for n in ${G//,/ }; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    timeout 300 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 22 --warmup 7 --timeout 125 --min-run-s 75 \
      --out "$OUT/c" --only ours --gpus "$G" --budget-s 295 | tail -6
    for n in ${G//,/ }; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    cd "$OUT" && tar czf rest.tgz a c; rm -rf a c; exit 0 ;;
  s7e)
    # #12: Unsloth's own route (TRL under torchrun) at the counts in GPUS (default "8,4"): the 1B in both modes
    G=${GPUS:-8,4}
    timeout 520 "${BENCH[@]}" --steps 20 --warmup 6 --timeout 160 --out "$OUT/t" --only trl-pf,trl-pack \
      --gpus "$G" --budget-s 515 | tail -6
    cd "$OUT" && tar czf rest.tgz t; rm -rf t; exit 0 ;;
  s7c)
    # #11, session 7 (a 1-GPU host): the look-ahead GPU test with room (s7a's 180 s ran out before it ended), then
    # the 8B without the look-ahead and with it in one lease (s7a: with it, the micro-batches slowed from 1.43 to
    # 1.83 s over steps 7-16; s6d: 1.44 s steady)
    timeout 260 python3 -m pytest -q -s -m gpu tests/test_gpu.py -k queued > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; grep -E "queued vs|passed|failed|Error" "$OUT/pytest-gpu.txt" | tail -5
    for la in 0 1; do
      MGPU_LOOKAHEAD=$la timeout 125 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 16 --warmup 6 --timeout 95 \
        --min-run-s 60 --out "$OUT/la$la" --only ours --gpus 1 --budget-s 120 | tail -2
      cp /tmp/mgpu-bench/ours-8b-1gpu/run/metrics.jsonl "$OUT/la$la/m1.jsonl"
    done
    cd "$OUT" && tar czf rest.tgz la0 la1; rm -rf la0 la1; exit 0 ;;
  s7a)
    # #11, session 7 (a 1-GPU host): the look-ahead loop (step k+1 queued before the host settles step k; the 8-bit
    # update of a step found bad later is undone on the device). Its CUDA test, then the 1B without it
    # (MGPU_LOOKAHEAD=0) and with it, then the 8B with it (s6d: 71,037 and 14,827 tokens/s on this kind of host).
    timeout 180 python3 -m pytest -q -s -m gpu tests/test_gpu.py -k "queued or flat" > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; grep -E "queued vs|passed|failed|Error" "$OUT/pytest-gpu.txt" | tail -5
    for la in 0 1; do
      MGPU_LOOKAHEAD=$la timeout 115 "${BENCH[@]}" --steps 40 --warmup 15 --timeout 100 --min-run-s 60 \
        --out "$OUT/la$la" --only ours --gpus 1 --budget-s 110 | tail -2
      cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/la$la/m1.jsonl"
    done
    timeout 150 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 18 --warmup 6 --timeout 100 --min-run-s 70 \
      --out "$OUT/c" --only ours --gpus 1 --budget-s 145 | tail -2
    cp /tmp/mgpu-bench/ours-8b-1gpu/run/metrics.jsonl "$OUT/c/m1.jsonl"
    cd "$OUT" && tar czf rest.tgz la0 la1 c; rm -rf la0 la1 c; exit 0 ;;
  s6b|s7b)
    # #11, session 6: the metrics row written while the next step runs (no wait for the optimizer between steps).
    # s7b, session 7: the same runs with the look-ahead loop (step k+1 queued before the host settles step k).
    # 1B then 8B, each on 2 then 1 GPUs (run.py runs the larger count first whatever the order of --gpus), 50 and
    # 22 steps.
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    timeout 215 "${BENCH[@]}" --steps 50 --warmup 15 --timeout 105 --min-run-s 60 --out "$OUT/a" --only ours \
      --gpus 2,1 --budget-s 210 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    timeout 265 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 22 --warmup 7 --timeout 115 --min-run-s 80 \
      --out "$OUT/c" --only ours --gpus 1,2 --budget-s 260 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    cd "$OUT" && tar czf rest.tgz a c; rm -rf a c; exit 0 ;;
  s6c)
    # #11: Unsloth's own route on the 8B at 2 GPUs (torchrun), both modes, 10 steps, steady after 4
    timeout 330 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 10 --warmup 4 --timeout 140 --min-run-s 90 \
      --out "$OUT/t" --only trl-pf,trl-pack --gpus 2 --budget-s 325 | tail -5
    cd "$OUT" && tar czf rest.tgz t; rm -rf t; exit 0 ;;
  s6d)
    # #11: what are the one-rank stalls of 0.1-0.15 s (8B 2 GPUs: 6 of 21 steps in s6b)? Metrics now carry each
    # rank's reserved device memory per step: growth at a stalled step points at the allocator going to the driver.
    # N=1 (1-GPU machine, session 6: 1-GPU runs stall too, e.g. 8B steps 6 and 18 in s6b) or N=2.
    N=${N:-2}
    timeout 120 "${BENCH[@]}" --steps 40 --warmup 15 --timeout 100 --min-run-s 60 --out "$OUT/a" --only ours \
      --gpus $N --budget-s 115 | tail -3
    cp /tmp/mgpu-bench/ours-1b-${N}gpu/run/metrics.jsonl "$OUT/a/m$N.jsonl"
    timeout 170 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 22 --warmup 7 --timeout 110 --min-run-s 80 \
      --out "$OUT/c" --only ours --gpus $N --budget-s 165 | tail -3
    cp /tmp/mgpu-bench/ours-8b-${N}gpu/run/metrics.jsonl "$OUT/c/m$N.jsonl"
    cd "$OUT" && tar czf rest.tgz a c; rm -rf a c; exit 0 ;;
  s6a)
    # #11, session 6: adamw_8bit updates each flat bucket in one kernel (was one per LoRA tensor, 224 for the 1B).
    # The 1B on 2 and 1 GPUs over 40 steps, the 8B on 2 and 1 GPUs over 16 steps, then TRL's best mode on the 1B
    # at 2 GPUs (packing=True in session 3) against today's code.
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    timeout 195 "${BENCH[@]}" --steps 40 --warmup 15 --timeout 95 --min-run-s 60 --out "$OUT/a" --only ours \
      --gpus 2,1 --budget-s 190 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    for n in 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/summary.json "$OUT/a/s$n.json"; done
    timeout 215 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 16 --warmup 6 --timeout 100 --min-run-s 75 \
      --out "$OUT/c" --only ours --gpus 2,1 --budget-s 212 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    timeout 125 "${BENCH[@]}" --steps 20 --warmup 8 --timeout 120 --min-run-s 60 --out "$OUT/t" --only trl-pack \
      --gpus 2 --budget-s 122 | tail -4
    cd "$OUT" && tar czf rest.tgz a c t; rm -rf a c t; exit 0 ;;
  s5e)
    # #11 with the new defaults (model.attention auto: no cuDNN; dataset.pad_to_multiple_of 8: one compile): the 1B
    # on 2 and 1 GPUs over 50 steps, then the 8B on 2 and 1 GPUs over 16 steps.
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    timeout 150 "${BENCH[@]}" --steps 50 --warmup 20 --timeout 80 --min-run-s 55 --out "$OUT/a" --only ours \
      --gpus 2,1 --budget-s 148 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    timeout 215 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 16 --warmup 6 --timeout 100 --min-run-s 75 \
      --out "$OUT/c" --only ours --gpus 2,1 --budget-s 212 | tail -6
    for n in 2 1; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    cd "$OUT" && tar czf rest.tgz a c; rm -rf a c; exit 0 ;;
  s5d)
    # #11 and #12 on 4 x H200 (lent in session 5): model.attention auto (no cuDNN), unpadded; the 1B at 4, 2 and 1
    # GPUs over 60 steps, then the 8B at 4, 2 and 1 GPUs over 20 steps. Any process left on the GPUs is listed.
    nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv
    timeout 225 "${BENCH[@]}" --steps 60 --warmup 30 --timeout 110 --min-run-s 55 --out "$OUT/a" --only ours \
      --gpus 4,2,1 --budget-s 220 | tail -6
    for n in 4 2 1; do cp /tmp/mgpu-bench/ours-1b-${n}gpu/run/metrics.jsonl "$OUT/a/m$n.jsonl"; done
    timeout 340 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 20 --warmup 6 --timeout 135 --min-run-s 85 \
      --out "$OUT/c" --only ours --gpus 4,2,1 --budget-s 335 | tail -6
    for n in 4 2 1; do cp /tmp/mgpu-bench/ours-8b-${n}gpu/run/metrics.jsonl "$OUT/c/m$n.jsonl"; done
    cd "$OUT" && tar czf rest.tgz a c; rm -rf a c; exit 0 ;;
  s5a)
    # #11, session 5's first call: (a) 1B on 2 GPUs, 40 steps, a trace of both ranks over steps 10-14 (10 and 12
    # fast, 11, 13 and 14 slow in every run so far) with the GPUs' clocks, power and throttle reasons sampled
    # every 100 ms; (b) 2 and 1 GPUs over 60 steps with row widths rounded up to 64 (at most 8 widths).
    nvidia-smi --query-gpu=timestamp,index,clocks.sm,clocks.mem,power.draw,temperature.gpu,utilization.gpu,\
clocks_throttle_reasons.active --format=csv,noheader -lms 100 > "$OUT/smi.csv" 2>&1 & SMI=$!
    MGPU_PROFILE="$OUT/prof:10:14:trace" "${BENCH[@]}" --steps 40 --warmup 15 --out "$OUT/a" --only ours --gpus 2 \
      --budget-s 170 | tail -3
    cp /tmp/mgpu-bench/ours-1b-2gpu/run/metrics.jsonl "$OUT/a/m2.jsonl"
    "${BENCH[@]}" --steps 60 --warmup 30 --timeout 220 --min-run-s 95 --out "$OUT/b" --only ours --gpus 2,1 \
      --budget-s 250 --ours-set dataset.pad_to_multiple_of=64 | tail -5
    cp /tmp/mgpu-bench/ours-1b-2gpu/run/metrics.jsonl "$OUT/b/m2.jsonl"
    cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/b/m1.jsonl"
    kill $SMI; mv "$OUT"/prof/trace-rank*.json.gz "$OUT"/ 2>/dev/null
    cd "$OUT" && tar czf rest.tgz a b prof smi.csv && rm -rf a b prof smi.csv && ls -la; exit 0 ;;
  steady)
    # #11: session 3 saw bimodal step times (most 2-GPU steps 0.17-0.20 s, a third 0.26-0.33 s; the first 6 steps
    # twice as long): 60 steps, steady state after 30, recompiles logged, metrics keep each rank's longest row;
    # the same with pad_to_multiple_of=64 (at most 8 row widths up to 512, so fewer new shapes).
    export TORCH_LOGS=recompiles
    LONG=(--steps 60 --warmup 30 --timeout 220 --min-run-s 95)
    "${BENCH[@]}" "${LONG[@]}" --out "$OUT/a" --only ours --gpus 2,1 --budget-s 240 | tail -5
    "${BENCH[@]}" "${LONG[@]}" --out "$OUT/b" --only ours --gpus 2,1 --budget-s 240 \
      --ours-set dataset.pad_to_multiple_of=64 | tail -5 ;;
  profile)
    # #11: what makes a third of the 1B's steps slow on both ranks at once (session 4: steps 11, 13-15, 17, 18, 23,
    # 29, 30 in two runs; not recompiles, not garbage collection): trace of both ranks over steps 11-13
    MGPU_PROFILE="$OUT/prof:11:13:trace" "${BENCH[@]}" --steps 16 --warmup 8 --out "$OUT/a" --only ours --gpus 2 \
      --budget-s 200 | tail -3
    cp -r /tmp/mgpu-bench/ours-1b-2gpu/run/metrics.jsonl "$OUT/" 2>/dev/null ;;
  graphs)
    # #11: Unsloth's opt-in CUDA graphs per decoder block (UNSLOTH_BLOCK_CUDAGRAPHS=1: no per-kernel launch cost on
    # the host, which bounds our steps) record one graph per input shape, at most 8: padded rows of 64 with widths
    # rounded up to 64 give at most 8 shapes. Against the same batching without graphs.
    G=(--steps 40 --warmup 20 --timeout 220 --min-run-s 95 --ours-set dataset.pad_to_multiple_of=64)
    UNSLOTH_BLOCK_CUDAGRAPHS=1 "${BENCH[@]}" "${G[@]}" --out "$OUT/a" --only ours-padded --gpus 2,1 --budget-s 230 \
      | tail -5
    "${BENCH[@]}" "${G[@]}" --out "$OUT/b" --only ours-padded --gpus 2 --budget-s 115 | tail -3 ;;
  8b)
    # #11, second model size: the 8B (Llama-3.1-8B dimensions) at micro-batch 16 (64 x 434 tokens of activations
    # would not fit without checkpointing); 2 GPUs: 16 x 4 x 2, 1 GPU: 16 x 8 x 1. About 3 s per step on 1 GPU.
    "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 25 --warmup 8 --timeout 260 --out "$OUT/a" --only ours \
      --gpus 2,1 --budget-s 540 | tail -5 ;;
  gputest)
    # the GPU tier of the test suite (make test-gpu): 5 cold tiny-model runs, ~70 s each on the H200 machine
    # K: a pytest -k expression, to split the tier over two calls (e.g. K=sharded, then K="not sharded")
    timeout -k 20 "${T:-520}" python3 -m pytest -q -m gpu tests/test_gpu.py ${K:+-k "$K"} > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  stops)
    # Ctrl-C twice with a worker stuck where Python's handlers cannot run; once with a checkpoint; on 2 GPUs a rank
    # that raises at step 4, whose peer must leave on the launcher's SIGTERM (not torch's SIGKILL 30 s later)
    OUT=$OUT SIGNALS=2 timeout -k 10 150 bash benchmarks/gpu_stop_check.sh
    echo "leaked-semaphore warnings: $(grep -c 'leaked semaphore' "$OUT/stop2/out.txt")"
    OUT=$OUT SIGNALS=1 FAULT=sleep:rank=0:step=4:seconds=4 timeout -k 10 150 bash benchmarks/gpu_stop_check.sh
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
      s=$(date +%s)
      MGPU_INJECT_FAULT=stuck:rank=1:step=3 python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml \
        distributed.num_gpus=2 distributed.timeout_seconds=20 training.max_steps=10 training.warmup_steps=1 \
        logging.progress=false output.save_steps=0 output.dir="$OUT/teardown" > "$OUT/teardown.txt" 2>&1
      echo "teardown: exit=$? in $(( $(date +%s)-s )) s"; tail -4 "$OUT/teardown.txt" | cut -c1-200
      grep -rh "stopped by the launcher" "$OUT/teardown/logs" | head -2
    fi ;;
  s13)
    # session 13 (1-GPU kind): this session's launcher on CUDA. (1) a one-GPU run's listening sockets while it
    # trains (the rendezvous stores now bound to loopback); (2) Ctrl-C while the worker loads the model: exit 130
    # before the first step, no checkpoint; (3) the 1B at 1 GPU, 50 steps, against s8b's 71,421 tokens/s (no
    # regression from sessions 9-13); (4) the GPU tier's 1-GPU tests.
    Q=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.warmup_steps=1
       logging.progress=false output.save_steps=0)
    "${Q[@]}" training.max_steps=300 output.dir="$OUT/live" > "$OUT/live.txt" 2>&1 & RUN=$!
    for i in $(seq 1 90); do sleep 1; grep -q '"step": 5' "$OUT/live/metrics.jsonl" 2>/dev/null && break; done
    echo "listening while training: $(ss -ltnpH 2>/dev/null | grep -E 'python|mgpu' | awk '{print $4}' | sort -u | tr '\n' ' ')"
    kill -INT $RUN; wait $RUN; echo "live run: exit=$? (130 expected)"; tail -2 "$OUT/live.txt" | cut -c1-220
    s=$(date +%s); "${Q[@]}" training.max_steps=20 output.dir="$OUT/early" > "$OUT/early.txt" 2>&1 & RUN=$!
    for i in $(seq 1 300); do sleep 0.2; grep -q '^Unsloth' "$OUT/early.txt" && break; done
    kill -INT $RUN; wait $RUN; echo "Ctrl-C while loading: exit=$? after $(( $(date +%s)-s )) s"
    tail -1 "$OUT/early.txt" | cut -c1-220; ls "$OUT/early/checkpoints" 2>/dev/null | head -3
    timeout 130 "${BENCH[@]}" --steps 50 --warmup 15 --timeout 105 --min-run-s 60 --out "$OUT/a" --only ours \
      --gpus 1 --budget-s 125 | tail -3
    cp /tmp/mgpu-bench/ours-1b-1gpu/run/metrics.jsonl "$OUT/a/m1.jsonl"
    timeout -k 10 "${T:-230}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt"
    rm -rf "$OUT/live" "$OUT/early" ;;
  s13b)
    # session 13: which addresses a one-GPU run listens on (s13's `ss -p` printed nothing there): the launcher
    # (rendezvous stores) and the worker (NCCL's bootstrap), by default and with NCCL_SOCKET_IFNAME=lo
    for ifname in "" lo; do
      NCCL_SOCKET_IFNAME=$ifname python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 \
        training.max_steps=300 training.warmup_steps=1 logging.progress=false output.save_steps=0 \
        output.dir="$OUT/run-$ifname" > "$OUT/run-$ifname.txt" 2>&1 & RUN=$!
      for i in $(seq 1 90); do sleep 1; grep -q '"step": 5' "$OUT/run-$ifname/metrics.jsonl" 2>/dev/null && break; done
      echo "NCCL_SOCKET_IFNAME='$ifname':"; python3 benchmarks/listeners.py unsloth_mgpu_cli
      python3 benchmarks/listeners.py spawn_main
      kill -INT $RUN; wait $RUN; echo "exit=$?"; tail -1 "$OUT/run-$ifname.txt" | cut -c1-120
    done
    rm -rf "$OUT"/run-* ;;
  s13c)
    # session 13, after s13b: the launcher sets NCCL_SOCKET_IFNAME=lo on one host; the same listing (all on
    # loopback expected), then the tier's 1-GPU tests with it
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=300 \
      training.warmup_steps=1 logging.progress=false output.save_steps=0 output.dir="$OUT/run" > "$OUT/run.txt" 2>&1 &
    RUN=$!
    for i in $(seq 1 90); do sleep 1; grep -q '"step": 5' "$OUT/run/metrics.jsonl" 2>/dev/null && break; done
    python3 benchmarks/listeners.py unsloth_mgpu_cli; python3 benchmarks/listeners.py spawn_main
    kill -INT $RUN; wait $RUN; echo "exit=$?"; rm -rf "$OUT/run"
    timeout -k 10 "${T:-230}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s13d)
    # session 13's final code on one GPU: `mgpu doctor --probe` (its launcher now on the loopback rendezvous, NCCL on
    # lo), then the tier's 1-GPU tests
    python3 -m unsloth_mgpu_cli doctor --probe --json > "$OUT/doctor.json" 2> "$OUT/doctor.err"
    echo "doctor --probe: exit=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
      print(d['summary'], {k: d['probe'].get(k) for k in ('ok', 'backend', 'world_size', 'busbw_gbps')})" \
      "$OUT/doctor.json" || tail -5 "$OUT/doctor.err"
    timeout -k 10 "${T:-300}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s14)
    # session 14 (1-GPU kind): the Python API's fixes on CUDA (advanced_config sized for the GPU found, its worker
    # planning for the launch, check_fits against the GPU's free memory, phase peaks; direct mode), tokens/s with
    # evaluation on (the device-timed window), and Ctrl-C while node 0 waits alone at the rendezvous
    python3 examples/advanced_config.py > "$OUT/advanced.txt" 2>&1; echo "advanced_config: exit=$?"
    grep -E "^devices|optimal config|^trained" "$OUT/advanced.txt" | cut -c1-700
    python3 examples/direct_trainer_usage.py --num-gpus 1 > "$OUT/direct.txt" 2>&1; echo "direct: exit=$?"
    tail -2 "$OUT/direct.txt" | cut -c1-300
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=40 \
      training.warmup_steps=1 dataset.eval_ratio=0.1 training.eval_steps=10 logging.progress=false \
      output.save_steps=0 output.dir="$OUT/eval" > "$OUT/eval.txt" 2>&1; echo "eval run: exit=$?"
    python3 -c "import json,sys; rows=[json.loads(l) for l in open(sys.argv[1])]; \
      print(' '.join(f\"{r['step']}:{r['tokens_per_second']:.0f}{'E' if 'eval_loss' in r else ''}\" for r in rows)); \
      s=json.load(open(sys.argv[2])); print('summary', round(s['tokens_per_second']), 'eval_s', round(s['eval_s'], 2))" \
      "$OUT/eval/metrics.jsonl" "$OUT/eval/summary.json"
    rm -rf "$OUT/eval" ;;
  s14b)
    # session 14: Ctrl-C while node 0 waits alone at the rendezvous (s14 sent it 2 s after "waiting ...", before
    # the launcher's handler was in place: a background job of a script ignores SIGINT until then, so it was
    # lost and the node waited on), then the tier's 1-GPU tests with this session's code
    pkill -f "unsloth_mgpu_cli train" || true
    s=$(date +%s)
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 --nnodes 2 --node-rank 0 \
      --rdzv-endpoint 127.0.0.1:29434 output.dir="$OUT/alone" > "$OUT/alone.txt" 2>&1 & RUN=$!
    for i in $(seq 1 60); do sleep 1; grep -q "waiting for all 2 nodes" "$OUT/alone.txt" && break; done
    sleep 10; t=$(date +%s); kill -INT $RUN
    for i in $(seq 1 60); do kill -0 $RUN 2>/dev/null || break; sleep 1; done
    if kill -0 $RUN 2>/dev/null; then kill -KILL $RUN; echo "still waiting 60 s after Ctrl-C: killed"; fi
    wait $RUN; echo "Ctrl-C at the rendezvous: exit=$? $(( $(date +%s)-t )) s after the signal"
    tail -1 "$OUT/alone.txt" | cut -c1-240; rm -rf "$OUT/alone"
    timeout -k 10 "${T:-300}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s14c)
    # session 14's final code on one GPU: the run summary's steady rate next to the whole-run one (a short run
    # with evaluation), then the tier's 1-GPU tests
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=40 \
      training.warmup_steps=1 dataset.eval_ratio=0.1 training.eval_steps=10 logging.progress=false \
      output.save_steps=0 output.dir="$OUT/eval" > "$OUT/eval.txt" 2>&1; echo "eval run: exit=$?"
    grep -A1 "^throughput" "$OUT/eval.txt"; python3 -c "import json,sys; s=json.load(open(sys.argv[1])); \
      print({k: s[k] for k in ('tokens_per_second', 'steady_tokens_per_second', 'eval_s', 'first_step_s')})" \
      "$OUT/eval/summary.json"
    rm -rf "$OUT/eval"
    timeout -k 10 "${T:-300}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s19b)
    # session 19, after the newcomer audit: on CUDA, a resume with a changed learning rate (printed, and recorded in
    # recipe.resolved.yaml's header), a hub model that is not cached (exit 2, no traceback), doctor's hub row
    R=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.warmup_steps=1
       logging.progress=false output.save_steps=5 output.dir="$OUT/r")
    "${R[@]}" training.max_steps=10 > "$OUT/r1.txt" 2>&1; echo "train: exit=$?"
    "${R[@]}" training.max_steps=14 training.learning_rate=1e-4 --resume auto > "$OUT/r2.txt" 2>&1
    echo "resume: exit=$?"; grep -E "^note: settings changed|^resuming" "$OUT/r2.txt" | cut -c1-200
    grep "^# Resumed" "$OUT/r/recipe.resolved.yaml"; rm -rf "$OUT/r/checkpoints" "$OUT/r/adapter"
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 model.name=unsloth/not-cached-model \
      output.dir="$OUT/hub" > "$OUT/hub.txt" 2>&1; echo "hub model: exit=$? traceback=$(grep -c Traceback "$OUT/hub.txt")"
    tail -3 "$OUT/hub.txt" | cut -c1-200
    HF_HUB_OFFLINE= TRANSFORMERS_OFFLINE= python3 -m unsloth_mgpu_cli doctor --json > "$OUT/doctor.json" 2>/dev/null
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
      print([(c['status'], c['value']) for c in d['checks'] if c['name'] == 'hugging face'])" "$OUT/doctor.json" ;;
  s19)
    # session 19 (1-GPU kind): the output changes on CUDA, piped as in a log: a run with evaluation and
    # logging.progress false (eval lines still printed), its resume (the summary's session/whole-run rows), the timed
    # export phases, the report; then the tier's 1-GPU tests and the 1B at 1 GPU against s17's figure
    R=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.warmup_steps=1
       dataset.eval_ratio=0.1 training.eval_steps=10 logging.progress=false output.save_steps=10 output.dir="$OUT/q")
    "${R[@]}" training.max_steps=20 > "$OUT/q1.txt" 2>&1; echo "train: exit=$?"
    grep -cE "eval" "$OUT/q1.txt" | sed 's/^/lines naming eval: /'; grep -E "checkpoint step-|^eval loss|^training" "$OUT/q1.txt"
    "${R[@]}" training.max_steps=30 --resume auto > "$OUT/q2.txt" 2>&1; echo "resume: exit=$?"
    grep -E "^steps|^tokens|^training|^throughput|^eval loss" "$OUT/q2.txt" | cut -c1-200
    python3 -m unsloth_mgpu_cli export "$OUT/q" --merged > "$OUT/export.txt" 2>&1; echo "export: exit=$?"
    cut -c1-160 "$OUT/export.txt" | tail -6
    python3 -m unsloth_mgpu_cli report "$OUT/q" > "$OUT/report.txt" 2>&1; echo "report: exit=$?"; head -4 "$OUT/report.txt"
    rm -rf "$OUT/q/merged" "$OUT/q/checkpoints"
    timeout -k 10 "${T:-230}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt"
    timeout 200 "${BENCH[@]}" --out "$OUT/a" --only ours --gpus 1 --budget-s 190 | tail -3
    cd "$OUT" && tar czf rest.tgz a q/logs; rm -rf a; exit 0 ;;
  s20)
    # session 20 (1-GPU kind): `kill -INT PID` twice to the launcher alone (the agent passes SIGINT on; it ended on
    # torch's SIGKILL 30 s later), and a double Ctrl-C to the whole group (no atexit traceback); a hub id from the HF
    # cache with downloads left on where the hub's name cannot resolve (hub.py), trained and exported on CUDA (the
    # adapter's save no longer asks the hub); then the tier's 1-GPU tests
    Q=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=3000
       training.warmup_steps=1 output.save_steps=50)
    for where in alone group; do
      setsid "${Q[@]}" output.dir="$OUT/int_$where" > "$OUT/int_$where.txt" 2>&1 & P=$!
      for i in $(seq 1 1800); do grep -q "^step 25/" "$OUT/int_$where.txt" 2>/dev/null && break; sleep 0.1; done
      s=$(date +%s.%N)
      if [ $where = alone ]; then kill -INT $P; sleep 0.05; kill -INT $P; else kill -INT -- -$P; sleep 0.05; kill -INT -- -$P; fi
      wait $P; rc=$?; echo "double SIGINT to the $where: exit=$rc after $(python3 -c "print(round($(date +%s.%N)-$s,2))") s"
      grep -cE "Traceback|Exception ignored" "$OUT/int_$where.txt" | sed 's/^/  traceback lines: /'
      grep -E "^stop requested|^interrupted|stopped at once" "$OUT/int_$where.txt" | cut -c1-160 | sed 's/^/  /'
      ls "$OUT/int_$where/checkpoints" | tr '\n' ' ' | sed 's/^/  checkpoints: /'; echo
      rm -rf "$OUT/int_$where/checkpoints"
    done
    python3 - "$OUT/hub" <<'PY'
import shutil, sys
from pathlib import Path
from unsloth_mgpu_cli.models import resolve_model_path
repo = Path(sys.argv[1]) / "models--someone--tiny"
shutil.copytree(resolve_model_path("builtin:tiny-llama"), repo / "snapshots" / "0123abcd")
(repo / "refs").mkdir(); (repo / "refs" / "main").write_text("0123abcd")
PY
    s=$(date +%s)
    env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE -u HF_DATASETS_OFFLINE HF_HUB_CACHE="$OUT/hub" \
      python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 model.name=someone/tiny \
      training.max_steps=5 training.warmup_steps=1 logging.progress=false output.dir="$OUT/hubrun" > "$OUT/hub.txt" 2>&1
    echo "hub id from the cache, downloads on: exit=$? in $(( $(date +%s)-s )) s"
    grep -E "^hub:|Retrying|Could not find a config" "$OUT/hub.txt" | sort | uniq -c | cut -c1-160
    env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE -u HF_DATASETS_OFFLINE HF_HUB_CACHE="$OUT/hub" \
      python3 -m unsloth_mgpu_cli export "$OUT/hubrun" > "$OUT/hubexport.txt" 2>&1
    echo "its export: exit=$?; retries: $(grep -c Retrying "$OUT/hubexport.txt")"; tail -1 "$OUT/hubexport.txt" | cut -c1-160
    rm -rf "$OUT/hub" "$OUT/hubrun"
    timeout -k 10 "${T:-230}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s22d)
    # session 22 (1-GPU kind): a chat run with dataset.system_prompt and `mgpu generate` on it (the prompt framed with
    # the run's template and system message), and NEFTune under fsdp with evaluation, on the quick start
    chat_data 256 "$OUT/chat.jsonl"
    Q=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 logging.progress=false)
    "${Q[@]}" dataset.path="$OUT/chat.jsonl" dataset.format=chat dataset.chat_template=chatml \
      "dataset.system_prompt=Answer briefly." training.max_steps=40 output.dir="$OUT/chat" > "$OUT/chat.txt" 2>&1
    echo "chat with a system prompt: exit=$?"; grep -E "^final loss" "$OUT/chat.txt"
    python3 -m unsloth_mgpu_cli generate "$OUT/chat" "Add the two numbers. 2 + 3" "Write the word in capital letters. fox" \
      --max-new-tokens 8 > "$OUT/gen.txt" 2> "$OUT/gen.err"; echo "generate: exit=$? replies: $(tr '\n' '|' < "$OUT/gen.txt")"
    python3 - "$OUT/chat" <<'PY'
import sys
from pathlib import Path
from unsloth_mgpu_cli.generate import GenerationArgs, load_run, prompt_ids
run = load_run(Path(sys.argv[1]), GenerationArgs())
print("  device", run.device, "| prompt:", repr(run.tokenizer.decode(prompt_ids(run, "Add the two numbers. 2 + 3", GenerationArgs()))))
PY
    "${Q[@]}" training.neftune_noise_alpha=5 distributed.strategy=fsdp dataset.eval_ratio=0.1 training.eval_steps=10 \
      training.max_steps=20 output.dir="$OUT/nf" > "$OUT/nf.txt" 2>&1
    echo "NEFTune under fsdp with evaluation: exit=$?"; grep -E "^final loss|^eval loss|strategy" "$OUT/nf.txt" | head -3
    rm -rf "$OUT"/*/checkpoints ;;
  s22c)
    # session 22 (1-GPU kind): lora.init_from on CUDA with QLoRA: the 1B's first stage (20 steps), a second stage from
    # its adapter at a frozen rate (the adapter must come back unchanged), and one that trains on (its first loss
    # near the first stage's last)
    build_1b
    B=("${ONE_B[@]}" logging.progress=false logging.steps=1 training.warmup_steps=0)
    "${B[@]}" training.max_steps=20 training.learning_rate=1e-3 output.dir="$OUT/one" > "$OUT/one.txt" 2>&1
    echo "stage 1: exit=$?"; grep -E "^final loss" "$OUT/one.txt"
    "${B[@]}" training.max_steps=3 training.learning_rate=1e-12 lora.init_from="$OUT/one" output.dir="$OUT/frozen" \
      > "$OUT/frozen.txt" 2>&1; echo "stage 2 at a frozen rate: exit=$?"
    "${B[@]}" training.max_steps=10 training.learning_rate=1e-3 training.seed=7 lora.init_from="$OUT/one" \
      output.dir="$OUT/two" > "$OUT/two.txt" 2>&1; echo "stage 2 training on: exit=$?"
    python3 - "$OUT" <<'PY'
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1])
a, b = (load_file(str(out / r / "adapter" / "adapter_model.safetensors")) for r in ("one", "frozen"))
print("frozen stage 2 == stage 1's adapter: largest difference", max(float((a[k].float() - b[k].float()).abs().max()) for k in a),
      "| largest B value", round(max(float(a[k].abs().max()) for k in a if "lora_B" in k), 4))
loss = lambda r: [json.loads(l)["loss"] for l in open(out / r / "metrics.jsonl")]
print("stage 1 losses: first", round(loss("one")[0], 4), "last", round(loss("one")[-1], 4),
      "| stage 2 (another seed: other samples): first", round(loss("two")[0], 4), "last", round(loss("two")[-1], 4))
PY
    rm -rf "$OUT"/*/checkpoints ;;
  s27)
    # session 27: a small model of each family the shipped recipes cover (Llama 2-style, Mistral, Qwen2, Gemma 2;
    # 8 layers, hidden 1024), QLoRA on one GPU for 30 steps, then its GGUF export (benchmarks/families_gpu.py)
    timeout 560 python3 benchmarks/families_gpu.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --out "$OUT/families"
    rm -rf "$OUT"/families/models "$OUT"/families/*/gguf "$OUT"/families/*/adapter "$OUT"/families/*/checkpoints ;;
  s27b)
    # session 27: s27's Gemma 2 failed in Unsloth's block compile (InductorError: AssertionError) and the three
    # other families trained. Its traceback (QLoRA, balanced batching); 16-bit LoRA; padded batching; Unsloth's block
    # compile off; Unsloth's own route (TRL padding-free) on the same model
    F=(python3 benchmarks/families_gpu.py --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --families gemma2 --steps 10)
    timeout 130 "${F[@]}" --out "$OUT/a"
    timeout 110 "${F[@]}" --out "$OUT/b" --set model.load_in_4bit=false | head -1
    timeout 110 "${F[@]}" --out "$OUT/c" --set dataset.batching=padded | head -1
    UNSLOTH_BLOCK_COMPILE=0 timeout 110 "${F[@]}" --out "$OUT/d" | head -1
    timeout 120 python3 benchmarks/trl_baseline.py --model "$OUT/a/models/gemma2-base" --steps 10 --micro-batch 16 \
      --data "$PWD/gpu-data/gsm8k_train_alpaca.json" --out "$OUT/trl" > "$OUT/trl.txt" 2>&1
    echo "trl: exit=$?"; grep -E "Error|error" "$OUT/trl.txt" | tail -5
    rm -rf "$OUT"/*/models "$OUT"/*/gemma2 "$OUT"/trl ;;
  s26c)
    # session 26: the data tokenised beside the workers' start (datagate.py) on a cold data cache, as every benchmark
    # run is: time to first step of ours, ours as before (49cce68's engine, trainer, data, render from
    # gpu-data/old26c: tokenised first), ours again; the 1B, the kernel, 20 steps
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    build_1b
    new_old_new old26c env "${SHIM[@]}" "${BENCH[@]}" --steps 20 --only ours --gpus 1 --budget-s 150 ;;
  s26b)
    # session 26, also at 2dcd439: s26 found no gain on the 1B (its head has 24,911 rows: ~5% of the matrix work).
    # The same pair on the 1B with Llama-3.2-1B's real head (128,256 rows): ours, ours with the whole head, ours again
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    new_old_new old26 env "${SHIM[@]}" "${BENCH[@]}" --sizes 1b-v128k --only ours --gpus 1 --budget-s 130 ;;
  s26)
    # session 26: lm_head and the loss on the labelled positions only (head.py, commit 2dcd439; not kept: no gain). Run
    # at 2dcd439 (gpu-data/old26/trainer.py: 49cce68's). Its GPU test without and with the
    # variable-length kernel; then side by side, all with the kernel: ours, ours with the whole head (HEAD's
    # trainer.py from gpu-data/old26), ours again (the pair's noise)
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    for m in plain varlen; do
      E=(); [ $m = varlen ] && E=("${SHIM[@]}")
      env "${E[@]}" timeout -k 10 120 python3 -m pytest -q -rP -m gpu tests/test_gpu.py -k "labelled_head" \
        > "$OUT/gputest-$m.txt" 2>&1; echo "$m: pytest exit=$?"; grep -hE "^\{|passed|failed|Error" "$OUT/gputest-$m.txt" | head -4
    done
    build_1b
    new_old_new old26 env "${SHIM[@]}" "${BENCH[@]}" --only ours --gpus 1 --budget-s 120 ;;
  s25)
    # session 25: packed rows carry their sample lengths on the host (packed_seq_lengths, as TRL's padding-free
    # collator gives them). Its GPU test without and with the variable-length kernel (benchmarks/varlen_gqa); then the
    # torch profiler over steps 14-16 of ours (auto: packed) and of TRL padding-free, both with the kernel.
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    for m in plain varlen; do
      E=(); [ $m = varlen ] && E=("${SHIM[@]}")
      env "${E[@]}" timeout -k 10 120 python3 -m pytest -q -rP -m gpu tests/test_gpu.py -k "sample_lengths or batching_auto" \
        > "$OUT/gputest-$m.txt" 2>&1; echo "$m: pytest exit=$?"; grep -hE "^\{|route|passed|failed" "$OUT/gputest-$m.txt" | head -4
    done
    build_1b
    for r in ours trl-pf; do
      env "${SHIM[@]}" MGPU_PROFILE="$OUT/prof-$r:14:16" "${BENCH[@]}" --steps 16 --warmup 8 --out "$OUT/$r" --only $r \
        --gpus 1 --budget-s 170 | tail -2
      head -1 "$OUT/prof-$r"/profile-rank0.txt
    done ;;
  s25b)
    # session 25: side by side, all with the kernel: ours with the host-side lengths, ours as before (session 24's
    # trainer.py and data.py, from gpu-data/old), TRL padding-free; then ours with one micro-batch of 128 per step
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    build_1b
    env "${SHIM[@]}" "${BENCH[@]}" --out "$OUT/new" --only ours,trl-pf --gpus 1 --budget-s 240 | tail -4
    cp unsloth_mgpu_cli/data.py unsloth_mgpu_cli/trainer.py /tmp/ && cp gpu-data/old/*.py unsloth_mgpu_cli/
    env "${SHIM[@]}" "${BENCH[@]}" --out "$OUT/old" --only ours --gpus 1 --budget-s 120 | tail -3
    cp /tmp/data.py /tmp/trainer.py unsloth_mgpu_cli/
    env "${SHIM[@]}" "${BENCH[@]}" --micro-batch 128 --out "$OUT/mb128" --only ours --gpus 1 --budget-s 120 | tail -3 ;;
  s24d)
    # #11 on 2 GPUs with the variable-length kernel on both sides (benchmarks/varlen_gqa: torch 2.11's varlen_attn
    # given enable_gqa): ours (auto: packed) and TRL padding-free, 2 then 1 GPU, one call (~8 min)
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    env "${SHIM[@]}" "${BENCH[@]}" --out "$OUT/a" --only ours,trl-pf --gpus 2,1 --budget-s 520 | tail -8 ;;
  s24e)
    # after s24d, the same lease: TRL padding-free on 1 GPU at its faster micro-batch (128 x 1; session 25: 81,491
    # against 61,543 at 64 x 2), the fair 1-GPU reference for ours, which packs a 64 x 2 step into one row anyway
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    env "${SHIM[@]}" "${BENCH[@]}" --micro-batch 128 --out "$OUT/a" --only trl-pf --gpus 1 --budget-s 200 | tail -4 ;;
  s24c)
    # session 24: dataset.batching auto (varlen.py) on CUDA. Its GPU test, on this image (torch 2.11: no kernel,
    # Unsloth attends per sample) and with benchmarks/varlen_gqa (torch varlen_attn with enable_gqa); an explicit
    # packed run here (the warning); then, side by side with the same measurement (30 steps, steady after 10), ours
    # with auto, ours balanced and TRL padding-free, all with the varlen kernel.
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    for m in plain varlen; do
      E=(); [ $m = varlen ] && E=("${SHIM[@]}")
      env "${E[@]}" timeout -k 10 150 python3 -m pytest -q -rP -m gpu tests/test_gpu.py -k batching_auto \
        > "$OUT/gputest-$m.txt" 2>&1; echo "$m: pytest exit=$?"; grep -h "route" "$OUT/gputest-$m.txt"
    done
    build_1b
    "${ONE_B[@]}" training.max_steps=3 training.warmup_steps=0 logging.progress=false dataset.batching=packed \
      output.dir="$OUT/warn" \
      > "$OUT/warn.txt" 2>&1; echo "explicit packed: exit=$?"; grep -E "warning|^auto" "$OUT/warn.txt"
    env "${SHIM[@]}" "${BENCH[@]}" --out "$OUT/side" --only ours,ours-balanced,trl-pf --gpus 1 --budget-s 330 | tail -6
    grep -h "auto: dataset.batching" /tmp/mgpu-bench/ours-1b-1gpu/*.log "$OUT"/side/logs/*.log 2>/dev/null | head -2 ;;
  s24b)
    # session 24: s24 showed Unsloth attending per sample in a packed row here (no flash-attn; xformers 0.0.35 cannot
    # load with torch 2.11; torch 2.11's varlen_attn lacks enable_gqa). The same runs with varlen_attn given the keyword
    # (benchmarks/varlen_gqa, K/V heads repeated): ours packed with and without it, TRL padding-free with it (its
    # earlier 1-GPU figure, 11,413 tokens/s in session 3, ran per sample too)
    build_1b
    B=("${ONE_B[@]}" training.max_steps=16 logging.progress=false logging.steps=1 dataset.batching=packed)
    SHIM=(MGPU_BENCH_VARLEN_GQA=1 UNSLOTH_LEAN_VARLEN=0 PYTHONPATH="$PWD/benchmarks/varlen_gqa:$PYTHONPATH")
    for m in packed-varlen packed; do
      E=(); [ $m = packed-varlen ] && E=("${SHIM[@]}")
      s=$(date +%s); env "${E[@]}" "${B[@]}" output.dir="$OUT/$m" > "$OUT/$m.txt" 2>&1
      echo "$m: exit=$? in $(( $(date +%s)-s )) s"; grep -E "^throughput|^final loss|^peak memory|^step time" "$OUT/$m.txt"
    done
    env "${SHIM[@]}" "${BENCH[@]}" --out "$OUT/trl" --only trl-pf --gpus 1 --budget-s 200 | tail -3 ;;
  s24)
    # session 24 (1-GPU kind): why packed rows run at 0.43 x balanced (s22b). Which attention route Unsloth takes for a
    # packed row on this image (torch 2.11: no torch varlen with enable_gqa; xformers 0.0.35 from .whl), then the 1B
    # balanced, packed (profiled over steps 8-9), and packed with UNSLOTH_SDPA_PACKED_SEGMENTS=0 (Unsloth's other route)
    python3 benchmarks/attention_probe.py > "$OUT/probe.txt" 2>&1; echo "probe exit=$?"; cat "$OUT/probe.txt" | tail -12
    build_1b
    B=("${ONE_B[@]}" training.max_steps=16 logging.progress=false logging.steps=1)
    for m in balanced packed packed-nosegments; do
      E=(); X=(dataset.batching=packed)
      [ $m = balanced ] && X=()
      [ $m = packed ] && E=(MGPU_PROFILE="$OUT/prof:8:9")
      [ $m = packed-nosegments ] && E=(UNSLOTH_SDPA_PACKED_SEGMENTS=0)
      s=$(date +%s); env "${E[@]}" "${B[@]}" "${X[@]}" output.dir="$OUT/$m" > "$OUT/$m.txt" 2>&1
      echo "$m: exit=$? in $(( $(date +%s)-s )) s"; grep -E "^throughput|^final loss|^peak memory|^step time" "$OUT/$m.txt"
    done
    ls "$OUT/prof" 2>/dev/null && head -30 "$OUT"/prof/*.txt 2>/dev/null ;;
  s22b)
    # session 22 (1-GPU kind): lora.loraplus_lr_ratio on the 1B with adamw_8bit (two parameter groups, each its own
    # runs of the flat buckets: the update's time against s22's 2 ms), with training.adam_beta2; then NEFTune on
    # packed rows (a row holds many samples: each gets its own noise)
    build_1b
    B=("${ONE_B[@]}" training.max_steps=30 logging.progress=false logging.steps=1)
    for m in loraplus packed; do
      X=(lora.loraplus_lr_ratio=16 training.adam_beta2=0.95)
      [ $m = packed ] && X=(dataset.batching=packed training.neftune_noise_alpha=5)
      s=$(date +%s); "${B[@]}" "${X[@]}" output.dir="$OUT/$m" > "$OUT/$m.txt" 2>&1
      echo "$m: exit=$? in $(( $(date +%s)-s )) s"; grep -E "^throughput|^final loss|^peak memory|^step time" "$OUT/$m.txt"
      python3 -c "import json; s = json.load(open('$OUT/$m/summary.json')); print('  optimizer_flat', s.get('optimizer_flat'))"
    done
    rm -rf "$OUT/loraplus/checkpoints" "$OUT/packed/checkpoints" ;;
  s22)
    # session 22 (1-GPU kind): training.neftune_noise_alpha on CUDA: the 1B (QLoRA, GSM8K, global batch 128 as 2 x 64)
    # for 30 steps without and with NEFTune (tokens/s: the per-sample noise's cost; loss), the second run with the
    # warmup_stable_decay schedule; the noise of a sample alone and inside a packed row on CUDA; `mgpu generate` on
    # the 1B run; then the quick start with fractional epochs, and with DoRA under fsdp
    build_1b
    B=("${ONE_B[@]}" training.max_steps=30 logging.progress=false logging.steps=1)
    for m in plain neftune; do
      X=(); [ $m = neftune ] && X=(training.neftune_noise_alpha=5 training.lr_scheduler=warmup_stable_decay
        training.decay_ratio=0.2 training.min_lr_ratio=0.1)
      s=$(date +%s); "${B[@]}" "${X[@]}" output.dir="$OUT/$m" > "$OUT/$m.txt" 2>&1
      echo "$m: exit=$? in $(( $(date +%s)-s )) s"; grep -E "^throughput|^final loss|^peak memory|^step time" "$OUT/$m.txt"
      python3 -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; \
print('  learning rate at steps 1, 5, 24, 25, 30:', [round(r[i - 1]['learning_rate'], 7) for i in (1, 5, 24, 25, 30)])" "$OUT/$m/metrics.jsonl"
    done
    python3 - <<'PY'
import torch
from unsloth_mgpu_cli.neftune import NoisyEmbeddings, packed_layout, padded_layout
n, lengths = NoisyEmbeddings(5.0, 42), [37, 120, 64]
with n.batch(7, padded_layout([1], lengths)):
    alone = n.noise((1, 120, 2048), "cuda")[0]
with n.batch(7, packed_layout([0, 2, 1], lengths)):
    packed = n.noise((1, 221, 2048), "cuda")[0, 101:221]
print("NEFTune on CUDA: sample 1 alone == inside a packed row:", torch.equal(alone, packed),
      "| max", round(float(alone.abs().max()), 5), "<= bound", round(5.0 / (120 * 2048) ** 0.5, 5))
PY
    s=$(date +%s); python3 -m unsloth_mgpu_cli generate "$OUT/neftune" "Natalia sold clips to 48 of her friends in April, \
and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?" \
      --max-new-tokens 24 > "$OUT/generate.txt" 2> "$OUT/generate.err"
    echo "generate on the 1B run: exit=$? in $(( $(date +%s)-s )) s; reply: $(head -c 160 "$OUT/generate.txt" | tr '\n' ' ')"
    tail -2 "$OUT/generate.err" | cut -c1-200
    rm -rf "$OUT/plain/checkpoints" "$OUT/neftune/checkpoints"
    Q=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 logging.progress=false)
    "${Q[@]}" training.max_steps=null training.epochs=1.5 output.dir="$OUT/epochs" > "$OUT/epochs.txt" 2>&1
    echo "quick start, epochs 1.5: exit=$?"; grep -E "^steps|^final loss|^length|epochs" "$OUT/epochs.txt" | head -4 | cut -c1-160
    python3 -c "import json; s = json.load(open('$OUT/epochs/summary.json')); print('  steps', s['steps'])"
    "${Q[@]}" training.max_steps=20 lora.use_dora=true distributed.strategy=fsdp output.dir="$OUT/dorafsdp" \
      > "$OUT/dorafsdp.txt" 2>&1
    echo "quick start, DoRA under fsdp: exit=$?"; grep -E "^final loss|^peak memory|strategy" "$OUT/dorafsdp.txt" | head -3
    python3 -m unsloth_mgpu_cli generate "$OUT/dorafsdp" "Write the word in capital letters." --input fox \
      --max-new-tokens 8 > "$OUT/gen2.txt" 2>&1; echo "generate on the DoRA run: exit=$?"
    rm -rf "$OUT/epochs/checkpoints" "$OUT/dorafsdp/checkpoints" ;;
  s21)
    # session 21 (1-GPU kind): lora.use_dora, training.warmup_ratio and training.min_lr_ratio on CUDA: the 1B (QLoRA,
    # GSM8K, global batch 128 as 2 x 64) for 30 steps with LoRA and with DoRA (tokens/s, loss, the learning rate's
    # warmup and floor), the DoRA adapter's merged export; then the quick start with DoRA in 16-bit
    build_1b
    B=("${ONE_B[@]}" training.max_steps=30 training.warmup_steps=0 training.warmup_ratio=0.1
       training.min_lr_ratio=0.1 logging.progress=false logging.steps=1)
    for m in lora dora; do
      s=$(date +%s)
      "${B[@]}" lora.use_dora=$([ $m = dora ] && echo true || echo false) output.dir="$OUT/$m" > "$OUT/$m.txt" 2>&1
      echo "$m: exit=$? in $(( $(date +%s)-s )) s"; grep -E "^throughput|^final loss|^peak memory|^step time" "$OUT/$m.txt"
      python3 -c "import json, sys; r = [json.loads(l) for l in open(sys.argv[1])]; \
print('  learning rate logged at steps 1, 3, 4, 30:', [r[i - 1]['learning_rate'] for i in (1, 3, 4, 30)])" "$OUT/$m/metrics.jsonl"
    done
    s=$(date +%s); python3 -m unsloth_mgpu_cli export "$OUT/dora" --merged > "$OUT/export.txt" 2>&1
    echo "DoRA export --merged: exit=$? in $(( $(date +%s)-s )) s"; tail -1 "$OUT/export.txt" | cut -c1-200
    rm -rf "$OUT/dora/merged" "$OUT/lora/checkpoints" "$OUT/dora/checkpoints"
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=20 \
      lora.use_dora=true training.warmup_steps=0 training.warmup_ratio=0.1 logging.progress=false \
      output.dir="$OUT/q" > "$OUT/q.txt" 2>&1
    echo "quick start with DoRA, 16-bit: exit=$?"; grep -E "^final loss|^peak memory|^throughput" "$OUT/q.txt"
    rm -rf "$OUT/q/checkpoints" ;;
  s21c)
    # session 21 (1-GPU kind): output.keep_best on CUDA: eval on rows unlike the training data (lowest at an early
    # evaluation), the final adapter equal to best/ and to that step's checkpoint
    python3 - "$OUT/noise.jsonl" <<'PY'
import json, random, sys
rng = random.Random(0)
words = lambda n: " ".join("".join(rng.choice("qxzjkvw") for _ in range(rng.randint(2, 7))) for _ in range(n))
open(sys.argv[1], "w").write("".join(json.dumps({"instruction": words(8), "input": "", "output": words(12)}) + "\n" for _ in range(16)))
PY
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=20 \
      training.warmup_steps=0 training.lr_scheduler=constant training.learning_rate=0.01 \
      dataset.eval_path="$OUT/noise.jsonl" training.eval_steps=2 output.keep_best=true output.save_steps=2 \
      output.save_total_limit=null logging.progress=false output.dir="$OUT/best" > "$OUT/best.txt" 2>&1
    echo "keep_best: exit=$?"; grep -E "^eval step|^eval loss|^weights" "$OUT/best.txt" | cut -c1-160
    python3 - "$OUT/best" <<'PY'
import json, sys, torch
from pathlib import Path
from safetensors.torch import load_file
out = Path(sys.argv[1]); s = json.loads((out / "summary.json").read_text())
final = load_file(str(out / "adapter" / "adapter_model.safetensors"))
best = load_file(str(out / "best" / "adapter_model.safetensors"))
ck = load_file(str(out / "checkpoints" / f"step-{s['final_weights_step']}" / "trainable.safetensors"))
ck = {k.replace(".default.", "."): v for k, v in ck.items()}
print("final_weights_step", s["final_weights_step"], "of", s["steps"], "| adapter == best/:",
      all(torch.equal(final[k], best[k]) for k in final), "| == its checkpoint:", all(torch.equal(final[k], ck[k]) for k in final))
PY
    rm -rf "$OUT/best/checkpoints" ;;
  s21b)
    # session 21's final code (1-GPU kind): early stopping on CUDA (a threshold no evaluation beats: patience 2 ends
    # the run at its third evaluation, step 6), its resume with nothing to do; then the tier's 1-GPU tests
    E=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=40
       training.warmup_steps=1 dataset.eval_ratio=0.1 training.eval_steps=2 training.early_stopping_patience=2
       training.early_stopping_threshold=100 logging.progress=false output.dir="$OUT/early")
    "${E[@]}" > "$OUT/early.txt" 2>&1; echo "early stopping: exit=$?"
    grep -E "^early stop|^steps|^eval loss" "$OUT/early.txt" | cut -c1-200
    "${E[@]}" --resume auto > "$OUT/early2.txt" 2>&1; echo "its resume: exit=$?"; grep -E "^nothing to do" "$OUT/early2.txt" | cut -c1-160
    rm -rf "$OUT/early/checkpoints"
    timeout -k 10 "${T:-300}" python3 -m pytest -q -m gpu tests/test_gpu.py > "$OUT/pytest-gpu.txt" 2>&1
    echo "pytest -m gpu exit=$?"; tail -3 "$OUT/pytest-gpu.txt" ;;
  s20b)
    # session 20's review (1-GPU kind): the adapter's save on CUDA with the final code: a chat run with
    # dataset.chat_template: chatml saves that template with the adapter and the export
    chat_data 128 "$OUT/chat.jsonl"
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=10 \
      training.warmup_steps=1 logging.progress=false dataset.path="$OUT/chat.jsonl" dataset.format=chat \
      dataset.chat_template=chatml output.dir="$OUT/chat" > "$OUT/chat.txt" 2>&1
    echo "chat run: exit=$?"; grep -E "^final loss|^peak memory|^throughput" "$OUT/chat.txt"
    python3 -m unsloth_mgpu_cli export "$OUT/chat" > "$OUT/export.txt" 2>&1; echo "export: exit=$?"
    for d in adapter merged; do
      python3 -c "import sys; from transformers import AutoTokenizer; from unsloth_mgpu_cli.data import NAMED_CHAT_TEMPLATES as T; \
print(sys.argv[1], 'template is chatml:', AutoTokenizer.from_pretrained(sys.argv[2]).chat_template == T['chatml'])" $d "$OUT/chat/$d"
    done
    rm -rf "$OUT/chat/merged" "$OUT/chat/checkpoints" ;;
  s18)
    # session 18 (1-GPU kind): Ctrl-C while the worker imports torch, before its handlers exist (the launcher now
    # starts the workers with the stop signals held; torch 2.11 here, 2.14 on CPU): exit 130, no traceback, no model
    # load. Then, in the same call: `stops` and `gputest` (the other worker changes: resume identity, early stop)
    python3 - "$OUT" <<'PY'
import os, signal, subprocess, sys, time
import psutil
out = sys.argv[1]
for delay in (0.2, 1.5):
    cmd = [sys.executable, "-m", "unsloth_mgpu_cli", "train", "recipes/quickstart.yaml", "distributed.num_gpus=1",
           "logging.progress=false", f"output.dir={out}/early"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    t0 = time.monotonic()
    def started():
        try:
            return any("spawn_main" in " ".join(c.cmdline()) for c in psutil.Process(p.pid).children(recursive=True))
        except psutil.Error:
            return False
    while not started() and p.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    time.sleep(delay)
    os.killpg(p.pid, signal.SIGINT)
    sent = time.monotonic()
    text, _ = p.communicate(timeout=120)
    bad = "Traceback" in text or "KeyboardInterrupt" in text
    print(f"Ctrl-C {delay} s after the worker started: exit={p.returncode} after {time.monotonic() - sent:.1f} s, "
          f"traceback={bad}, model loaded={'LlamaForCausalLM' in text}")
    print("  " + text.strip().splitlines()[-1][:220])
    if bad:
        print(text[-3000:])
    subprocess.run(["rm", "-rf", f"{out}/early"])
PY
    ;;
  s17)
    # session 17 (1-GPU kind): the Python API's fixes on CUDA (hook mode: the launch's GPU memory passed to the
    # worker's get_optimal_config, the settings check before the first step; direct mode's end-of-data and batch
    # checks), doctor's disk checks, the run summary and report, then the 1B at 1 GPU (the 8-bit AdamW now in its
    # own module) against s16's 69,261 tokens/s
    python3 examples/advanced_config.py > "$OUT/advanced.txt" 2>&1; echo "advanced_config: exit=$?"
    grep -E "^devices|optimal config|^trained" "$OUT/advanced.txt" | cut -c1-500
    python3 examples/direct_trainer_usage.py --num-gpus 1 > "$OUT/direct.txt" 2>&1; echo "direct: exit=$?"
    tail -2 "$OUT/direct.txt" | cut -c1-300
    python3 -m unsloth_mgpu_cli doctor > "$OUT/doctor.txt" 2>&1; echo "doctor: exit=$?"; grep "disk:" "$OUT/doctor.txt"
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=20 \
      training.warmup_steps=1 logging.progress=false output.save_steps=0 output.dir="$OUT/q" > "$OUT/q.txt" 2>&1
    echo "quickstart: exit=$?"; grep -A1 "^throughput" "$OUT/q.txt"
    python3 -m unsloth_mgpu_cli report "$OUT/q" > "$OUT/report.txt" 2>&1; echo "report: exit=$?"
    grep -A1 "tokens/s" "$OUT/report.txt"; rm -rf "$OUT/q"
    timeout 200 "${BENCH[@]}" --out "$OUT/a" --only ours --gpus 1 --budget-s 190 | tail -3
    cd "$OUT" && tar czf rest.tgz a; rm -rf a; exit 0 ;;
  s16b)
    # Unsloth's own route on the 8B at 1 GPU (the row missing next to s6c's 2-GPU TRL runs), both modes, 10 steps,
    # steady after 4: micro-batch 16 x 8 accumulation = the same global batch 128
    timeout 550 "${BENCH[@]}" --sizes 8b --micro-batch 16 --steps 10 --warmup 4 --timeout 230 --min-run-s 90 \
      --out "$OUT/t" --only trl-pack,trl-pf --gpus 1 --budget-s 540 | tail -5
    cd "$OUT" && tar czf rest.tgz t; rm -rf t; exit 0 ;;
  s16)
    # session 16 (1-GPU kind): the loop split into methods (trainer.py) and the probe's workers pinned as training's
    # are. `mgpu doctor --probe`, then s15's checks (the quick start's exit; the 1B at 1 GPU against 71,085 tokens/s)
    python3 -m unsloth_mgpu_cli doctor --probe --json > "$OUT/doctor.json" 2> "$OUT/doctor.err"
    echo "doctor --probe: exit=$?"; python3 -c "import json,sys; d=json.load(open(sys.argv[1])); \
      print(d['summary'], {k: d['probe'].get(k) for k in ('ok', 'backend', 'world_size', 'busbw_gbps')})" \
      "$OUT/doctor.json" || tail -5 "$OUT/doctor.err"
    OUT=${OUT%/s16} exec bash "$0" s15 ;;
  s15)
    # session 15 (1-GPU kind): workers and the launcher freeze the garbage collector before they exit. On CUDA: a
    # short run still exits 0, and the seconds from its summary.json to the process's end; then the 1B at 1 GPU
    # against s13's 71,538 tokens/s (sessions 14-15 changed the loop's metrics and the exit)
    s=$(date +%s.%N)
    python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=20 \
      training.warmup_steps=1 logging.progress=false output.save_steps=0 output.dir="$OUT/q" > "$OUT/q.txt" 2>&1
    rc=$?; e=$(date +%s.%N)
    python3 -c "import os,sys; s,e,f=float(sys.argv[1]),float(sys.argv[2]),sys.argv[3]; m=os.stat(f).st_mtime; \
      print(f'quickstart: exit={sys.argv[4]} run {e-s:.1f} s, summary.json to exit {e-m:.2f} s')" \
      "$s" "$e" "$OUT/q/summary.json" "$rc"
    grep -E "^start-up|^throughput" "$OUT/q.txt"; rm -rf "$OUT/q"
    timeout 200 "${BENCH[@]}" --out "$OUT/a" --only ours --gpus 1 --budget-s 190 | tail -3
    cd "$OUT" && tar czf rest.tgz a; rm -rf a; exit 0 ;;
  outputs)
    # session 12's output safety on CUDA (1 GPU): --overwrite over an earlier run, the export's marker, modes that
    # other users can read, and an export refused over a folder it did not write
    R=(python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml distributed.num_gpus=1 training.max_steps=6
       training.warmup_steps=1 logging.progress=false output.save_steps=3 output.dir="$OUT/run")
    "${R[@]}" > "$OUT/train1.txt" 2>&1; echo "train: exit=$?"
    "${R[@]}" --overwrite > "$OUT/train2.txt" 2>&1; echo "train --overwrite: exit=$?"; tail -1 "$OUT/train2.txt"
    python3 -m unsloth_mgpu_cli export "$OUT/run" --merged > "$OUT/export.txt" 2>&1; echo "export: exit=$?"
    tail -1 "$OUT/export.txt"; echo "umask $(umask)"
    stat -c '%a %n' "$OUT"/run/adapter "$OUT"/run/adapter/* "$OUT"/run/checkpoints/* "$OUT"/run/merged "$OUT"/run/merged/* \
      "$OUT/run/merged/.mgpu-export.json" | sed "s#$OUT/##"
    mkdir -p "$OUT/precious" && echo keep > "$OUT/precious/x.txt"
    python3 -m unsloth_mgpu_cli export "$OUT/run" --merged --output "$OUT/precious" > "$OUT/export2.txt" 2>&1
    echo "export over a folder it did not write: exit=$? (2 expected), x.txt: $(cat "$OUT/precious/x.txt")"
    rm -rf "$OUT/run/merged" "$OUT/run/checkpoints" ;;
  *) echo "unknown stage $STAGE"; exit 2 ;;
esac
cd "$OUT" && if compgen -G "*/logs" > /dev/null; then tar czf logs.tgz */logs && rm -rf */logs; fi
