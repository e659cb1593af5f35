"""Rich rendering of recipes and summaries for the terminal (rank 0 / parent process only)."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from .recipe import LoadedRecipe, to_yaml


def people_console(**kwargs: object) -> Console:
    """A console for people: on a terminal it wraps at the terminal's width; in a log or a pipe (CI, nohup, SLURM),
    where rich assumes 80 columns unless COLUMNS says otherwise, text lines stay whole (soft wrap), so grep finds
    them, and tables get 160 columns."""
    import os

    made = Console(highlight=False, **kwargs)
    if not made.is_terminal:
        made.soft_wrap = True
        if not os.environ.get("COLUMNS"):
            made.width = LOG_WIDTH
    return made


LOG_WIDTH = 160


console = people_console()


def size_text(nbytes: float) -> str:
    """Bytes for people: KiB, MiB or GiB, four significant digits."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if nbytes >= scale:
            return f"{nbytes / scale:.4g} {unit}"
    return f"{nbytes / 2**10:.4g} KiB"


def method_name(loaded: LoadedRecipe) -> str:
    """What the recipe trains, in words: full fine-tuning, QLoRA or LoRA."""
    r = loaded.recipe
    if r.lora is None:
        return "full fine-tuning"
    return "QLoRA (4-bit base + LoRA)" if r.model.load_in_4bit else "LoRA (16-bit base)"


def print_recipe(loaded: LoadedRecipe) -> None:
    """Print the resolved recipe as YAML plus a short summary of what it will do."""
    r = loaded.recipe
    title = f"resolved recipe: {loaded.path}" if loaded.path else "resolved recipe"
    # The panel's border and padding take 4 columns; PyYAML breaks a line only once it has passed `width`, so
    # leave room for one more list item. Longer values (paths) still wrap in the panel rather than being cut.
    text = to_yaml(r, width=max(40, console.width - 4 - 16))
    syntax = Syntax(text, "yaml", theme="ansi_dark", background_color="default", word_wrap=True)
    console.print(Panel(syntax, title=title))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_row("method", method_name(loaded))
    t.add_row("workers", f"{r.distributed.num_gpus} on {r.distributed.device}")
    mb, ga = r.training.micro_batch_size, r.training.gradient_accumulation_steps
    t.add_row("global batch", f"{mb} x workers x {ga} samples per optimizer step")
    t.add_row(
        "length", "max_steps=" + str(r.training.max_steps) if r.training.max_steps else f"{r.training.epochs} epoch(s)"
    )
    autos = [
        k
        for k, v in (
            ("training.micro_batch_size", mb),
            ("training.gradient_accumulation_steps", ga),
            ("distributed.num_gpus", r.distributed.num_gpus),
            ("memory.gradient_checkpointing", r.memory.gradient_checkpointing),
        )
        if v == "auto"
    ]
    if autos:
        t.add_row("auto", ", ".join(autos) + " (filled at `mgpu train` from the detected hardware)")
    console.print(t)
    # what was checked: the recipe and that its paths exist; the rows are read by `mgpu prepare` (and train)
    console.print("[green]valid[/] (the recipe; the data's rows are checked by `mgpu prepare`)")


