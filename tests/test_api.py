"""The Python API: cheap imports, argument checks, the shard sampler, MemoryManager, and MultiGPUTrainer's
distributed math against a single-process reference (2 real gloo ranks, a tiny transformers model)."""

from __future__ import annotations

import gc
import math
import os
import subprocess
import sys
import weakref

import pytest
import torch
from conftest import ROOT, mgpu_env
from fake_nvml import FakeNVML, h200

import unsloth_mgpu_cli
import unsloth_multigpu
from unsloth_mgpu_cli import distributed as D
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.hooks import AggregationMethod, GlobalBatchShardSampler, enable_multi_gpu
from unsloth_mgpu_cli.memory_manager import MemoryManager, OutOfMemoryRisk

API = [
    "enable_multi_gpu",
    "disable_multi_gpu",
    "MultiGPUTrainer",
    "AggregationMethod",
    "ConfigManager",
    "DeviceManager",
    "MemoryManager",
]


def test_both_packages_expose_the_api_and_importing_them_stays_cheap():
    code = (
        "import sys, unsloth_multigpu, unsloth_mgpu_cli; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); "
        f"names = {API!r}; "
        "assert all(getattr(unsloth_multigpu, n) is getattr(unsloth_mgpu_cli, n) for n in names); "
        "assert 'torch' not in sys.modules and 'unsloth' not in sys.modules"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=mgpu_env(), capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert unsloth_multigpu.ConfigManager is unsloth_mgpu_cli.configgen.ConfigManager
    with pytest.raises(AttributeError):
        unsloth_multigpu.no_such_name  # noqa: B018


def test_bad_arguments_are_refused_before_anything_launches():
    with pytest.raises(ValueError, match="mean"):
        enable_multi_gpu(num_gpus=2, gradient_aggregation="avg")
    with pytest.raises(ValueError, match="num_gpus"):
        enable_multi_gpu(num_gpus=0)
    with pytest.raises(ValueError, match="device"):
        enable_multi_gpu(device="tpu")
    for bad in ({"num_gpus": True}, {"num_gpus": 2.0}, {"verify_every": "abc"}, {"verify_every": -1},
                {"timeout_seconds": -5}, {"timeout_seconds": "x"}, {"timeout_seconds": float("nan")}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            enable_multi_gpu(**bad)
    assert AggregationMethod.parse("WEIGHTED") is AggregationMethod.WEIGHTED
    for bad in ({"main_process_saves": "no"}, {"load_in_4bit": "yes"}, {"gradient_checkpointing": "bogus"},
                {"max_seq_length": -1}, {"predicted_peak_gb": "x"}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            enable_multi_gpu(**bad)
    with pytest.raises(ValueError, match="memory_fraction must be a number"):
        MemoryManager(memory_fraction="0.9")
    with pytest.raises(UserError, match="gradient_checkpointing"):
        MemoryManager().forecast("1B", gradient_checkpointing=None)


def test_under_torchrun_a_num_gpus_other_than_the_launched_count_is_refused(monkeypatch):
    for name, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match="num_gpus=3 but the launcher started WORLD_SIZE=2"):
        enable_multi_gpu(num_gpus=3, device="cpu")


def test_direct_trainer_refuses_bad_arguments_when_built():
    model = torch.nn.Linear(2, 2)
    for bad in ({"num_gpus": 0}, {"num_gpus": -2}, {"num_gpus": 1.5}, {"num_gpus": "2"}, {"max_grad_norm": -1},
                {"max_grad_norm": float("inf")}, {"verify_every": -1}):  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(bad))):
            unsloth_multigpu.MultiGPUTrainer(model, **bad)


