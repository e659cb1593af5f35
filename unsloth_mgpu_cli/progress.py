"""Rank 0's live progress display: step, loss, learning rate, tokens/s (all GPUs), ETA, memory per GPU, eval loss.

Other ranks get a disabled display: its bar and rows draw nothing (the null-logger pattern), but `log` still
prints, so callers guard messages meant for rank 0 alone with `info.is_main`.
"""

from __future__ import annotations

import sys
from typing import Any

# Characters the bar's text columns take besides the memory (5-digit steps, 7-digit tokens/s): with the learning
# rate and the elapsed time (wide terminals), and without them. The bar itself takes what is left (24 at most).
WIDE_TEXT = 84
NARROW_TEXT = 64
MIN_BAR = 8


def memory_text(mem_gb: list[float], each: bool = True) -> str:
    """Peak memory per GPU for the bar: each GPU's (`each`), else the largest (the one that runs out first)."""
    if each:
        return "/".join(f"{m:.1f}" for m in mem_gb) + " GB"
    return f"max {max(mem_gb):.1f} GB"


class ProgressDisplay:
    """Rank 0's bar and one line per logged step (a plain line where there is no terminal); disabled elsewhere."""

    def __init__(self, enabled: bool, total: int, start: int = 0, gpus: int = 1, console: Any = None):
        self.enabled = enabled
        self._progress: Any = None
        self.total = total
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console or Console(file=sys.stdout, highlight=False)
        # A terminal gets a live bar sized to its width; logs and pipes get plain lines (see update).
        width, all_gpus_len = self.console.width, len(memory_text([100.0] * gpus))
        # each GPU's peak when up to 4 fit beside a short bar, else the largest
        self.each_gpu = gpus <= 4 and width >= NARROW_TEXT + all_gpus_len + MIN_BAR
        mem = all_gpus_len if self.each_gpu else len(memory_text([100.0], each=False))
        wide = width >= WIDE_TEXT + mem + 24
        self._progress = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(bar_width=24 if wide else min(24, max(4, width - NARROW_TEXT - mem))),
            MofNCompleteColumn(),
            TextColumn("loss [cyan]{task.fields[loss]}[/]"),
            *([TextColumn("lr {task.fields[lr]}")] if wide else []),
            TextColumn("[green]{task.fields[tps]}[/] tok/s"),
            TextColumn("mem {task.fields[mem]}"),
            *([TimeElapsedColumn()] if wide else []),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=self.console,
            refresh_per_second=4,
            transient=False,
            disable=not self.console.is_terminal,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, loss="-", lr="-", tps="-", mem="-")
        self._progress.start()

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float, mem_gb: list[float]) -> None:
        if self._progress is None:
            return
        self._progress.update(
            self._task,
            completed=step,
            loss=f"{loss:.4f}",
            lr=f"{lr:.2e}",
            tps=f"{tokens_per_s:,.0f}",
            mem=memory_text(mem_gb, self.each_gpu),
        )
        if not self.console.is_terminal:
            # Non-interactive output (CI logs, pipes): one plain line per update instead of a live bar.
            self.console.print(
                f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"tokens/s {tokens_per_s:,.0f} mem {'/'.join(f'{m:.2f}' for m in mem_gb)} GB"
            )

    def advance(self, step: int) -> None:
        """A step done: move the live bar (with `logging.steps: 10` it used to jump by 10); no plain line."""
        if self._progress is not None:
            self._progress.update(self._task, completed=step)

    def eval(self, step: int, loss: float, perplexity: float) -> None:
        """One line per evaluation (printed above the live bar)."""
        if self._progress is not None:
            self._progress.console.print(
                f"[bold]eval[/] step {step}: loss [cyan]{loss:.4f}[/], perplexity {perplexity:,.2f}"
            )

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[yellow]{message}[/]")
        elif self.enabled is False:  # warnings (skipped steps, OOM retries) are shown without a progress bar too
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
