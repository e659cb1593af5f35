"""`mgpu report OUTPUT_DIR`: a summary table of a run and PNG plots of its metrics over steps.

    mgpu report outputs/quickstart

Reads `metrics.jsonl` (and `summary.json` when the run finished); matplotlib is imported only here, with the
Agg backend, so it needs no display.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import Problem, UserError, is_number
from .paths import output_file_problems

#: Row fields the report reads, each a number (or null, or absent); `step` is required and an integer.
NUMERIC_FIELDS = ("loss", "learning_rate", "tokens", "tokens_per_second", "elapsed_s", "eval_loss")
#: Shown one by one; more skipped rows are counted in one last line.
MAX_SKIP_NOTES = 5


def _row_problem(row: Any) -> str | None:
    """What is wrong with one parsed metrics row (None: the report can use it)."""
    if not isinstance(row, dict):
        return f"expected a JSON object (one logged step), found {type(row).__name__} {_short(row)}"
    step = row.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return f"step: expected an integer >= 0, found {_short(step)}"
    for key in NUMERIC_FIELDS:
        if row.get(key) is not None and not is_number(row[key], finite=False):
            return f"{key}: expected a number, found {_short(row[key])}"
    peaks = row.get("peak_memory_gb")
    if peaks is not None and not (isinstance(peaks, list) and all(is_number(m, finite=False) for m in peaks)):
        return f"peak_memory_gb: expected a list of numbers (GB per GPU), found {_short(peaks)}"
    return None


def _short(value: Any, width: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= width else text[: width - 3] + "..."


def read_metrics(out: Path) -> tuple[list[dict[str, Any]], list[Problem]]:
    """The usable rows of `<out>/metrics.jsonl` and one Problem (file:line) per line that was skipped.

    A line that is not JSON, not an object, or holds a wrong type in a field the report reads (a damaged or
    hand-edited file; the last line of a run that was killed mid-write) is skipped rather than failing the
    whole report: the other steps still say what the run did, and the warnings name each skipped line.

    Raises:
        UserError: no metrics.jsonl, or no usable row in it.
    """
    path = Path(out) / "metrics.jsonl"
    if not path.is_file():
        hint = "give the output.dir of an `mgpu train` run"
        if path.is_dir():
            found = f"{path} is a folder, not a file"
        elif Path(out).is_file():
            found = f"{out} is a file, not a run's folder"
            hint = "give the output.dir of an `mgpu train` run (the folder that holds metrics.jsonl)"
        elif not Path(out).is_dir():
            found = f"no such folder: {out}"
        elif (Path(out) / "recipe.resolved.yaml").is_file():  # written when a run starts
            found = f"the run in {out} has not logged a step yet (it is starting, or stopped before its first step)"
            hint = "report again after its first logged step (every logging.steps steps)"
        else:
            found = f"no metrics.jsonl in {out}"
        raise UserError(Problem("argument OUTPUT_DIR", found, hint), "nothing to report")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(Problem(str(path), f"cannot read: {exc}"), "nothing to report") from exc
    rows: list[dict[str, Any]] = []
    skipped: list[Problem] = []
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError:
            skipped.append(Problem(f"{path}:{lineno}", "not UTF-8 text"))
            continue
        except ValueError as exc:
            skipped.append(Problem(f"{path}:{lineno}", f"not a JSON line ({exc})"))
            continue
        problem = _row_problem(row)
        if problem is None:
            rows.append(row)
        else:
            skipped.append(Problem(f"{path}:{lineno}", problem))
    if not rows:
        if skipped:
            raise UserError(
                [*skipped[:MAX_SKIP_NOTES], Problem(str(path), "no usable row: every line above is damaged")],
                "invalid metrics",
            )
        raise UserError(Problem(str(path), "no rows yet", "wait for the first logged step"), "nothing to report")
    return rows, skipped


def load_summary(out: Path) -> dict[str, Any]:
    """`<out>/summary.json` (written when a run finishes), or {} when there is none.

    Raises:
        UserError: the file is there but is not the JSON object `mgpu train` writes; names the file (and line).
    """
    path = Path(out) / "summary.json"
    if not path.exists():
        return {}
    hint = f"the run's summary is damaged: move it away (mv {path} {path}.bad) to report from metrics.jsonl alone"
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(
            Problem(f"{path}:{exc.lineno}", f"not valid JSON: {exc.msg} (column {exc.colno})", hint), "invalid summary"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(Problem(str(path), f"cannot read: {exc}", hint), "invalid summary") from None
    if not isinstance(summary, dict):
        found = f"{type(summary).__name__} {_short(summary)}"
        raise UserError(
            Problem(str(path), f"expected a JSON object (what `mgpu train` writes), found {found}", hint),
            "invalid summary",
        )
    problems = [
        Problem(str(path), f"{key}: expected {what}, found {_short(summary[key])}", hint)
        for key, what, ok in (
            ("run_tokens", "a number", lambda v: is_number(v, finite=False)),
            ("device_type", "a string", lambda v: isinstance(v, str)),
        )
        if summary.get(key) is not None and not ok(summary[key])
    ]
    if problems:
        raise UserError(problems, "invalid summary")
    return summary


def summarize(out: Path, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Whole-run numbers: time, tokens, throughput (total and per GPU), peak memory per GPU, eval losses."""
    summary = load_summary(out)
    last = rows[-1]
    world = max((len(r.get("peak_memory_gb") or []) for r in rows), default=1) or 1
    elapsed = float(last.get("elapsed_s") or 0.0)
    # per-step tokens are only in the logged rows; the worker's running total covers every step (summary.json at
    # the end, each row's run_tokens while the run goes on; older runs' rows lack it)
    running = last.get("run_tokens") if is_number(last.get("run_tokens")) else None
    tokens = int(summary.get("run_tokens") or running or sum(int(r.get("tokens") or 0) for r in rows))
    # a run resumed on another GPU count (a sharded checkpoint allows it) has rows of different lengths
    peak = [
        max(float(r["peak_memory_gb"][i]) for r in rows if len(r.get("peak_memory_gb") or []) > i)
        for i in range(world)
        if any(len(r.get("peak_memory_gb") or []) > i for r in rows)
    ]
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r.get("eval_loss") is not None]
    best = min(evals, key=lambda e: e[1]) if evals else None
    tps = tokens / elapsed if elapsed > 0 else math.nan
    # a finished run: the numbers `mgpu train` printed (its last session's training time, evaluation left out)
    steady = summary.get("steady_tokens_per_second") if is_number(summary.get("steady_tokens_per_second")) else None
    if is_number(summary.get("tokens_per_second")) and summary["tokens_per_second"] > 0:
        tps = float(summary["tokens_per_second"])
    return {
        "steps": int(last["step"]),
        "elapsed_s": elapsed,
        "tokens": tokens,
        "tokens_per_second": tps,
        "tokens_per_second_per_gpu": tps / world,
        "steady_tokens_per_second": steady,
        "world_size": world,
        "peak_memory_gb": peak,
        "final_loss": float(last["loss"]) if last.get("loss") is not None else math.nan,
        "final_eval_loss": evals[-1][1] if evals else None,
        # the throughput is the last session's (what `mgpu train` printed); None: a run trained in one go
        "resumed_from_step": summary.get("resumed_from_step") if steady is not None else None,
        "best_eval_loss": best[1] if best else None,
        "best_eval_step": best[0] if best else None,
        "finished": bool(summary),
        "unit": "worker" if (summary.get("device_type") or _resolved_device(out)) == "cpu" else "GPU",
    }