@pytest.mark.parametrize(
    ("config", "needle"),
    [
        ({"class": "sgd", "kwargs": {"lrate": 1}}, "['lrate'], which SGD does not take (did you mean 'lr'?)"),
        ({"class": dict}, "must be a torch.optim optimizer class, or a name: adadelta"),
        ({"class": "lbfgs"}, "not one this trainer can use"),
        ({"class": torch.optim.LBFGS}, "LBFGS needs a closure"),
        ({"class": "adamw_9bit"}, "or adamw_8bit"),
    ],
    ids=["unknown-kwarg", "not-an-optimizer", "lbfgs-name", "lbfgs-class", "unknown-name"],
)
def test_direct_trainer_refuses_an_optimizer_config_it_cannot_use_when_built(config, needle):
    """These failed later, in setup() or the first step, with torch's own errors."""
    with pytest.raises(ValueError, match="optimizer_config") as info:
        unsloth_multigpu.MultiGPUTrainer(torch.nn.Linear(2, 2), optimizer_config=config)
    assert needle in str(info.value)


def test_direct_trainer_takes_the_recipes_8bit_adamw_by_name_and_refuses_a_model_that_is_none():
    trainer = unsloth_multigpu.MultiGPUTrainer(torch.nn.Linear(2, 2), optimizer_config={"class": "adamw_8bit"})
    trainer.setup()
    assert type(trainer.optimizer).__name__ == "AdamW8bit"
    with pytest.raises(ValueError, match="model must be a torch.nn.Module"):
        unsloth_multigpu.MultiGPUTrainer(None)


def test_what_the_api_raises_can_be_caught_by_name_from_the_package():
    with pytest.raises(unsloth_multigpu.UserError, match="available_memory"):
        unsloth_multigpu.ConfigManager().get_optimal_config(model_size="7B", available_memory="abc")
    assert issubclass(unsloth_multigpu.OutOfMemoryRisk, unsloth_multigpu.UserError)
    assert issubclass(unsloth_multigpu.ConsistencyError, RuntimeError)
    assert unsloth_multigpu.GPUInfo.__name__ == "GPUInfo"


def test_direct_trainer_names_optimizer_kwargs_by_their_torch_names_and_refuses_text_numbers():
    """`{"lr": "1e-4"}` passed and failed in setup() with torch's TypeError ("'<=' not supported"); `learning_rate`
    got no hint; a second setup() silently dropped the optimizer's state."""
    for kwargs, needle in (
        ({"learning_rate": 1e-4}, "(did you mean 'lr'?)"),
        ({"epsilon": 1e-8}, "(did you mean 'eps'?)"),
        ({"lr": "1e-4"}, "['lr'] must be a number, got '1e-4': write lr=0.0001"),
        ({"weight_decay": True}, "['weight_decay'] must be a number, got True"),
    ):
        with pytest.raises(ValueError) as info:
            unsloth_multigpu.MultiGPUTrainer(
                torch.nn.Linear(2, 2), optimizer_config={"class": "adamw", "kwargs": kwargs}
            )
        assert needle in str(info.value), str(info.value)
    trainer = unsloth_multigpu.MultiGPUTrainer(
        torch.nn.Linear(2, 2), optimizer_config={"class": "adamw", "kwargs": {"lr": torch.tensor(1e-3)}}
    )  # the control: a tensor learning rate, which torch takes
    trainer.setup()
    with pytest.warns(UserWarning, match=r"setup\(\) called again: the optimizer is built anew"):
        trainer.setup()


def test_direct_trainer_keeps_the_documented_learning_rate_when_kwargs_leave_it_out():
    trainer = unsloth_multigpu.MultiGPUTrainer(
        torch.nn.Linear(2, 2), optimizer_config={"class": torch.optim.AdamW, "kwargs": {"weight_decay": 0.0}}
    )
    trainer.setup()
    assert trainer.optimizer.param_groups[0]["lr"] == 2e-4
    assert trainer.optimizer.param_groups[0]["weight_decay"] == 0.0


