"""`mgpu report OUTPUT_DIR`: a summary table of a run and PNG plots of its metrics over steps.

    mgpu report outputs/quickstart

Reads `metrics.jsonl` (and `summary.json` when the run finished); matplotlib is imported only here, with the
Agg backend, so it needs no display.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .errors import Problem, UserError


def load_metrics(out: Path) -> list[dict[str, Any]]:
    """The rows of `<out>/metrics.jsonl`, or a UserError when there are none."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise UserError(
            Problem("OUTPUT_DIR", f"no metrics.jsonl in {out}", "give the output.dir of an `mgpu train` run"),
            "nothing to report",
        )
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError as exc:
            raise UserError(Problem(f"{path}:{lineno}", f"not a JSON line: {exc}"), "invalid metrics") from exc
    if not rows:
        raise UserError(Problem(str(path), "no rows yet", "wait for the first logged step"), "nothing to report")
    return rows


def summarize(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-run numbers: time, tokens, throughput (total and per GPU), peak memory per GPU, eval losses."""
    summary_file = Path(out) / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    last = rows[-1]
    world = max((len(r.get("peak_memory_gb") or []) for r in rows), default=1) or 1
    elapsed = float(last.get("elapsed_s", 0.0))
    # per-step tokens are only in the logged rows; the worker's running total covers every step
    tokens = int(summary.get("run_tokens") or sum(int(r.get("tokens", 0)) for r in rows))
    peak = (
        [
            max(float((r.get("peak_memory_gb") or [0.0] * world)[i]) for r in rows if r.get("peak_memory_gb"))
            for i in range(world)
        ]
        if any(r.get("peak_memory_gb") for r in rows)
        else []
    )
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss") is not None]
    best = min(evals, key=lambda e: e[1]) if evals else None
    tps = tokens / elapsed if elapsed > 0 else math.nan
    return {
        "steps": int(last["step"]),
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_second": tps,
        "tokens_per_second_per_gpu": tps / world,
        "world_size": world,
        "peak_memory_gb": peak,
        "final_loss": float(last.get("loss", math.nan)),
        "final_eval_loss": evals[-1][1] if evals else None,
        "best_eval_loss": best[1] if best else None,
        "best_eval_step": best[0] if best else None,
        "finished": bool(summary),
        "unit": "worker" if summary.get("device_type") == "cpu" else "GPU",  # runs before it was recorded: GPU
    }


def write_plots(rows: list[dict[str, Any]], png: Path) -> Path:
    """Loss, eval loss, learning rate, throughput and peak memory per GPU over steps, in one PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training hosts
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(5, 1, figsize=(8, 13), sharex=True)
    panels = [
        ("training loss", "loss"),
        ("eval loss", "eval_loss"),
        ("learning rate", "learning_rate"),
        ("throughput (tokens/s, all GPUs)", "tokens_per_second"),
    ]
    for ax, (title, key) in zip(axes, panels, strict=False):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o" if key == "eval_loss" else None, markersize=4)
        else:
            ax.text(
                0.5,
                0.5,
                "not logged (no eval split)" if key == "eval_loss" else "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="gray",
            )
        ax.set_title(title, loc="left", fontsize=10)
        ax.grid(alpha=0.3)
    ax = axes[4]
    world = max((len(r.get("peak_memory_gb") or []) for r in rows), default=0)
    for i in range(world):
        ax.plot(steps, [(r.get("peak_memory_gb") or [math.nan] * world)[i] for r in rows], label=f"GPU {i}")
    if world:
        ax.legend(fontsize=8)
    ax.set_title("peak memory per GPU (GB)", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def print_report(out: Path, s: dict[str, Any], png: Path | None) -> None:
    """The rich summary table."""
    from rich.table import Table

    from .render import console

    t = Table(title=f"run report: {out}", show_header=False, title_justify="left")
    t.add_row("steps", f"{s['steps']}" + ("" if s["finished"] else " (not finished)"))
    t.add_row("time", f"{s['elapsed_s']:.1f} s")
    unit = s["unit"]
    t.add_row("tokens", f"{s['tokens']:,} (non-padding, all {unit}s)")
    per = f"{s['tokens_per_second_per_gpu']:,.0f} per {unit} ({s['world_size']} {unit}s)"
    t.add_row("tokens/s", f"{s['tokens_per_second']:,.0f} total, {per}")
    t.add_row("peak memory", " / ".join(f"{m:.2f}" for m in s["peak_memory_gb"]) + f" GB per {unit}")
    t.add_row("final loss", f"{s['final_loss']:.4f}")
    if s["final_eval_loss"] is not None:
        t.add_row(
            "final eval loss",
            f"{s['final_eval_loss']:.4f} (perplexity {math.exp(min(s['final_eval_loss'], 700)):,.2f})",
        )
        t.add_row("best eval loss", f"{s['best_eval_loss']:.4f} at step {s['best_eval_step']}")
    else:
        t.add_row("eval loss", "- (no eval split: set dataset.eval_ratio or dataset.eval_path)")
    if png is not None:
        t.add_row("plots", str(png))
    console.print(t)


def report(out: Path, png: Path | None = None, plots: bool = True) -> dict[str, Any]:
    """Run `mgpu report`: print the table, write the plots (default `<out>/report.png`); return the numbers."""
    out = Path(out)
    rows = load_metrics(out)
    s = summarize(out, rows)
    written = write_plots(rows, png or out / "report.png") if plots else None
    print_report(out, s, written)
    return s