def _resolved_device(out: Path) -> str | None:
    """distributed.device of a run still going on (no summary.json yet), from the recipe it wrote at its start."""
    try:
        import yaml

        return (yaml.safe_load((out / "recipe.resolved.yaml").read_text()) or {}).get("distributed", {}).get("device")
    except Exception:  # no resolved recipe, or not one we can read: the unit is only a word in the table
        return None


def write_plots(rows: list[dict[str, Any]], png: Path) -> Path:
    """Loss, eval loss, learning rate, throughput and peak memory per GPU over steps, in one PNG."""
    try:
        import matplotlib
    except ImportError:
        raise UserError(
            Problem("", "the plots need matplotlib, which is not installed", "pip install 'unsloth-mgpu[report]'"),
            "cannot write the report",
        ) from None

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
        gb = [((r.get("peak_memory_gb") or [])[i : i + 1] or [math.nan])[0] for r in rows]
        ax.plot(steps, gb, label=f"GPU {i}")
    if world:
        ax.legend(fontsize=8)
    ax.set_title("peak memory per GPU (GB)", loc="left", fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlabel("optimizer step")
    fig.tight_layout()
    png = Path(png)
    # written beside the target and renamed over it: a failed write leaves no half-written PNG
    tmp = png.with_name(f".{png.name}.tmp")
    try:
        fig.savefig(tmp, dpi=100, format="png")
        os.replace(tmp, png)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise UserError(Problem(str(png), f"cannot write the plots: {exc}"), "cannot write the report") from None
    finally:
        plt.close(fig)
    return png


def print_report(out: Path, s: dict[str, Any], png: Path | None) -> None:
    """The rich summary table."""
    from rich.table import Table

    from .render import console

    t = Table(title=f"run report: {out}", show_header=False, title_justify="left")
    t.add_row("steps", f"{s['steps']}" + ("" if s["finished"] else " (not finished)"))
    if s.get("skipped_rows"):
        t.add_row("skipped", f"{s['skipped_rows']} damaged line(s) of metrics.jsonl (see the warnings)")
    t.add_row("time", f"{s['elapsed_s']:.1f} s")
    unit = s["unit"]
    t.add_row("tokens", f"{s['tokens']:,} (non-padding, all {unit}s)")
    steady, world = s.get("steady_tokens_per_second"), s["world_size"]
    units = f"{world} {unit}" + ("s" if world != 1 else "")
    if steady:  # as `mgpu train` printed it: the first step's compilation and warm-up dominate short runs
        per = f"{steady / world:,.0f} per {unit} ({units})"
        resumed = s.get("resumed_from_step")
        scope = "the whole run" if resumed is None else f"its last session (resumed from step {resumed})"
        t.add_row(
            "tokens/s",
            f"{steady:,.0f} total after the first step, {per}; {s['tokens_per_second']:,.0f} over {scope}",
        )
    else:
        per = f"{s['tokens_per_second_per_gpu']:,.0f} per {unit} ({units})"
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
    problems = output_file_problems(Path(png), "--png", suffix=".png") if png is not None and plots else []
    rows: list[dict[str, Any]] = []
    skipped: list[Problem] = []
    try:
        rows, skipped = read_metrics(out)
    except UserError as exc:
        problems += exc.problems
    try:
        load_summary(out)
    except UserError as exc:
        problems += exc.problems
    if problems:
        raise UserError(problems, "cannot report")
    _warn_skipped(skipped)
    s = summarize(out, rows)
    s["skipped_rows"] = len(skipped)
    written = write_plots(rows, png or out / "report.png") if plots else None
    print_report(out, s, written)
    return s


def _warn_skipped(skipped: list[Problem]) -> None:
    """One warning (stderr) per damaged metrics line left out of the report; the first few, then a count."""
    if not skipped:
        return
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    for p in skipped[:MAX_SKIP_NOTES]:
        err.print(f"[yellow]warning:[/] skipped {escape(p.where)}: {escape(p.message)}")
    if len(skipped) > MAX_SKIP_NOTES:
        err.print(f"[yellow]warning:[/] skipped {len(skipped) - MAX_SKIP_NOTES} more damaged line(s)")
