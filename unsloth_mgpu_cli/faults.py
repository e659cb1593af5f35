"""Fault injection for tests of the failure paths (an edge, like a failing disk; never the math).

`MGPU_INJECT_FAULT="kind:rank=R:step=S[:until=T][:opt=V]"` (several separated by ';') makes rank R misbehave
at step S (through step T when `until` is given):
  perturb   - add 1e-3 to one trainable weight before the optimizer step (replicas drift)
  nan       - make the loss non-finite
  raise     - raise RuntimeError("injected failure")
  exit      - hard exit (os._exit(17)), like a crashed worker
  sigkill   - the worker kills itself with SIGKILL mid-step (OOM killer, `kill -9`)
  sleep     - stop making progress for `seconds` (default 3600): a hang
  stuck     - like sleep, with SIGINT/SIGTERM blocked in the main thread: a rank stuck in C++ (a collective, a GPU
              sync), where Python's signal handlers cannot run
  stop      - a stop request, as a first SIGTERM or Ctrl-C makes it (save at the step's end, exit)
  oom       - raise torch.OutOfMemoryError at the forward of any micro-batch of more than `above`
              samples (default 1), as CUDA does when activations do not fit
  slow      - wait `us` microseconds (default 100) per token of each micro-batch (padding included) at its
              forward: a device that runs slower than the others (a GPU held back by its power cap)
  slow_eval - the evaluation after step S takes `seconds` (default 1) longer: a long evaluation
An `attempt=A` option limits a fault to one attempt of an elastic run (0: before any restart), so that
`exit:rank=1:step=4:attempt=0` crashes once and lets the restarted workers finish.
Unset in normal runs: then `maybe_inject` is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

_PARSED: list[dict[str, Any]] | None = None


def _faults() -> list[dict[str, Any]]:
    global _PARSED
    if _PARSED is None:
        _PARSED = []
        for spec in filter(None, os.environ.get("MGPU_INJECT_FAULT", "").split(";")):
            kind, *opts = spec.split(":")
            d: dict[str, Any] = {"kind": kind, "rank": 0, "step": 1}
            for opt in opts:
                k, _, v = opt.partition("=")
                d[k] = int(v) if v.lstrip("-").isdigit() else v
            _PARSED.append(d)
    return _PARSED


def maybe_inject(point: str, trainer: Any, **kw: Any) -> None:
    """Apply any fault meant for this rank, step and point of the loop."""
    faults = _faults()
    if not faults:
        return
    # at "step_end" and "evaluate" the step counter has already advanced; elsewhere the step in progress is the one
    # being queued (the loop queues a step before it settles the previous one: `Trainer.launching`)
    current = trainer.step if point in ("step_end", "evaluate") else getattr(trainer, "launching", trainer.step + 1)
    for f in faults:
        if f["rank"] != trainer.info.rank or not f["step"] <= current <= f.get("until", f["step"]):
            continue
        if "attempt" in f and f["attempt"] != getattr(trainer.info, "restart_count", 0):
            continue
        kind = f["kind"]
        if kind == "nan" and point == "loss":
            kw["loss"].data.fill_(float("nan"))
        elif kind == "perturb" and point == "before_optimizer_step":
            import torch

            with torch.no_grad():
                trainer.params[0].view(-1)[0] += 1e-3
        elif kind == "raise" and point == "before_optimizer_step":
            raise RuntimeError(f"injected failure on rank {trainer.info.rank} at step {current}")
        elif kind == "exit" and point == "before_optimizer_step":
            os._exit(17)
        elif kind == "sigkill" and point == "loss":
            os.kill(os.getpid(), signal.SIGKILL)
        elif kind == "sleep" and point == "before_optimizer_step":
            time.sleep(float(f.get("seconds", 3600)))
        elif kind == "stuck" and point == "before_optimizer_step":
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
            time.sleep(float(f.get("seconds", 3600)))
        elif kind == "stop" and point == "forward" and trainer.stop is not None:
            trainer.stop.count = max(trainer.stop.count, 1)  # what StopSignal's handler records
        elif kind == "slow_eval" and point == "evaluate":
            time.sleep(float(f.get("seconds", 1)))
        elif kind == "slow" and point == "forward":
            time.sleep(kw["tokens"] * float(f.get("us", 100)) * 1e-6)
        elif kind == "oom" and point == "forward" and kw["samples"] > int(f.get("above", 1)):
            import torch

            raise torch.OutOfMemoryError(
                f"CUDA out of memory (injected on rank {trainer.info.rank} at step {current}, "
                f"micro-batch of {kw['samples']} samples)"
            )
