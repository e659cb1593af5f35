"""`mgpu suggest`, the memory forecast and the optimal-config generator (CPU only, no torch needed)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import LLAMA_CONFIG, ROOT, assert_user_error, mgpu_env, run_mgpu
from fake_nvml import FakeNVML, h200

from unsloth_mgpu_cli.configgen import ConfigManager, detect_gpu_memory, plan, resolve_auto
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.memory import (
    NF4_BYTES_PER_PARAM,
    SIZE_TABLE,
    Architecture,
    GiB,
    TrainingSetup,
    estimate,
    parse_memory,
    resolve_architecture,
)
from unsloth_mgpu_cli.recipe import Recipe

# Llama-shaped 852M (hidden 2048, 16 layers, MLP 5632, 32/8 heads, 32k vocab): docs/suggest.md, 2 x H200.
ARCH_852M = Architecture(2048, 16, 32, 8, 5632, 32000, False, name="852M")
ARCH_8B_32K = Architecture(4096, 32, 32, 8, 14336, 32000, False, name="8B-32k")
H200 = 139 * GiB


# --- the forecast ----------------------------------------------------------------------------------------


def test_parameter_counts_match_the_real_models():
    assert SIZE_TABLE["8B"].num_parameters() == pytest.approx(8.03e9, rel=0.01)
    assert SIZE_TABLE["70B"].num_parameters() == pytest.approx(70.55e9, rel=0.01)
    assert SIZE_TABLE["1B"].num_parameters() == pytest.approx(1.236e9, rel=0.01)
    # Qwen2.5's published counts (its q/k/v biases are left out: 0.1% at most)
    assert SIZE_TABLE["0.5B"].num_parameters() == pytest.approx(0.49e9, rel=0.01)
    assert SIZE_TABLE["1.5B"].num_parameters() == pytest.approx(1.54e9, rel=0.01)
    assert SIZE_TABLE["14B"].num_parameters() == pytest.approx(14.7e9, rel=0.01)
    assert SIZE_TABLE["32B"].num_parameters() == pytest.approx(32.5e9, rel=0.01)
    assert ARCH_852M.num_parameters() == pytest.approx(852e6, rel=0.01)
    assert ARCH_8B_32K.num_parameters() == pytest.approx(7.24e9, rel=0.01)


@pytest.mark.parametrize(
    ("ckpt", "measured_gb"),
    [("unsloth", 2.6), (True, 3.3), (False, 14.7)],
)
def test_calibration_852m_matches_findings(ckpt, measured_gb):
    """docs/suggest.md: 852M, 4-bit, seq 2048, micro-batch 8, r=16 on all seven projections, 2 GPUs."""
    b = estimate(
        ARCH_852M,
        TrainingSetup(
            method="qlora",
            seq_len=2048,
            micro_batch_size=8,
            gradient_checkpointing=ckpt,
            optimizer="adamw",
            num_gpus=2,
            gpu_memory_bytes=H200,
        ),
    )
    assert b.allocated / GiB == pytest.approx(measured_gb, rel=0.15)


def test_calibration_8b_padding_free_matches_findings():
    """docs/suggest.md: Llama-3.1-8B dims with 32k vocab, 4-bit, mb 8 of ~155 tokens, adamw_8bit: 4.8 GB."""
    b = estimate(
        ARCH_8B_32K,
        TrainingSetup(
            method="qlora",
            seq_len=2048,
            micro_batch_size=8,
            tokens_per_sample=155,
            gradient_checkpointing="unsloth",
            optimizer="adamw_8bit",
            num_gpus=2,
            gpu_memory_bytes=H200,
        ),
    )
    assert b.allocated / GiB == pytest.approx(4.8, rel=0.15)


ARCH_1B_32K = Architecture(2048, 16, 32, 8, 8192, 32000, False, name="1B-32k")


@pytest.mark.parametrize(("dora", "measured_gb"), [(False, 16.55), (True, 73.38)])
def test_calibration_dora_matches_the_h200_measurement(dora, measured_gb):
    """gpu_plan.sh s21 (1 x H200): the 1B QLoRA on GSM8K, micro-batch 64 of 16,488 tokens at the peak step, no
    checkpointing, adamw_8bit: max_memory_allocated 16.55 GiB with LoRA, 73.38 GiB with DoRA."""
    setup = TrainingSetup(
        method="qlora",
        seq_len=512,
        micro_batch_size=64,
        tokens_per_sample=16488 / 64,
        gradient_checkpointing=False,
        optimizer="adamw_8bit",
        gpu_memory_bytes=H200,
        dora=dora,
    )
    assert estimate(ARCH_1B_32K, setup).allocated / GiB == pytest.approx(measured_gb, rel=0.05)


def test_a_dora_recipe_gets_a_micro_batch_that_fits_dora():
    """The planner sized lora.use_dora runs as LoRA ones: on the H200 a DoRA step takes 4.4 x LoRA's memory."""
    lora, dora = _auto_recipe(load_in_4bit=True), _auto_recipe(load_in_4bit=True)
    dora.lora.use_dora = True
    (with_lora, _), (with_dora, notes) = (resolve_auto(r, num_gpus=1, gpu_memory_bytes=24 * GiB) for r in (lora, dora))
    # the 8B at 2,048 tokens per sample on 24 GB: LoRA fits one sample without checkpointing, DoRA does not
    assert (with_lora.training.micro_batch_size, with_lora.memory.gradient_checkpointing) == (1, False)
    assert with_dora.memory.gradient_checkpointing == "unsloth"
    assert "no checkpointing does not fit even at micro-batch 1" in notes


