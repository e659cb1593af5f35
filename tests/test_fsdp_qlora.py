"""QLoRA under the sharded mode (`distributed.strategy: fsdp` + `model.load_in_4bit`): torchao NF4 shards.

Integration: real `mgpu train` on CPU (gloo, real Unsloth, tiny Llama): 2 sharded 4-bit workers end with the
adapter of 1 worker training the same 4-bit model (same global batch), another seed differs, each rank stores
half of the 4-bit bytes, and a 2-worker checkpoint resumes on 1 worker. Unit: recipe rules, forecast, generator.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, adapter, assert_user_error, max_rel_diff, run_mgpu
from safetensors.torch import load_file

from unsloth_mgpu_cli.configgen import plan, resolve_auto
from unsloth_mgpu_cli.memory import NF4_BYTES_PER_PARAM, GiB, TrainingSetup, estimate, resolve_architecture
from unsloth_mgpu_cli.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
QLORA = [
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.learning_rate=5e-3",
    "distributed.aggregation=weighted",
    "distributed.strategy=fsdp",
    "model.load_in_4bit=true",
    "logging.progress=false",
]
TWO = ["distributed.num_gpus=2", "training.micro_batch_size=2"]
ONE = ["distributed.num_gpus=1", "training.micro_batch_size=4"]  # the same global batch (4) in one process
# builtin:tiny-llama: 2 layers of q,o (128x128), k,v (64x128), gate, up (256x128), down (128x256)
TINY_LINEAR_PARAMS = 2 * (2 * 128 * 128 + 2 * 64 * 128 + 3 * 256 * 128)


def train(out: Path, *overrides: str, resume: bool = False):
    extra = ["--resume", "auto"] if resume else []
    proc = run_mgpu("train", str(QUICKSTART), *QLORA, f"output.dir={out}", *overrides, *extra, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("qlora-fsdp")
    logs = {
        "fsdp": train(base / "fsdp", *TWO, "output.save_steps=2").stdout,
        "one": train(base / "one", *ONE, "output.save_steps=0").stdout,
        "control": train(base / "control", *ONE, "output.save_steps=0", "training.seed=7").stdout,
    }
    # The step-2 checkpoint of 2 sharded 4-bit workers, resumed by 1 worker on the same global batch.
    shutil.copytree(base / "fsdp", base / "resumed", ignore=shutil.ignore_patterns("adapter", "step-4"))
    logs["resumed"] = train(base / "resumed", *ONE, "output.save_steps=2", resume=True).stdout
    return base, logs


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.integration
@pytest.mark.slow
def test_sharded_4bit_equals_one_worker(runs):
    base, _ = runs
    fsdp, one = adapter(base / "fsdp"), adapter(base / "one")
    # the same PEFT adapter as any LoRA run: A and B of the 7 targets in both layers, B moved off zero
    assert len(fsdp) == 2 * 7 * 2 and all(".lora_A." in k or ".lora_B." in k for k in fsdp)
    assert all(float(v.abs().max()) > 1e-4 for k, v in fsdp.items() if "lora_B" in k)
    assert max_rel_diff(fsdp, one) < 1e-5
    rows, ref = _metrics(base / "fsdp"), _metrics(base / "one")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [round(r["loss"], 4) for r in rows] == [round(r["loss"], 4) for r in ref]
    assert [round(r["grad_norm"], 4) for r in rows] == [round(r["grad_norm"], 4) for r in ref]
    resolved = (base / "fsdp" / "recipe.resolved.yaml").read_text()
    assert "strategy: fsdp" in resolved and "load_in_4bit: true" in resolved


@pytest.mark.integration
@pytest.mark.slow
def test_control_with_another_seed_differs(runs):
    base, _ = runs
    assert max_rel_diff(adapter(base / "control"), adapter(base / "fsdp")) > 1e-2


_UNITS = {"KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def _storage_line(log: str) -> tuple[int, float, float, list[float]]:
    """(weights, NF4 bytes, 16-bit bytes before, bytes stored per rank) from the worker's `4-bit:` line."""
    size = r"([\d.]+) (KiB|MiB|GiB)"
    m = re.search(rf"4-bit: (\d+) NF4 weights, {size} \(from {size}\); stored per rank: (.+)", log)
    assert m, log[-3000:]
    ranks = [float(v) * _UNITS[u] for v, u in re.findall(size, m.group(6))]
    return int(m.group(1)), float(m.group(2)) * _UNITS[m.group(3)], float(m.group(4)) * _UNITS[m.group(5)], ranks


@pytest.mark.integration
@pytest.mark.slow
def test_each_rank_stores_half_of_the_4bit_weights(runs):
    _, logs = runs
    count, full, before, ranks = _storage_line(logs["fsdp"])
    assert count == 14  # every frozen linear of both decoder layers
    assert before == pytest.approx(4 * TINY_LINEAR_PARAMS, rel=1e-3)  # fp32 on CPU
    assert full == pytest.approx(TINY_LINEAR_PARAMS * NF4_BYTES_PER_PARAM, rel=0.03)  # ~4.1 bits per weight
    assert len(ranks) == 2
    for stored in ranks:
        assert stored == pytest.approx(full / 2, rel=0.01)  # measured on each rank's local NF4 shards
    # one worker keeps the whole 4-bit model
    _, full_one, _, (stored_one,) = _storage_line(logs["one"])
    assert stored_one == pytest.approx(full_one, rel=1e-3) and full_one == pytest.approx(full, rel=1e-3)


