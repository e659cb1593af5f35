"""Benchmarks: `mgpu train` next to Unsloth's own multi-GPU route (TRL SFTTrainer), 1 and N GPUs, GSM8K QLoRA.

    HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python3 benchmarks/run.py \
        --data gpu-data/gsm8k_train_alpaca.json --out "$OUT"                      # 2 x H200, about 8 minutes
    python3 benchmarks/run.py --cpu-smoke --data ../shared/data/gsm8k_train_alpaca.json --out /tmp/bench-smoke

One call builds the model (benchmarks/make_model.py, random weights, bf16), then runs, one after the other and each
in its own process tree with its own timeout:

  ours      `python3 -m unsloth_mgpu_cli train benchmarks/recipes/gsm8k_qlora.yaml` (num_gpus=N; dataset.batching
            auto, the default: the table's batching column says what it chose); ours-balanced, ours-pack,
            ours-padded: the same with that dataset.batching
  trl-pf    benchmarks/trl_baseline.py --mode pf    (Unsloth's default, padding-free), torchrun for N > 1
  trl-pack  benchmarks/trl_baseline.py --mode pack  (packing=True)

with the same LoRA (r=16, alpha=16, seven projections, dropout 0), optimizer (adamw_8bit), learning rate and
cosine schedule, max sequence length (512), 4-bit base, gradient checkpointing setting and global batch
(--global-batch samples per optimizer step; per GPU micro-batch min(--micro-batch, global/N), the rest is
gradient accumulation). A packed TRL "sample" is a packed sequence of up to 512 tokens, so trl-pack sees more
examples per step; its loss is therefore read at the step where it has consumed the same number of examples.

Per run: effective tokens/s (real, non-padding tokens, all GPUs, over the steps after --warmup), time to first
optimizer step from the launch of the command, torch peak memory per GPU, loss around the same number of examples.
Writes OUT/bench.json, OUT/BENCHMARKS.table.md (printed last) and OUT/logs/<run>.log. A failed run is recorded
with the tail of its log. --budget-s bounds the whole call: each run's timeout is cut to what is left of it, and a
run with less than --min-run-s left is skipped (recorded as such), so the call ends within the budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "benchmarks" / "recipes" / "gsm8k_qlora.yaml"
SYSTEMS = ("ours", "ours-balanced", "ours-pack", "ours-padded", "trl-pf", "trl-pack")
LABELS = {
    "ours": "mgpu train (dataset.batching: auto, the default)",
    "ours-balanced": "mgpu train (dataset.batching: balanced)",
    "ours-pack": "mgpu train (dataset.batching: packed)",
    "ours-padded": "mgpu train (dataset.batching: padded)",
    "trl-pf": "TRL + Unsloth, padding-free",
    "trl-pack": "TRL + Unsloth, packing=True",
}
OURS_BATCHING = {"ours": "auto", "ours-balanced": "balanced", "ours-pack": "packed", "ours-padded": "padded"}
NOT_MEASURED = "not yet measured"


# ----------------------------------------------------------------------------------------------------
# Pure functions (unit-tested in tests/test_bench_harness.py)
# ----------------------------------------------------------------------------------------------------


def split_batch(global_batch: int, gpus: int, max_micro: int) -> tuple[int, int]:
    """(micro-batch per GPU, gradient accumulation) giving exactly `global_batch` samples per optimizer step."""
    if global_batch % gpus:
        raise ValueError(f"global batch {global_batch} is not divisible by {gpus} GPUs")
    per_gpu = global_batch // gpus
    micro = min(max_micro, per_gpu)
    while per_gpu % micro:
        micro -= 1
    return micro, per_gpu // micro


def steady_state(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any] | None:
    """Throughput over the logged windows after step `warmup`.

    rows: one per logged window, sorted by step, each with `step` (last step of the window), `elapsed_s` (end of
    that step, any fixed origin), `tokens` and `samples` (consumed in the window, all ranks). The window ending at
    the last row with step <= warmup is the origin; None when no window is left after it.
    """
    rows = sorted(rows, key=lambda r: r["step"])
    base = None
    for r in rows:
        if r["step"] <= warmup:
            base = r
    after = [r for r in rows if r["step"] > (base["step"] if base else 0)]
    if base is None or not after:
        return None
    seconds = after[-1]["elapsed_s"] - base["elapsed_s"]
    if seconds <= 0:
        return None
    tokens = sum(r["tokens"] for r in after)
    samples = sum(r["samples"] for r in after)
    return {
        "tokens_per_second": tokens / seconds,
        "samples_per_second": samples / seconds,
        "steps": after[-1]["step"] - base["step"],
        "seconds": seconds,
        "tokens": tokens,
        "samples": samples,
        "seconds_per_step": seconds / (after[-1]["step"] - base["step"]),
        # the typical step, robust to one-off slow ones (a new row width's first use): per logged window
        "median_seconds_per_step": statistics.median(
            (b["elapsed_s"] - a["elapsed_s"]) / (b["step"] - a["step"])
            for a, b in zip([base, *after[:-1]], after, strict=True)
        ),
    }


def rank_balance(rows: list[dict[str, Any]], warmup: int) -> dict[str, Any] | None:
    """How a step's time splits, over the logged single steps after `warmup` (rows need `compute_s` per rank and
    `elapsed_s`): each rank's mean seconds in its micro-batches, the imbalance (mean of slowest / mean rank - 1:
    what waiting for the slowest rank costs) and `busy`, the share of the step's wall time the slowest rank's
    micro-batches take (the rest: gradient sync, optimizer, host work between steps)."""
    rows = sorted(rows, key=lambda r: r["step"])
    # (row, its step's wall time) for each single logged step after the warm-up that carries compute_s
    steps = [
        (b, b["elapsed_s"] - a["elapsed_s"])
        for a, b in zip(rows, rows[1:], strict=False)
        if b["step"] > warmup and b["step"] - a["step"] == 1 and b.get("compute_s")
    ]
    if not steps:
        return None
    computes = [b["compute_s"] for b, _ in steps]
    # steps in which some rank compiled a graph (a new shape): their slowest rank's seconds, against the rest
    with_c = [max(b["compute_s"]) for b, _ in steps if any(b.get("compiles") or [])]
    without = [max(b["compute_s"]) for b, _ in steps if not any(b.get("compiles") or [])]
    return {
        "steps": len(steps),
        "mean_compute_s": [round(statistics.fmean(c[k] for c in computes), 5) for k in range(len(computes[0]))],
        "imbalance": round(statistics.fmean(max(c) / statistics.fmean(c) - 1 for c in computes), 4),
        "busy": round(sum(max(c) for c in computes) / sum(t for _, t in steps), 4),
        "steps_compiling": len(with_c),
        "slowest_rank_s_compiling": round(statistics.fmean(with_c), 5) if with_c else None,
        "slowest_rank_s_other": round(statistics.fmean(without), 5) if without else None,
    }


def same_steps(a_rows: list[dict[str, Any]], b_rows: list[dict[str, Any]], warmup: int) -> dict[str, Any] | None:
    """Tokens/s of two runs over the steps both logged, for a pair where one run was cut short (a timeout).

    Same global batch and seed: step s holds the same samples in both runs, so the ratio over the same steps is
    fair however short. The window starts after `warmup` when at least 5 common steps follow it, else after step
    5 (the first steps compile and warm up). Needs per-step rows (`logging.steps=1`); None when fewer than 3
    common steps remain.
    """
    a, b = ({r["step"]: r for r in rows} for rows in (a_rows, b_rows))
    common = sorted(set(a) & set(b))
    if not common:
        return None
    last = common[-1]
    start = warmup if last - warmup >= 5 else 5
    window = [s for s in common if s > start]
    if len(window) < 3 or window != list(range(start + 1, last + 1)) or start not in a or start not in b:
        return None
    out: dict[str, Any] = {"first_step": start + 1, "last_step": last}
    for key, rows in (("a", a), ("b", b)):
        seconds = rows[last]["elapsed_s"] - rows[start]["elapsed_s"]
        out[f"{key}_tokens_per_second"] = sum(rows[s]["tokens"] for s in window) / seconds
    out["ratio"] = out["a_tokens_per_second"] / out["b_tokens_per_second"]
    return out


def loss_at_samples(rows: list[dict[str, Any]], target: int, window: int) -> dict[str, Any] | None:
    """Mean logged loss over the steps that consumed examples (target - window, target], by cumulative count.

    A step counts when its first example lies in that range; rows need `samples` per window and `loss`.
    None when the run never reached `target` examples.
    """
    rows = sorted(rows, key=lambda r: r["step"])
    seen = 0
    picked: list[dict[str, Any]] = []
    for r in rows:
        start, seen = seen, seen + r["samples"]
        if target - window <= start < target and r.get("loss") is not None:
            picked.append(r)
    if seen < target or not picked:
        return None
    return {
        "loss": sum(r["loss"] for r in picked) / len(picked),
        "steps": [r["step"] for r in picked],
        "samples": target,
    }


def ours_rows(metrics: list[dict[str, Any]], global_batch: int) -> list[dict[str, Any]]:
    """Normalise `mgpu train`'s metrics.jsonl: tokens of each window = its tokens/s x its duration."""
    rows, prev_t, prev_step = [], 0.0, 0
    for m in sorted(metrics, key=lambda m: m["step"]):
        dt = m["elapsed_s"] - prev_t
        rows.append(
            {
                "step": m["step"],
                "elapsed_s": m["elapsed_s"],
                "tokens": m["tokens_per_second"] * dt,
                "samples": global_batch * (m["step"] - prev_step),
                "loss": m.get("loss"),
                "longest_row": m.get("longest_row"),  # per rank: a new width is a new shape for the kernels
                "compute_s": m.get("compute_s"),  # per rank: seconds its micro-batches took on its GPU
            }
        )
        prev_t, prev_step = m["elapsed_s"], m["step"]
    return rows