def test_components_order_checkpointing_and_methods():
    kw = dict(seq_len=2048, micro_batch_size=4, gpu_memory_bytes=80 * GiB)
    off, on, offl = (
        estimate(SIZE_TABLE["8B"], TrainingSetup(gradient_checkpointing=c, **kw)) for c in (False, True, "unsloth")
    )
    assert off.activations_kept > on.activations_kept > offl.activations_kept
    assert offl.host_offload > 0 and on.host_offload == 0
    q, lo, full = (estimate(SIZE_TABLE["8B"], TrainingSetup(method=m, **kw)) for m in ("qlora", "lora", "full"))
    a = SIZE_TABLE["8B"]
    # 4-bit linears with their constants; embeddings, lm_head and norms stay 16-bit.
    assert q.weights == int(a.linear_params() * NF4_BYTES_PER_PARAM) + 2 * (a.embedding_params() + a.norm_params())
    assert lo.weights == 2 * a.num_parameters() and 0.51 < NF4_BYTES_PER_PARAM < 0.52
    assert full.optimizer_states > 10 * lo.optimizer_states and full.num_trainable == full.num_params
    assert sum(nbytes for _, nbytes, _ in q.rows()) >= q.peak  # the table shows every component
    one, two = (estimate(SIZE_TABLE["8B"], TrainingSetup(num_gpus=n, **kw)) for n in (1, 2))
    assert one.allreduce_buffer == two.allreduce_buffer == 0  # LoRA gradients are views into the buckets
    full1, full2 = (estimate(SIZE_TABLE["8B"], TrainingSetup(method="full", num_gpus=n, **kw)) for n in (1, 2))
    assert full1.allreduce_buffer == 0 < full2.allreduce_buffer  # 16-bit gradients go through fp32 buckets
    a8, a, s = (estimate(SIZE_TABLE["8B"], TrainingSetup(optimizer=o, **kw)) for o in ("adamw_8bit", "adamw", "sgd"))
    assert s.optimizer_states == 0 < a8.optimizer_states < a.optimizer_states


def test_loss_is_chunked_not_full_fp32_logits():
    setup = TrainingSetup(seq_len=4096, micro_batch_size=16, gradient_checkpointing="unsloth", gpu_memory_bytes=H200)
    b = estimate(SIZE_TABLE["8B"], setup)
    full_fp32_logits = setup.tokens * SIZE_TABLE["8B"].vocab_size * 4
    assert b.loss_chunks > 1 and b.loss_chunk < full_fp32_logits / 4


# --- architecture from config.json -------------------------------------------------------------------------


