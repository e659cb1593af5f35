"""Several nodes: where nnodes/node_rank/endpoint come from (flags, recipe, torchrun, SLURM), bad arguments,
two "nodes" on localhost against one node, and an elastic restart that resumes from the last checkpoint.

    PYTHONPATH=. python -m pytest -q -x tests/test_multinode.py
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EQUIVALENCE_RUN, ROOT, adapter, assert_user_error, mgpu_env, run_mgpu

from unsloth_mgpu_cli import distributed as D
from unsloth_mgpu_cli.errors import TrainingFailed, UserError
from unsloth_mgpu_cli.recipe import DistributedSection

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
SBATCH = ROOT / "examples" / "slurm" / "train.sbatch"

# ------------------------------------------------------------------------------------------------------
# Environment detection, on fake environments (no scontrol: the nodelist parser is used)
# ------------------------------------------------------------------------------------------------------

SLURM = {"SLURM_NNODES": "4", "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09,11]", "SLURM_NTASKS": "4"}


def resolve(env, flags=None, recipe=None):
    return D.resolve_nodes(env, flags or {}, recipe, scontrol="")


def test_no_environment_means_one_node_on_loopback():
    setup = resolve({})
    assert (setup.nnodes, setup.node_rank, setup.rdzv_endpoint, setup.under_torchrun) == (1, 0, None, False)
    assert set(setup.sources.values()) == {"default"}


def test_srun_environment_gives_nodes_rank_and_first_host_of_the_nodelist():
    setup = resolve(SLURM)
    assert (setup.nnodes, setup.node_rank, setup.rdzv_endpoint) == (4, 2, "gpu07:29400")
    assert setup.sources == {
        "nnodes": "SLURM_NNODES",
        "node_rank": "SLURM_NODEID",
        "rdzv_endpoint": "SLURM_JOB_NODELIST",
    }
    assert "SLURM_NODEID" in setup.describe()


def test_master_addr_and_port_win_over_the_nodelist():
    setup = resolve({**SLURM, "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "29555"})
    assert setup.rdzv_endpoint == "10.1.2.3:29555"
    assert setup.sources["rdzv_endpoint"] == "MASTER_ADDR/MASTER_PORT"
    # MASTER_PORT alone changes the port on the first host of the nodelist
    assert resolve({**SLURM, "MASTER_PORT": "30000"}).rdzv_endpoint == "gpu07:30000"


def test_scontrol_is_asked_first_when_present(tmp_path):
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames n[1-2]" ] && printf "head-a\\nhead-b\\n"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    env = {"SLURM_NNODES": "2", "SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "n[1-2]"}
    assert D.resolve_nodes(env, {}, None, scontrol=str(fake)).rdzv_endpoint == "head-a:29400"
    assert D.resolve_nodes(env, {}, None, scontrol="").rdzv_endpoint == "n1:29400"


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("gpu[01-04]", ["gpu01", "gpu02", "gpu03", "gpu04"]),
        ("gpu[01-02,10],login7", ["gpu01", "gpu02", "gpu10", "login7"]),
        ("node5", ["node5"]),
        ("a[1-2]-b[08-09]", ["a1-b08", "a1-b09", "a2-b08", "a2-b09"]),
        ("x[9-11]", ["x9", "x10", "x11"]),
    ],
)
def test_compact_nodelist_expands(nodelist, hosts):
    assert D.expand_nodelist(nodelist) == hosts


def test_flags_beat_the_recipe_which_beats_slurm():
    recipe = DistributedSection(nnodes=3, rdzv_endpoint="head:1234")
    setup = resolve(SLURM, {"node_rank": 1, "nnodes": None}, recipe)
    assert (setup.nnodes, setup.node_rank, setup.rdzv_endpoint) == (3, 1, "head:1234")
    assert setup.sources == {
        "nnodes": "distributed.nnodes",
        "node_rank": "--node-rank",
        "rdzv_endpoint": "distributed.rdzv_endpoint",
    }
    # recipe defaults (not written by the user) do not hide the environment
    assert resolve(SLURM, {}, DistributedSection()).nnodes == 4


def test_under_torchrun_the_process_is_a_worker_already():
    env = {
        "TORCHELASTIC_RUN_ID": "abc",
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "GROUP_RANK": "1",
        "MASTER_ADDR": "h0",
        "MASTER_PORT": "29500",
        **SLURM,
    }
    setup = resolve(env)
    assert setup.under_torchrun
    assert (setup.nnodes, setup.node_rank, setup.rank, setup.local_world_size, setup.world_size) == (2, 1, 5, 4, 8)
    with pytest.raises(UserError) as err:
        resolve(env, {"nnodes": 2})
    assert "--nnodes" in str(err.value) and "torchrun" in str(err.value)


@pytest.mark.parametrize(
    ("env", "flags", "where"),
    [
        ({}, {"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "argument --node-rank"),
        ({}, {"nnodes": 2, "node_rank": 1}, "argument --rdzv-endpoint"),
        ({}, {"nnodes": 2, "rdzv_endpoint": "no-port"}, "argument --rdzv-endpoint"),
        ({}, {"nnodes": 2, "rdzv_endpoint": "host:99999"}, "argument --rdzv-endpoint"),
        ({**SLURM, "SLURM_NODEID": "4"}, {}, "SLURM_NODEID"),
        ({**SLURM, "SLURM_NTASKS": "32"}, {}, "SLURM_NTASKS"),
    ],
)
def test_bad_node_arguments_name_their_source(env, flags, where):
    with pytest.raises(UserError) as err:
        resolve(env, flags)
    assert any(p.where == where for p in err.value.problems), err.value.render()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29400"], "--node-rank"),
        (["--nnodes", "2", "--node-rank", "1"], "--rdzv-endpoint"),
        (["--nnodes", "2", "--rdzv-endpoint", "127.0.0.1"], "--rdzv-endpoint"),
        (["distributed.nnodes=2", "distributed.node_rank=0"], "distributed.rdzv_endpoint"),
        # a host name that does not resolve, on node 0 and on the others (both gave up after two minutes)
        (["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", "nosuchhost.invalid:29419"], "does not resolve"),
        (["--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "nosuchhost.invalid:29419"], "does not resolve"),
    ],
)
def test_cli_rejects_bad_node_arguments_with_exit_2(tmp_path, args, needle):
    proc = run_mgpu("train", str(QUICKSTART), f"output.dir={tmp_path / 'out'}", *args, timeout=120)
    assert_user_error(proc, needle)
    assert not (tmp_path / "out").exists()


def test_validate_resolves_the_nodes_from_srun_as_train_does(tmp_path):
    """`mgpu validate` said `valid` for a task count that `mgpu train` refuses under srun."""
    bad = {**SLURM, "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_NTASKS": "4", "SLURM_JOB_NODELIST": "g[1-2]"}
    assert_user_error(run_mgpu("validate", str(QUICKSTART), timeout=60, **bad), "SLURM_NTASKS", "--ntasks-per-node=1")
    ok = run_mgpu("validate", str(QUICKSTART), timeout=60, **{**bad, "SLURM_NTASKS": "2"})
    assert ok.returncode == 0 and "nodes: node 1 of 2, rendezvous g1:29400" in ok.stdout, ok.stdout + ok.stderr
    # the printed recipe shows them as train records them (it said nnodes: 1 next to "node 1 of 2")
    shown = yaml.safe_load(
        run_mgpu("validate", str(QUICKSTART), "--yaml", timeout=60, **{**bad, "SLURM_NTASKS": "2"}).stdout
    )
    assert (shown["distributed"]["nnodes"], shown["distributed"]["node_rank"]) == (2, 1)
    assert shown["distributed"]["rdzv_endpoint"] == "g1:29400"


def test_sbatch_example_is_a_valid_script_using_srun_one_task_per_node():
    text = SBATCH.read_text()
    assert "--ntasks-per-node=1" in text and "srun" in text and "mgpu train" in text
    assert subprocess.run(["bash", "-n", str(SBATCH)], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------------------
# End to end on CPU (gloo): two "nodes" on localhost, and an elastic restart
# ------------------------------------------------------------------------------------------------------

BASE = [*EQUIVALENCE_RUN, "training.micro_batch_size=2"]


def _train_cmd(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "unsloth_mgpu_cli", "train", str(QUICKSTART), *BASE, f"output.dir={out}", *extra]


def _own_cores(node: int):
    """For Popen's preexec_fn: the node keeps the slice of the cores that worker `node` of a 2-worker host gets."""
    mine = D.worker_cores(node, 2, os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return (lambda: os.sched_setaffinity(0, mine)) if mine else None


def _start_nodes(out: Path, *extra: str, env: dict[str, str], own_cores: bool = False, **popen: Any):
    """Two "nodes" of one run on this host (loopback rendezvous), one worker each, sharing `out`. `own_cores`: each
    on its own half of the cores, so its worker runs as many threads as each worker of a 2-worker node."""
    rendezvous = ("--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{D.free_port()}")
    return [
        subprocess.Popen(
            _train_cmd(out, "distributed.num_gpus=1", *extra, *rendezvous, "--node-rank", str(r)),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=_own_cores(r) if own_cores else None,
            **{"stderr": subprocess.PIPE, **popen},
        )
        for r in (0, 1)
    ]


def _check(proc, expect=0):
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Three runs of 5 steps with the same global batch (4 samples): one node x 2 workers started by torchrun; 2
    nodes x 1 worker; one node x 2 workers whose rank 1 crashes at step 4 of the first attempt, with
    max_restarts=1. (That 2 workers equal 1 worker is tests/test_engine_cpu.py's.)"""
    base = tmp_path_factory.mktemp("multinode")
    (base / "tmp").mkdir()
    env = mgpu_env(TMPDIR=str(base / "tmp"))  # where node 1 keeps its worker logs while the run lasts
    logs = {}
    # two nodes, started concurrently, sharing one output folder (only global rank 0 writes); each on its own
    # cores: with all the cores a worker would reduce in another order (1.9e-6 from the one-node run)
    nodes = _start_nodes(base / "nodes", env=env, own_cores=True)
    for r, p in enumerate(nodes):
        stdout, stderr = p.communicate(timeout=400)
        logs[f"node{r}"] = _check(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    # one node x 2 workers, started by torchrun (docs/multi-node.md, "Under torchrun"): mgpu trains in place
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m"]
    logs["one"] = _check(
        subprocess.run(
            [*torchrun, *_train_cmd(base / "one", "distributed.num_gpus=2")[2:]],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    )
    restart_env = {**env, "MGPU_INJECT_FAULT": "exit:rank=1:step=4:attempt=0"}
    logs["restart"] = _check(
        subprocess.run(
            _train_cmd(base / "restart", "distributed.num_gpus=2", "distributed.max_restarts=1", "output.save_steps=2"),
            cwd=ROOT,
            env=restart_env,
            capture_output=True,
            text=True,
            timeout=400,
        )
    )
    return base, logs


def _max_rel_diff(a, b) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in a)


@pytest.mark.integration
def test_two_nodes_train_the_same_adapter_as_one_node_with_two_workers_under_torchrun(runs):
    base, logs = runs
    nodes, one = adapter(base / "nodes"), adapter(base / "one")
    assert all(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)  # it trained
    assert _max_rel_diff(nodes, one) < 1e-6
    summary = json.loads((base / "nodes" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "node 0 of 2" in logs["node0"] and "--nnodes" in logs["node0"]
    # same global loss at every step: the shards of the two nodes together are the one node's global batch
    rows = [json.loads(x) for x in (base / "nodes" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (base / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert [round(r["loss"], 5) for r in rows] == [round(r["loss"], 5) for r in ref]


@pytest.mark.integration
def test_under_torchrun_mgpu_trains_in_place_and_reports_once(runs):
    base, logs = runs
    out = logs["one"]
    assert "started by torchrun" in out and out.count("run summary") == 1, out[-3000:]
    assert "nnodes: 1" in (base / "one" / "recipe.resolved.yaml").read_text()
    assert json.loads((base / "one" / "summary.json").read_text())["world_size"] == 2


@pytest.mark.integration
def test_only_node_0_prepares_the_output_folder(runs):
    base, logs = runs
    resolved = (base / "nodes" / "recipe.resolved.yaml").read_text()
    assert "nnodes: 2" in resolved and "node_rank: 0" in resolved  # node 1 would have written node_rank: 1
    assert "; batching" in logs["node0"] and "; batching" not in logs["node1"]  # the data line: node 0 prepared
    # each console says which node it is; one run summary (node 1 holds global rank 1 here)
    assert "node 0 of 2" in logs["node0"] and "node 1 of 2" in logs["node1"]
    assert "final loss" in logs["node0"] and "final loss" not in logs["node1"]  # the summary table
    assert "the node of global rank 0 prints the run summary" in logs["node1"]
    # each elastic agent makes one log folder under its log_dir: node 1 keeps its own out of output.dir
    assert len([p for p in (base / "nodes" / "logs").iterdir() if p.name.startswith("mgpu")]) == 1
    # and, the run done, removes them (a folder was left in /tmp by every run of a node other than node 0)
    assert not [p.name for p in (base / "tmp").iterdir() if p.name.startswith("mgpu-node")]


@pytest.mark.integration
def test_restarted_workers_resume_from_the_last_checkpoint_and_match_an_undisturbed_run(runs):
    base, logs = runs
    out = logs["restart"]
    assert "resuming from" in out and "step-2" in out, out[-3000:]
    rows = [json.loads(x) for x in (base / "restart" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    # attempt 0 logged steps 1..3 then died in step 4; attempt 1 went on from the step-2 checkpoint, not from 0
    assert steps.count(1) == 1 and steps[-3:] == [3, 4, 5], steps
    assert _max_rel_diff(adapter(base / "restart"), adapter(base / "one")) < 1e-6


@pytest.mark.integration
def test_sigterm_to_every_node_saves_one_checkpoint_and_both_exit_130(tmp_path):
    """SLURM's scancel or preemption: SIGTERM to every process of every node. All ranks must finish the step and
    checkpoint together; a node whose agent killed its workers would make node 0's checkpoint fail too."""
    import signal
    import time

    out = tmp_path / "run"
    env = mgpu_env(MGPU_INJECT_FAULT="sleep:rank=0:step=4:seconds=6")
    # each node its own process group, as srun gives each task
    nodes = _start_nodes(out, "training.max_steps=10", env=env, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        metrics = out / "metrics.jsonl"
        while not (metrics.exists() and '"step": 2' in metrics.read_text()):
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), "step 2 never logged"
            time.sleep(0.2)
        for p in nodes:
            os.killpg(p.pid, signal.SIGTERM)
        outputs = [p.communicate(timeout=120)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    assert [p.returncode for p in nodes] == [130, 130], "\n---\n".join(o[-2000:] for o in outputs)
    saved = sorted((out / "checkpoints").iterdir()) if (out / "checkpoints").is_dir() else []
    assert saved and "checkpoint saved" in outputs[0], outputs[0][-2000:]
    assert not any("Traceback" in o for o in outputs), outputs[1][-2000:]  # node 1's agent raised SignalException


def test_a_node_that_starts_first_waits_for_node_0_and_names_it_when_it_never_comes():
    """torch's client gave up after two 60 s connection timeouts with a C++ stack dump and a traceback (exit 1),
    while the docs promise the join timeout; here node 0's port is polled in Python until it listens."""
    import socket
    import threading
    import time

    port = D.free_port()
    started = time.monotonic()
    with pytest.raises(TrainingFailed) as exc:
        D.wait_for_rendezvous_host(f"127.0.0.1:{port}", timeout_s=1.5, node_rank=1, poll_s=0.2)
    assert time.monotonic() - started < 10  # its own timeout, not torch's two minutes
    assert f"node 1: node 0's rendezvous at 127.0.0.1:{port} did not answer within 2 s" in str(exc.value)
    assert "--node-rank 0" in exc.value.details
    # the control: node 0 comes up a moment later, and the wait ends then
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def node_0_comes_up() -> None:
        time.sleep(0.5)
        listener.bind(("127.0.0.1", port))
        listener.listen()

    threading.Thread(target=node_0_comes_up).start()
    try:
        D.wait_for_rendezvous_host(f"127.0.0.1:{port}", timeout_s=30, node_rank=1, poll_s=0.2)
    finally:
        listener.close()


@pytest.mark.integration
def test_node_0_left_alone_gives_up_after_the_recipes_join_timeout_and_leaves_no_output_folder(tmp_path):
    """The wait was fixed at 600 s; it is distributed.join_timeout_seconds now. Node 0 had already written output.dir,
    so after the nodes failed to meet, the same command was refused ("already holds a run") though nothing trained."""
    import time

    out = tmp_path / "run"
    cmd = _train_cmd(out, "distributed.num_gpus=1", "distributed.join_timeout_seconds=10", "--nnodes", "2")
    cmd += ["--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{D.free_port()}"]
    started = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=mgpu_env(), capture_output=True, text=True, timeout=180)
    output = _check(proc, expect=1)
    assert time.monotonic() - started < 120 and "waiting for all 2 nodes" in output and "(up to 10 s)" in output
    assert "node 0: the rendezvous at 127.0.0.1:" in output and "no worker started" in output, output[-3000:]
    assert "distributed.join_timeout_seconds" in output and "Traceback" not in output, output[-3000:]
    assert not out.exists()  # as before the command: it runs again as it is


def _ctrl_c_a_lone_node(out: Path, node_rank: int, waiting: Any) -> tuple[int, float, str]:
    """Start node `node_rank` of 2 alone, send its session a Ctrl-C once `waiting()` holds (it waits for the other
    node by then); return its exit code, the seconds from the signal to its exit, and its output."""
    import signal
    import time

    cmd = _train_cmd(out, "distributed.num_gpus=1", "--nnodes", "2", "--node-rank", str(node_rank))
    cmd += ["--rdzv-endpoint", f"127.0.0.1:{D.free_port()}"]
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=mgpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not waiting():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGINT)
        sent = time.monotonic()
        output = proc.communicate(timeout=60)[0]
        return proc.returncode, time.monotonic() - sent, output
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


@pytest.mark.integration
def test_ctrl_c_on_a_node_waiting_for_node_0_stops_it_at_once(tmp_path):
    """It took 110 s and exit 1, with two tracebacks ending in SignalException; the docs promise exit 130 at once."""
    import time

    started = time.monotonic()  # after 12 s the recipe is checked, the data tokenised: it waits for node 0
    code, took, output = _ctrl_c_a_lone_node(tmp_path / "run", 1, lambda: time.monotonic() - started > 12)
    assert code == 130 and took < 10, (code, took, output[-3000:])
    assert "Traceback" not in output and "waiting for all 2 nodes" in output, output[-3000:]


@pytest.mark.integration
def test_ctrl_c_on_node_0_waiting_for_the_others_puts_the_output_folder_back(tmp_path):
    """No step ran, but the folder node 0 had prepared stayed (recipe.resolved.yaml, logs/): the same command was then
    refused as "already holds a run"."""
    import time

    out, prepared = tmp_path / "run", []

    def at_the_rendezvous() -> bool:  # 3 s after node 0 prepared the folder (the launch follows it)
        if not prepared and (out / "recipe.resolved.yaml").is_file():
            prepared.append(time.monotonic())
        return bool(prepared) and time.monotonic() - prepared[0] > 3

    code, _, output = _ctrl_c_a_lone_node(out, 0, at_the_rendezvous)
    assert code == 130 and "before any worker had started" in output, output[-3000:]
    assert "Traceback" not in output and not out.exists(), output[-3000:]


def _two_nodes_refuse(command: Any) -> list[str]:
    """Nodes 0 and 1 of one run (`command(node)`: its train command) on loopback, both to end with exit 2; their
    outputs."""
    rendezvous = ["--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{D.free_port()}"]
    nodes = [
        subprocess.Popen(
            [*command(r), *rendezvous, f"--node-rank={r}"],
            cwd=ROOT,
            env=mgpu_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in (0, 1)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [2, 2], "\n---\n".join(o[-3000:] for o in outputs)
    return outputs


@pytest.mark.integration
def test_nodes_started_with_different_overrides_both_refuse_with_exit_2_naming_the_key(tmp_path):
    """Each node's workers compare the recipes at start. The difference is bad input: it ended with exit 1,
    "training failed: rank 0 failed: RuntimeError: ..." and the resume hint of a crash."""
    out = tmp_path / "run"
    outputs = _two_nodes_refuse(lambda r: _train_cmd(out, "distributed.num_gpus=1", f"training.max_steps={3 + r}"))
    for text in outputs:
        assert "the nodes' recipes: differ: training.max_steps: 3 on node 0, 4 on node 1" in text, text[-3000:]
        assert "only --node-rank differs" in text and "Traceback" not in text and "continue with" not in text, text
    # refused before any step: node 0 takes back what it wrote (recipe.resolved.yaml, its worker logs), so the
    # corrected command needs no --overwrite; an earlier run's folder keeps its files
    assert not out.exists(), sorted(map(str, out.rglob("*")))


@pytest.mark.integration
def test_nodes_whose_output_dirs_are_not_one_folder_both_refuse_with_exit_2(tmp_path):
    """Each node may name output.dir by its own mount point, so the recipes' comparison leaves it out; a node given
    another folder (or a folder on its local disk) went unnoticed, and global rank 0's checkpoints were where the
    other node's restart could not find them."""
    outputs = _two_nodes_refuse(lambda r: _train_cmd(tmp_path / f"node{r}", "distributed.num_gpus=1"))
    for text in outputs:
        assert "output.dir (command line): expected one folder that every node reaches; node 0 prepared" in text, text
        assert f"node 1 does not see it at {tmp_path / 'node1'}" in text and "Traceback" not in text, text[-3000:]
    assert not (tmp_path / "node0").exists() and not (tmp_path / "node1").exists()


@pytest.mark.integration
def test_losing_node_0_mid_run_is_reported_as_such_on_node_1(tmp_path):
    """Node 0 killed outright (SIGKILL: no stop, no checkpoint) after step-2's checkpoint. Node 1 said "the
    rendezvous ... failed; no worker started" under 27 lines of C++ frames of c10d warnings."""
    import signal
    import time

    out = tmp_path / "run"
    env = mgpu_env(MGPU_INJECT_FAULT="sleep:rank=0:step=4:seconds=60")  # node 0's worker: global rank 0
    nodes = _start_nodes(out, "training.max_steps=10", "output.save_steps=2", env=env, stderr=subprocess.STDOUT,
                         start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not (out / "checkpoints" / "step-2").is_dir():
            assert time.monotonic() < deadline and all(p.poll() is None for p in nodes), "step-2 never saved"
            time.sleep(0.2)
        os.killpg(nodes[0].pid, signal.SIGKILL)
        sent = time.monotonic()
        output = nodes[1].communicate(timeout=120)[0]
        took = time.monotonic() - sent
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        nodes[0].communicate()
    assert nodes[1].returncode == 1 and took < 60, (nodes[1].returncode, took, output[-3000:])
    assert "no worker started" not in output and "frame #" not in output and "Traceback" not in output, output
    reported = ("lost node 0's rendezvous", "lost its connection to another rank")
    assert any(r in output for r in reported), output[-3000:]
    assert "--resume auto" in output and "step-2" in output, output[-3000:]


def test_a_rendezvous_lost_after_the_workers_started_is_not_called_a_failure_to_meet():
    """Which of the two a node sees first when node 0 dies is a race: its worker's collective, or its agent's
    rendezvous store (then the message said "no worker started")."""
    from torch.distributed.elastic.rendezvous.api import RendezvousConnectionError

    spec = D.LaunchSpec(nproc_per_node=1, device_type="cpu", nnodes=2, node_rank=1, rdzv_endpoint="10.0.0.1:29400")
    exc = RendezvousConnectionError("The connection to the C10d store has failed.")
    before, hint = D._describe_rendezvous_failure(exc, spec)
    assert "no worker started" in before and "within 600 s" in hint
    during, hint = D._describe_rendezvous_failure(exc, spec, started=True)
    assert "node 1: lost node 0's rendezvous at 10.0.0.1:29400 during the run" in during
    assert "no worker started" not in during and "node 0's console" in hint