def trl_rows(rank_results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge TRL ranks: tokens/samples summed over ranks, time and loss (already the mean over ranks) from rank 0."""
    ranks = sorted(rank_results, key=lambda r: r["rank"])
    main = ranks[0]
    origin = main["launch_time"]
    per_step: dict[int, dict[str, Any]] = {}
    for row in main["steps"]:
        per_step[row["step"]] = {
            "step": row["step"],
            "elapsed_s": row["t"] - origin,
            "tokens": 0,
            "samples": 0,
            "loss": main["losses"].get(str(row["step"]), main["losses"].get(row["step"])),
        }
    for rk in ranks:
        for row in rk["steps"]:
            if row["step"] in per_step:
                per_step[row["step"]]["tokens"] += row["tokens"]
                per_step[row["step"]]["samples"] += row["samples"]
    return [per_step[s] for s in sorted(per_step)]


def trl_batching(rank0: dict[str, Any], system: str) -> str:
    """What TRL actually did (Unsloth may turn packing or padding-free off, e.g. without FlashAttention on CPU)."""
    got = "packed" if rank0.get("packing") else "padding-free" if rank0.get("padding_free") else "padded"
    wanted = "packed" if system == "trl-pack" else "padding-free"
    return got if got == wanted else f"{got} (asked: {wanted}; Unsloth's choice)"


@dataclass
class RunSpec:
    system: str
    gpus: int
    size: str

    @property
    def name(self) -> str:
        return f"{self.system}-{self.size}-{self.gpus}gpu"


def plan_runs(systems: list[str], gpus: list[int], sizes: list[str]) -> list[RunSpec]:
    """Order: per size, the largest GPU count first for every system (the head-to-head), then smaller counts."""
    runs = []
    for size in sizes:
        for n in sorted(gpus, reverse=True):
            for s in SYSTEMS:
                if s in systems:
                    runs.append(RunSpec(s, n, size))
    return runs


def derive(results: list[dict[str, Any]], warmup: int = 10) -> list[dict[str, Any]]:
    """Comparisons: scaling N/1 GPU per system, ours vs TRL's best at each N, first-step and memory ratios; for a
    pair where one run was cut short, the scaling over the steps both did (`same_steps`)."""
    ok = {(r["system"], r["size"], r["gpus"]): r for r in results if r.get("status") == "ok"}
    out: list[dict[str, Any]] = []
    logged = {(r["system"], r["size"], r["gpus"]): r for r in results if r.get("per_step")}
    for (system, size, n), r in sorted(logged.items()):
        one = logged.get((system, size, 1))
        if n == 1 or one is None or ((system, size, n) in ok and (system, size, 1) in ok):
            continue
        same = same_steps(r["per_step"], one["per_step"], warmup)
        if same:
            what = f"{system} {size}: {n} GPUs / 1 GPU, steps {same['first_step']}-{same['last_step']} of both"
            out.append({"what": what, "system": system, "size": size, "gpus": n, "same_steps": same})
    for (system, size, n), r in sorted(ok.items()):
        one = ok.get((system, size, 1))
        if n == 1 or one is None:
            continue
        item = {"what": f"{system} {size}: {n} GPUs / 1 GPU", "system": system, "size": size, "gpus": n}
        if r.get("tokens_per_second") and one.get("tokens_per_second"):
            item["scaling"] = r["tokens_per_second"] / one["tokens_per_second"]
            item["efficiency"] = item["scaling"] / n
        med = [x.get("steady_state", {}).get("median_seconds_per_step") for x in (one, r)]
        if all(med):  # same global batch: the ratio of typical step times
            item["median_step_scaling"] = med[0] / med[1]
        if r.get("first_step_s") and one.get("first_step_s"):
            item["first_step_ratio"] = r["first_step_s"] / one["first_step_s"]
        if r.get("peak_memory_gb") and one.get("peak_memory_gb"):
            item["peak_memory_ratio"] = max(r["peak_memory_gb"]) / max(one["peak_memory_gb"])
        out.append(item)
    for size, n in sorted({(k[1], k[2]) for k in ok}):
        mine = [
            ok[k]
            for k in ok
            if k[0].startswith("ours") and k[1] == size and k[2] == n and ok[k].get("tokens_per_second")
        ]
        ours = max(mine, key=lambda r: r["tokens_per_second"]) if mine else None
        trls = [
            ok[k]
            for k in ok
            if k[0].startswith("trl") and k[1] == size and k[2] == n and ok[k].get("tokens_per_second")
        ]
        if ours and ours.get("tokens_per_second") and trls:
            best = max(trls, key=lambda r: r["tokens_per_second"])
            out.append(
                {
                    "what": f"ours best ({ours['system']}) vs TRL best ({best['system']}) {size}, {n} GPU(s)",
                    "size": size,
                    "gpus": n,
                    "versus": best["system"],
                    "speedup": ours["tokens_per_second"] / best["tokens_per_second"],
                }
            )
    return out


def _fmt(v: Any, spec: str = ",.0f", none: str = "n/a") -> str:
    return none if v is None else format(v, spec)


def render_table(results: list[dict[str, Any]], comparisons: list[dict[str, Any]], header: str = "") -> str:
    """Markdown: one row per run, then the comparisons."""
    lines = [header, ""] if header else []
    lines += [
        "| run | batching | GPUs | batch (micro x accum x GPUs) | effective tokens/s | examples/s "
        "| time to first step (s) | peak GB per GPU | loss @ examples | status |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:
        batch = f"{r.get('micro_batch')} x {r.get('grad_accum')} x {r['gpus']}"
        if r.get("status") != "ok":
            why = (r.get("error") or r.get("status") or "").splitlines()[-1:] or [""]
            lines.append(
                f"| {r['name']} | {r.get('batching', '')} | {r['gpus']} | {batch} | | | | | | {r.get('status')}: "
                f"{why[0][:100].replace('|', '/')} |"
            )
            continue
        peak = ", ".join(f"{g:.1f}" for g in r.get("peak_memory_gb") or []) or "n/a"
        held = [g for g in r.get("peak_reserved_gb") or [] if g is not None]
        if held:  # what the caching allocator held (nvidia-smi: this plus the CUDA context)
            peak += " (reserved " + ", ".join(f"{g:.1f}" for g in held) + ")"
        loss = r.get("loss_at_samples")
        loss_s = f"{loss['loss']:.3f} @ {loss['samples']}" if loss else "n/a"
        lines.append(
            f"| {r['name']} | {r.get('batching', '')} | {r['gpus']} | {batch} | {_fmt(r.get('tokens_per_second'))} | "
            f"{_fmt(r.get('samples_per_second'), ',.1f')} | {_fmt(r.get('first_step_s'), '.1f')} | {peak} | "
            f"{loss_s} | ok |"
        )
    balanced = [r for r in results if r.get("rank_balance")]
    if balanced:
        lines += [
            "",
            "| run | seconds per step in micro-batches, per GPU | rank imbalance | slowest rank busy |",
            "| --- | --- | --- | --- |",
        ]
        for r in balanced:
            b = r["rank_balance"]
            per_gpu = ", ".join(f"{c:.3f}" for c in b["mean_compute_s"])
            comp = ""
            if b.get("steps_compiling"):
                comp = (
                    f"; {b['steps_compiling']} steps compiled a graph: slowest rank "
                    f"{b['slowest_rank_s_compiling']:.3f} s"
                    f" (other steps {b['slowest_rank_s_other'] or 0:.3f} s)"
                )
            lines.append(
                f"| {r['name']} | {per_gpu} | {100 * b['imbalance']:.1f}% | {100 * b['busy']:.0f}% of the step{comp} |"
            )
    if comparisons:
        lines += ["", "| comparison | value |", "| --- | --- |"]
        for c in comparisons:
            parts = []
            if "scaling" in c:
                parts.append(f"tokens/s x{c['scaling']:.2f} ({100 * c['efficiency']:.0f}% of linear)")
            if "median_step_scaling" in c:
                parts.append(f"median step x{c['median_step_scaling']:.2f}")
            if "first_step_ratio" in c:
                parts.append(f"time to first step x{c['first_step_ratio']:.2f}")
            if "peak_memory_ratio" in c:
                parts.append(f"peak memory per GPU x{c['peak_memory_ratio']:.2f}")
            if "speedup" in c:
                parts.append(f"ours / TRL tokens/s = {c['speedup']:.2f}")
            if "same_steps" in c:
                s = c["same_steps"]
                parts.append(
                    f"tokens/s x{s['ratio']:.2f} over the same steps ({s['a_tokens_per_second']:,.0f} vs "
                    f"{s['b_tokens_per_second']:,.0f}; a run was cut short)"
                )
            lines.append(f"| {c['what']} | {'; '.join(parts) or 'n/a'} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------


def _env(gpus: int, cpu: bool, launch: float, run_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if run_dir is not None:
        # Every run starts cold: its own torch.compile/Triton caches and its own mgpu data cache, so a later run
        # does not inherit an earlier run's compilation or tokenisation (time to first step stays comparable).
        env.update(
            TORCHINDUCTOR_CACHE_DIR=str(run_dir / ".cache" / "inductor"),
            TRITON_CACHE_DIR=str(run_dir / ".cache" / "triton"),
            UNSLOTH_MGPU_CACHE=str(run_dir / ".cache" / "mgpu"),
        )
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        PYTHONUNBUFFERED="1",
        COLUMNS="140",
        BENCH_LAUNCH_TIME=repr(launch),
    )
    if not cpu:
        # BENCH_DEVICES=1,0 runs on the GPUs in that order (rank 0 on GPU 1): does a slow rank follow its GPU?
        order = [d for d in os.environ.get("BENCH_DEVICES", "").split(",") if d.strip()] or range(gpus)
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i).strip() for i in list(order)[:gpus])
    else:
        env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def run_process(cmd: list[str], env: dict[str, str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run in its own session (process group); on timeout kill the whole tree. (exit code or None, seconds)."""
    t0 = time.time()
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc: int | None = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    return rc, time.time() - t0


def lr_warmup(a: argparse.Namespace) -> int:
    """Learning-rate warm-up steps, the same for every run (fewer than the run's steps, as the recipe requires)."""
    return max(0, min(a.lr_warmup_steps, a.steps - 1))


def _fresh(folder: Path) -> Path:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return folder


def _tail(log: Path, n: int = 15) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join(lines[-n:])


def run_ours(spec: RunSpec, a: argparse.Namespace, model: str, work: Path, log: Path, timeout: float) -> dict[str, Any]:
    micro, accum = split_batch(a.global_batch, spec.gpus, a.micro_batch)
    out_dir = _fresh(work / spec.name)
    cmd = [
        sys.executable,
        "-m",
        "unsloth_mgpu_cli",
        "train",
        str(RECIPE),
        f"model.name={model}",
        f"dataset.path={a.data}",
        f"distributed.num_gpus={spec.gpus}",
        f"training.max_steps={a.steps}",
        f"training.micro_batch_size={micro}",
        f"training.gradient_accumulation_steps={accum}",
        f"training.learning_rate={a.lr}",
        f"training.warmup_steps={lr_warmup(a)}",
        f"model.max_seq_length={a.seq_len}",
        f"memory.gradient_checkpointing={a.gradient_checkpointing}",
        f"output.dir={out_dir / 'run'}",
        "logging.progress=false",
        "logging.steps=1",
        f"dataset.batching={OURS_BATCHING[spec.system]}",
        *a.ours_set,
        "--overwrite",
    ]
    if a.cpu_smoke:
        cmd += ["distributed.device=cpu", "model.dtype=float32", "model.load_in_4bit=false", "training.optimizer=adamw"]
    launch = time.time()
    rc, wall = run_process(cmd, _env(spec.gpus, a.cpu_smoke, launch, out_dir), log, timeout)
    rec: dict[str, Any] = {
        "micro_batch": micro,
        "grad_accum": accum,
        "wall_s": wall,
        "exit_code": rc,
        "command": " ".join(cmd),
        "batching": OURS_BATCHING[spec.system],
    }
    summary_f, metrics_f = out_dir / "run" / "summary.json", out_dir / "run" / "metrics.jsonl"
    if rc != 0 or not summary_f.exists() or not metrics_f.exists():
        rec.update(status=f"timeout ({timeout:.0f} s)" if rc is None else "failed", error=_tail(log))
        if metrics_f.exists():  # the steps it did still compare with another run's same steps (derive)
            done = [json.loads(ln) for ln in metrics_f.read_text().splitlines() if ln.endswith("}")]
            rec["partial_rows"] = ours_rows(done, a.global_batch)
        return rec
    summary = json.loads(summary_f.read_text())
    resolved = re.search(r"^  batching: (\w+)$", (out_dir / "run" / "recipe.resolved.yaml").read_text(), re.M)
    if spec.system == "ours" and resolved:  # what auto chose on this machine
        rec["batching"] = f"auto: {resolved.group(1)}"
    metrics = [json.loads(ln) for ln in metrics_f.read_text().splitlines() if ln.strip()]
    rows = ours_rows(metrics, a.global_batch)
    # metrics.jsonl was last written at the end of the last step: that fixes fit()'s origin on the wall clock, and
    # with it the first step's end relative to this command's launch (the engine itself times from fit()).
    fit_start = metrics_f.stat().st_mtime - metrics[-1]["elapsed_s"]
    rec.update(
        status="ok",
        rows=rows,
        peak_memory_gb=summary.get("peak_memory_gb"),
        peak_reserved_gb=summary.get("peak_reserved_gb"),
        first_step_s=fit_start + summary["first_step_s"] - launch,
        first_step_in_fit_s=summary["first_step_s"],
        startup_s=summary.get("startup_s"),  # where the time to the first step went (engine's own marks)
        step_phases_s=summary.get("step_phases_s"),  # host time per step: forward/backward, wait, update, other
        final_loss=summary.get("final_loss"),
        overall_tokens_per_second=summary.get("tokens_per_second"),
    )
    return rec


def run_trl(spec: RunSpec, a: argparse.Namespace, model: str, work: Path, log: Path, timeout: float) -> dict[str, Any]:
    micro, accum = split_batch(a.global_batch, spec.gpus, a.micro_batch)
    out_dir = _fresh(work / spec.name)
    script = [
        str(ROOT / "benchmarks" / "trl_baseline.py"),
        "--model",
        model,
        "--data",
        str(a.data),
        "--out",
        str(out_dir),
        "--mode",
        spec.system.split("-")[1],
        "--micro-batch",
        str(micro),
        "--grad-accum",
        str(accum),
        "--steps",
        str(a.steps),
        "--lr",
        str(a.lr),
        "--warmup-steps",
        str(lr_warmup(a)),
        "--seq-len",
        str(a.seq_len),
        "--gradient-checkpointing",
        a.gradient_checkpointing,
    ]
    if a.cpu_smoke:
        script.append("--cpu")
    if spec.gpus == 1:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={spec.gpus}", *script]
    launch = time.time()
    env = _env(spec.gpus, a.cpu_smoke, launch, out_dir)
    # Cold like ours: Unsloth otherwise writes its generated modules to ./unsloth_compiled_cache and every later
    # TRL run reuses them (ours get a fresh per-rank folder under their output.dir from the engine).
    env["UNSLOTH_COMPILE_LOCATION"] = str(out_dir / ".cache" / "unsloth_compiled")
    if a.cpu_smoke:
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // spec.gpus))
    rc, wall = run_process(cmd, env, log, timeout)
    rec: dict[str, Any] = {
        "micro_batch": micro,
        "grad_accum": accum,
        "wall_s": wall,
        "exit_code": rc,
        "command": " ".join(cmd),
    }
    ranks = [json.loads(f.read_text()) for f in sorted(out_dir.glob("rank*.json"))]
    if rc != 0 or len(ranks) != spec.gpus or any(r.get("error") for r in ranks):
        rec.update(status=f"timeout ({timeout:.0f} s)" if rc is None else "failed", error=_tail(log))
        return rec
    main = min(ranks, key=lambda r: r["rank"])
    rec.update(
        status="ok",
        rows=trl_rows(ranks),
        peak_memory_gb=[r["peak_memory_gb"] for r in sorted(ranks, key=lambda r: r["rank"])],
        peak_reserved_gb=[r.get("peak_reserved_gb") for r in sorted(ranks, key=lambda r: r["rank"])],
        first_step_s=main["first_step_time"] - launch,
        padding_free=main.get("padding_free"),
        padding_free_config=main.get("padding_free_config"),
        collator=main.get("collator"),
        packing=main.get("packing"),
        versions=main.get("versions"),
        batching=trl_batching(main, spec.system),
    )
    return rec


def build_model(a: argparse.Namespace, size: str, log: Path, timeout: float) -> tuple[str | None, float, str | None]:
    if a.cpu_smoke:
        from unsloth_mgpu_cli.models import ensure_builtin_model

        t0 = time.time()
        return str(ensure_builtin_model("builtin:tiny-llama")), time.time() - t0, None
    dest = a.models_dir / f"llama-{size}"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "make_model.py"),
        "--size",
        size,
        "--out",
        str(dest),
        "--corpus",
        str(a.data),
    ]
    rc, wall = run_process(cmd, _env(1, False, time.time()), log, timeout)
    if rc != 0 or not (dest / "config.json").exists():
        return None, wall, _tail(log)
    return str(dest), wall, None