def print_summary(summary: dict, rewritten: frozenset[str] = frozenset()) -> None:
    """The end-of-run table: time, tokens, throughput, memory per GPU, where the results are."""
    if not summary:
        return
    t = Table(title="run summary", show_header=False, box=None, pad_edge=False)
    resumed = summary.get("resumed_from_step")
    session = "" if resumed is None else " this session"  # the numbers below cover it; the run's are noted
    steps = str(summary.get("steps"))
    if resumed is not None:
        steps += f" (resumed from step {resumed}: this session trained steps {resumed + 1}-{summary.get('steps')})"
    t.add_row("steps", steps)
    t.add_row(
        "training",
        f"{summary.get('elapsed_s', 0):.1f} s{session} (the first step, with its compilation: "
        f"{summary.get('first_step_s') or 0:.1f} s)",
    )
    startup = summary.get("startup_s") or {}
    if "total" in startup:
        phases = {k: v for k, v in startup.items() if k not in ("total", "data_beside")}
        parts = ", ".join(f"{k.replace('_', ' ')} {v:.1f}" for k, v in phases.items())
        if "data_beside" in startup:  # not a phase of its own: it ran while the workers started
            parts += f" (data tokenised beside the workers' start in {startup['data_beside']:.1f})"
        t.add_row("start-up", f"{startup['total']:.1f} s to the first step: {parts}")
    phases = summary.get("step_phases_s") or {}
    if phases.get("steps"):
        parts = ", ".join(f"{k.replace('_', '/')} {v * 1e3:.0f}" for k, v in phases.items() if k != "steps")
        t.add_row("step time", f"{parts} ms per step (rank 0, mean of {phases['steps']} steps after the first)")
    run_tokens = summary.get("run_tokens")
    whole = f"; {run_tokens:,} over the whole run" if resumed is not None and run_tokens else ""
    t.add_row("tokens", f"{summary.get('tokens', 0):,}{session} (non-padding, all workers){whole}")
    world = max(1, int(summary.get("world_size", 1)))
    tps = float(summary.get("tokens_per_second", 0.0))
    steady = summary.get("steady_tokens_per_second")
    if steady:  # what the progress bar showed: the first step's compilation and warm-up dominate short runs
        t.add_row(
            "throughput",
            f"{steady:,.0f} tokens/s total after the first step, {steady / world:,.0f} per worker; "
            f"{tps:,.0f} over the whole {'session' if session else 'run'}",
        )
    else:
        t.add_row("throughput", f"{tps:,.0f} tokens/s total, {tps / world:,.0f} per worker")
    loss = summary.get("final_loss")
    t.add_row("final loss", "-" if loss is None else f"{loss:.4f}")  # None: no step ran in this session
    if summary.get("final_eval_loss") is not None:
        best, at = summary.get("best_eval_loss"), summary.get("best_eval_step")
        t.add_row(
            "eval loss",
            f"{summary['final_eval_loss']:.4f} at the end"
            + (f", best {best:.4f}" if best is not None else "")
            + (f" at step {at}" if best is not None and at is not None else "")
            + ("; stopped early (training.early_stopping_patience)" if summary.get("stopped_early") else ""),
        )
    kept = summary.get("final_weights_step")
    if kept is not None and kept != summary.get("steps"):
        t.add_row("weights", f"the final weights are step {kept}'s, the best evaluation's (output.keep_best)")
    t.add_row("peak memory", " / ".join(f"{m:.2f}" for m in summary.get("peak_memory_gb", [])) + " GB per worker")
    t.add_row("output", str(summary.get("output_dir")))
    if console.is_terminal:
        console.print(t)
    else:  # a log: rows without the padding to the longest one, which grep and copy-paste would carry along
        with console.capture() as shown:
            console.print(t)
        console.print("\n".join(line.rstrip() for line in shown.get().splitlines()), markup=False, soft_wrap=True)
    # `rewritten`: the export folders output.export writes next
    stale = [d for d in _stale_exports(summary.get("output_dir")) if d not in rewritten]
    if stale:
        again = " and ".join(
            f"`mgpu export {summary.get('output_dir')}{' --format gguf' if d == 'gguf/' else ''}`" for d in stale
        )
        console.print(
            f"[yellow]note[/]: {', '.join(stale)} in the output folder export(s) an earlier adapter; run "
            f"{again} again for this one"
        )


