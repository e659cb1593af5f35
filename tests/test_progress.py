"""Rank 0's progress display: a live bar that fits the terminal, plain lines in logs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from unsloth_mgpu_cli.progress import ProgressDisplay


def last_bar(width: int, gpus: int, terminal: bool = True) -> tuple[str, str]:
    """The bar's last rendering and everything printed, for a long run's worst-case numbers."""
    console = Console(file=io.StringIO(), width=width, force_terminal=terminal, color_system=None, record=True)
    display = ProgressDisplay(True, 12000, 0, gpus, console=console)
    display.update(11999, 5.74661, 3.52e-7, 1_234_567.0, [141.23] * gpus)
    display.close()
    text = console.export_text()
    bar = ("train" + text.rsplit("train", 1)[1]).splitlines()[0].rstrip() if "train" in text else ""
    return bar, text


@pytest.mark.parametrize("gpus", [1, 2, 4, 8])
@pytest.mark.parametrize("width", [80, 100, 140])
def test_the_bar_fits_the_terminal_without_cutting_a_value(width, gpus):
    bar, _ = last_bar(width, gpus)
    assert len(bar) <= width, bar
    assert "…" not in bar, bar  # rich cuts a column that does not fit with an ellipsis
    for value in ("11999/12000", "loss 5.7466", "1,234,567 tok/s", "141.2", "ETA"):
        assert value in bar, (value, bar)
    if width >= 140:
        assert "lr 3.52e-07" in bar
    if gpus <= 4 and width >= 100:
        assert "/".join(["141.2"] * gpus) + " GB" in bar  # each GPU's peak
    elif gpus > 4:
        assert "max 141.2 GB" in bar


def test_logs_get_plain_lines_and_no_bar():
    _, text = last_bar(80, 2, terminal=False)
    assert "step 11999/12000 loss 5.7466 lr 3.52e-07 tokens/s 1,234,567 mem 141.23/141.23 GB" in text
    assert "━" not in text and "ETA" not in text, text


def test_the_bar_moves_every_step_between_logged_ones_without_printing_lines():
    for terminal in (True, False):
        console = Console(file=io.StringIO(), width=120, force_terminal=terminal, color_system=None, record=True)
        display = ProgressDisplay(True, 100, 0, 1, console=console)
        display.update(10, 5.0, 1e-4, 1000.0, [1.0])
        for step in range(11, 18):
            display.advance(step)
        assert display._progress.tasks[0].completed == 17
        display.close()
        lines = [line for line in console.export_text().splitlines() if line.startswith("step ")]
        plain = "step 10/100 loss 5.0000 lr 1.00e-04 tokens/s 1,000 mem 1.00 GB elapsed 0:00:00"
        assert lines == ([] if terminal else [plain])


def test_the_eta_holds_for_steps_slower_than_rich_s_speed_window(monkeypatch):
    """rich estimates speed over the last 30 s by default: with steps of 40 s (a large model) it held one sample,
    so the bar showed `ETA -:--:--` for the whole run. The plain lines of a log have an ETA of their own."""
    from unsloth_mgpu_cli import progress

    now = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: now[0])
    for terminal in (True, False):
        console = Console(file=io.StringIO(), width=140, force_terminal=terminal, color_system=None, record=True,
                          get_time=lambda: now[0])  # fmt: skip
        display = ProgressDisplay(True, 100, 0, 1, console=console)
        for step in range(1, 6):
            now[0] += 40.0
            display.update(step, 5.0, 1e-4, 1000.0, [1.0])
        if terminal:
            assert display._progress.tasks[0].time_remaining == pytest.approx(95 * 40.0)
        display.close()
        if not terminal:
            lines = [line for line in console.export_text().splitlines() if line.startswith("step ")]
            # 4 steps in 160 s since the first logged one: 95 more at 40 s each
            assert lines[-1].endswith("elapsed 0:02:40 ETA 1:03:20"), lines[-1]


def test_without_progress_rank_0_still_prints_evaluations_and_notes(capsys):
    """`logging.progress: false` turned every line off, evaluations included; other ranks print none of them."""
    quiet = ProgressDisplay(False, 10, 0, 1, main=True)
    quiet.update(1, 5.0, 1e-4, 1000.0, [1.0])  # no bar, no step lines
    quiet.eval(5, 2.5, 12.18)
    quiet.note("checkpoint step-5 saved in 0.1 s")
    ProgressDisplay(False, 10, 0, 1).eval(5, 2.5, 12.18)  # another rank
    assert capsys.readouterr().out == "eval step 5: loss 2.5000, perplexity 12.18\ncheckpoint step-5 saved in 0.1 s\n"