def test_a_failing_hook_mode_worker_ends_the_script_with_its_rank_and_error(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(
        "import unsloth_multigpu\n"
        "unsloth_multigpu.enable_multi_gpu(num_gpus=2, device='cpu')\n"
        "if unsloth_multigpu.dist_info().rank == 1:\n"
        "    raise RuntimeError('boom on purpose')\n"
    )
    env = mgpu_env(MGPU_LOG_DIR=str(tmp_path / "logs"))
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "[unsloth-mgpu] training failed" in proc.stderr and "rank 1" in proc.stderr, proc.stderr[-3000:]
    assert "boom on purpose" in proc.stderr, proc.stderr[-3000:]
    assert "AttributeError" not in proc.stderr, proc.stderr[-3000:]


def test_a_hook_mode_worker_sizes_for_the_launch_and_keeps_the_launching_calls_timeout(tmp_path):
    """In a re-launched worker (one GPU visible to it), ConfigManager plans for the launch's worker count, a
    different num_gpus is refused, and collectives time out after the launching call's timeout_seconds (they
    used to wait for the default 1,800 s). The script skips the hooks' install (no Unsloth import: seconds)."""
    script = tmp_path / "sized.py"
    script.write_text(
        "import time\n"
        "import torch, torch.distributed as dist, unsloth_multigpu\n"
        "info = unsloth_multigpu.dist_info()\n"
        "if info is None:\n"
        "    unsloth_multigpu.enable_multi_gpu(num_gpus=2, device='cpu', timeout_seconds=3)  # never returns\n"
        "cfg = unsloth_multigpu.ConfigManager().get_optimal_config('1B', '24GB', global_batch=16)\n"
        "per_rank = cfg['batch_size_per_gpu'] * cfg['gradient_accumulation_steps']\n"
        "print('CONFIG', info.rank, cfg['num_gpus'], per_rank, flush=True)\n"
        "try:\n"
        "    unsloth_multigpu.enable_multi_gpu(num_gpus=1, device='cpu')\n"
        "except ValueError as exc:\n"
        "    print('REFUSED', info.rank, exc, flush=True)\n"
        "if info.rank == 1:\n"
        "    time.sleep(60)\n"
        "dist.all_reduce(torch.ones(1))\n"
    )
    env = mgpu_env(MGPU_LOG_DIR=str(tmp_path / "logs"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=50
    )
    out = proc.stdout + proc.stderr
    assert "CONFIG 0 2 8" in proc.stdout, out[-3000:]  # 2 workers x 8 = the global batch of 16
    assert "REFUSED 0 num_gpus=1 in this worker but enable_multi_gpu launched 2 worker(s)" in proc.stdout, out[-3000:]
    assert proc.returncode == 1 and "Timed out waiting 3000ms" in proc.stderr, out[-3000:]


def test_hook_mode_workers_size_for_the_smallest_launched_gpu(monkeypatch):
    """A worker sees only its own GPU: sized from it, ranks on a 24 GB and a 16 GB GPU chose different batches.
    The launching call passes the smallest launched GPU's memory on, and get_optimal_config sizes for it."""
    from types import SimpleNamespace

    from unsloth_mgpu_cli import hooks
    from unsloth_mgpu_cli.configgen import ConfigManager

    monkeypatch.delenv(hooks.LAUNCH_GPU_MEMORY_ENV, raising=False)
    hooks._share_launch_gpu_memory(2, nvml=FakeNVML([h200(0, total_gib=24.0), h200(1, total_gib=16.0), h200(2)]))
    assert int(os.environ[hooks.LAUNCH_GPU_MEMORY_ENV]) == 16 * 2**30  # the smallest of the first two
    monkeypatch.setattr(hooks._STATE, "info", SimpleNamespace(world_size=2, rank=1))  # in a worker of that launch
    in_worker = ConfigManager().get_optimal_config("7B", seq_len=1024)
    assert in_worker == ConfigManager().get_optimal_config("7B", "16GB", seq_len=1024)
    assert in_worker != ConfigManager().get_optimal_config("7B", "24GB", seq_len=1024)  # the sizes matter
    monkeypatch.setattr(hooks._STATE, "info", None)  # outside a worker the variable is not read
    with pytest.raises(UserError, match="available_memory"):  # no GPU here, none given
        ConfigManager().get_optimal_config("7B", seq_len=1024)


class _Base:
    """A base sampler whose order depends on torch's global RNG, like RandomSampler."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __iter__(self):
        return iter(torch.randperm(self.n).tolist())


@pytest.mark.parametrize("n", [16, 19, 17])  # whole blocks; a tail split unevenly; a tail of 1 < world (dropped)
def test_shard_sampler_splits_every_global_batch_between_ranks(n):
    world, bs = 2, 4
    one = list(GlobalBatchShardSampler(_Base(n), 0, 1, bs * world, seed=5))
    torch.manual_seed(123)  # a different global RNG state must not change the order
    ranks = [list(GlobalBatchShardSampler(_Base(n), r, world, bs, seed=5)) for r in range(world)]
    assert sorted(one) == list(range(n))
    assert len({len(ranks[0]) // bs + (len(ranks[0]) % bs > 0), len(ranks[1]) // bs + (len(ranks[1]) % bs > 0)}) == 1
    for b in range(n // (bs * world)):  # global batch b of N ranks == batch b of one rank with N x the batch
        assert sorted(ranks[0][b * bs : (b + 1) * bs] + ranks[1][b * bs : (b + 1) * bs]) == sorted(
            one[b * bs * world : (b + 1) * bs * world]
        )
    assert not set(ranks[0]) & set(ranks[1])
    tail = n % (bs * world)
    expected = n if tail >= world else n - tail
    assert len(ranks[0]) + len(ranks[1]) == expected
    assert [len(GlobalBatchShardSampler(_Base(n), r, world, bs)) for r in range(world)] == [len(x) for x in ranks]


def test_shard_sampler_reshuffles_per_epoch():
    s = GlobalBatchShardSampler(_Base(32), 0, 2, 4, seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(1)
    assert list(s) != first
    s.set_epoch(0)
    assert list(s) == first


def test_memory_preflight_refuses_what_cannot_fit_and_passes_what_can():
    mm = MemoryManager(memory_fraction=0.9)
    with pytest.raises(OutOfMemoryRisk, match="70B"):
        mm.check_fits("70B", seq_len=4096, micro_batch_size=8, method="full", available_bytes=80 * 2**30)
    b = mm.check_fits("1B", seq_len=512, micro_batch_size=1, method="qlora", available_bytes=80 * 2**30)
    assert 0 < b.peak < 0.9 * 80 * 2**30
    # the boundary is the forecast itself: just below its peak / fraction fails, just above passes
    need = mm.forecast("8B", seq_len=2048, micro_batch_size=2).peak
    with pytest.raises(OutOfMemoryRisk):
        mm.check_fits("8B", seq_len=2048, micro_batch_size=2, available_bytes=int(need / 0.9) - 2**20)
    mm.check_fits("8B", seq_len=2048, micro_batch_size=2, available_bytes=int(need / 0.9) + 2**20)
    with pytest.raises(UserError) as info:
        mm.check_fits("8B", seq_len=-5, micro_batch_size=0, method="bogus", available_bytes=80 * 2**30)
    assert [p.where for p in info.value.problems] == ["seq_len", "micro_batch_size", "method"]


@pytest.mark.parametrize("size,memory", [("8B", 16), ("3B", 16), ("1B", 8)])
def test_what_config_manager_chooses_passes_the_memory_preflight_on_that_memory(size, memory):
    """The documented flow: get_optimal_config, then check_fits with the same set-up. check_fits used to forecast
    without the GPU's size (Unsloth's loss chunks), about 0.7 GB more for the 8B on 16 GB, and refused it."""
    cfg = unsloth_multigpu.ConfigManager().get_optimal_config(size, f"{memory}GB")
    fits = MemoryManager().check_fits(
        size,
        seq_len=cfg["max_seq_length"],
        micro_batch_size=cfg["batch_size_per_gpu"],
        method="qlora" if cfg["load_in_4bit"] else "lora",
        gradient_checkpointing=cfg["gradient_checkpointing"],
        available_bytes=memory * 2**30,
    )
    assert fits.peak / 2**30 == pytest.approx(cfg["predicted_peak_gb"], abs=0.01)


def test_a_model_too_big_for_a_replica_per_gpu_says_so_in_the_python_apis_terms():
    """70B on 8 x 24 GB: no replica fits (hook mode keeps one per GPU), sharded it does: the error says both and
    names the API's arguments, not suggest's flags. Unknown size and bad memory are reported together."""
    with pytest.raises(UserError) as exc:
        unsloth_multigpu.ConfigManager().get_optimal_config("70B", "24GB", num_gpus=8)
    text = exc.value.render()
    assert "whole replica on every GPU" in text and "distributed.strategy: fsdp" in text, text
    assert "available_memory/memory_fraction" in text and "--gpu-memory/" not in text, text
    with pytest.raises(UserError) as exc:
        unsloth_multigpu.ConfigManager().get_optimal_config("70B", "24GB", num_gpus=1)
    assert "fsdp" not in exc.value.render()  # one GPU: nothing to shard over
    with pytest.raises(UserError) as exc:
        unsloth_multigpu.ConfigManager().get_optimal_config("6B", "-3GB")
    assert [p.where for p in exc.value.problems] == ["model_size", "available_memory"]


def test_check_fits_says_available_bytes_is_in_bytes():
    for bad, says in ((24, "not GB"), ("24GB", "positive number of bytes"), (-1, "positive number of bytes")):
        with pytest.raises(UserError, match=says):
            MemoryManager().check_fits("1B", available_bytes=bad)


def test_memory_usage_reads_nvml_gpus_and_falls_back_to_host_ram():
    nvml = FakeNVML([h200(0), h200(1, free_gib=100.0)])
    usage = MemoryManager(nvml=nvml).get_memory_usage()
    assert [u["device"] for u in usage] == ["cuda:0", "cuda:1"] and {u["source"] for u in usage} == {"nvml"}
    assert usage[1]["free_bytes"] == 100 * 2**30 and usage[0]["total_bytes"] > usage[0]["free_bytes"] > 0
    host = MemoryManager(nvml=FakeNVML([], fail_init=True)).get_memory_usage()
    assert host[0]["source"] == "psutil" and host[0]["used_bytes"] > 0 and host[0]["total_bytes"] > 0


def test_cleanup_collects_garbage_and_phases_are_recorded():
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a  # a reference cycle: only the garbage collector frees it
    ref = weakref.ref(a)
    del a, b
    mm = MemoryManager()
    gc.disable()  # no automatic collection: the phase's clean-up must be what frees the cycle
    try:
        with mm.phase("load"):
            pass
    finally:
        gc.enable()
    assert ref() is None
    assert mm.history[0]["phase"] == "load" and mm.history[0]["collected"] >= 2 and mm.history[0]["rss_bytes"] > 0
    # the phase's peak, not its end: 400 MB touched and freed inside it
    with mm.phase("train"):
        block = bytearray(400 * 2**20)
        block[:: 2**12] = b"\1" * (len(block) // 2**12)
        del block
    row = mm.history[1]
    assert row["peak_rss_bytes"] - row["rss_bytes"] > 300 * 2**20, row
    with mm.phase("evaluate"):  # a new phase starts a new high-water mark
        pass
    assert mm.history[2]["peak_rss_bytes"] < row["peak_rss_bytes"] - 300 * 2**20, mm.history


def test_direct_trainer_needs_the_workers_for_more_than_one_gpu():
    from api_workers import tiny_causal_lm

    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    with pytest.raises(RuntimeError, match="enable_multi_gpu"):
        MultiGPUTrainer(model=tiny_causal_lm(), num_gpus=2).setup()
    with pytest.raises(RuntimeError, match="setup"):
        MultiGPUTrainer(model=tiny_causal_lm()).train_epoch([])


def _rel(a, b):
    return max(float((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-12)) for k in b)


@pytest.fixture(scope="module")
def launched_direct():
    """The direct trainer on 2 ranks: weighted, mean, and weighted with rank 1's loss NaN on batch 1, in one launch;
    per case, {rank: result}."""
    from api_workers import direct_trainer_runs

    cases = [("weighted", 2, None), ("mean", 2, None), ("weighted", 2, 1)]
    results = D.launch(direct_trainer_runs, (cases,), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    return [{rank: runs[i] for rank, runs in results.items()} for i in range(len(cases))]


@pytest.mark.integration
def test_direct_trainer_on_two_ranks_equals_one_process_over_the_same_batches(launched_direct):
    from api_workers import direct_trainer_run, rank_average_reference

    ref = direct_trainer_run("weighted", None)
    two, mean, _ = launched_direct
    assert _rel(two[0]["weights"], two[1]["weights"]) == 0.0  # replicas identical
    assert _rel(two[0]["weights"], ref["weights"]) < 1e-5
    assert two[0]["stats"]["steps"] == ref["stats"]["steps"] == 5  # the last batch has 1 row for 2 ranks
    assert two[0]["stats"]["tokens"] == ref["stats"]["tokens"]
    assert two[0]["stats"]["loss"] == pytest.approx(ref["stats"]["loss"], rel=1e-5)
    # mean: each rank's token mean, averaged over the ranks. It equals that rule computed in one process, and
    # differs from one big batch (the ranks' token counts differ), which shows the 1e-5 can fail. (sum is mean's
    # all-reduce without the division: tests/test_distributed.py checks the aggregations by hand on 3 ranks.)
    assert _rel(mean[0]["weights"], rank_average_reference("mean", 2)["weights"]) < 1e-5
    assert _rel(mean[0]["weights"], ref["weights"]) > 1e-3


def test_hook_mode_refuses_ranks_with_different_settings_or_an_iterable_dataset_on_every_rank():
    """On GPUs of different sizes a script that sizes its batch from the GPU it sees (each worker sees its own)
    trained different batches per rank, and the sampler's shards overlapped; an iterable dataset trained the same
    samples on every rank (transformers asks no sampler for one). Both are refused before the first step, with
    the same error on every rank (the settings are gathered first, so no rank waits for another)."""
    from api_workers import hook_settings_checks

    results = D.launch(hook_settings_checks, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    assert sorted(results) == [0, 1]
    for by_case in results.values():
        assert by_case["same"] is None
        kind, message = by_case["batch"]
        assert kind == "RanksDisagree" and "per_device_train_batch_size: 2 on rank 0, 4 on rank 1" in message
        assert "available_memory" in message and "max_steps" not in message  # only what differs
        kind, message = by_case["accumulation"]
        assert kind == "RanksDisagree" and "gradient_accumulation_steps: 1 on rank 0, 2 on rank 1" in message
        kind, message = by_case["iterable"]
        assert kind == "NotImplementedError" and "iterable" in message and "map-style" in message


def test_hook_mode_with_one_worker_takes_an_iterable_dataset():
    """Nothing to shard with one rank (the sampler is left as it is): the settings check measured the dataset's
    length regardless, and an iterable dataset failed with `TypeError: ... has no len()`."""
    from types import SimpleNamespace

    from datasets import Dataset
    from transformers import TrainingArguments

    from unsloth_mgpu_cli import hooks

    rows = Dataset.from_list([{"text": f"row {i}"} for i in range(4)]).to_iterable_dataset()
    args = TrainingArguments(output_dir="/tmp/unused", per_device_train_batch_size=2, max_steps=2)
    hooks._check_same_settings(SimpleNamespace(args=args, train_dataset=rows), hooks.MultiGPUConfig(), D.DistInfo())


def test_direct_trainer_refuses_ranks_whose_loaders_disagree_and_skips_a_batch_with_nothing_to_learn():
    """A loader one batch longer on one rank made that rank's last collective meet another kind on the other
    (gloo aborted, NCCL would hang); the same rows in another order passed the fingerprint (a sum) and trained
    rows twice; a batch whose labels are all masked counted as a step (Adam's momentum still moved the weights)."""
    from api_workers import direct_trainer_refusals

    results = D.launch(direct_trainer_refusals, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    assert sorted(results) == [0, 1]
    for by_case in results.values():
        assert "different numbers of batches" in by_case["longer"] and "rank(s) [0] ended after 1" in by_case["longer"]
        assert "ranks iterate different batches" in by_case["reordered"]
        assert by_case["masked"] == {"steps": 0, "skipped": 1, "changed": False}


@pytest.mark.parametrize(
    ("batch", "needle"),
    [
        ({"input_ids": [[5, 6, 7]]}, "batch['input_ids'] must be a 2-D tensor of [rows, length], got a list"),
        ({"input_ids": torch.tensor([5, 6, 7])}, "got a tensor of shape [3]"),
        ({"input_ids": torch.ones(2, 3, dtype=torch.long), "labels": torch.ones(2, 4, dtype=torch.long)}, "labels"),
    ],
    ids=["a-list", "1-d", "labels-of-another-shape"],
)
def test_direct_trainer_names_a_batch_it_cannot_read(batch, needle):
    from api_workers import tiny_causal_lm

    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    trainer = MultiGPUTrainer(model=tiny_causal_lm())
    trainer.setup()
    with pytest.raises(TypeError, match="collate the rows") as info:
        trainer.train_epoch([batch])
    assert needle in str(info.value)


def test_direct_trainer_takes_a_batch_encoding_as_it_takes_a_dict():
    """A tokenizer's or a transformers collator's batch is a BatchEncoding (a UserDict, not a dict): it was refused,
    by the very error that suggested DataCollatorForLanguageModeling."""
    from api_workers import tiny_causal_lm
    from transformers import BatchEncoding

    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    weights = []
    for given in (BatchEncoding(batch), batch):  # the plain dict: the control
        trainer = MultiGPUTrainer(model=tiny_causal_lm())
        trainer.setup()
        assert trainer.train_epoch([given])["steps"] == 1
        weights.append([p.detach().clone() for p in trainer.params])
    assert all(torch.equal(a, b) for a, b in zip(*weights, strict=True))


def test_direct_trainer_names_misuse_that_torch_reported_from_deep_inside():
    """One batch instead of a loader (its keys were iterated as 'str batches'); float ids; -100 in input_ids (an
    IndexError inside torch's embedding, a device assert on CUDA); a model that returns no loss."""
    from api_workers import tiny_causal_lm

    from unsloth_mgpu_cli.direct import MultiGPUTrainer

    trainer = MultiGPUTrainer(model=tiny_causal_lm())
    trainer.setup()
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"got one batch \(a dict with keys \['input_ids'\]\): pass train_epoch"):
        trainer.train_epoch({"input_ids": ids})
    with pytest.raises(TypeError, match=r"batch\['input_ids'\] must hold token ids .*got torch.float32"):
        trainer.train_epoch([{"input_ids": ids.float()}])
    for bad, shown in ((ids.masked_fill(ids > 30, -100), -100), (ids + 64, int(ids.max()) + 64)):
        with pytest.raises(ValueError, match=rf"token id {shown}, outside the model's embedding \(ids 0 to 63\)"):
            trainer.train_epoch([{"input_ids": bad}])
    with pytest.warns(UserWarning, match="none of the epoch's 1 batch\\(es\\) trained"):  # every label masked
        stats = trainer.train_epoch([{"input_ids": ids, "labels": torch.full_like(ids, -100)}])
    assert (stats["steps"], stats["skipped_steps"]) == (0, 1)

    class NoLoss(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids, labels=None, attention_mask=None):
            return input_ids.float() * self.w

    trainer = MultiGPUTrainer(model=NoLoss())
    trainer.setup()
    with pytest.raises(TypeError, match="returned a Tensor without a loss"):
        trainer.train_epoch([{"input_ids": ids}])


@pytest.mark.integration
def test_direct_trainer_skips_a_batch_with_a_nan_loss_on_one_rank_on_every_rank(launched_direct):
    """Rank 1's loss is NaN on the second batch: no rank updates, the replicas stay identical (the consistency
    check after every step passes), and the weights equal one process that never saw that batch. Before, every
    rank stepped on NaN gradients and the run ended in a ConsistencyError blaming drifted replicas."""
    from api_workers import direct_trainer_run

    skipped = direct_trainer_run("weighted", None, 1)
    two = launched_direct[2]
    assert _rel(two[0]["weights"], two[1]["weights"]) == 0.0
    assert all(torch.isfinite(w).all() for w in two[0]["weights"].values())
    assert two[0]["stats"]["skipped_steps"] == 1 and two[0]["stats"]["steps"] == skipped["stats"]["steps"] == 4
    assert _rel(two[0]["weights"], skipped["weights"]) < 1e-5
    assert _rel(two[0]["weights"], direct_trainer_run("weighted", None)["weights"]) > 1e-3  # the batch mattered
    assert math.isfinite(two[0]["stats"]["loss"])


def test_direct_trainer_stops_after_max_skipped_steps_and_reports_batches_it_cannot_read():
    from api_workers import tiny_causal_lm

    model = tiny_causal_lm()
    trainer = unsloth_multigpu.MultiGPUTrainer(model, max_skipped_steps=2)
    trainer.setup()
    assert math.isnan(trainer.train_epoch([])["loss"])  # no step: no loss (it said 0.0)
    with pytest.raises(TypeError, match="dicts with 'input_ids'.*got a tuple"):
        trainer.train_epoch([(torch.ones(2, 4, dtype=torch.long),)])
    forward = model.forward

    def infinite_loss(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.loss = out.loss * float("inf")
        return out

    model.forward = infinite_loss
    ids = torch.randint(1, 64, (2, 6))
    with (
        pytest.warns(UserWarning, match="non-finite loss on 1 rank"),
        pytest.raises(RuntimeError, match="2 batches in a row"),
    ):
        trainer.train_epoch([{"input_ids": ids}] * 3)
    for bad, match in (({"class": torch.optim.AdamW, "lr": 1e-3}, "inside 'kwargs'"), ("adamw", "must be a dict"),
                       ({"class": 3}, "optimizer class"), ({"kwargs": [1]}, "kwargs")):  # fmt: skip
        with pytest.raises(ValueError, match=match):
            unsloth_multigpu.MultiGPUTrainer(model, optimizer_config=bad)  # refused when built, not in setup()
    with pytest.raises(ValueError, match="aggregation_method must be one of"):
        unsloth_multigpu.MultiGPUTrainer(model, aggregation_method="avg")


def test_disable_multi_gpu_puts_back_every_original(monkeypatch):
    """Zero intrusion: hook mode patches transformers' classes in the worker, never Unsloth's files, and
    `disable_multi_gpu()` restores the very objects it replaced (rank 1 of 2: the save methods are patched too)."""
    import logging
    import types

    import peft
    import transformers

    from unsloth_mgpu_cli import hooks

    targets = [
        (transformers.Trainer, "__init__"),
        (transformers.TrainingArguments, "should_save"),
        (transformers.TrainingArguments, "should_log"),
        (transformers.PreTrainedModel, "save_pretrained"),
        (transformers.PreTrainedTokenizerBase, "save_pretrained"),
        (peft.PeftModel, "save_pretrained"),
        (transformers.Trainer, "_save_rng_state"),  # saved by every rank, under one name, into rank 0's checkpoint
    ]
    before = {key: key[0].__dict__[key[1]] for key in targets}
    filters = list(logging.getLogger("transformers.training_args").filters)
    monkeypatch.setitem(sys.modules, "unsloth", types.ModuleType("unsloth"))  # the edge: skip the 20 s import
    monkeypatch.setattr(hooks._STATE, "info", D.DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2))
    try:
        hooks._install(hooks.MultiGPUConfig(num_gpus=2, gradient_aggregation="weighted"))
        assert all(key[0].__dict__[key[1]] is not before[key] for key in targets)
        assert hooks.get_config() is not None
    finally:
        unsloth_multigpu.disable_multi_gpu()
    assert {key: key[0].__dict__[key[1]] for key in targets} == before
    assert all(key[0].__dict__[key[1]] is before[key] for key in targets)
    assert logging.getLogger("transformers.training_args").filters == filters and hooks.get_config() is None
