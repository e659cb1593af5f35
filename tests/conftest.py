"""Shared test helpers: run the real `mgpu` in a subprocess, locate the repository and the shared data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

from unsloth_mgpu_cli.distributed import die_with_parent

# The workers keep a user's OMP_NUM_THREADS: one set in the CI's environment would change the thread counts,
# and so the reduction order, that the tests' tolerances were measured with. The tests give their own.
os.environ.pop("OMP_NUM_THREADS", None)

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
GSM8K = SHARED_DATA / "gsm8k_train_alpaca.json"


# A short `mgpu train` whose result is compared with another run's: weighted aggregation (the update of one big
# batch), replicas checked at every step, a learning rate large enough that the adapters move.
EQUIVALENCE_RUN = [
    "training.max_steps=5",
    "training.warmup_steps=1",
    "training.learning_rate=5e-3",
    "output.save_steps=0",
    "distributed.aggregation=weighted",
    "distributed.verify_every=1",
    "logging.progress=false",
]


# `make test` hands whole files to its workers (pytest-xdist --dist loadfile --no-loadscope-reorder) in collection
# order. The files that train many multi-process runs go first, so that the short ones fill the gaps at the end
# (xdist's own order, by number of tests, started the longest file last and left the other worker idle).
HEAVY_FILES_FIRST = (  # by their measured time (2 workers on the 2-core CI machine, 2026-12-01), longest first
    "test_reliability.py",
    "test_checkpoint_cpu.py",
    "test_engine_cpu.py",
    "test_fsdp_qlora.py",
    "test_data_train.py",
    "test_multinode.py",
    "test_data_faults.py",
    "test_fsdp.py",
    "test_data.py",
    "test_examples.py",
    "test_api_hooks.py",
    "test_distributed.py",
    "test_output_safety.py",
    "test_api.py",
    "test_mix.py",
    "test_families.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(HEAVY_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its own order


# A small Llama-shaped config.json: tests that write a model folder for the planner or `mgpu suggest` start from it.
LLAMA_CONFIG = {
    "model_type": "llama",
    "hidden_size": 1024,
    "num_hidden_layers": 8,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "intermediate_size": 4096,
    "vocab_size": 50000,
}


def mgpu_env(**extra: str) -> dict[str, str]:
    """Environment for subprocess runs: offline, quiet, the checkout first on the import path."""
    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT) + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        PYTHONUNBUFFERED="1",
        COLUMNS="120",
    )
    env.update(extra)
    return env


def packing_probe(*args: str) -> dict[str, Any]:
    """Run tests/packing_probe.py (Unsloth in its own process: it patches transformers process-wide) with `args`;
    its JSON result."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "packing_probe.py"), *args],
        env=mgpu_env(),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_mgpu(
    *args: str,
    cwd: Path | None = None,
    timeout: float = 600,
    env: dict[str, str] | None = None,
    input: str | None = None,
    max_file_bytes: int | None = None,
    **extra_env: str,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m unsloth_mgpu_cli ARGS` (with `input` on stdin) and capture its output. `max_file_bytes`: no
    file may grow past it (RLIMIT_FSIZE: a write past it fails with EFBIG, as on a full disk)."""

    def start() -> None:
        die_with_parent()  # a killed pytest takes its runs down with it (they stop at a step boundary)
        if max_file_bytes is not None:
            import resource

            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    return subprocess.run(
        [sys.executable, "-m", "unsloth_mgpu_cli", *args],
        cwd=cwd or ROOT,
        env=env or mgpu_env(**extra_env),
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=start,
    )


# -- a run's process session (start_mgpu starts one): signals to it, what is left of it --
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


@pytest.fixture
def mgpu():
    return run_mgpu


def start_mgpu(*args: str, **extra_env: str) -> subprocess.Popen[str]:
    """Start `python -m unsloth_mgpu_cli ARGS` in its own session, output and errors in one pipe: the test can signal
    the whole process tree as a terminal does, and check afterwards that none of it is left."""
    return subprocess.Popen(
        [sys.executable, "-m", "unsloth_mgpu_cli", *args],
        cwd=ROOT,
        env=mgpu_env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def wait_until(proc: subprocess.Popen[str], ready: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `ready()` while `proc` runs. Fail with the run's last output when it ended first or `timeout` passed;
    a run still going is killed, whole session, before its output is read."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None or time.monotonic() > deadline:
            running = proc.poll() is None
            if running:
                os.killpg(proc.pid, signal.SIGKILL)
            output = proc.communicate()[0]
            ended = f"not within {timeout} s" if running else f"the run ended first, exit {proc.returncode}"
            raise AssertionError(f"{what}: {ended}\n{output[-3000:]}")
        time.sleep(0.1)


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    """Exit code 2, every needle in the message, and no Python traceback."""
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, f"expected exit 2, got {proc.returncode}\n{out}"
    assert "Traceback" not in out, out
    for needle in needles:
        assert needle in out, f"{needle!r} not in output:\n{out}"


def adapter(out: Path) -> dict:
    """The trained LoRA tensors of a run's output folder."""
    from safetensors.torch import load_file

    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def max_rel_diff(a: dict, b: dict) -> float:
    """Largest per-tensor relative difference ||a - b|| / ||b|| (float32), over tensors with the same names."""
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).norm() / b[k].float().norm().clamp_min(1e-12)) for k in a)


# -- the tiny model and a fresh data cache, for the data tests -------------------------------------------


@pytest.fixture(scope="session")
def model_path() -> str:
    from unsloth_mgpu_cli.models import ensure_builtin_model

    return str(ensure_builtin_model("builtin:tiny-llama"))


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_path)


@pytest.fixture
def data_cache(tmp_path, monkeypatch):
    """A fresh data cache for one test (the model was located before, in the default cache)."""
    monkeypatch.setenv("UNSLOTH_MGPU_CACHE", str(tmp_path / "cache"))
