"""Rank 0's live progress display: step, loss, learning rate, tokens/s (all GPUs), ETA, memory per GPU, eval loss.

Other ranks get a disabled display: its bar and rows draw nothing (the null-logger pattern), but `log` still
prints, so callers guard messages meant for rank 0 alone with `info.is_main`. With `logging.progress: false`
rank 0's display is disabled too, but still prints evaluations and notes (`main`).
"""

from __future__ import annotations

import sys
import time
from datetime import timedelta
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


def clock(seconds: float) -> str:
    """H:MM:SS, as rich's time columns show it."""
    return str(timedelta(seconds=max(0, round(seconds))))


class ProgressDisplay:
    """Rank 0's bar and one line per logged step (a plain line where there is no terminal); disabled elsewhere."""

    def __init__(
        self, enabled: bool, total: int, start: int = 0, gpus: int = 1, console: Any = None, main: bool = False
    ):
        self.enabled = enabled
        self.main = main or enabled  # rank 0: evaluations and notes are printed even without progress
        self._progress: Any = None
        self.total = total
        self._first: tuple[float, int] | None = None  # (time, step) of the first update: the plain lines' ETA
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
            # rich's default (30 s) holds one sample when steps take longer: no speed, and `ETA -:--:--` all run
            speed_estimate_period=3600,
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
        now = time.monotonic()
        if self._first is None:
            self._first = (now, step)
        if not self.console.is_terminal:
            # Non-interactive output (CI logs, pipes): one plain line per update instead of a live bar, with the
            # time since the first logged step and the ETA at the pace since then
            t0, step0 = self._first
            eta = f" ETA {clock((self.total - step) * (now - t0) / (step - step0))}" if step > step0 else ""
            self.console.print(
                f"step {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"tokens/s {tokens_per_s:,.0f} mem {'/'.join(f'{m:.2f}' for m in mem_gb)} GB "
                f"elapsed {clock(now - t0)}{eta}",
                soft_wrap=True,
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
        elif self.main:
            print(f"eval step {step}: loss {loss:.4f}, perplexity {perplexity:,.2f}", flush=True)

    def note(self, message: str) -> None:
        """An event worth a line on rank 0 (a checkpoint saved), above the live bar; not a warning."""
        if self._progress is not None:
            self._progress.console.print(f"[dim]{message}[/]", soft_wrap=True)
        elif self.main:
            print(message, flush=True)

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[yellow]{message}[/]")
        elif self.enabled is False:  # warnings (skipped steps, OOM retries) are shown without a progress bar too
            print(message, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