def _write_config(folder, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {**LLAMA_CONFIG, **extra}
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def test_architecture_from_local_config_tied_and_untied(tmp_path):
    tied = resolve_architecture(str(_write_config(tmp_path / "tied", tie_word_embeddings=True)))
    untied = resolve_architecture(str(_write_config(tmp_path / "untied", tie_word_embeddings=False)))
    assert (tied.hidden_size, tied.num_layers, tied.num_kv_heads, tied.vocab_size) == (1024, 8, 4, 50000)
    assert tied.tie_word_embeddings and not untied.tie_word_embeddings
    assert untied.num_parameters() - tied.num_parameters() == 50000 * 1024


def test_architecture_moe_counts_experts(tmp_path):
    dense = resolve_architecture(str(_write_config(tmp_path / "dense")))
    moe = resolve_architecture(str(_write_config(tmp_path / "moe", num_local_experts=8, num_experts_per_tok=2)))
    assert moe.num_experts == 8 and moe.experts_per_token == 2
    mlp = 3 * 1024 * 4096 * 8
    assert moe.linear_params() - dense.linear_params() == mlp * 7 + 1024 * 8 * 8  # 7 more experts + routers
    kw = dict(seq_len=512, micro_batch_size=2, gradient_checkpointing=False)
    assert estimate(moe, TrainingSetup(**kw)).activations_kept > estimate(dense, TrainingSetup(**kw)).activations_kept


def test_architecture_from_hf_cache(tmp_path, monkeypatch):
    snap = tmp_path / "hub" / "models--acme--tiny" / "snapshots" / "abc123"
    _write_config(snap, hidden_size=512)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_architecture("acme/tiny").hidden_size == 512
    # Not cached, but the size is in the name: the typical architecture of that size.
    assert resolve_architecture("acme/Something-8B-Instruct").hidden_size == 4096


# --- the generator -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ckpt", [False, True, "unsloth"])
@pytest.mark.parametrize("size", ["1B", "8B"])
def test_more_memory_never_a_smaller_micro_batch(size, ckpt):
    last = 0
    for gb in (12, 16, 24, 32, 40, 48, 64, 80, 96, 141):
        p = plan(SIZE_TABLE[size], gpu_memory_bytes=gb * GiB, method="qlora", gradient_checkpointing=ckpt)
        mb = p.micro_batch_size if p.fits else 0
        assert mb >= last, f"{size} {ckpt}: {gb} GB gave micro-batch {mb} < {last}"
        last = mb
    assert last > 1  # the sweep must actually exercise growth


@pytest.mark.parametrize("ckpt", [False, "unsloth"])
def test_longer_sequences_never_a_larger_micro_batch(ckpt):
    last = 10**9
    for seq in (256, 512, 1024, 2048, 4096, 8192, 16384):
        p = plan(
            SIZE_TABLE["8B"],
            gpu_memory_bytes=80 * GiB,
            method="qlora",
            seq_len=seq,
            gradient_checkpointing=ckpt,
            global_batch=256,
        )
        mb = p.micro_batch_size if p.fits else 0
        assert mb <= last, f"seq {seq} gave micro-batch {mb} > {last}"
        last = mb
    assert last < 64


def test_checkpointing_only_turns_off_as_memory_grows():
    seen_off = False
    for gb in (16, 24, 32, 48, 80, 141):
        p = plan(SIZE_TABLE["8B"], gpu_memory_bytes=gb * GiB, method="qlora")
        assert p.fits
        if seen_off:
            assert p.gradient_checkpointing is False
        seen_off |= p.gradient_checkpointing is False
    assert seen_off


def test_1b_on_80gb_fits_without_checkpointing():
    p = plan(SIZE_TABLE["1B"], gpu_memory_bytes=80 * GiB)
    assert p.fits and p.method == "lora" and p.gradient_checkpointing is False and p.micro_batch_size >= 8
    assert p.breakdown.peak <= 0.9 * 80 * GiB
    assert p.micro_batch_size * p.gradient_accumulation_steps * p.num_gpus == 32


def test_8b_qlora_on_24gb_fits():
    p = plan(SIZE_TABLE["8B"], gpu_memory_bytes=24 * GiB, method="qlora")
    assert p.fits and p.load_in_4bit and p.predicted_peak_gb <= 0.9 * 24


def test_70b_lora_on_24gb_does_not_fit_and_says_what_would():
    p = plan(SIZE_TABLE["70B"], gpu_memory_bytes=24 * GiB, method="lora")
    assert not p.fits
    text = " ".join(p.suggestions)
    assert "qlora" in text and "4-bit" in text and "per GPU" in text and "full replica" in text


def test_70b_qlora_on_80gb_fits_and_on_16gb_does_not():
    assert plan(SIZE_TABLE["70B"], gpu_memory_bytes=80 * GiB, method="qlora").fits
    small = plan(SIZE_TABLE["70B"], gpu_memory_bytes=16 * GiB, method="qlora")
    assert not small.fits and small.suggestions


def test_default_method_falls_back_to_qlora():
    p = plan(SIZE_TABLE["70B"], gpu_memory_bytes=80 * GiB)
    assert p.fits and p.method == "qlora"
    assert any(r["method"] == "lora" for r in p.rejected)


def test_get_optimal_config_is_enable_multi_gpu_shaped():
    cfg = ConfigManager().get_optimal_config(model_size="7B", available_memory="32GB", num_gpus=2)
    assert cfg["num_gpus"] == 2 and cfg["gradient_aggregation"] == "weighted" and cfg["max_seq_length"] == 2048
    assert cfg["batch_size_per_gpu"] >= 1 and cfg["predicted_peak_gb"] <= 0.9 * 32
    assert cfg["batch_size_per_gpu"] * 2 * cfg["gradient_accumulation_steps"] == 32


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"memory_fraction": 2.0}, "memory_fraction"),
        ({"memory_fraction": 0}, "memory_fraction"),
        ({"available_memory": float("nan")}, "available_memory"),
        ({"available_memory": float("inf")}, "available_memory"),
        ({"available_memory": 2**20 + 1}, "available_memory"),  # bytes, below the 256MB floor
        ({"seq_len": 0}, "seq_len"),
        ({"method": "bogus"}, "method"),
        ({"optimizer": "bogus"}, "optimizer"),
        ({"num_gpus": "2"}, "num_gpus"),
        ({"num_gpus": 2.5}, "num_gpus"),
        ({"num_gpus": True}, "num_gpus"),
        ({"global_batch": 0}, "global_batch"),
    ],
)
def test_get_optimal_config_names_each_bad_argument(kwargs, key):
    args = {"model_size": "7B", "available_memory": "32GB", "num_gpus": 2} | kwargs
    with pytest.raises(UserError) as info:
        ConfigManager().get_optimal_config(**args)
    assert [p.where for p in info.value.problems] == [key]


