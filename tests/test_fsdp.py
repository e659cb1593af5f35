"""The sharded mode (`distributed.strategy: fsdp`, PyTorch FSDP2) against the replicated one (`ddp`).

Integration: real `mgpu train` on CPU (gloo, real Unsloth, tiny Llama): 2 sharded workers end with the adapter
of 2 replicated workers; a checkpoint written by 2 sharded workers resumes on 1. Unit: recipe rules and the
generator's choice of strategy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, adapter, assert_user_error, max_rel_diff, run_mgpu
from safetensors.torch import load_file

from unsloth_mgpu_cli.configgen import plan, resolve_auto
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.memory import GiB, TrainingSetup, estimate, resolve_architecture
from unsloth_mgpu_cli.recipe import load_recipe

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BASE = [
    "training.max_steps=4",
    "training.warmup_steps=1",
    "training.learning_rate=5e-3",
    "distributed.aggregation=weighted",
    "distributed.num_gpus=2",
    "training.micro_batch_size=2",
    "logging.progress=false",
]


def train(out: Path, *overrides: str, expect: int = 0):
    proc = run_mgpu("train", str(QUICKSTART), *BASE, f"output.dir={out}", *overrides, timeout=400)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("fsdp")
    train(base / "ddp", "output.save_steps=0")
    train(base / "fsdp", "distributed.strategy=fsdp", "output.save_steps=2")
    # one sharded worker (a world of one is not a special case; and one process is quicker on two cores)
    train(
        base / "control",
        "distributed.strategy=fsdp",
        "output.save_steps=0",
        "training.seed=7",
        "distributed.num_gpus=1",
        "training.micro_batch_size=4",
    )
    # The step-2 checkpoint of 2 sharded workers, resumed by 1 sharded worker on the same global batch (4).
    shutil.copytree(base / "fsdp", base / "resumed", ignore=shutil.ignore_patterns("adapter", "step-4"))
    proc = run_mgpu(
        "train",
        str(QUICKSTART),
        *BASE,
        f"output.dir={base / 'resumed'}",
        "distributed.strategy=fsdp",
        "output.save_steps=2",
        "distributed.num_gpus=1",
        "training.micro_batch_size=4",
        "--resume",
        "auto",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return base


@pytest.mark.integration
def test_sharded_equals_replicated(runs):
    ddp, fsdp = adapter(runs / "ddp"), adapter(runs / "fsdp")
    assert all(float(v.abs().max()) > 1e-4 for k, v in ddp.items() if "lora_B" in k)  # B moved off zero
    assert max_rel_diff(fsdp, ddp) < 1e-5
    # the same global loss at every step
    rows = [json.loads(x) for x in (runs / "fsdp" / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (runs / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [round(r["loss"], 4) for r in rows] == [round(r["loss"], 4) for r in ref]
    # the pre-clipping norm catches a wrong reduction (FSDP2's default AVG halves it: checked by mutation), which
    # AdamW's scale invariance could hide in the weights
    assert [round(r["grad_norm"], 4) for r in rows] == [round(r["grad_norm"], 4) for r in ref]
    assert (runs / "fsdp" / "adapter" / "adapter_config.json").exists()
    assert "strategy: fsdp" in (runs / "fsdp" / "recipe.resolved.yaml").read_text()


@pytest.mark.integration
def test_control_with_another_seed_differs(runs):
    assert max_rel_diff(adapter(runs / "control"), adapter(runs / "fsdp")) > 1e-2


@pytest.mark.integration
def test_sharded_checkpoint_is_full_and_resumes_on_another_worker_count(runs):
    ckpt = runs / "fsdp" / "checkpoints" / "step-2"
    state = json.loads((ckpt / "state.json").read_text())
    assert state["strategy"] == "fsdp" and state["world_size"] == 2
    # gathered: full shapes (LoRA A of q_proj is r x hidden = 16 x 256 on the tiny model), not half shards
    tensors = load_file(str(ckpt / "trainable.safetensors"))
    q_a = next(v for k, v in tensors.items() if "q_proj.lora_A" in k)
    full = next(v for k, v in adapter(runs / "ddp").items() if "q_proj.lora_A" in k)
    assert q_a.shape == full.shape
    assert max_rel_diff(adapter(runs / "resumed"), adapter(runs / "ddp")) < 1e-5


def test_median_with_fsdp_is_refused(tmp_path):
    proc = run_mgpu(
        "validate", str(QUICKSTART), "distributed.strategy=fsdp", "distributed.aggregation=median", timeout=60
    )
    assert_user_error(proc, "distributed.aggregation", "median", "fsdp")


# -- the forecast and the generator ----------------------------------------------------------------------

H200 = 141 * GiB


def test_sharding_divides_the_static_memory():
    arch = resolve_architecture("70B")
    rep = estimate(arch, TrainingSetup(method="lora", num_gpus=2, gpu_memory_bytes=H200))
    sh = estimate(arch, TrainingSetup(method="lora", num_gpus=2, gpu_memory_bytes=H200, sharded=True))
    assert sh.weights == pytest.approx(rep.weights / 2, rel=1e-6)
    assert sh.optimizer_states == pytest.approx(rep.optimizer_states / 2, rel=1e-6)
    assert 0 < sh.gathered < rep.weights / 10  # the root and two layers, not the model
    assert rep.gathered == 0
    four = estimate(arch, TrainingSetup(method="lora", num_gpus=4, gpu_memory_bytes=H200, sharded=True))
    assert four.peak < sh.peak < rep.peak


def test_generator_chooses_fsdp_only_when_a_replica_does_not_fit():
    big, small = resolve_architecture("70B"), resolve_architecture("8B")
    p = plan(big, gpu_memory_bytes=H200, num_gpus=2, method="lora", strategy="auto")
    assert p.fits and p.strategy == "fsdp" and p.to_dict()["strategy"] == "fsdp"
    assert not plan(big, gpu_memory_bytes=H200, num_gpus=2, method="lora", strategy="ddp").fits
    assert p.predicted_peak_gb <= 0.9 * 141
    q = plan(small, gpu_memory_bytes=H200, num_gpus=2, method="lora", strategy="auto")
    assert q.fits and q.strategy == "ddp"
    # one GPU: nothing to shard over
    assert plan(big, gpu_memory_bytes=H200, num_gpus=1, method="lora", strategy="auto").strategy == "ddp"
    # method free: 16-bit LoRA sharded is not preferred over replicated QLoRA (sharding only when no replica fits)
    free = plan(big, gpu_memory_bytes=H200, num_gpus=2, strategy="auto")
    assert (free.method, free.strategy) == ("qlora", "ddp")


def _recipe(tmp_path: Path, name: str, **distributed: str):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n')
    dist = "".join(f"  {k}: {v}\n" for k, v in distributed.items())
    (tmp_path / "r.yaml").write_text(
        f"model:\n  name: {name}\n  max_seq_length: 2048\n"
        f"dataset:\n  path: d.jsonl\n  format: alpaca\n"
        f"training:\n  micro_batch_size: auto\n  gradient_accumulation_steps: auto\n"
        f"distributed:\n  strategy: auto\n{dist}"
    )
    return load_recipe(tmp_path / "r.yaml").recipe


def test_resolve_auto_picks_the_strategy(tmp_path):
    big = _recipe(tmp_path, "meta-llama/Llama-3.1-70B")
    r, notes = resolve_auto(big, 2, H200)
    assert r.distributed.strategy == "fsdp", notes
    assert any("strategy fsdp" in n for n in notes)
    r, _ = resolve_auto(_recipe(tmp_path, "meta-llama/Llama-3.1-8B"), 2, H200)
    assert r.distributed.strategy == "ddp"
    r, _ = resolve_auto(_recipe(tmp_path, "meta-llama/Llama-3.1-70B", aggregation="median"), 2, H200)
    assert r.distributed.strategy == "ddp"  # median cannot be sharded
    r, _ = resolve_auto(big, 2, None)  # CPU
    assert r.distributed.strategy == "ddp"


@pytest.mark.parametrize(
    ("strategy", "fraction", "refused"),
    [("ddp", 0.35, True), ("fsdp", 0.35, False), ("auto", 0.35, False), ("ddp", 0.9, False)],
    ids=["ddp-over-cap", "fsdp-over-cap", "auto-over-cap", "ddp-control-fits"],
)
def test_an_explicit_ddp_that_cannot_fit_is_refused_with_the_fsdp_forecast(tmp_path, strategy, fraction, refused):
    """#13: an 8B full fine-tune at micro-batch 4 under a cap of 0.35 x 141 GB: a replica does not fit, two shards
    do. `strategy: ddp` is refused before launching, naming the key and what fits; fsdp and auto are not; with
    the cap raised (control) ddp fits and is kept."""
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    (tmp_path / "r.yaml").write_text(
        "model:\n  name: meta-llama/Llama-3.1-8B\n  max_seq_length: 512\n  load_in_4bit: false\nlora: null\n"
        "dataset:\n  path: d.jsonl\n  format: alpaca\n"
        "training:\n  micro_batch_size: 4\n  gradient_accumulation_steps: 4\n  optimizer: adamw\n"
        f"memory:\n  gradient_checkpointing: true\n  max_memory_fraction: {fraction}\n"
        f"distributed:\n  strategy: {strategy}\n"
    )
    recipe = load_recipe(tmp_path / "r.yaml").recipe
    if not refused:
        r, _ = resolve_auto(recipe, 2, H200)
        assert r.distributed.strategy == ("ddp" if strategy == "ddp" else "fsdp")
        return
    with pytest.raises(UserError) as err:
        resolve_auto(recipe, 2, H200)
    (problem,) = err.value.problems
    assert problem.where == "distributed.strategy"
    assert "49.3 GB" in problem.message and "micro-batch 4" in problem.message, problem.message
    assert "distributed.strategy: fsdp" in problem.hint and "GB per GPU" in problem.hint, problem.hint
    # one GPU: nothing to shard over, so no refusal in favour of fsdp (resolve_auto warns instead)
    r, notes = resolve_auto(recipe, 1, H200)
    assert r.distributed.strategy == "ddp"


def test_suggest_json_names_the_strategy():
    proc = run_mgpu("suggest", "--model", "70B", "--gpus", "2", "--gpu-memory", "141GB", "--method", "lora", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["fits"] and doc["strategy"] == "fsdp"
    proc = run_mgpu("suggest", "--model", "70B", "--gpus", "2", "--gpu-memory", "141GB", "--method", "lora")
    assert "strategy" in proc.stdout and "fsdp" in proc.stdout


def test_fp32_norms_in_a_bf16_model_shard_as_their_own_groups():
    """Regression (8B bf16 full fine-tune on 2 x H200): Unsloth keeps the norms in fp32, and FSDP2 refused the
    layers ("FSDP expects uniform original parameter dtype"). The norms now form their own group per unit, and
    one sharded step equals one unsharded step on the whole batch; the control (another batch) must differ."""
    from dist_workers import sharded_mixed_dtypes

    from unsloth_mgpu_cli import distributed as D

    results = D.launch(sharded_mixed_dtypes, (), D.LaunchSpec(nproc_per_node=2, device_type="cpu"))
    for res in results.values():
        # FSDP modules: per layer the layer and its 2 norms (one group), then the root and model.norm
        assert res["groups"] == res["units"] == 2 * 3 + 2
        # measured on CPU: same batch bf16 2.1e-3 (bf16 rounding), fp32 0; other batch bf16 0.57, fp32 2.9e-3
        same, other = res["diffs"]["same-batch"], res["diffs"]["other-batch"]
        assert same["torch.bfloat16"] < 1e-2 and same["torch.float32"] < 1e-4, same
        assert other["torch.bfloat16"] > 0.1 and other["torch.float32"] > 1e-3, other


def test_dtype_groups_name_what_cannot_be_sharded():
    import torch

    from unsloth_mgpu_cli.distributed import _minority_dtype_modules

    layer = torch.nn.Sequential(torch.nn.Linear(4, 4).to(torch.bfloat16), torch.nn.LayerNorm(4))
    assert _minority_dtype_modules(layer) == [layer[1]]  # the fp32 norm: its own group
    assert _minority_dtype_modules(torch.nn.Linear(4, 4)) == []  # one dtype: nothing to split
    layer[1].bias.data = layer[1].bias.data.to(torch.bfloat16)  # one module mixing dtypes: refused, named
    with pytest.raises(RuntimeError, match="LayerNorm holds trainable parameters of several dtypes"):
        _minority_dtype_modules(layer)
