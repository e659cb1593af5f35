"""The gradient aggregation strategies on known tensors across 3 real gloo ranks (launched like training)."""

from __future__ import annotations

import os

import pytest
import torch

from unsloth_mgpu_cli import distributed as D
from unsloth_mgpu_cli.errors import Problem, RanksDisagree, TrainingFailed, UserError, reported_user_error

pytestmark = pytest.mark.integration

# ranks hold: r0 [1, 10, 7], r1 [2, 25, -3], r2 [3, 30, 100]
EXPECTED = {
    "mean": [2.0, 65.0 / 3, 104.0 / 3],
    "sum": [6.0, 65.0, 104.0],
    "median": [2.0, 25.0, 7.0],
}


@pytest.fixture(scope="module")
def aggregated():
    """Every case below in one launch of 3 ranks (a launch costs seconds; a case, milliseconds)."""
    from dist_workers import aggregate_known_tensors

    cases = [(aggregation, views) for aggregation in sorted(EXPECTED) for views in (False, True)]
    return D.launch(aggregate_known_tensors, (cases,), D.LaunchSpec(nproc_per_node=3, device_type="cpu"))


@pytest.mark.parametrize("views", [False, True], ids=["copied", "bucket-views"])
@pytest.mark.parametrize("aggregation", sorted(EXPECTED))
def test_aggregation_by_hand_on_three_gloo_ranks(aggregated, aggregation, views):
    assert sorted(aggregated) == [0, 1, 2]
    for rank, by_case in aggregated.items():
        res = by_case[aggregation, views]
        assert res["rank"] == rank
        assert res["grads"] == pytest.approx(EXPECTED[aggregation], rel=1e-6)
        if views:
            assert res["zeroed"] == [0.0, 0.0, 0.0]


def test_clipping_on_bucket_views_matches_torch():
    import torch

    info = D.DistInfo()
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    ref = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
    sync = D.GradientSynchronizer(params, info, "mean", bucket_size_mb=1, grad_views=True)
    grads = [torch.tensor([3.0, -4.0, 12.0]), torch.tensor([[1.0, 2.0], [2.0, 4.0]])]
    for p, q, g in zip(params, ref, grads, strict=True):
        p.grad.copy_(g)
        q.grad = g.clone()
    norm = sync.clip_grad_norm(1.0)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)
    assert float(norm) == pytest.approx(float(ref_norm))
    for p, q in zip(params, ref, strict=True):
        assert torch.allclose(p.grad, q.grad)
    params[0].grad[0] = float("nan")
    assert not bool(sync.grads_finite())


def test_median_of_even_count_is_mean_of_middle_pair():
    stacked = torch.tensor([[1.0, 4.0], [3.0, 2.0], [10.0, 0.0], [2.0, 8.0]])
    assert D.reduce_median(stacked).tolist() == [2.5, 3.0]


def test_checksum_sees_a_tiny_change_and_a_permutation():
    a = [torch.arange(6, dtype=torch.float32).reshape(2, 3), torch.ones(4)]
    b = [a[0].clone(), a[1].clone()]
    assert D.parameters_checksum(a) == D.parameters_checksum(b)
    b[0][0, 0] += 1e-3
    assert D.parameters_checksum(a) != D.parameters_checksum(b)
    c = [a[1].clone(), a[0].clone()]  # same values, swapped order
    assert D.parameters_checksum(a)[1] != D.parameters_checksum(c)[1]


def test_workers_share_the_hosts_cores(monkeypatch):
    from unsloth_mgpu_cli.distributed import cores_per_worker

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    assert [cores_per_worker(n) for n in (1, 2, 8, 64)] == [32, 16, 4, 1]


def test_each_worker_keeps_its_own_slice_of_the_cores():
    from unsloth_mgpu_cli.distributed import worker_cores

    assert [worker_cores(r, 2, set(range(32))) for r in (0, 1)] == [list(range(16)), list(range(16, 32))]
    assert worker_cores(3, 4, [8, 9, 10, 11, 12, 13, 14, 15]) == [14, 15]  # within the mask it was given
    assert worker_cores(0, 1, set(range(32))) is None  # one worker: every core stays its own
    assert worker_cores(1, 4, {0, 1}) is None  # fewer cores than workers: nothing to split


