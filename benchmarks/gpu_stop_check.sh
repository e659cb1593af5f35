#!/bin/bash
# Stops of a 1-GPU run on CUDA (run by `benchmarks/gpu_plan.sh stops`; also on CPU with EXTRA=distributed.device=cpu).
# SIGNALS=2: a worker stuck where Python's signal handlers cannot run (fault `stuck`, step 4): the second Ctrl-C
# must end the run within ~3 s. SIGNALS=1 FAULT=sleep:rank=0:step=4:seconds=4: one Ctrl-C, a checkpoint, exit 130.
O=$OUT/stop${SIGNALS:-2}; mkdir -p $O
FAULT=${FAULT:-stuck:rank=0:step=4:seconds=600}
MGPU_INJECT_FAULT=$FAULT setsid python3 -m unsloth_mgpu_cli train recipes/quickstart.yaml ${EXTRA:-} \
  distributed.num_gpus=1 training.max_steps=10 training.warmup_steps=1 logging.progress=false output.save_steps=0 \
  output.dir=$O/run > $O/out.txt 2>&1 &
P=$!
for i in $(seq 1 900); do grep -q '"step": 2' $O/run/metrics.jsonl 2>/dev/null && break; sleep 0.2; done
kill -INT -- -$P
if [ "${SIGNALS:-2}" = 2 ]; then sleep 2; kill -INT -- -$P; fi
t0=$(date +%s.%N); wait $P; rc=$?
echo "stop check (${SIGNALS:-2} signals): rc=$rc seconds_after_last=$(python3 -c "print(round($(date +%s.%N) - $t0, 1))")"
grep -v "^\s*$" $O/out.txt | tail -4 | cut -c1-220; ls $O/run/checkpoints 2>/dev/null
for s in 0 2 5 10; do sleep $s; echo "after +$s s:"; ps -o pid,ppid,stat,etimes,cmd -g $P | cut -c1-150; done
