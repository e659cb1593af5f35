"""GPU tier: the same correctness claims on real GPUs with NCCL. Skipped without the GPUs each test needs.

python -m pytest -m gpu      (or `make test-gpu`)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import EQUIVALENCE_RUN, ROOT, max_rel_diff, mgpu_env, packing_probe, run_mgpu
from safetensors.torch import load_file

from unsloth_mgpu_cli.devices import count_gpus

GPUS = count_gpus()
pytestmark = pytest.mark.gpu
needs_one = pytest.mark.skipif(GPUS < 1, reason="needs a GPU")
needs_two = pytest.mark.skipif(GPUS < 2, reason="needs 2 GPUs")

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BASE = [
    *EQUIVALENCE_RUN,
    "training.max_steps=8",  # later overrides win
    "distributed.device=cuda",
    "model.dtype=bfloat16",
    "memory.gradient_checkpointing=false",
]


def _train(out, *overrides, **env):
    proc = run_mgpu("train", str(QUICKSTART), *BASE, f"output.dir={out}", *overrides, timeout=500, **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@needs_one
def test_flat_8bit_adamw_equals_per_parameter_on_cuda():
    """bitsandbytes' CUDA kernels: one kernel per flat run gives the per-parameter update to the bit."""
    from test_optim import test_flat_update_equals_per_parameter_update_to_the_bit

    test_flat_update_equals_per_parameter_update_to_the_bit(device="cuda")


