"""Errors meant for people: each names where the problem is, what was expected and found, and a fix.

`UserError` (bad recipe, arguments, data, missing files) maps to exit code 2 without a traceback;
anything else is a bug or a fault and keeps its traceback.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass
from typing import Any


@dataclass
class Problem:
    """One thing wrong with the user's input.

    Attributes:
        where: the dotted recipe key, `file:line`, or `argument --x`.
        message: what is wrong (expected vs found).
        hint: how to fix it, when there is something useful to say.
    """

    where: str
    message: str
    hint: str | None = None

    def render(self) -> str:
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


def first_line(exc: BaseException) -> str:
    """An exception's message for one line of ours: its first line, or its type when it has none."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class UserError(Exception):
    """Bad input from the user; the CLI prints every problem and exits with code 2."""

    exit_code = 2

    def __init__(self, problems: list[Problem] | Problem | str, title: str = "invalid input"):
        if isinstance(problems, str):
            problems = [Problem("", problems)]
        elif isinstance(problems, Problem):
            problems = [problems]
        self.problems = problems
        self.title = title
        super().__init__(self.render())

    def render(self) -> str:
        lines = [f"{self.title} ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}):"]
        lines += ["  - " + p.render().replace("\n", "\n  ") for p in self.problems]
        return "\n".join(lines)


class RanksDisagree(UserError, RuntimeError):
    """Settings that every rank must share differ between them: nodes started with different recipes, overrides or
    --resume (`mgpu train`), or a script that sizes its batch from the GPU it sees (hook mode). Bad input, exit 2
    (a RuntimeError too, as hook mode's scripts caught it before)."""

    def __init__(self, what: str, differences: list[str], hint: str):
        shown = "; ".join(differences[:6]) + (f"; and {len(differences) - 6} more" if len(differences) > 6 else "")
        super().__init__(Problem(what, f"differ: {shown}", hint), "invalid arguments")


def reported_user_error(report: str) -> UserError | None:
    """The UserError a worker raised, from the line torch's error file keeps of it (`<type>: <render()>`); None
    for any other error. A worker's bad input then ends the run as one in the launcher would: exit 2, its text."""
    kind, _, text = report.strip().partition(": ")
    if kind not in {"UserError", RanksDisagree.__name__} or not text:
        return None
    head, _, body = text.partition("\n")
    title = re.sub(r" \(\d+ problems?\):$", "", head)
    problems = []
    for item in re.split(r"^  - ", body, flags=re.M)[1:]:
        item = re.sub(r"\n  ", "\n", item.rstrip("\n"))  # render() indents each problem's lines by two spaces
        item, _, hint = item.partition("\n    hint: ")
        where, sep, message = item.partition(": ")
        problems.append(Problem(where, message, hint or None) if sep else Problem("", where, hint or None))
    return UserError(problems or text, title if problems else "invalid input")


class TrainingFailed(Exception):
    """A worker failed during training (exit code 1); `details` names the rank and its error. `title` heads the
    message: what failed (a fault while preparing the data is not one of training)."""

    exit_code = 1

    def __init__(self, message: str, details: str = "", title: str = "training failed"):
        self.details, self.title = details, title
        super().__init__(message)


class NodesNeverMet(TrainingFailed):
    """The nodes did not all reach the rendezvous in time: no worker started, nothing was trained (exit code 1)."""


class Interrupted(Exception):
    """Training stopped on Ctrl-C/SIGTERM after saving a checkpoint (exit code 130)."""

    exit_code = 130


class InterruptedBeforeStart(Interrupted):
    """Ctrl-C/SIGTERM before any worker started (a node waiting at the rendezvous): no step ran (exit code 130)."""


UTF8_HINT = "save the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`"


def read_utf8(path: Any, title: str) -> str:
    """The text of `path`, UTF-8 (a byte-order mark, as some Windows editors write, is skipped).

    Raises:
        UserError: the file is not UTF-8; names file:line of the first bad byte.
    """
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(
            Problem(
                f"{path}:{line}",
                f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at offset {exc.start} ({exc.reason})",
                UTF8_HINT,
            ),
            title,
        ) from None


def is_whole(value: object) -> bool:
    """An integer that is not a bool (True is an int to Python: num_gpus=True would mean 1); NumPy's count too."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_number(value: object, finite: bool = True) -> bool:
    """A real number that is not a bool; finite unless `finite=False` (a metrics row may hold a NaN loss)."""
    return (
        isinstance(value, numbers.Real) and not isinstance(value, bool) and (not finite or math.isfinite(value))  # type: ignore[arg-type]
    )


def how_it_ended(exitcode: int) -> str:
    """A process's end in words: "exit code 3", "killed by SIGKILL: the out-of-memory killer, or kill -9"."""
    import signal

    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        return f"killed by signal {-exitcode}"
    return f"killed by {name}" + (": the out-of-memory killer, or kill -9" if exitcode == -signal.SIGKILL else "")
