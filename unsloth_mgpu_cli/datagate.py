"""Tokenise the data while the workers start.

On a data-cache miss, `mgpu train` has two slow start-up jobs that need nothing from each other: tokenising (the
tokenizer's import and the rows: 5-15 s on the GPU machine) and each worker's start (`import unsloth`: 7-30 s). The
launcher forks a child that prepares the data (`data.prepare`, the checks that need its counts, the data lines on
the console) and starts the workers at once. Each worker registers here, imports Unsloth, and waits at the gate,
before it loads the model, for the child's result.

A refusal (bad rows, no sample left, a global batch larger than the data) is written here for the launcher, which
raises it as before (exit 2, output.dir as it was); the child ends the registered workers at once rather than let
them finish their import. One node only: under torchrun or with several nodes every process prepares first.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .errors import Problem, TrainingFailed, UserError, how_it_ended
from .paths import write_text_atomically

RESULT = "result.json"  # the child's outcome, written once (atomically)
POLL_S = 0.05


class DataGate:
    """The child preparing the data, and the folder where it leaves its result for the launcher and the workers."""

    def __init__(self, folder: Path, process: Any):
        self.folder = folder
        self.process = process

    @property
    def pid(self) -> int:
        return int(self.process.pid)

    @classmethod
    def start(cls, work: Callable[[], None]) -> DataGate:
        """Fork a child that runs `work` (prepare, check, print) and records how it ended.

        Fork: the launcher holds no CUDA context and no threads yet (the elastic agent starts after this), and the
        child needs the launcher's resolved recipe, not a fresh interpreter's imports.
        """
        import multiprocessing as mp

        folder = Path(tempfile.mkdtemp(prefix="mgpu-data-"))
        process = mp.get_context("fork").Process(target=_child, args=(folder, work), name="mgpu-data")
        process.start()
        return cls(folder, process)

    def outcome(self) -> UserError | TrainingFailed | None:
        """The child's refusal (UserError) or failure (TrainingFailed), if it recorded one, or its death without a
        result (killed: TrainingFailed); None otherwise (also when Ctrl-C interrupted it: the workers stop on their
        own, and the launcher reports the interruption)."""
        result = read_result(self.folder)
        if result is None:
            self.process.join(timeout=1)  # the workers saw it gone: reap it
            if self.process.exitcode in (None, 0) or read_result(self.folder) is not None:
                return None
            return TrainingFailed(
                f"the process preparing the data ended without a result ({how_it_ended(self.process.exitcode)})",
                "hint: run it again; if memory ran out, lower dataset.num_proc or free memory",
                title="preparing the data failed",
            )
        if result.get("ok") or result.get("interrupted"):
            return None
        return _as_error(result)

    def close(self) -> None:
        """End the child if it still runs (the workers failed or stopped first: one SIGTERM, which it takes as
        Ctrl-C, or none when a Ctrl-C reached it already), and remove the folder."""
        if self.process.is_alive():
            self.process.terminate()  # ignored after a first stop: the child is ending its work already
            self.process.join(timeout=30)
            if self.process.is_alive():
                self.process.kill()  # its pool's processes die with it (data._init_worker)
        self.process.join(timeout=5)
        shutil.rmtree(self.folder, ignore_errors=True)


def _child(folder: Path, work: Callable[[], None]) -> None:
    from .distributed import die_with_parent

    die_with_parent()  # a launcher killed outright takes the child along
    # SIGTERM (the launcher's close() after the workers failed) ends the work like Ctrl-C: a pool of tokenising
    # processes is stopped (data._stop_pool), no half-written cache is left (data._write_cache renames into place).
    # Only the first of them: a second (Ctrl-C, then the launcher's close()) would break off the pool's stop and
    # leave its processes running.
    signal.signal(signal.SIGINT, _stop_once)
    signal.signal(signal.SIGTERM, _stop_once)
    result: dict[str, Any]
    try:
        work()
        result = {"ok": True}
    except UserError as exc:
        result = {"ok": False, "title": exc.title, "problems": [asdict(p) for p in exc.problems]}
    except TrainingFailed as exc:  # a fault it describes (a tokenising process killed): no traceback
        result = {"ok": False, "title": exc.title, "failed": str(exc), "details": exc.details}
    except KeyboardInterrupt:  # Ctrl-C reached the workers too: they stop and the launcher reports it
        result = {"ok": False, "interrupted": True}
    except BaseException:  # a bug or a fault: its traceback goes to the launcher's report
        result = {"ok": False, "error": traceback.format_exc()}
    result["at"] = time.time()
    with contextlib.suppress(Exception):  # what the child printed comes before anything a worker prints after it
        sys.stdout.flush()
        sys.stderr.flush()
    write_text_atomically(folder / RESULT, json.dumps(result))
    if not result["ok"] and not result.get("interrupted"):
        _end_workers(folder)


def _stop_once(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def read_result(folder: Path) -> dict[str, Any] | None:
    """The child's result, or None while it has written none."""
    try:
        return json.loads((folder / RESULT).read_text())
    except FileNotFoundError:
        return None


def _end_workers(folder: Path) -> None:
    """Kill the registered workers: they are importing Unsloth (nothing to save, nothing to close) and would
    otherwise take that long to find the refusal."""
    for marker in folder.glob("worker-*.pid"):
        with contextlib.suppress(ValueError, OSError):
            os.kill(int(marker.read_text()), signal.SIGKILL)


def _as_error(result: dict[str, Any]) -> UserError | TrainingFailed:
    if "problems" in result:
        return UserError([Problem(**p) for p in result["problems"]], result["title"])
    if "failed" in result:
        return TrainingFailed(result["failed"], result["details"], result["title"])
    return TrainingFailed("preparing the data failed", result.get("error", ""))


# -- worker side -----------------------------------------------------------------------------------------------
def register(folder: Path, rank: int) -> None:
    """A worker's first step: leave its pid for the child to end on a refusal, then look for one already made (a
    refusal written before the pid was would otherwise be found only after the import)."""
    (folder / f"worker-{rank}.pid").write_text(str(os.getpid()))
    result = read_result(folder)
    if result is not None and not result.get("ok") and not result.get("interrupted"):
        raise _as_error(result)


def wait_for_data(folder: Path, child_pid: int, stop_requested: Callable[[], bool]) -> float | None:
    """Block until the child's result. Returns when the data was ready (its clock), or None when this worker was
    asked to stop first.

    Raises:
        UserError: the child refused the run (the launcher reports the same error).
        TrainingFailed: the child failed, or ended without a result.
    """
    while True:
        result = read_result(folder)
        if result is not None:
            if result.get("ok"):
                return float(result["at"])
            if result.get("interrupted"):
                return None
            raise _as_error(result)
        if stop_requested():
            return None
        if not _alive(child_pid):
            if (result := read_result(folder)) is not None:  # it wrote its result and ended since the first look
                continue
            raise TrainingFailed("the process preparing the data ended without a result (killed?)")
        time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    if not Path("/proc").is_dir():  # not Linux: whether it exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