def test_memory_given_as_a_number_of_bytes_is_read_as_bytes():
    assert parse_memory(24e9) == parse_memory(int(24e9)) == parse_memory("24000000000") == 24_000_000_000
    assert parse_memory(24) == parse_memory("24") == 24 * GiB
    gb = ConfigManager().get_optimal_config("7B", available_memory=32 * GiB, num_gpus=2)
    as_float = ConfigManager().get_optimal_config("7B", available_memory=float(32 * GiB), num_gpus=2)
    assert gb == as_float == ConfigManager().get_optimal_config("7B", available_memory="32GB", num_gpus=2)


def test_a_global_batch_that_cannot_be_kept_is_rounded_up_with_a_warning():
    """32 on 3 GPUs became 48 (8 x 2 x 3) with no word outside `last_plan.reasons`."""
    with pytest.warns(UserWarning, match=r"global batch 48 samples per step .*not global_batch=32"):
        cfg = ConfigManager().get_optimal_config("1B", "24GB", num_gpus=3, global_batch=32)
    assert cfg["batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 3 == 48
    import warnings

    with warnings.catch_warnings():  # the control: 32 on 2 GPUs is kept, silently
        warnings.simplefilter("error")
        cfg = ConfigManager().get_optimal_config("1B", "24GB", num_gpus=2, global_batch=32)
    assert cfg["batch_size_per_gpu"] * cfg["gradient_accumulation_steps"] * 2 == 32


def test_a_gpu_memory_no_gpu_has_is_refused_with_the_unit_it_probably_meant():
    """16000 meant as MB was planned as 16,000 GB per GPU: micro-batch 32, out of memory at once."""
    with pytest.raises(UserError, match=r"at most 4,096 GB\), found 16000 = 16,000 GB") as info:
        ConfigManager().get_optimal_config("7B", available_memory=16000)
    assert "for megabytes write 16000MB" in str(info.value)
    with pytest.raises(UserError, match="give one GPU's memory"):
        parse_memory("5TB")
    assert parse_memory("16000MB") == 16000 * 2**20 and parse_memory("4TB") == 4096 * GiB  # the controls


def test_the_builtin_model_is_planned_like_any_other():
    """What a recipe accepts as model.name, the Python API and `mgpu suggest` accept too."""
    cfg = ConfigManager().get_optimal_config("builtin:tiny-llama", available_memory="24GB", num_gpus=2)
    assert cfg["num_gpus"] == 2 and cfg["predicted_peak_gb"] < 24
    assert resolve_architecture("builtin:tiny-llama").name == "builtin:tiny-llama"
    proc = run_mgpu("suggest", "--model", "builtin:tiny-llama", "--gpu-memory", "24GB", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["fits"], proc.stderr


def test_detected_gpus_are_the_visible_ones():
    nvml = FakeNVML([h200(i) for i in range(7)] + [h200(7, total_gib=24.0)])
    assert detect_gpu_memory(env={}, nvml=nvml) == (8, 24 * GiB)
    assert detect_gpu_memory(env={"CUDA_VISIBLE_DEVICES": "0,1"}, nvml=nvml) == (2, 140 * GiB)
    assert detect_gpu_memory(env={"CUDA_VISIBLE_DEVICES": ""}, nvml=nvml) == (0, None)


# --- resolve_auto ----------------------------------------------------------------------------------------


def _auto_recipe(**model):
    return Recipe.model_validate(
        {
            "model": {"name": "unsloth/Meta-Llama-3.1-8B", "max_seq_length": 2048, **model},
            "dataset": {"path": "yahma/alpaca-cleaned"},
            "training": {"micro_batch_size": "auto", "gradient_accumulation_steps": "auto"},
            "memory": {"gradient_checkpointing": "auto"},
        }
    )


def test_resolve_auto_fills_every_auto_on_gpu():
    recipe = _auto_recipe(load_in_4bit=True)
    resolved, notes = resolve_auto(recipe, num_gpus=2, gpu_memory_bytes=24 * GiB)
    t = resolved.training
    assert isinstance(t.micro_batch_size, int) and isinstance(t.gradient_accumulation_steps, int)
    assert resolved.memory.gradient_checkpointing in (False, True, "unsloth")
    assert resolved.distributed.num_gpus == "auto"  # the launcher's to fill
    assert recipe.training.micro_batch_size == "auto"  # the input is not modified
    assert notes and any("predicted peak" in n for n in notes)


def test_resolve_auto_on_cpu_is_conservative_and_says_so():
    resolved, notes = resolve_auto(_auto_recipe(), num_gpus=1, gpu_memory_bytes=None)
    assert (resolved.training.micro_batch_size, resolved.training.gradient_accumulation_steps) == (2, 1)
    assert resolved.memory.gradient_checkpointing is False
    assert any("no GPU" in n for n in notes)
    fixed = _auto_recipe()
    fixed.training.micro_batch_size = 4
    _, notes = resolve_auto(fixed, num_gpus=1, gpu_memory_bytes=None)
    (note,) = [n for n in notes if "no GPU" in n]
    assert "micro_batch_size" not in note and "gradient_accumulation_steps 1" in note  # only what was auto


def test_resolve_auto_keeps_fixed_values():
    recipe = _auto_recipe(load_in_4bit=True)
    recipe.training.micro_batch_size = 2
    resolved, _ = resolve_auto(recipe, num_gpus=1, gpu_memory_bytes=80 * GiB)
    assert resolved.training.micro_batch_size == 2 and resolved.training.gradient_accumulation_steps == 16


# --- the command line ------------------------------------------------------------------------------------


def test_suggest_json_has_contract_keys():
    proc = run_mgpu("suggest", "--model", "8B", "--gpus", "2", "--gpu-memory", "80GB", "--json", timeout=60)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    for key in (
        "fits",
        "method",
        "load_in_4bit",
        "micro_batch_size",
        "gradient_accumulation_steps",
        "gradient_checkpointing",
        "predicted_peak_gb",
        "breakdown",
        "reasons",
        "rejected",
    ):
        assert key in doc
    assert doc["fits"] is True and doc["num_gpus"] == 2 and doc["predicted_peak_gb"] <= 72


def test_suggest_table_and_not_fitting_exits_2(tmp_path):
    proc = run_mgpu("suggest", "--model", "70B", "--gpu-memory", "24GB", "--method", "lora", timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "does not fit" in proc.stdout and "qlora" in proc.stdout
    assert "no recipe was written" not in proc.stderr  # none was asked for
    out = tmp_path / "r.yaml"
    proc = run_mgpu("suggest", "--model", "70B", "--gpu-memory", "24GB", "--output", str(out), timeout=60)
    assert proc.returncode == 2 and f"nothing fits, so no recipe was written to {out}" in proc.stderr
    assert not out.exists()
    ok = run_mgpu("suggest", "--model", "1B", "--gpu-memory", "80GB", timeout=60)
    assert ok.returncode == 0 and "activations kept" in ok.stdout and "micro_batch_size" in ok.stdout


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--model", "8B", "--gpu-memory", "lots"], "--gpu-memory"),
        (["--model", "9Q", "--gpu-memory", "80GB"], "--model"),
        (["--model", "8B", "--gpu-memory", "80GB", "--gpus", "0"], "--gpus"),
        (["--model", "8B", "--gpu-memory", "80GB", "--method", "dora"], "--method"),
        (["--model", "8B", "--gpu-memory", "80GB", "--optimizer", "lion"], "--optimizer"),
        (["--model", "8B", "--gpu-memory", "80GB", "--seq-len", "0"], "--seq-len"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(args, flag):
    assert_user_error(run_mgpu("suggest", *args, timeout=60), flag)


def test_no_gpu_and_no_gpu_memory_exits_2():
    # This machine has no NVIDIA driver; NVML detection finds nothing.
    proc = run_mgpu("suggest", "--model", "8B", timeout=60)
    if proc.returncode == 0:
        pytest.skip("a GPU was detected")
    assert_user_error(proc, "--gpu-memory")


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_output_recipes_validate(tmp_path, method):
    out = tmp_path / f"8B_{method}.yaml"
    proc = run_mgpu(
        "suggest",
        "--model",
        "8B",
        "--gpu-memory",
        "141GB",
        "--gpus",
        "2",
        "--method",
        method,
        "--output",
        str(out),
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = out.read_text()
    assert text.startswith("# yaml-language-server: $schema=")
    check = run_mgpu("validate", str(out), timeout=120)
    assert check.returncode == 0, check.stdout + check.stderr


def test_suggest_dora_sizes_dora_and_writes_a_recipe_that_asks_for_it(tmp_path):
    args = ("suggest", "--model", "8B", "--gpu-memory", "24GB", "--gpus", "1", "--method", "qlora", "--json")
    lora, dora = (json.loads(run_mgpu(*args, *extra, timeout=60).stdout) for extra in ((), ("--dora",)))
    assert (lora["dora"], dora["dora"]) == (False, True)
    assert (lora["gradient_checkpointing"], dora["gradient_checkpointing"]) == (False, "unsloth")
    assert any(r.startswith("DoRA (lora.use_dora)") for r in dora["reasons"])
    out = tmp_path / "dora.yaml"
    assert run_mgpu(*args[:-1], "--dora", "--output", str(out), timeout=60).returncode == 0
    assert "  use_dora: true" in out.read_text()
    check = run_mgpu("validate", str(out), timeout=120)
    assert check.returncode == 0 and "use_dora: true" in check.stdout, check.stdout + check.stderr
    proc = run_mgpu("suggest", "--model", "1B", "--gpu-memory", "80GB", "--method", "full", "--dora", timeout=60)
    assert_user_error(proc, "argument --dora", "--method full")


def test_output_recipe_from_local_folder_validates(tmp_path):
    folder = _write_config(tmp_path / "mymodel")
    out = tmp_path / "r.yaml"
    proc = run_mgpu("suggest", "--model", str(folder), "--gpu-memory", "24GB", "--output", str(out), timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert str(folder) in out.read_text()
    assert run_mgpu("validate", str(out), timeout=120).returncode == 0


def test_suggest_does_not_import_torch_or_unsloth():
    code = (
        "import sys; from typer.testing import CliRunner; from unsloth_mgpu_cli.cli import app;"
        "r = CliRunner().invoke(app, ['suggest', '--model', '8B', '--gpu-memory', '80GB', '--json']);"
        "assert r.exit_code == 0, r.output;"
        "print(sorted(m for m in ('torch', 'unsloth', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=mgpu_env(), capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"