def _stale_exports(out: str | None) -> list[str]:
    """Exports inside the run's folder (`mgpu export`'s default `merged/`) made before its adapter or model was last
    written: after a resumed run they hold the earlier weights."""
    from pathlib import Path

    from .checkpoint import EXPORT_MARKER

    if not out or not Path(out).is_dir():
        return []
    weights = [Path(out) / name for name in ("adapter", "model") if (Path(out) / name).is_dir()]
    newest = max((w.stat().st_mtime for w in weights), default=None)
    if newest is None:
        return []
    return [
        f"{d.name}/"
        for d in sorted(Path(out).iterdir())
        if d.is_dir() and (d / EXPORT_MARKER).is_file() and (d / EXPORT_MARKER).stat().st_mtime < newest
    ]


def print_plan(plan) -> None:
    """Print a `configgen.Plan`: the forecast's components, the chosen settings, what did not fit and why."""
    from .memory import GiB

    a = plan.architecture
    console.print(f"[bold]{a.name or 'model'}[/]: {a.num_parameters() / 1e9:.2f}B parameters ({a.source})")
    console.print(
        f"{plan.num_gpus} GPU(s) x {plan.gpu_memory_bytes / GiB:.0f} GB, budget "
        f"{plan.budget_bytes / GiB:.1f} GB each (max_memory_fraction {plan.memory_fraction:g}); "
        f"sequence {plan.seq_len} tokens; optimizer {plan.optimizer}"
    )
    b = plan.breakdown
    if b is not None:
        title = "memory forecast per GPU (GB = GiB, 2^30 bytes)" + ("" if plan.fits else " (smallest setting tried)")
        t = Table(title=title, title_justify="left")
        t.add_column("component")
        t.add_column("GB", justify="right")
        t.add_column("what")
        for name, nbytes, what in b.rows():
            t.add_row(name, f"{nbytes / GiB:.2f}", what)
        t.add_row(
            "[bold]peak[/]",
            f"[bold]{b.peak / GiB:.2f}[/]",
            f"torch allocated {b.allocated / GiB:.2f}, reserved {b.reserved / GiB:.2f}; peak during the {b.peak_phase}",
        )
        console.print(t)
        for note in b.notes:
            console.print(f"  note: {note}")
    if plan.fits:
        s = Table(title="recommended settings", title_justify="left", show_header=False)
        s.add_row("method", f"{plan.method} (load_in_4bit: {str(plan.load_in_4bit).lower()})")
        s.add_row(
            "strategy",
            "fsdp (sharded across the GPUs: a full replica does not fit one GPU)"
            if plan.strategy == "fsdp"
            else "ddp (a full replica per GPU)",
        )
        s.add_row("micro_batch_size", str(plan.micro_batch_size))
        s.add_row("gradient_accumulation_steps", str(plan.gradient_accumulation_steps))
        s.add_row("gradient_checkpointing", str(plan.gradient_checkpointing).lower())
        s.add_row(
            "global batch",
            f"{plan.global_batch_size} = {plan.micro_batch_size} x {plan.num_gpus} x "
            f"{plan.gradient_accumulation_steps}",
        )
        s.add_row("predicted peak", f"{plan.predicted_peak_gb:.1f} GB per GPU")
        console.print(s)
        for why in plan.reasons:
            console.print(f"  why: {why}")
    else:
        console.print(
            f"[bold red]does not fit[/]: {plan.method} needs more than {plan.budget_bytes / GiB:.1f} GB per GPU"
        )
        for sug in plan.suggestions:
            console.print(f"  - {sug}")
    if plan.rejected:
        r = Table(title="did not fit", title_justify="left")
        for col in ("method", "checkpointing", "micro-batch", "peak GB", "why"):
            r.add_column(col)
        for alt in plan.rejected:
            r.add_row(
                alt["method"],
                str(alt["gradient_checkpointing"]).lower(),
                str(alt["micro_batch_size"]),
                f"{alt['predicted_peak_gb']:.1f}",
                alt["why"],
            )
        console.print(r)