@needs_two
def test_two_gpus_equal_one_gpu_and_a_control_differs(tmp_path):
    two = _train(tmp_path / "two", "distributed.num_gpus=2", "training.micro_batch_size=2")
    one = _train(tmp_path / "one", "distributed.num_gpus=1", "training.micro_batch_size=4")
    ctl = _train(tmp_path / "ctl", "distributed.num_gpus=1", "training.micro_batch_size=4", "training.seed=7")
    same, other = max_rel_diff(two, one), max_rel_diff(ctl, one)
    # bf16 activations: differently shaped micro-batches round differently, so the bound is looser than on CPU
    assert same < 2e-2, same
    assert other > 10 * same, (same, other)
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows[-1]["peak_memory_gb"]) == 2 and all(m > 0 for m in rows[-1]["peak_memory_gb"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert all(r >= a > 0 for r, a in zip(summary["peak_reserved_gb"], summary["peak_memory_gb"], strict=True))


@needs_one
def test_gemma2_trains_on_cuda_with_unsloths_block_compile_off(tmp_path):
    """A small Gemma 2, QLoRA on one GPU: Unsloth's block compile fails in Gemma 2's backward (the control, with it
    forced on); with it off (mgpu's default for Gemma 2 on CUDA) the run trains and its loss falls."""
    from sentencepiece_models import GSM8K, sentencepiece_base

    corpus = GSM8K if GSM8K.is_file() else ROOT / "gpu-data" / GSM8K.name  # the GPU machine's copy
    base = sentencepiece_base("gemma2", tmp_path, corpus)
    args = [f"model.name={base}", "model.load_in_4bit=true", "distributed.num_gpus=1", "training.max_steps=12"]
    proc = run_mgpu("train", str(QUICKSTART), *BASE, *args, f"output.dir={tmp_path / 'run'}", timeout=500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Unsloth's per-layer torch.compile is off for this gemma2 model" in proc.stdout
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    forced = run_mgpu(
        "train", str(QUICKSTART), *BASE, *args, f"output.dir={tmp_path / 'on'}", timeout=500, UNSLOTH_BLOCK_COMPILE="1"
    )
    # if this starts to pass, Unsloth compiles Gemma 2's blocks: drop trainer.BLOCK_COMPILE_FAILS's entry
    assert forced.returncode == 1 and "InductorError" in forced.stdout + forced.stderr, forced.stdout[-2000:]


@needs_two
def test_sharded_on_two_gpus_equals_replicated(tmp_path):
    """fsdp on NCCL: the weights sit in host memory until sharded, and every collective on them must be staged on
    the GPU (session 4: the start-up weight check was not, and fsdp failed at load; gloo takes host tensors, so
    only this tier can see it). Written in session 4; first run on 2 x H200 in session 6: passed."""
    ddp = _train(tmp_path / "ddp", "distributed.num_gpus=2", "training.micro_batch_size=2")
    fsdp = _train(
        tmp_path / "fsdp", "distributed.num_gpus=2", "training.micro_batch_size=2", "distributed.strategy=fsdp"
    )
    # bf16 on the GPU, and FSDP2 reduce-scatters where ddp all-reduces: looser than the CPU test's 1e-5
    assert max_rel_diff(fsdp, ddp) < 2e-2
    assert "strategy: fsdp" in (tmp_path / "fsdp" / "recipe.resolved.yaml").read_text()


@needs_one
def test_batching_auto_predicts_the_route_unsloth_takes_for_packed_rows():
    """`dataset.batching: auto` decides from the installed packages (varlen.varlen_kernel) without importing Unsloth;
    Unsloth, imported on this GPU, must then attend a packed row in one variable-length call exactly where the
    prediction says so (else `auto` would pack rows that Unsloth attends one sample at a time)."""
    from unsloth_mgpu_cli.devices import min_compute_capability
    from unsloth_mgpu_cli.varlen import varlen_kernel

    code = "from unsloth import FastLanguageModel\nfrom unsloth_mgpu_cli.varlen import unsloth_packed_route\n"
    code += "print(unsloth_packed_route())"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=mgpu_env(), capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    route = proc.stdout.strip().splitlines()[-1]
    kernel, why = varlen_kernel("cuda", min_compute_capability(), "auto", "auto")
    print(f"Unsloth's route: {route}; predicted: {kernel} ({why})")
    if kernel is not None:
        assert route in ("flash_varlen", "torch varlen"), (route, kernel, why)
    else:  # xformers' block-diagonal kernel is one call too: a chance auto leaves, not a wrong pick
        assert route in ("per sample", "dense mask", "xformers"), (route, why)


@needs_one
def test_packed_rows_sample_lengths_reach_unsloth_on_cuda():
    """A packed micro-batch carries its sample lengths on the host (`packed_seq_lengths`, as TRL's padding-free
    collator gives them): on CUDA Unsloth must read them (wrong lengths change the loss), give the loss it gets from
    the positions, and sync the host less often than when it finds the lengths in the positions on the GPU."""
    r = packing_probe("--cuda")
    print(r)
    assert abs(r["packed_lengths"] - r["packed"]) <= 1e-6 * r["packed"], r  # the same boundaries, the same kernels
    assert abs(r["packed_lengths"] - r["one_by_one"]) < 2e-2 * r["one_by_one"], r  # bfloat16
    assert abs(r["wrong_lengths"] - r["packed"]) > 1e-6 * r["packed"], r  # control: the keyword is read
    assert r["syncs"]["lengths"] < r["syncs"]["positions"], r


@needs_one
def test_queued_steps_equal_settled_steps_on_cuda(tmp_path):
    """The look-ahead loop on CUDA (NCCL with 2 GPUs): the step's flags reach the host through a pinned copy behind
    an event, and the 8-bit update of a skipped step is undone on the device. A non-finite step (3) and an
    out-of-memory redo (6) must give the weights of the loop that settles each step first."""
    run = (f"distributed.num_gpus={min(GPUS, 2)}", "training.micro_batch_size=4", "distributed.verify_every=0")
    run += ("training.optimizer=adamw_8bit",)  # quickstart.yaml's torch AdamW settles every step
    run += ("distributed.balance_speed=false",)  # the same split in every run: timings must not move samples
    faults = f"nan:rank={min(GPUS, 2) - 1}:step=3;oom:rank=0:step=6:until=99:above=2"
    settled = _train(tmp_path / "settled", *run, MGPU_INJECT_FAULT=faults, MGPU_LOOKAHEAD="0")
    ahead = _train(tmp_path / "ahead", *run, MGPU_INJECT_FAULT=faults)
    control = _train(tmp_path / "control", *run, MGPU_INJECT_FAULT="oom:rank=0:step=6:until=99:above=2")
    same, other = max_rel_diff(ahead, settled), max_rel_diff(control, settled)
    print(f"queued vs settled {same:.3g}, control {other:.3g}")
    # the same kernels on the same shapes in the same order: equal up to the GPU's non-deterministic reductions
    assert same < 1e-3, same
    assert other > 10 * max(same, 1e-3), (same, other)
    assert json.loads((tmp_path / "ahead" / "summary.json").read_text())["look_ahead"] is True
    rows = [json.loads(x) for x in (tmp_path / "ahead" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1, 1, 1, 1, 1]
    assert all(r["compute_s"] and all(c > 0 for c in r["compute_s"]) for r in rows)


@needs_two
def test_a_slow_gpu_gets_fewer_tokens(tmp_path):
    """distributed.balance_speed on CUDA (auto): the ranks' device times (CUDA events) reach every rank with the
    step's collective, and a rank made slower (`slow` fault: waits before each forward, so its GPU idles inside
    the timed window, as a GPU held back by its power cap runs longer) gets fewer tokens. The math is the CPU
    test's (tests/test_engine_cpu.py): weighted aggregation, so any split gives one batch's update."""
    _train(
        tmp_path / "two",
        "distributed.num_gpus=2",
        "training.micro_batch_size=8",
        MGPU_INJECT_FAULT="slow:rank=1:step=1:until=999:us=100",
    )
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    late = [r for r in rows if r["rank_speeds"] is not None]
    assert len(late) >= 3 and all(r["rank_speeds"][1] < 0.95 < 1.05 < r["rank_speeds"][0] for r in late), rows
    assert all(r["rank_compute_tokens"][1] < r["rank_compute_tokens"][0] for r in late), late
    assert "balance_speed: true" in (tmp_path / "two" / "recipe.resolved.yaml").read_text()
