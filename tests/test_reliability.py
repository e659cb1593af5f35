"""Faults during training (issue #10): nothing lost, nothing left running, every error explained.

Real `mgpu train` runs (2 CPU workers over gloo, real Unsloth) with faults injected at the edges through
`MGPU_INJECT_FAULT` (faults.py): a worker killed by SIGKILL, a hung worker, out-of-memory in the forward,
non-finite losses. Each run is started in its own session so that afterwards we can prove no process of it
is left. The cheap, worker-free security checks are here too.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from conftest import ROOT, adapter, assert_user_error, max_rel_diff, mgpu_env, run_mgpu, start_mgpu, wait_until
from safetensors.torch import load_file
from typer.testing import CliRunner

from unsloth_mgpu_cli import cli
from unsloth_mgpu_cli import distributed as D
from unsloth_mgpu_cli.recipe import load_recipe
from unsloth_mgpu_cli.trainer import model_load_kwargs

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BASE = [
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.learning_rate=5e-3",
    "training.micro_batch_size=4",
    "distributed.num_gpus=2",
    "distributed.device=cpu",
    "distributed.aggregation=weighted",
    "logging.progress=false",
]


def session_processes(sid: int) -> list[psutil.Process]:
    """Live processes of session `sid`. Zombies are left out: they are dead and only wait for the container's
    PID 1 (which does not reap orphans here) to collect them."""
    found = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        except (ProcessLookupError, psutil.NoSuchProcess, PermissionError):
            continue
    return found


def train(out: Path, *args: str, fault: str = "", timeout: float = 240, **env: str):
    """Run `mgpu train` in a new session; return (exit code, output, seconds, processes left in the session)."""
    t0 = time.monotonic()
    proc = start_mgpu("train", str(QUICKSTART), *BASE, f"output.dir={out}", *args, MGPU_INJECT_FAULT=fault, **env)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:  # only on a test failure: do not leave the run behind either
            os.killpg(proc.pid, 9)
            proc.wait()
    seconds = time.monotonic() - t0
    return proc.returncode, output, seconds, left_in_session(proc.pid)


def stop_and_time(proc: subprocess.Popen[str], *signals: int, to_group: bool) -> tuple[str, float]:
    """Send `signals` 0.3 s apart, to the whole session (a terminal's Ctrl-C) or to the launcher alone (`kill PID`);
    return the run's output and the seconds from the last signal to its exit."""
    for i, sig in enumerate(signals):
        time.sleep(0.3 if i else 0)
        (os.killpg if to_group else os.kill)(proc.pid, sig)
    sent = time.monotonic()
    output, _ = proc.communicate(timeout=120)
    return output, time.monotonic() - sent


def left_in_session(sid: int, wait_s: float = 5.0) -> list[psutil.Process]:
    """The processes of session `sid` still alive after up to `wait_s` (the agent's children, the resource tracker
    may take a moment to end after the launcher)."""
    deadline = time.monotonic() + wait_s
    while (left := session_processes(sid)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


# ---------------------------------------------------------------------------------------------------------
# Worker death
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_sigkill_of_one_rank_stops_everything_keeps_the_checkpoint_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    code, output, _, left = train(out, "training.max_steps=6", "output.save_steps=2", fault="sigkill:rank=1:step=5")
    stopped = time.time()
    assert code == 1, output
    assert "rank 1 failed: killed by signal SIGKILL" in output
    assert "Traceback" not in output
    assert left == [], f"processes left behind: {left}"
    ckpt = out / "checkpoints" / "step-4"
    flat = " ".join(output.split())  # the way on, as after Ctrl-C: the checkpoint and the exact command
    assert f"the newest checkpoint is {ckpt}; continue with: mgpu train" in flat and "--resume auto" in flat, output
    # the last checkpoint before step 5 was written just before the kill: everything stopped within 30 s of it
    assert stopped - (ckpt / "state.json").stat().st_mtime < 30
    assert json.loads((ckpt / "state.json").read_text())["step"] == 4
    assert load_file(str(ckpt / "trainable.safetensors"))  # intact, loadable
    assert not list((out / "checkpoints").glob(".tmp-*"))  # no half-written checkpoint
    assert not (out / "adapter").exists()

    code, output, _, left = train(out, "training.max_steps=6", "output.save_steps=2", "--resume", "auto")
    assert code == 0, output
    assert f"resuming from {ckpt}" in output.replace("\n", "")
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [5, 6]
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert left == []


# ---------------------------------------------------------------------------------------------------------
# A hang
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_a_hung_rank_becomes_an_error_naming_the_timeout_the_rank_and_the_setting(tmp_path):
    code, output, seconds, left = train(tmp_path / "run", "distributed.timeout_seconds=15", fault="sleep:rank=1:step=3")
    assert code == 1, output
    assert "hang watchdog" in output
    assert "distributed.timeout_seconds=15" in output and "raise distributed.timeout_seconds" in output
    assert "rank(s) 1 did not reach the collective (hung)" in output
    assert "Traceback" not in output
    assert left == [], f"processes left behind: {left}"
    assert seconds < 120  # not the sleep's 3600 s
    # the hung rank took the launcher's SIGTERM as the teardown and left at once, not after torch's 30 s SIGKILL
    logs = "".join(p.read_text() for p in (tmp_path / "run" / "logs").rglob("stderr.log"))
    assert "stopped by the launcher: another rank failed" in logs, logs[-2000:]
    assert "Terminating process" not in output  # torch's spawn warnings stay out of the user's console


# ---------------------------------------------------------------------------------------------------------
# Out of memory
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An un-injected run; also shows that secrets in the environment end up nowhere."""
    out = tmp_path_factory.mktemp("oom") / "reference"
    code, output, _, _ = train(out, HF_TOKEN="secret-xyz-hf", WANDB_API_KEY="secret-xyz-wandb")
    assert code == 0, output
    return out, output


@pytest.mark.integration
def test_oom_splits_the_micro_batch_on_all_ranks_with_the_same_gradients(reference, tmp_path):
    out = tmp_path / "oom"
    # rank 1 cannot fit micro-batches of more than 1 sample from step 2 on: 4 -> 2 -> 1
    code, output, _, left = train(out, fault="oom:rank=1:step=2:until=4:above=1")
    assert code == 0, output
    assert (
        "step 2: out of memory on 1 rank(s) with micro-batches of 4 samples; retrying the step in pieces of 2"
        in output.replace("\n", "")
    )
    assert "pieces of 1" in output and "training.micro_batch_size=1" in output
    assert "gradient_accumulation_steps=4" in output
    got, want = adapter(out), adapter(reference[0])
    assert got.keys() == want.keys()
    assert all(float(want[k].abs().max()) > 1e-4 for k in want if "lora_B" in k)  # it did train
    # float32: halved micro-batches pad and sum in another order, so agreement is to rounding, not bits
    assert max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)) for k in want) < 1e-4
    assert left == []


@pytest.mark.integration
def test_oom_at_one_sample_saves_and_stops(tmp_path):
    out = tmp_path / "run"
    code, output, _, left = train(
        out, "distributed.num_gpus=1", "output.save_steps=0", fault="oom:rank=0:step=3:until=9:above=0"
    )
    assert code == 1, output
    assert "out of memory at step 3" in output and "even with micro-batches of 1 sample" in output
    assert "checkpoint saved at step 2" in output and "model.max_seq_length" in output
    assert json.loads((out / "checkpoints" / "step-2" / "state.json").read_text())["step"] == 2
    assert "Traceback" not in output
    assert left == []


# ---------------------------------------------------------------------------------------------------------
# Non-finite losses
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_non_finite_steps_are_skipped_together_then_stop_naming_where_it_started(tmp_path):
    out = tmp_path / "run"
    code, output, _, left = train(
        out,
        "training.max_steps=8",
        "training.max_skipped_steps=3",
        "output.save_steps=0",
        fault="nan:rank=1:step=3:until=99",
    )
    assert code == 1, output
    assert "3 optimizer steps in a row had a non-finite loss or gradient, starting at step 3" in output
    assert "training.max_skipped_steps=3" in output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # steps 1-2 trained, 3-4 skipped (step 5 raised before logging); the skip is global, not per rank
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 2]
    assert all(r["loss"] == r["loss"] for r in rows[:2]) and all(r["loss"] != r["loss"] for r in rows[2:])
    assert left == []


# ---------------------------------------------------------------------------------------------------------
# Steps queued before the previous one is settled (trainer.py `Trainer.fit`: look-ahead)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_queued_steps_equal_settled_steps_through_a_skip_a_stop_and_an_oom(tmp_path):
    """With 8-bit AdamW the loop queues step k+1 before it reads step k's outcome, and the device undoes step k's
    update when a rank saw a non-finite value or ran out of memory. Every path of that must give the weights of
    the loop that settles each step first (`MGPU_LOOKAHEAD=0`), to the bit: a skipped step (3), a stop request
    (4: step 5, already queued, is dropped; the run resumes from step 4's checkpoint) and an out-of-memory redo
    (6: step 7 is dropped, step 6 runs again in halves)."""
    # (quickstart.yaml trains with torch's AdamW, which settles every step; LoRA dropout draws random numbers in
    # every forward: a dropped step must give them back)
    args = (
        "training.optimizer=adamw_8bit",
        "training.max_steps=8",
        "output.save_steps=0",
        "distributed.verify_every=0",
    )
    args += ("lora.dropout=0.1",)
    faults = "nan:rank=1:step=3;oom:rank=0:step=6:until=99:above=2"
    settled, ahead, stopped, control = (tmp_path / n for n in ("settled", "ahead", "stopped", "control"))
    runs = {
        settled: train(settled, *args, fault=faults, MGPU_LOOKAHEAD="0"),
        ahead: train(ahead, *args, fault=faults),
        stopped: train(stopped, *args, fault=faults + ";stop:rank=1:step=4"),
    }
    code, output, _, _ = runs[stopped]
    assert code == 130, output
    assert [p.name for p in (stopped / "checkpoints").iterdir()] == ["step-4"]
    code, output, _, left = train(stopped, *args, "--resume", "auto", fault=faults)
    assert code == 0 and left == [], output
    for out in (settled, ahead):
        code, output, _, left = runs[out]
        assert code == 0 and left == [], output
        assert "step 3: non-finite loss or gradient on 1 rank(s) (rank 1)" in output.replace("\n", "")
        assert "retrying the step in pieces of 2" in output.replace("\n", "")
    assert [json.loads((out / "summary.json").read_text())["look_ahead"] for out in (settled, ahead)] == [False, True]
    want = adapter(settled)
    assert all(float(want[k].abs().max()) > 1e-4 for k in want if "lora_B" in k)  # it trained
    for out in (ahead, stopped):
        got = adapter(out)
        assert all(torch.equal(want[k], got[k]) for k in want), {k: float((want[k] - got[k]).abs().max()) for k in want}
    rows = {out: [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] for out in runs}
    keys = ("step", "loss", "learning_rate", "skipped_steps", "longest_row")
    for out in (ahead, stopped):
        assert [[r[k] for k in keys] for r in rows[out]] == [[r[k] for k in keys] for r in rows[settled]]
        assert [r["grad_norm"] for r in rows[out] if r["step"] != 3] == [
            r["grad_norm"] for r in rows[settled] if r["step"] != 3
        ]
    assert [r["skipped_steps"] for r in rows[ahead]] == [0, 0, 1, 1, 1, 1, 1, 1]
    # the queued steps' rows carry every rank's device time too (it travels with the next step's collective)
    assert all(len(r["compute_s"]) == 2 for r in rows[ahead])
    # control: the same run without the non-finite step ends elsewhere, so the comparison above can fail
    code, output, _, _ = train(control, *args, fault="oom:rank=0:step=6:until=99:above=2")
    assert code == 0, output
    assert max_rel_diff(adapter(control), want) > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Security defaults
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_no_secret_from_the_environment_is_written_or_printed(reference):
    out, output = reference
    assert "secret-xyz" not in output
    for f in out.rglob("*"):
        if f.is_file():
            assert b"secret-xyz" not in f.read_bytes(), f


class _Bomb:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_pickle_bomb_without_running_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "out" / "checkpoints" / "step-2"
    ckpt.mkdir(parents=True)
    (ckpt / "state.json").write_text(json.dumps({"step": 2}))
    with (ckpt / "optimizer.pt").open("wb") as fh:
        pickle.dump({"state": _Bomb(marker)}, fh)
    proc_env = mgpu_env()
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "unsloth_mgpu_cli",
            "train",
            str(QUICKSTART),
            *BASE,
            f"output.dir={tmp_path / 'out'}",
            "--resume",
            "auto",
        ],
        cwd=ROOT,
        env=proc_env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert_user_error(result, "optimizer.pt", "refused to load", "weights_only")
    assert not marker.exists()
    assert "launching" not in result.stdout  # refused in the parent, before any worker


def test_trust_remote_code_is_passed_only_when_the_recipe_sets_it():
    loaded = load_recipe(QUICKSTART, ["distributed.device=cpu"])
    assert model_load_kwargs(loaded.recipe, "/m", torch.float32, "cpu")["trust_remote_code"] is False
    loaded = load_recipe(QUICKSTART, ["distributed.device=cpu", "model.trust_remote_code=true"])
    assert model_load_kwargs(loaded.recipe, "/m", torch.float32, "cpu")["trust_remote_code"] is True
    result = CliRunner().invoke(cli.app, ["validate", str(QUICKSTART), "model.trust_remote_code=yes please"])
    assert result.exit_code == 2 and "model.trust_remote_code" in result.output


def test_single_node_rendezvous_stays_on_loopback():
    config = D.build_launch_config(D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    host, _, port = config.rdzv_endpoint.rpartition(":")
    assert host == "127.0.0.1" and port.isdigit()
    assert config.local_addr == "127.0.0.1"
    multi = D.build_launch_config(
        D.LaunchSpec(nproc_per_node=2, device_type="cpu", nnodes=2, rdzv_endpoint="10.1.2.3:29400")
    )
    assert multi.rdzv_endpoint == "10.1.2.3:29400" and multi.local_addr is None


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
    args += ["dataset.too_long=drop", "dataset.num_proc=1", *BASE, f"output.dir={tmp_path / 'out'}"]
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


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_second_signal_to_the_launcher_alone_stops_the_workers_at_once(tmp_path, sig):
    """`kill PID` twice, or `docker stop` (SIGTERM to the launcher only): after the first, the workers take a
    SIGTERM as "finish the step"; the agent's SIGTERM after the second was taken so too, and the run ended only when
    torch SIGKILLed the workers 30 s later. `kill -INT PID` twice: the agent passes on the signal it got, and a
    SIGINT was taken as a person's first Ctrl-C, with the same 30 s."""
    out = tmp_path / "run"
    args = ["train", str(QUICKSTART), *BASE, "distributed.num_gpus=1", "training.max_steps=400", f"output.dir={out}"]
    proc = start_mgpu(*args, MGPU_INJECT_FAULT="slow:rank=0:step=1:until=1000:us=2000", OMP_NUM_THREADS="1")
    metrics = out / "metrics.jsonl"
    wait_until(proc, lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, 240, "3 steps logged")
    output, took = stop_and_time(proc, sig, sig, to_group=False)
    assert proc.returncode == 130 and took < 10, (proc.returncode, took, output[-3000:])
    assert f"stopped at once on a second {sig.name}" in output and "Traceback" not in output, output[-3000:]
    assert left_in_session(proc.pid) == []


@pytest.mark.integration
def test_ctrl_c_while_the_workers_import_torch_stops_before_the_model_loads_without_a_traceback(tmp_path):
    """A worker imports torch before any of our code runs in it (unpickling its entry point): a Ctrl-C then killed it
    with a KeyboardInterrupt traceback on the console. The launcher now starts the workers with the stop signals
    held, and each takes a held one as a stop request once its handlers are in place: no step, no model load."""
    out = tmp_path / "run"
    proc = start_mgpu("train", str(QUICKSTART), *BASE, f"output.dir={out}", OMP_NUM_THREADS="1")

    def worker_started() -> bool:
        return any("spawn_main" in " ".join(c.cmdline()) for c in psutil.Process(proc.pid).children(recursive=True))

    wait_until(proc, worker_started, 120, "a worker process")
    time.sleep(0.1)  # importing torch takes seconds on the CI machine
    output, took = stop_and_time(proc, signal.SIGINT, to_group=True)
    assert proc.returncode == 130 and took < 30, (proc.returncode, took, output[-3000:])
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output[-3000:]
    assert "stopped before the first step of this session: nothing new to save" in output, output[-3000:]
    assert "LlamaForCausalLM" not in output, output[-3000:]  # Unsloth's line as it loads the model
    assert not (out / "checkpoints").exists() and left_in_session(proc.pid) == []