TRAINING_PACKAGES = ("transformers", "datasets", "peft", "trl", "unsloth", "unsloth_zoo", "bitsandbytes", "torchao")


def warm_bytecode() -> float:
    """Compile the training packages' bytecode once, before any timed run (seconds taken).

    pip installs usually leave it compiled; an install without it (`pip --no-compile`, as on the GPU machine)
    would make whichever run comes first pay for writing it, skewing time to first step by the order of the
    runs (session 4: the 8B 2-GPU run, first, spent 7 s more in `prepare` than the 1-GPU run after it).
    Located with find_spec (nothing is imported); unwritable folders are skipped.
    """
    t0 = time.time()
    dirs = []
    for name in TRAINING_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            dirs += [d for d in spec.submodule_search_locations if os.access(d, os.W_OK)]
    if dirs:
        subprocess.run(
            [sys.executable, "-m", "compileall", "-q", "-j", "0", *dirs],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )
    return time.time() - t0


def summarise(rec: dict[str, Any], a: argparse.Namespace) -> None:
    partial = rec.pop("partial_rows", None)
    if partial:
        rec["per_step"], rec["steps_done"] = partial, partial[-1]["step"]
    rows = rec.pop("rows", None)
    if not rows:
        return
    rec["steps_done"] = rows[-1]["step"]
    st = steady_state(rows, a.warmup)
    rec["steady_state"] = st
    rec["tokens_per_second"] = st["tokens_per_second"] if st else None
    rec["samples_per_second"] = st["samples_per_second"] if st else None
    target = a.steps * a.global_batch
    rec["loss_at_samples"] = loss_at_samples(rows, target, a.loss_window * a.global_batch)
    rec["rank_balance"] = rank_balance(rows, a.warmup)
    rec["per_step"] = rows