def _short_path(path: str) -> str:
    """A path relative to the current folder when it lies under it (shorter in a table), else as given."""
    from pathlib import Path

    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def print_data_report(rep) -> None:
    """`mgpu prepare`: statistics, the cache, one example with its masked part marked, batching estimates."""
    from rich.markup import escape
    from rich.text import Text

    s = rep.summary
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_row("samples", f"{s.samples:,} (of {s.rows:,} rows)")
    t.add_row("tokens", f"{s.tokens:,}, trained on {s.loss_tokens:,}; masked share {s.masked_share:.1%}")
    pct = ", ".join(f"{k} {v}" for k, v in s.percentiles.items())
    t.add_row("length", f"mean {s.tokens / max(1, s.samples):.0f}, {pct}, longest {s.longest}")
    if rep.eval_note:
        t.add_row("eval data", escape(rep.eval_note))
    policy = "none longer than max_seq_length"
    if s.truncated:
        policy = (
            f"[yellow]{s.truncated:,} truncated to {rep.max_seq_length} (longest was {s.longest_before}; "
            f"{s.tokens_cut:,} tokens cut)[/]"
        )
    elif s.dropped:
        policy = f"[yellow]{s.dropped:,} dropped as longer than {rep.max_seq_length} (longest {s.longest_before})[/]"
    t.add_row("too long", policy)
    if s.no_loss:
        t.add_row("no loss", f"[yellow]{escape(s.no_loss_text())}[/]")
    t.add_row("cache", f"{rep.cache} " + ("[dim](hit: not re-tokenised)[/]" if rep.cache_hit else "(written)"))
    console.print(Panel(t, title="data", expand=False))
    if s.mix:
        mt = Table(title="mix: samples drawn from each source (dataset.mix.<i>)", title_justify="left")
        mt.add_column("i", justify="right", no_wrap=True)
        mt.add_column("source", overflow="fold")
        for col in ("format", "weight", "rows", "samples", "share", "resampled"):
            mt.add_column(col, justify="left" if col == "format" else "right", no_wrap=True)
        for i, m in enumerate(s.mix):
            # repeats (upsampled), or rows its share leaves out (equal weights are equal shares, not all rows)
            up = f"[yellow]x{m.taken / m.rows:.2f}[/]" if m.taken != m.rows else "no"
            mt.add_row(
                str(i),
                _short_path(m.source),
                m.format,
                f"{m.weight:g}",
                f"{m.rows:,}",
                f"{m.taken:,}",
                f"{m.share:.1%}",
                up,
            )
        console.print(mt)
    example = Text()
    for text, trained in rep.example:
        example.append(text, style="bold green" if trained else "dim strike")
    console.print(
        Panel(
            example,
            title=f"sample {rep.example_index}: [bold green]trained on[/], [dim strike]masked[/] (no loss)",
            expand=False,
        )
    )
    masked = "".join(text for text, trained in rep.example if not trained)
    trained = "".join(text for text, trained in rep.example if trained)
    console.print(f"[dim]masked:[/] {masked!r}", soft_wrap=True)
    console.print(f"[dim]trained on:[/] {trained!r}", soft_wrap=True)
    if rep.estimates:
        bt = Table(title=f"batching for {rep.workers} worker(s) (dataset.batching)", title_justify="left")
        bt.add_column("mode")
        bt.add_column("real tokens / processed", justify="right")
        bt.add_column("slowest rank vs mean", justify="right")
        bt.add_column("largest micro-batch (tokens)", justify="right")
        for e in rep.estimates:
            bt.add_row(e.mode, f"{e.padding_efficiency:.1%}", f"+{e.rank_imbalance:.1%}", str(e.max_micro_batch_tokens))
        console.print(bt)
    if rep.batch_note:
        console.print(f"[dim]{escape(rep.batch_note)}[/]", soft_wrap=True)
    if rep.train_refusal is not None:
        refusal = escape(rep.train_refusal.render())
        console.print(f"[bold yellow]warning:[/] mgpu train will refuse this recipe: {refusal}", soft_wrap=True)
