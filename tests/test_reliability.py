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

import psutil
import pytest
import torch
from conftest import (
    ROOT,
    adapter,
    assert_user_error,
    left_in_session,
    max_rel_diff,
    mgpu_env,
    start_mgpu,
    stop_and_time,
    wait_until,
)
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
