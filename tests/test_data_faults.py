"""Faults and Ctrl-C while the data is tokenised: by a pool of processes, in `prepare` or in the child that
tokenises beside the workers' start (datagate.py); a full disk while mgpu's cache is written. (Apart from
test_reliability.py so that `make test`'s two workers share these out.)"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    ROOT,
    assert_user_error,
    left_in_session,
    mgpu_env,
    run_mgpu,
    start_mgpu,
    stop_and_time,
    wait_until,
)

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def big_data(path: Path) -> None:
    """120,000 short alpaca rows: tokenised by a pool of processes (dataset.num_proc=2) for several seconds."""
    rows = (
        json.dumps({"instruction": f"Add {i} and {i % 97}.", "input": "", "output": str(i + i % 97)}) + "\n"
        for i in range(120_000)
    )
    path.write_text("".join(rows))


def tokenising_pool(proc: subprocess.Popen[str], gate_tmp: Path | None = None) -> tuple[psutil.Process, list[Any]]:
    """(the pool's parent, its processes) once the tokenising pool under `proc` has worked for a second. `gate_tmp`:
    the run's TMPDIR; the pool is then the tokenising child's (datagate.py), and both workers registered first (in
    the gate's folder there)."""

    def found() -> tuple[psutil.Process, list[Any]] | None:
        launcher = psutil.Process(proc.pid)
        parents = [launcher] if gate_tmp is None else launcher.children()
        if gate_tmp is not None and len(list(gate_tmp.glob("mgpu-data-*/worker-*.pid"))) < 2:
            return None
        return next(((p, p.children()) for p in parents if len(p.children()) >= 2), None)

    wait_until(proc, lambda: found() is not None, 120, "the tokenising pool's processes")
    time.sleep(1.0)  # tokenising
    parent_and_pool = found()
    assert parent_and_pool is not None
    return parent_and_pool


@pytest.mark.integration
def test_ctrl_c_while_a_process_pool_tokenises_stops_at_once_and_leaves_no_process(tmp_path):
    """Large data is tokenised by a pool of processes. Ctrl-C reached every process of the group: the pool's
    processes died in the middle of a queue operation (a second Ctrl-C then left the parent waiting on them
    forever), or the pool ran all its queued work first (14 s) and the command exited without a word."""
    big_data(tmp_path / "big.jsonl")
    args = ["prepare", str(QUICKSTART), f"dataset.path={tmp_path / 'big.jsonl'}", "dataset.num_proc=2"]
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    tokenising_pool(proc)
    out, took = stop_and_time(proc, signal.SIGINT, to_group=True)
    assert proc.returncode == 130 and took < 5, (proc.returncode, took, out[-3000:])
    assert "interrupted: stopped while preparing" in out and "Traceback" not in out, out[-3000:]
    assert left_in_session(proc.pid) == []
    assert not list((tmp_path / "cache").glob("data/*/meta.json"))  # no cache that looks complete


@pytest.mark.integration
def test_ctrl_c_while_data_is_tokenised_beside_the_workers_start_stops_and_leaves_no_process(tmp_path):
    """A cold data cache: a child of the launcher tokenises (here with a pool of 2 processes: 120,000 rows) while the
    workers import Unsloth (datagate.py). Ctrl-C reaches them all: the child stops its pool and records the
    interruption, and the workers agree to stop before the model loads. Exit 130 without a traceback, nothing left
    running, no cache that looks complete."""
    big_data(tmp_path / "big.jsonl")  # about 30 s of tokenising in 2 processes on the 2-core CI machine
    args = ["train", str(QUICKSTART), f"dataset.path={tmp_path / 'big.jsonl'}", "dataset.num_proc=2"]
    args += ["distributed.num_gpus=2", f"output.dir={tmp_path / 'out'}"]
    tmp = tmp_path / "tmp"  # where the launcher's gate folder goes (tempfile): the workers register there
    tmp.mkdir()
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    tokenising_pool(proc, gate_tmp=tmp)  # the workers registered; the pool past its start (it ignores SIGINT)
    out, took = stop_and_time(proc, signal.SIGINT, to_group=True)
    assert proc.returncode == 130 and took < 60, (proc.returncode, took, out[-3000:])
    assert "interrupted" in out and "Traceback" not in out, out[-3000:]
    assert left_in_session(proc.pid) == []
    assert not list((tmp_path / "cache").glob("data/*/meta.json"))  # no cache that looks complete


@pytest.mark.integration
def test_data_refused_while_the_workers_import_ends_them_at_once_and_leaves_no_process(tmp_path):
    """A refusal found only while tokenising (here every row too long) beside the workers' start: the child kills
    the registered workers, which would otherwise import Unsloth to the end (its banner; 7 s more here) before
    they found the refusal. Exit 2 with the cause, no output folder, nothing left running."""
    rows = "".join(
        json.dumps({"instruction": f"Say {i} " + "hi " * 20, "input": "", "output": "hi"}) + "\n" for i in range(20_000)
    )
    (tmp_path / "long.jsonl").write_text(rows)
    args = ["train", str(QUICKSTART), f"dataset.path={tmp_path / 'long.jsonl'}", "model.max_seq_length=16"]
    args += ["dataset.too_long=drop", "dataset.num_proc=1", "distributed.num_gpus=2", "distributed.device=cpu"]
    args += ["logging.progress=false", f"output.dir={tmp_path / 'out'}"]
    tmp = tmp_path / "tmp"  # where the launcher's gate folder goes (tempfile): the workers register there
    tmp.mkdir()
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    registered = lambda: len(list(tmp.glob("mgpu-data-*/worker-*.pid"))) == 2  # noqa: E731
    wait_until(proc, registered, 120, "both workers registered while the child tokenises")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "no samples left after dropping 20000" in out, out[-3000:]
    assert "Unsloth 20" not in out and "Traceback" not in out, out[-3000:]  # no worker got through its import
    assert left_in_session(proc.pid) == [] and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_a_tokenising_process_killed_is_a_fault_named_as_such_without_a_traceback(tmp_path):
    """The pool broke (BrokenProcessPool) and `mgpu prepare` ended in a 40-line traceback (exit 1)."""
    big_data(tmp_path / "big.jsonl")
    args = ["prepare", str(QUICKSTART), f"dataset.path={tmp_path / 'big.jsonl'}", "dataset.num_proc=2"]
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    tokenising_pool(proc)[1][0].kill()  # as the out-of-memory killer does
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "preparing the data failed: one of the 2 tokenising processes ended abruptly (killed by SIGKILL" in out
    assert "lower dataset.num_proc (now 2" in out, out[-3000:]
    assert left_in_session(proc.pid) == [] and not list((tmp_path / "cache").glob("data/*/meta.json"))


@pytest.mark.integration
def test_a_tokenising_process_killed_beside_the_workers_start_stops_the_run_and_puts_output_dir_back(tmp_path):
    """The same under `mgpu train` with a cold cache: the tokenising child reports the fault (not a traceback), the
    workers are ended, and output.dir goes back as it was (nothing trained: the same command runs again)."""
    big_data(tmp_path / "big.jsonl")
    args = ["train", str(QUICKSTART), f"dataset.path={tmp_path / 'big.jsonl'}", "dataset.num_proc=2"]
    args += ["distributed.num_gpus=2", f"output.dir={tmp_path / 'out'}"]
    tmp = tmp_path / "tmp"  # where the launcher's gate folder goes (tempfile): the workers register there
    tmp.mkdir()
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    tokenising_pool(proc, gate_tmp=tmp)[1][0].kill()
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1 and "Traceback" not in out, out[-3000:]
    assert "preparing the data failed: one of the 2 tokenising processes ended abruptly" in out, out[-3000:]
    assert left_in_session(proc.pid) == [] and not (tmp_path / "out").exists()


@pytest.mark.integration
def test_the_tokenising_child_killed_stops_the_run_and_leaves_no_process(tmp_path):
    """The child tokenising beside the workers' start killed outright: its pool's processes took their parent-death
    SIGTERM as a stop (the child's handler, inherited), then ignored SIGTERM and waited for work forever, orphans
    holding the run's output open; the run printed "training failed" and kept output.dir."""
    big_data(tmp_path / "big.jsonl")
    args = ["train", str(QUICKSTART), f"dataset.path={tmp_path / 'big.jsonl'}", "dataset.num_proc=2"]
    args += ["distributed.num_gpus=2", f"output.dir={tmp_path / 'out'}"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    proc = start_mgpu(*args, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", TMPDIR=str(tmp))
    tokenising_pool(proc, gate_tmp=tmp)[0].kill()
    try:
        out = proc.communicate(timeout=60)[0]  # orphans holding the output open: a timeout
    finally:
        left = left_in_session(proc.pid)
        for p in left:  # only on a failure: no orphan outlives the test
            p.kill()
    assert left == [] and proc.returncode == 1 and "Traceback" not in out, (left, out[-3000:])
    expected = "preparing the data failed: the process preparing the data ended without a result (killed by SIGKILL"
    assert expected in out and not (tmp_path / "out").exists(), out[-3000:]


@pytest.mark.integration
def test_a_full_disk_while_the_cache_is_written_names_the_cache_and_leaves_nothing_half_written(tmp_path):
    """No file may grow past 64 KiB (RLIMIT_FSIZE: EFBIG, as on a full disk). Writing the builtin model (2.2 MB)
    into the cache, then the tokenised data (374 KB of ids), ended in a traceback (safetensors', numpy's)."""
    import shutil

    from unsloth_mgpu_cli.models import ensure_builtin_model

    cache = tmp_path / "cache"
    proc = run_mgpu("prepare", str(QUICKSTART), UNSLOTH_MGPU_CACHE=str(cache), max_file_bytes=64 << 10)
    assert_user_error(proc, f"UNSLOTH_MGPU_CACHE ({cache}): cannot write the builtin model", "nothing was left half")
    assert "set UNSLOTH_MGPU_CACHE to a folder on a disk with room" in proc.stderr, proc.stderr[-3000:]
    assert list((cache / "models").iterdir()) == []
    model = ensure_builtin_model("builtin:tiny-llama")
    shutil.copytree(model, cache / "models" / model.name)  # the model in place: the data's turn
    proc = run_mgpu("prepare", str(QUICKSTART), UNSLOTH_MGPU_CACHE=str(cache), max_file_bytes=64 << 10)
    assert_user_error(proc, f"UNSLOTH_MGPU_CACHE ({cache}): cannot write the tokenised data to {cache / 'data'}")
    assert list((cache / "data").iterdir()) == []


def run_probe(script: str, data: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """tests/SCRIPT DATA in a process of its own (the probes fork: not from pytest's), with a data cache of the test's
    own beside DATA."""
    env = mgpu_env(UNSLOTH_MGPU_CACHE=str(data.parent / "cache"), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tests" / script), str(data)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_ctrl_c_while_a_tokenising_pool_starts_neither_kills_it_nor_prints_a_traceback(tmp_path):
    """The pool's processes ignore SIGINT once their initializer runs; a Ctrl-C before that (here: their start
    slowed by 2 s) ended each with a KeyboardInterrupt traceback, and the pool broke. Born with SIGINT blocked, they
    now take none: the tokenising goes on (the parent's own stop is the tests above)."""
    rows = "".join(json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n" for i in range(5000))
    (tmp_path / "rows.jsonl").write_text(rows)
    proc = run_probe("pool_start_probe.py", tmp_path / "rows.jsonl", timeout=120)
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0 and lines[-2] == "done", proc.stdout[-2000:] + proc.stderr[-3000:]
    assert json.loads(lines[-1]) == {"pool": 2, "left": []}
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr[-3000:]


def test_a_data_gate_closed_while_its_child_stops_its_pool_leaves_no_process(tmp_path):
    """Ctrl-C reaches the tokenising child of a DataGate, and the launcher's close() sends SIGTERM while the child
    stops its pool (the workers stopped first): the second signal must not break off the pool's stop, whose
    processes ignore SIGINT and would run on (and hold the terminal's output open)."""
    rows = "".join(
        json.dumps({"instruction": f"Say {i}.", "input": "", "output": str(i)}) + "\n" for i in range(120_000)
    )
    (tmp_path / "big.jsonl").write_text(rows)
    proc = run_probe("gate_probe.py", tmp_path / "big.jsonl", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pool"] == 2 and result["left"] == [], result


def test_a_stopped_tokenising_pool_leaves_nothing_for_the_exit_hook_to_wake():
    """concurrent.futures' exit hook wakes each pool's manager thread through a pipe, unlocked; a manager that closed
    it meanwhile gave "Exception ignored ... Bad file descriptor" after the interrupted message (once in CI). The
    manager was meant to be forgotten, but was looked up after shutdown(), which drops the pool's reference."""
    import concurrent.futures.process as cfp
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from unsloth_mgpu_cli.data import _stop_pool

    pool = ProcessPoolExecutor(2, mp_context=mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None))
    [pool.submit(time.sleep, 2) for _ in range(8)]  # queued work, as when Ctrl-C comes mid-way
    time.sleep(0.3)
    manager = pool._executor_manager_thread
    assert manager in cfp._threads_wakeups  # the control: the hook knows of it while the pool runs
    _stop_pool(pool)
    assert manager not in cfp._threads_wakeups and not manager.is_alive()


def _twenty_megabytes(_: int) -> bytes:
    return b"x" * 20_000_000


def test_a_pool_process_stopped_while_it_sends_a_result_does_not_leave_the_manager_reading_forever():
    """A result larger than a pipe's buffer goes in several writes; a pool process terminated between two of them
    left its pool's manager thread waiting for the rest (the parent itself holds the pipe's write end), and the
    interpreter, which joins that thread at exit, hung after the interrupted message (once in CI: 120 s)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from unsloth_mgpu_cli.data import _stop_pool

    pool = ProcessPoolExecutor(2, mp_context=mp.get_context("fork" if "fork" in mp.get_all_start_methods() else None))
    [pool.submit(_twenty_megabytes, i) for i in range(40)]  # the processes spend their time sending results
    time.sleep(0.3)
    manager = pool._executor_manager_thread
    t0 = time.monotonic()
    _stop_pool(pool)
    took, stuck = time.monotonic() - t0, manager.is_alive()
    if stuck:  # let this process exit when the test fails
        manager.result_queue._writer.close()
    assert not stuck and took < 4, (stuck, took)