def test_cuda_workers_get_expandable_segments_unless_the_user_chose_an_allocator_setting():
    env: dict[str, str] = {}
    D.cuda_allocator_defaults(env)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for chosen in ("", "max_split_size_mb:128"):  # empty: torch's own default, kept as asked
        env = {"PYTORCH_CUDA_ALLOC_CONF": chosen}
        D.cuda_allocator_defaults(env)
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == chosen


def test_each_cuda_worker_sees_only_its_own_gpu_of_those_the_user_made_visible():
    # the user's choice: GPUs 3 and 5 of the host; rank 1 gets 5 (as cuda:0), and its children keep the list
    env = {"CUDA_VISIBLE_DEVICES": "3,5"}
    assert D.show_only_own_gpu(env, 1, 2) == "5"
    assert env == {"CUDA_VISIBLE_DEVICES": "5", "MGPU_VISIBLE_DEVICES": "3,5"}
    # a process started from that worker (an elastic restart of its children) still picks from the host's list
    assert D.show_only_own_gpu(env, 0, 2) == "3" and env["CUDA_VISIBLE_DEVICES"] == "3"
    env = {}  # nothing chosen: GPU i for local rank i
    assert D.show_only_own_gpu(env, 3, 4) == "3" and env["MGPU_VISIBLE_DEVICES"] == "0,1,2,3"


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_real_workers_run_on_disjoint_cores(monkeypatch):
    from dist_workers import worker_affinity

    monkeypatch.setenv("MGPU_CPU_AFFINITY", "1")
    res = D.launch(worker_affinity, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    cores = [set(res[r]["cores"]) for r in (0, 1)]
    assert cores[0] and cores[1] and not cores[0] & cores[1], cores
    assert all(res[r]["threads"] == len(cores[r]) for r in (0, 1)), res
    # by default (the control): both keep the whole mask
    monkeypatch.delenv("MGPU_CPU_AFFINITY")
    res = D.launch(worker_affinity, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    assert res[0]["cores"] == res[1]["cores"] == sorted(os.sched_getaffinity(0))


def test_mixed_fp32_and_bf16_buckets_stay_synchronised_every_step():
    """Regression (8B bf16 full fine-tune on 2 x H200 drifted at step 20): fp32 norms next to bf16 weights.

    zero_grad used to call `optimizer.zero_grad(set_to_none=True)` as soon as one bucket had no views, which
    dropped the views of the fp32 bucket: from step 2 on its gradients were never all-reduced."""
    from dist_workers import mixed_dtype_steps

    results = D.launch(mixed_dtype_steps, (3,), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    for res in results.values():
        for step, grads in enumerate(res["grads"]):
            total = 3.0 * (step + 1)  # ranks contribute 1x and 2x
            assert grads == [[total * k for k in range(1, n + 1)] for n in (4, 2, 3)], (res["rank"], step)
        for zeroed in res["zeroed"]:
            assert zeroed == [None, [0.0, 0.0], [0.0, 0.0, 0.0]]


def test_bf16_gradients_are_reduced_in_fp32():
    """1 + 2**-8 + 2**-8 is 1 + 2**-7 in fp32 (and in bf16, once rounded) but 1 when bf16 adds the 1 first: bf16
    has 8 significant bits, so 1 + 2**-8 rounds back to 1. The control, a bf16 all-reduce of the same gradients,
    shows that the comparison can fail: it loses the small terms wherever gloo's order adds the 1 early."""
    from dist_workers import bf16_gradients_summed

    results = D.launch(bf16_gradients_summed, (), D.LaunchSpec(nproc_per_node=3, device_type="cpu"))
    assert sorted(results) == [0, 1, 2]
    for res in results.values():
        for aggregation, ranks in (("sum", 1), ("mean", 3)):
            exact = float(torch.tensor((1 + 2**-7) / ranks).to(torch.bfloat16))
            assert res[aggregation] == ["torch.bfloat16", [exact] * 9], (aggregation, res)
        assert any(v == 1.0 for v in res["bf16"]), res  # the control: bf16 arithmetic loses 2**-7


def test_a_replaced_gradient_view_is_still_all_reduced():
    from dist_workers import replaced_views

    results = D.launch(replaced_views, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    for res in results.values():
        assert res["grad"] == [3.0, 3.0, 3.0] and res["is_view"]


def test_a_single_host_run_listens_on_loopback_only():
    """The rendezvous store and the store the workers bootstrap from: torch's TCPStore listens on every interface
    whatever host it is given; a one-host run must not leave them open to the network."""
    from dist_workers import listening_addresses

    results = D.launch(listening_addresses, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    launcher = {ip for r in results.values() for ip in r["launcher"]}
    assert len(launcher) >= 1 and launcher <= {"127.0.0.1"}, results  # the stores are up, on loopback
    assert all(set(r["worker"]) <= {"127.0.0.1"} for r in results.values()), results


def test_a_full_disk_that_empties_the_workers_error_files_is_reported_not_a_traceback(tmp_path, monkeypatch):
    """A full disk (the edge, faked): a failed worker's error.json is empty, and torch's own parser of it raised
    JSONDecodeError out of the launcher, with 70 lines of traceback and no word about the disk."""
    import json
    import shutil
    from collections import namedtuple

    import torch.distributed.launcher.api as launcher_api

    def empty_error_file(config, entry):
        def run(*args):
            raise json.JSONDecodeError("Expecting value", "", 0)

        return run

    monkeypatch.setattr(launcher_api, "elastic_launch", empty_error_file)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10 * 2**30, 10 * 2**30, 0))
    spec = D.LaunchSpec(nproc_per_node=2, device_type="cpu", log_dir=tmp_path / "logs")
    with pytest.raises(TrainingFailed) as exc:
        D.launch(print, (), spec)
    assert "is full (0.0 MB free)" in str(exc.value) and "--resume auto" in exc.value.details


def test_the_users_omp_num_threads_is_each_workers_thread_count(monkeypatch):
    """OMP_NUM_THREADS given to `mgpu train` wins (it used to be replaced by the cores' share); without it each
    worker gets its share of the cores, also on a second launch from the same process."""
    from dist_workers import worker_affinity

    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    res = D.launch(worker_affinity, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    assert [res[r]["threads"] for r in (0, 1)] == [3, 3], res
    # without it: each worker's share of the cores (OMP_NUM_THREADS set for the workers), and that value is not
    # taken for the user's by a second launch of the same process
    spec = D.LaunchSpec(nproc_per_node=2, device_type="cpu")
    env: dict[str, str] = {}
    for _ in range(2):
        D.worker_threads_env(env, spec)
        assert D.USER_THREADS not in env and env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    env["OMP_NUM_THREADS"] = "5"  # the user's after all
    D.worker_threads_env(env, spec)
    assert env[D.USER_THREADS] == "5"


def test_nodes_with_different_recipes_are_stopped_naming_the_keys():
    """Two nodes started with different overrides (max_steps 10 and 14) trained on until a replica check failed
    (or gloo aborted on a collective mismatch): each worker now compares its node's resolved recipe at start."""
    from dist_workers import ranks_compare

    # the shape engine._node_independent_settings gives: the recipe's sections at the top, named as in a recipe
    same = {"training": {"max_steps": 10, "learning_rate": 1e-4}, "tokenised data": "abc"}
    other = {"training": {"max_steps": 14, "learning_rate": 1e-4}, "tokenised data": "abc"}
    # (the same recipe on every node passes: tests/test_multinode.py's two-node run)
    spec = D.LaunchSpec(nproc_per_node=2, device_type="cpu")
    errors = [r["error"] for r in D.launch(ranks_compare, ([same, other],), spec).values()]
    assert errors[0] == errors[1] and "differ: training.max_steps: 10 on rank 0, 14 on rank 1" in errors[0], errors
    assert "learning_rate" not in errors[0] and "Run the same recipe" in errors[0]


def test_a_user_error_raised_in_the_workers_ends_the_launch_as_one_exit_2():
    """Nodes with different recipes exited 1 ("training failed: rank 0 failed: RuntimeError: ...") with the resume
    hint of a crash: it is bad input, found where only the workers can see it."""
    from dist_workers import ranks_disagree

    same = {"training": {"max_steps": 10}, "dataset": {"max_samples": 8}}
    other = {"training": {"max_steps": 14}, "dataset": {"max_samples": 8}}
    with pytest.raises(UserError) as exc:
        D.launch(ranks_disagree, ([same, other],), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    assert exc.value.exit_code == 2 and exc.value.title == "invalid arguments"
    (problem,) = exc.value.problems
    assert problem.where == "the nodes' recipes"
    assert problem.message == "differ: training.max_steps: 10 on rank 0, 14 on rank 1"
    assert problem.hint == "Run the same recipe."


@pytest.mark.parametrize(
    "error",
    [
        UserError([Problem("training.max_steps", "expected 1..9; found 10", "lower it"), Problem("", "two\nlines")]),
        UserError("one line: with a colon", "invalid data"),
        RanksDisagree("the nodes' recipes", ["a.b: 1 on node 0, 2 on node 1"] * 8, "Run the same recipe."),
    ],
)
def test_a_workers_user_error_is_rebuilt_from_its_error_report_as_it_rendered(error):
    rebuilt = reported_user_error(f"{type(error).__name__}: {error}")
    assert rebuilt is not None and rebuilt.render() == error.render() and rebuilt.title == error.title
    # (a problem without `where` whose message holds ": " renders as one with it: the same text either way)
    assert rebuilt.problems[0].where == error.problems[0].where or not error.problems[0].where


@pytest.mark.parametrize("report", ["RuntimeError: x: y", "ValueError: invalid input (1 problem):", "UserError: ", ""])
def test_other_worker_errors_are_not_taken_for_user_errors(report):
    assert reported_user_error(report) is None


def test_nccl_bootstraps_on_loopback_on_one_host_unless_the_user_chose():
    """On 2026-12-02's H200 machine a one-GPU run's worker listened on the host's address (NCCL's bootstrap), and
    on 127.0.0.1 only with NCCL_SOCKET_IFNAME=lo (benchmarks/gpu_plan.sh s13b)."""
    one = D.LaunchSpec(nproc_per_node=2, device_type="cuda")
    env: dict[str, str] = {}
    D.nccl_on_loopback(env, one)
    assert env == {"NCCL_SOCKET_IFNAME": "lo"}
    env = {"NCCL_SOCKET_IFNAME": "ib0"}
    D.nccl_on_loopback(env, one)
    assert env == {"NCCL_SOCKET_IFNAME": "ib0"}  # the user's interface stays
    for other in (D.LaunchSpec(nproc_per_node=2, device_type="cuda", nnodes=2, rdzv_endpoint="h:1"),
                  D.LaunchSpec(nproc_per_node=2, device_type="cpu")):  # fmt: skip
        env = {}
        D.nccl_on_loopback(env, other)
        assert env == {}  # several hosts need their real interfaces; gloo already binds loopback


def test_a_node_left_alone_at_the_rendezvous_ends_with_a_message_not_a_traceback():
    """Only node 0 started: torch's RendezvousTimeoutError came out as a 79-line traceback after 10 minutes."""
    from dist_workers import replaced_views

    spec = D.LaunchSpec(
        nproc_per_node=1, device_type="cpu", nnodes=2, rdzv_endpoint=f"127.0.0.1:{D.free_port()}", join_timeout_s=3
    )
    with pytest.raises(TrainingFailed) as exc:
        D.launch(replaced_views, (), spec)
    assert "node 0: the rendezvous at 127.0.0.1:" in str(exc.value) and "no worker started" in str(exc.value)
    assert "start the same command on all 2 nodes" in exc.value.details and "within 3 s" in exc.value.details


def test_a_second_node_0_on_the_same_host_is_refused_naming_node_rank_not_with_a_traceback():
    """Two nodes both started with --node-rank 0 (a copied command): the second one's rendezvous store could not bind
    the port the first one took after both passed the check before tokenising, and OSError's traceback came out."""
    import socket

    from dist_workers import replaced_views

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        endpoint = f"127.0.0.1:{taken.getsockname()[1]}"
        spec = D.LaunchSpec(nproc_per_node=1, device_type="cpu", nnodes=2, node_rank=0, rdzv_endpoint=endpoint)
        with pytest.raises(UserError) as exc:
            D.launch(replaced_views, (), spec)
    (problem,) = exc.value.problems
    assert problem.where == f"rendezvous endpoint {endpoint}" and "already in use" in problem.message
    assert "its own --node-rank (0..1)" in problem.hint


def test_node_0_is_warned_when_the_endpoint_is_not_an_address_of_its_host():
    """Node 0 hosts the rendezvous: started on the wrong host it waited alone for 10 minutes while the others met."""
    warning = D.check_rendezvous_port("192.0.2.7:29400", "argument --rdzv-endpoint")  # TEST-NET-1: no host's
    assert warning and "192.0.2.7 (from argument --rdzv-endpoint) is not an address of this machine" in warning
    assert D.check_rendezvous_port(f"127.0.0.1:{D.free_port()}") is None


def test_ctrl_c_while_node_0_waits_for_the_others_stops_at_once(tmp_path):
    """No worker has started, so there is no step to finish: the first Ctrl-C used to say "finishing the current
    step" and wait out the whole join timeout, then blame a worker that never existed."""
    import signal
    import threading
    import time

    from dist_workers import replaced_views

    from unsloth_mgpu_cli.errors import Interrupted

    spec = D.LaunchSpec(nproc_per_node=1, device_type="cpu", nnodes=2, rdzv_endpoint=f"127.0.0.1:{D.free_port()}",
                        join_timeout_s=120, stop_file=tmp_path / "stop")  # fmt: skip
    timer = threading.Timer(2.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    start = time.monotonic()
    try:
        with pytest.raises(Interrupted, match="before any worker had started"):
            D.launch(replaced_views, (), spec)
    finally:
        timer.cancel()
    assert time.monotonic() - start < 30
    assert not D._workers_started()


def test_a_cpu_workers_peak_memory_is_its_high_water_mark():
    """The summary's and the metrics' "peak" on CPU was the current resident size, which falls when memory is
    freed; the per-step values then disagreed with the summary."""
    import numpy as np

    from unsloth_mgpu_cli.trainer import _peak_memory_gb

    info = D.DistInfo(device_type="cpu")
    block = np.ones(300 * 2**20 // 8)  # 300 MB, touched
    during = _peak_memory_gb(info)
    del block
    assert _peak_memory_gb(info) >= during > 0.25


def test_weights_that_are_not_finite_are_reported_as_such_not_as_drift():
    """NaN is not equal to itself: replicas that diverged alike were reported as replicas that drifted apart."""
    import torch

    params = [torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.tensor([1.0, float("nan")]))]
    with pytest.raises(D.ConsistencyError, match="not finite") as info:
        D.check_consistency(params, D.DistInfo(), step=7, names=["a", "b"])
    assert "at step 7 on ranks [0]: 1 of 2 tensors, b" in str(info.value) and "drifted" not in str(info.value)
    D.check_consistency(params[:1], D.DistInfo(), step=7)  # finite weights pass


def test_the_settings_nodes_compare_are_keyed_as_the_recipe_names_them():
    """A node started with training.max_steps=14 was told `recipe.training.max_steps` differed."""
    from types import SimpleNamespace

    from unsloth_mgpu_cli.engine import _node_independent_settings
    from unsloth_mgpu_cli.recipe import Recipe

    recipe = Recipe.model_validate({"model": {"name": "builtin:tiny-llama"}, "dataset": {"path": "/data/d.jsonl"}})
    plan = SimpleNamespace(recipe=recipe, identity={"data": "abc", "global_batch": 8}, resume_from=None)
    settings = _node_independent_settings(plan)
    assert settings["training"]["max_steps"] == recipe.training.max_steps and "recipe" not in settings
    assert settings["tokenised data"] == "abc" and settings["global batch"] == 8
    # --resume auto given on one node only: a difference the nodes see (it ended in a shared-filesystem hint)
    assert settings["--resume (checkpoint)"] is None
    plan.resume_from = "/mnt/a/out/checkpoints/step-197"
    assert _node_independent_settings(plan)["--resume (checkpoint)"] == "step-197"
    assert settings["dataset"]["path"] == "d.jsonl"  # host paths: the file's name only


def test_a_rank_killed_by_a_signal_is_named_before_the_rank_whose_collective_it_broke(tmp_path):
    """CI once named rank 0 ("Connection reset by peer") for a SIGKILL of rank 1: the agent's timestamps are whole
    seconds, the two failures shared one, and rank order decided."""
    import json
    import time

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    error = tmp_path / "error.json"
    lost = "RuntimeError: [../gloo/transport/tcp/pair.cc:545] Read error [127.0.0.1]:1234: Connection reset by peer"
    now = int(time.time())
    error.write_text(json.dumps({"message": {"message": lost, "extraInfo": {"py_callstack": "", "timestamp": now}}}))
    symptom = ProcessFailure(local_rank=0, pid=100, exitcode=1, error_file=str(error))
    killed = ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=str(tmp_path / "none.json"))
    symptom.timestamp = killed.timestamp = now
    message, details = D._describe_failure(ChildFailedError("w", {0: symptom, 1: killed}), None)
    assert message == "rank 1 failed: killed by signal SIGKILL" and "also stopped: rank 0: exit code 1" in details
    # the symptom alone is still named, with what it means
    message, details = D._describe_failure(ChildFailedError("w", {0: symptom}), None)
    assert message.startswith("rank 0 failed: RuntimeError:") and "lost its connection to another rank" in details