@pytest.mark.integration
@pytest.mark.slow
def test_4bit_checkpoint_resumes_on_one_worker(runs):
    base, logs = runs
    ckpt = base / "fsdp" / "checkpoints" / "step-2"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["strategy"] == "fsdp" and state["world_size"] == 2
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    assert tensors and all("lora_" in k for k in tensors)  # adapters only: the 4-bit base comes from the model
    assert "resuming" in logs["resumed"]
    assert [r["step"] for r in _metrics(base / "resumed")] == [1, 2, 3, 4]
    assert max_rel_diff(adapter(base / "resumed"), adapter(base / "one")) < 1e-5


# -- recipe rules ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
def test_4bit_with_fsdp_is_allowed(device):
    proc = run_mgpu(
        "validate",
        str(QUICKSTART),
        "distributed.strategy=fsdp",
        "model.load_in_4bit=true",
        f"distributed.device={device}",
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("strategy", ["ddp", "auto"])
def test_4bit_on_cpu_without_fsdp_is_refused(strategy):
    proc = run_mgpu(
        "validate",
        str(QUICKSTART),
        f"distributed.strategy={strategy}",
        "model.load_in_4bit=true",
        "distributed.device=cpu",
        timeout=60,
    )
    assert_user_error(proc, "model.load_in_4bit", "needs CUDA", "distributed.strategy: fsdp")


def test_4bit_on_a_host_without_gpus_is_refused_before_launch(tmp_path):
    # device auto: the recipe is valid; the run finds no GPU and refuses before anything starts
    proc = run_mgpu(
        "train",
        str(QUICKSTART),
        "model.load_in_4bit=true",
        "distributed.device=auto",
        f"output.dir={tmp_path / 'out'}",
        timeout=120,
        CUDA_VISIBLE_DEVICES="",
    )
    assert_user_error(proc, "model.load_in_4bit", "no GPU is visible", "distributed.strategy: fsdp")
    assert not (tmp_path / "out").exists()


def test_4bit_full_finetuning_is_still_refused_under_fsdp():
    proc = run_mgpu(
        "validate", str(QUICKSTART), "distributed.strategy=fsdp", "model.load_in_4bit=true", "lora=null", timeout=60
    )
    assert_user_error(proc, "model.load_in_4bit", "cannot be fully fine-tuned")


# -- the forecast and the generator ----------------------------------------------------------------------


def test_sharded_4bit_forecast():
    arch = resolve_architecture("70B")
    gpu = 48 * GiB
    rep = estimate(arch, TrainingSetup(method="qlora", num_gpus=2, gpu_memory_bytes=gpu))
    sh = estimate(arch, TrainingSetup(method="qlora", num_gpus=2, gpu_memory_bytes=gpu, sharded=True))
    lora = estimate(arch, TrainingSetup(method="lora", num_gpus=2, gpu_memory_bytes=gpu, sharded=True))
    assert sh.weights == pytest.approx(rep.weights / 2, rel=1e-6)
    # gathered: root (16-bit) + two 4-bit layers + one dequantised weight: less than two 16-bit layers
    assert 0 < sh.gathered < lora.gathered
    assert sh.peak < rep.peak


def test_generator_shards_qlora_when_no_replica_fits():
    big = resolve_architecture("70B")
    p = plan(big, gpu_memory_bytes=48 * GiB, num_gpus=2, method="qlora", strategy="auto")
    assert p.fits and (p.method, p.strategy) == ("qlora", "fsdp")
    assert not plan(big, gpu_memory_bytes=48 * GiB, num_gpus=2, method="qlora", strategy="ddp").fits
    # method free: nothing replicated fits and 16-bit LoRA does not fit sharded either: sharded QLoRA
    free = plan(big, gpu_memory_bytes=48 * GiB, num_gpus=2, strategy="auto")
    assert (free.method, free.strategy) == ("qlora", "fsdp")
    # a replica that fits stays replicated
    assert plan(big, gpu_memory_bytes=141 * GiB, num_gpus=2, method="qlora", strategy="auto").strategy == "ddp"


def test_resolve_auto_shards_a_4bit_recipe(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "r.yaml").write_text(
        "model:\n  name: meta-llama/Llama-3.1-70B\n  max_seq_length: 2048\n  load_in_4bit: true\n"
        "dataset:\n  path: d.jsonl\n  format: alpaca\n"
        "training:\n  micro_batch_size: auto\n  gradient_accumulation_steps: auto\n"
        "distributed:\n  strategy: auto\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml").recipe
    r, notes = resolve_auto(recipe, 2, 48 * GiB)
    assert r.distributed.strategy == "fsdp", notes
    r, notes = resolve_auto(recipe, 2, 141 * GiB)
    assert r.distributed.strategy == "ddp", notes