def _gpu_info() -> str:
    try:
        return subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "no nvidia-smi"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", type=Path, default=ROOT / "gpu-data" / "gsm8k_train_alpaca.json", help="alpaca JSON (GSM8K)"
    )
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or ROOT / "outputs" / "bench"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mgpu-bench"), help="run folders (large; not under OUT)")
    ap.add_argument("--models-dir", type=Path, default=Path("/tmp/models"))
    ap.add_argument("--sizes", default="1b", help="model sizes, comma-separated: 1b, 8b (8b builds for minutes)")
    ap.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (e.g. 1,2,4,8)")
    ap.add_argument("--only", default=",".join(SYSTEMS), help=f"runs, comma-separated: {', '.join(SYSTEMS)}")
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    ap.add_argument("--warmup", type=int, default=10, help="steps left out of the steady state")
    # 128 x ~167 tokens: enough work per GPU and step that the GPU, not per-call host overhead, sets the pace (at
    # global batch 32 the 1B model's GPU was busy 16% of a step on one H200: docs/BENCHMARKS.md)
    ap.add_argument("--global-batch", type=int, default=128, help="samples per optimizer step, the same for every run")
    ap.add_argument("--micro-batch", type=int, default=64, help="largest micro-batch per GPU; the rest is accumulation")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--lr-warmup-steps", type=int, default=5, help="linear learning-rate warm-up, then cosine")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument(
        "--ours-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra recipe override for our runs (repeatable), e.g. dataset.pad_to_multiple_of=64",
    )
    ap.add_argument("--gradient-checkpointing", default="false", choices=["false", "true", "unsloth"])
    ap.add_argument("--loss-window", type=int, default=5, help="loss = mean over the last N global batches of examples")
    # a cold machine: import + load + compile alone took 70-90 s on one H200 and over 95 s on two (2026-11-30)
    ap.add_argument("--timeout", type=float, default=300, help="seconds per run")
    ap.add_argument("--build-timeout", type=float, default=420, help="seconds per model build")
    ap.add_argument("--budget-s", type=float, default=510, help="seconds for the whole call, model builds included")
    ap.add_argument("--min-run-s", type=float, default=75, help="skip a run when less than this is left of the budget")
    ap.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="CPU plumbing check: builtin tiny model, float32, no 4-bit, adamw; N 'GPUs' = N CPU processes (gloo)",
    )
    a = ap.parse_args(argv)
    a.gpus_list = [int(x) for x in a.gpus.split(",") if x.strip()]
    a.systems = [s.strip() for s in a.only.split(",") if s.strip()]
    a.sizes_list = [s.strip() for s in a.sizes.split(",") if s.strip()]
    bad = [s for s in a.systems if s not in SYSTEMS]
    if bad:
        ap.error(f"--only: unknown {bad}; choose from {SYSTEMS}")
    for n in a.gpus_list:
        try:
            split_batch(a.global_batch, n, a.micro_batch)
        except ValueError as exc:
            ap.error(f"--global-batch: {exc}")
    if a.cpu_smoke:
        a.sizes_list = ["tiny"]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    start = time.time()
    a.data = a.data.resolve()
    out, work = a.out.resolve(), a.work.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    results: list[dict[str, Any]] = []
    models: dict[str, dict[str, Any]] = {}
    warm_s = warm_bytecode()
    print(f"bytecode of the training packages compiled in {warm_s:.0f} s", flush=True)
    for size in a.sizes_list:
        timeout = min(a.build_timeout, a.budget_s - (time.time() - start))
        path, secs, err = build_model(a, size, out / "logs" / f"build-{size}.log", timeout)
        models[size] = {"path": path, "build_s": round(secs, 1), "error": err}
        print(f"model {size}: {path or 'FAILED'} ({secs:.0f} s)", flush=True)
    for spec in plan_runs(a.systems, a.gpus_list, a.sizes_list):
        rec: dict[str, Any] = {
            "name": spec.name,
            "system": spec.system,
            "label": LABELS[spec.system],
            "gpus": spec.gpus,
            "size": spec.size,
            "global_batch": a.global_batch,
        }
        model = models[spec.size]["path"]
        if model is None:
            rec.update(status="skipped", error=f"model {spec.size} was not built")
        elif a.budget_s - (time.time() - start) < a.min_run_s:
            rec.update(status="skipped", error=f"less than {a.min_run_s:.0f} s left of the {a.budget_s:.0f} s budget")
        else:
            runner = run_ours if spec.system.startswith("ours") else run_trl
            timeout = min(a.timeout, a.budget_s - (time.time() - start))
            rec.update(runner(spec, a, model, work, out / "logs" / f"{spec.name}.log", timeout))
            summarise(rec, a)
        results.append(rec)
        tps = rec.get("tokens_per_second")
        print(
            f"{spec.name}: {rec['status']} ({rec.get('wall_s', 0):.0f} s)"
            + (f" {tps:,.0f} tokens/s" if tps else "")
            + (f"\n{rec['error']}" if rec.get("error") else ""),
            flush=True,
        )
    comparisons = derive(results, a.warmup)
    versions = next((r["versions"] for r in results if r.get("versions")), {})
    header = (
        f"GSM8K QLoRA ({'CPU smoke, tiny model, float32' if a.cpu_smoke else '4-bit, bf16'}), LoRA r=16 on "
        f"all seven projections, seq {a.seq_len}, global batch {a.global_batch}, {a.steps} steps, steady state "
        f"after step {a.warmup}, gradient checkpointing {a.gradient_checkpointing}; {_gpu_info()}; "
        f"{', '.join(f'{k} {v}' for k, v in versions.items())}; total {time.time() - start:.0f} s."
    )
    doc = {
        "header": header,
        "args": {k: str(v) for k, v in vars(a).items()},
        "host": platform.node(),
        "models": models,
        "results": results,
        "comparisons": comparisons,
    }
    (out / "bench.json").write_text(json.dumps(doc, indent=1, default=str))
    table = render_table(results, comparisons, header)
    (out / "BENCHMARKS.table.md").write_text(table)
    print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
