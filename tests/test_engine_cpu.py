"""`mgpu train` end to end on CPU with real Unsloth and real gloo process groups.

The central claim: N workers with `weighted` aggregation equal one worker over the same global batch.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import EQUIVALENCE_RUN, ROOT, adapter, max_rel_diff, run_mgpu

from unsloth_mgpu_cli.trainer import SpeedBalance

pytestmark = pytest.mark.integration

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BASE = EQUIVALENCE_RUN


def train(out: Path, *overrides: str, expect: int = 0, **env: str):
    proc = run_mgpu("train", str(QUICKSTART), *BASE, f"output.dir={out}", *overrides, timeout=400, **env)
    assert proc.returncode == expect, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("engine")
    # the quick start's rows in a file of this module's own (the cache key hashes its path): the first run finds no
    # tokenised data, so a child tokenises it while the workers start (datagate.py); the others read that cache
    data = base / "data.jsonl"
    shutil.copy(ROOT / "recipes" / "data" / "quickstart.jsonl", data)
    copy = f"dataset.path={data}"
    (base / "tmp").mkdir()  # where the first run's gate folder goes (tempfile): nothing may be left there
    proc = train(base / "two", copy, "distributed.num_gpus=2", "training.micro_batch_size=2", TMPDIR=str(base / "tmp"))
    (base / "two.log").write_text(proc.stdout + proc.stderr)
    # one worker accumulates the same global batch over two micro-batches
    train(
        base / "one",
        copy,
        "distributed.num_gpus=1",
        "training.micro_batch_size=2",
        "training.gradient_accumulation_steps=2",
    )
    # the control is a near miss: the two workers' run with `mean` aggregation, which weights each rank's token
    # mean alike although their token counts differ (the bug `weighted` exists to avoid)
    train(
        base / "control",
        copy,
        "distributed.num_gpus=2",
        "training.micro_batch_size=2",
        "distributed.aggregation=mean",
    )
    # any worker count and batching: four CPU workers (the 4-GPU shape) x micro-batch 1, samples packed into rows
    # (the one-worker run pads them: the same samples per step, other batch shapes); only PyTorch's math attention
    train(
        base / "four",
        copy,
        "distributed.num_gpus=4",
        "training.micro_batch_size=1",
        "dataset.batching=packed",
        "model.attention=math",
    )
    # packed rows bounded by tokens: 2 workers x micro-batch 1 x 2 accumulation steps, but a row may hold
    # micro_batch_size x max_seq_length = 256 tokens, so a rank's two samples (about 95 tokens each, none cut at 128
    # or 256) share one forward
    train(
        base / "merged",
        copy,
        "distributed.num_gpus=2",
        "training.micro_batch_size=1",
        "training.gradient_accumulation_steps=2",
        "model.max_seq_length=256",
        "dataset.batching=packed",
        "model.attention=math",
    )
    return base


def test_two_workers_equal_one_worker_on_the_same_global_batch(runs):
    two, one = adapter(runs / "two"), adapter(runs / "one")
    # LoRA B starts at zero: a non-trivial comparison needs it to have moved
    assert all(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)
    assert max_rel_diff(two, one) < 1e-4


def test_four_workers_with_packed_rows_equal_one_worker_on_the_same_global_batch(runs):
    assert max_rel_diff(adapter(runs / "four"), adapter(runs / "one")) < 1e-4
    rows = [json.loads(line) for line in (runs / "four" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ones]  # the same samples in every step
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ones], rel=1e-5)
    assert "batching: packed" in (runs / "four" / "recipe.resolved.yaml").read_text()
    assert len(rows[-1]["peak_memory_gb"]) == 4
    # model.attention reached the workers: only the math kernel was on (the default leaves PyTorch's CPU choice)
    assert json.loads((runs / "four" / "summary.json").read_text())["attention_kernels"] == ["math"]
    assert "math" in json.loads((runs / "two" / "summary.json").read_text())["attention_kernels"]
    assert len(json.loads((runs / "two" / "summary.json").read_text())["attention_kernels"]) > 1


def test_packed_rows_that_merge_the_accumulation_steps_equal_one_worker(runs):
    rows = [json.loads(line) for line in (runs / "merged" / "metrics.jsonl").read_text().splitlines()]
    ones = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in ones]  # the same samples in every step
    assert any(r["micro_batches"] == 1 for r in rows), rows  # two samples in one forward: the case under test
    assert all(r["micro_batches"] in (1, 2) and max(r["longest_row"]) <= 256 for r in rows), rows
    assert [r["micro_batches"] for r in ones] == [2] * len(ones)  # padded: one forward per micro-batch
    assert max_rel_diff(adapter(runs / "merged"), adapter(runs / "one")) < 1e-4


def test_the_comparison_catches_mean_aggregation_in_place_of_weighted(runs):
    assert max_rel_diff(adapter(runs / "control"), adapter(runs / "one")) > 1e-3  # 10 x the tolerance above


def test_a_logged_run_holds_step_lines_not_library_noise(runs):
    """Output to a pipe (a log, CI): no bar frames, no warnings that ask nothing of the user."""
    log = (runs / "two.log").read_text()
    assert "launching 2 worker(s)" in log and "run summary" in log
    for noise in ("Loading weights", "\r", "kernels-community", "torch.utils._pytree", "Traceback", "Warning"):
        assert noise not in log, f"{noise!r} in the log:\n{log}"


def test_outputs_follow_the_contract(runs):
    out = runs / "two"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    for key in ("loss", "learning_rate", "grad_norm", "tokens", "tokens_per_second"):
        assert all(key in r for r in rows)
    assert all(r["tokens"] > 0 and r["tokens_per_second"] > 0 for r in rows)
    assert len(rows[0]["peak_memory_gb"]) == 2
    resolved = (out / "recipe.resolved.yaml").read_text()
    assert "auto" not in resolved.split("distributed:")[1].split("memory:")[0]  # num_gpus/device filled
    # dataset.batching auto: balanced on CPU (Unsloth attends a packed row one sample at a time there), and why
    assert "  batching: balanced\n" in resolved
    assert "auto: dataset.batching balanced: no variable-length attention kernel" in (runs / "two.log").read_text()
    assert (out / "adapter" / "adapter_config.json").exists()
    # where the time to the first step went: every phase measured, adding up to the total
    startup = json.loads((out / "summary.json").read_text())["startup_s"]
    # a cold data cache: tokenised by a child while the workers imported Unsloth (datagate.py); they waited data_wait
    # for it after the import, and it took data_beside (not a phase: it ran beside launch and import)
    phases = ("prepare", "launch", "import", "data_wait", "load", "setup", "first_step")
    assert set(startup) == {*phases, "total", "data_beside"} and all(startup[k] >= 0 for k in phases), startup
    assert sum(startup[k] for k in phases) == pytest.approx(startup["total"], abs=0.1)
    assert 0 < startup["data_beside"] < startup["launch"] + startup["import"] + startup["data_wait"] + 0.1, startup
    assert "data: 512 samples" in (runs / "two.log").read_text()  # the child printed the data line
    assert list((runs / "tmp").glob("mgpu-data-*")) == []  # the gate folder is gone
    one = json.loads((runs / "one" / "summary.json").read_text())["startup_s"]
    assert "data_wait" not in one and "data_beside" not in one, one  # the cache was there: read first
    assert startup["import"] > 1.0  # `import unsloth` in the worker takes seconds: the marks are real
    # where a step's time goes (rank 0's host clock): the 4 steps after the first, each phase measured
    summary = json.loads((out / "summary.json").read_text())
    assert summary["peak_reserved_gb"] is None and len(summary["peak_memory_gb"]) == 2  # no CUDA allocator on CPU
    # a peak (on CPU the worker's peak resident memory): it never falls, and the summary's is the run's largest
    for rank, peak in enumerate(summary["peak_memory_gb"]):
        logged = [r["peak_memory_gb"][rank] for r in rows]
        assert logged == sorted(logged) and peak >= max(logged) - 1e-3, (rank, logged, peak)
    steps = summary["step_phases_s"]
    assert steps["steps"] == 4 and steps["forward_backward"] > 0 and all(steps[k] >= 0 for k in steps), steps
    # the widest row of each rank, as the planner padded it (its compute tokens are at most rows x width)
    for r in rows:
        assert len(r["longest_row"]) == 2 and all(0 < w <= 128 for w in r["longest_row"])
        assert all(w % 8 == 0 for w in r["longest_row"])  # dataset.pad_to_multiple_of: 8 by default
        assert r["compute_tokens"] <= 2 * 2 * max(r["longest_row"])
    assert all(len(r["compiles"]) == 2 and min(r["compiles"]) >= 0 for r in rows)
    assert all(r["reserved_gb"] == [0.0, 0.0] for r in rows)  # the CUDA allocator's memory: none on CPU
    # each rank's time in its micro-batches: measured, and within the step's wall time
    for prev, r in zip(rows, rows[1:], strict=False):
        assert len(r["compute_s"]) == 2 and all(0 < c <= r["elapsed_s"] - prev["elapsed_s"] for c in r["compute_s"])
    # the two runs logged the same global loss at every step (same samples per step)
    one = [json.loads(line) for line in (runs / "one" / "metrics.jsonl").read_text().splitlines()]
    assert [round(r["loss"], 4) for r in rows] == [round(r["loss"], 4) for r in one]
    assert [r["tokens"] for r in rows] == [r["tokens"] for r in one]


def test_adapter_loads_with_peft_and_changes_the_model(runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = json.loads((runs / "one" / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(cfg["base_model_name_or_path"], dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 21]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        tuned = PeftModel.from_pretrained(base, str(runs / "one" / "adapter"))(ids).logits
    assert tuned.shape == before.shape
    assert float((tuned - before).abs().max()) > 1e-4


EIGHT = ("training.optimizer=adamw_8bit", "training.max_steps=8")


@pytest.fixture(scope="module")
def eight_bit(tmp_path_factory):
    """Two workers and one with adamw_8bit (bitsandbytes' CPU implementation)."""
    base = tmp_path_factory.mktemp("eight")
    train(base / "two", "distributed.num_gpus=2", "training.micro_batch_size=2", *EIGHT)
    train(base / "one", "distributed.num_gpus=1", "training.micro_batch_size=4", *EIGHT)
    return base


def test_two_workers_equal_one_worker_with_the_8bit_optimizer(eight_bit, runs):
    """adamw_8bit: weights and gradients as flat views, tensors of 4096 elements and up updated one kernel per flat
    run, the rest one by one. Session 6: 1e-4 apart on CPU float32."""
    two, one = adapter(eight_bit / "two"), adapter(eight_bit / "one")
    assert all(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)
    assert max_rel_diff(two, one) < 1e-3
    # a far smaller gap than the near miss's (`mean` aggregation, the adamw control above), and the flat path ran
    assert max_rel_diff(two, one) < max_rel_diff(adapter(runs / "control"), adapter(runs / "one")) / 10
    for run in ("two", "one"):
        flat = json.loads((eight_bit / run / "summary.json").read_text())["optimizer_flat"]
        assert 0 < flat["tensors"] < flat["of"] and flat["kernels"] >= 1, flat


def test_two_workers_equal_one_worker_with_loraplus_and_the_8bit_optimizer(tmp_path, eight_bit):
    """lora.loraplus_lr_ratio: two parameter groups (B matrices at 4 x the rate), each updated in flat runs."""
    train(tmp_path / "two", "distributed.num_gpus=2", "training.micro_batch_size=2", "lora.loraplus_lr_ratio=4", *EIGHT)
    train(tmp_path / "one", "distributed.num_gpus=1", "training.micro_batch_size=4", "lora.loraplus_lr_ratio=4", *EIGHT)
    two, one, plain = adapter(tmp_path / "two"), adapter(tmp_path / "one"), adapter(eight_bit / "one")
    assert max_rel_diff(two, one) < 1e-3
    # at the same base rate the B matrices moved further
    for name in (k for k in one if "lora_B" in k):
        assert float(one[name].norm()) > 2 * float(plain[name].norm()), name
    # the groups are runs of their own in the flat buckets: as many tensors per kernel as with one group
    flat = [json.loads((d / "one" / "summary.json").read_text())["optimizer_flat"] for d in (tmp_path, eight_bit)]
    assert flat[0] == flat[1] and flat[0]["tensors"] > flat[0]["kernels"], flat


def test_two_workers_equal_one_worker_with_dora_and_the_merged_export_loads(tmp_path, runs):
    """lora.use_dora: PEFT's magnitude vectors are trained parameters too, synchronised like LoRA's matrices."""
    dora = ("lora.use_dora=true", "training.micro_batch_size=2")
    train(tmp_path / "two", "distributed.num_gpus=2", *dora)
    train(tmp_path / "one", "distributed.num_gpus=1", "training.gradient_accumulation_steps=2", *dora)
    two, one = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    magnitudes = [k for k in one if k.endswith("lora_magnitude_vector")]
    assert len(magnitudes) == len([k for k in one if "lora_A" in k]) > 0
    assert max_rel_diff(two, one) < 1e-4
    # DoRA trains otherwise than LoRA on the same batches (the recipe key is not ignored)
    plain = adapter(runs / "one")
    lora = {k: v for k, v in one.items() if k in plain}
    assert lora.keys() == plain.keys() and max_rel_diff(lora, plain) > 1e-3
    proc = run_mgpu("export", str(tmp_path / "one"), "--merged", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "one" / "merged"))
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_two_workers_equal_one_worker_with_neftune_noise(tmp_path, runs):
    """training.neftune_noise_alpha: each sample's noise is seeded by the sample, not the rank or the batch, so two
    workers on packed rows equal one worker on padded ones; and the noise is there (the weights move otherwise)."""
    noisy = ("training.neftune_noise_alpha=15", "training.micro_batch_size=2")
    train(tmp_path / "two", "distributed.num_gpus=2", "dataset.batching=packed", "model.attention=math", *noisy)
    train(tmp_path / "one", "distributed.num_gpus=1", "training.gradient_accumulation_steps=2", *noisy)
    two, one = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert max_rel_diff(two, one) < 1e-4
    assert max_rel_diff(one, adapter(runs / "one")) > 1e-3  # the same run without noise


def test_a_second_stage_starts_from_the_first_stages_adapter(tmp_path, runs):
    """lora.init_from: at a learning rate too small to move anything, two workers end where the first run ended
    (a fresh start's B matrices are zero); an adapter of another shape is refused with exit 2."""
    frozen = ("training.learning_rate=1e-12", "training.warmup_steps=0", "training.max_steps=2")
    train(tmp_path / "stage2", "distributed.num_gpus=2", f"lora.init_from={runs / 'one'}", *frozen)
    first, second = adapter(runs / "one"), adapter(tmp_path / "stage2")
    assert max_rel_diff(second, first) < 1e-6
    assert all(float(v.abs().max()) > 1e-4 for k, v in second.items() if "lora_B" in k)
    resolved = (tmp_path / "stage2" / "recipe.resolved.yaml").read_text()
    assert f"init_from: {runs / 'one' / 'adapter'}" in resolved
    # an adapter whose tensors have other shapes (another model) with the same lora settings
    from safetensors.torch import save_file

    other = tmp_path / "other"
    shutil.copytree(runs / "one" / "adapter", other)
    name = next(k for k in first if "lora_A" in k)
    save_file(
        {**first, name: torch.zeros(first[name].shape[0], first[name].shape[1] + 8)},
        other / "adapter_model.safetensors",
    )
    proc = train(tmp_path / "bad", "distributed.num_gpus=2", f"lora.init_from={other}", *frozen, expect=2)
    err = proc.stdout + proc.stderr
    assert "lora.init_from" in err and "does not fit this model" in err and "size mismatch" in err, err[-2000:]
    assert "Traceback" not in err


def test_loading_an_adapter_names_what_does_not_fit(tmp_path):
    """load_adapter_weights with PEFT on plain transformers: all tensors in; a tensor too many, one missing, or one
    of another shape is a UserError naming lora.init_from."""
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from unsloth_mgpu_cli.errors import UserError
    from unsloth_mgpu_cli.models import ensure_builtin_model
    from unsloth_mgpu_cli.trainer import load_adapter_weights

    def fresh():
        base = AutoModelForCausalLM.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")))
        return get_peft_model(base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))

    trained = fresh()
    for n, p in trained.named_parameters():
        if "lora_" in n:
            torch.nn.init.normal_(p.data)
    trained.save_pretrained(str(tmp_path / "good"))
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    model = fresh()
    load_adapter_weights(model, str(tmp_path / "good"))
    got = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert got and all(torch.equal(p, dict(trained.named_parameters())[n]) for n, p in got.items())
    name = next(iter(tensors))
    cases = {
        "extra": (
            {**tensors, name.replace("layers.0.", "layers.99."): tensors[name].clone()},
            "tensors the model lacks",
        ),
        "missing": ({k: v for k, v in tensors.items() if k != name}, "LoRA tensors it lacks"),
        "shape": ({**tensors, name: torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])}, "size mismatch"),
    }
    for case, (state, expected) in cases.items():
        folder = tmp_path / case
        folder.mkdir()
        save_file(state, str(folder / "adapter_model.safetensors"))
        with pytest.raises(UserError) as exc:
            load_adapter_weights(fresh(), str(folder))
        text = exc.value.render()
        assert "lora.init_from" in text and "does not fit this model" in text and expected in text, (case, text)


def test_speed_balance_follows_persistent_differences_only():
    sb = SpeedBalance(world=2, enabled=True)
    assert sb.speeds() is None  # nothing measured yet
    sb.observe([1000, 1000], [1.0, 1.5])
    assert sb.speeds() is None  # one step is not enough
    sb.observe([1000, 1000], [1.0, float("nan")])  # a step without device times is left out
    assert sb.speeds() is None
    sb.observe([1200, 800], [1.2, 1.2])  # rank 1: 1.5 ms per token, rank 0: 1 ms
    assert sb.speeds() == (1.2, 0.8)  # rank 0's speed 1 and rank 1's 1 / 1.5, over their mean
    far = SpeedBalance(world=2, enabled=True)
    for _ in range(2):
        far.observe([1000, 1000], [1.0, 3.0])  # relative speeds 1.5 and 0.5: clamped to the limits
    assert far.speeds() == (1.25, 0.8)
    even = SpeedBalance(world=2, enabled=True)
    for t in ([1.00, 1.04], [1.04, 1.00], [1.00, 1.03]):  # swings of a few percent: left alone
        even.observe([1000, 1000], t)
    assert even.speeds() is None
    off = SpeedBalance(world=2, enabled=False)
    for _ in range(3):
        off.observe([1000, 1000], [1.0, 2.0])
    assert off.speeds() is None and SpeedBalance(world=1, enabled=True).enabled is False


def test_a_slow_rank_gets_fewer_tokens_and_the_weights_stay_those_of_one_worker(tmp_path, runs):
    """distributed.balance_speed with rank 1 made slower (`slow` fault: a GPU held back by its power cap): the
    planner moves tokens to rank 0, and the update, under weighted aggregation, stays one worker's. With
    adamw_8bit and no replica checks the loop queues each step before settling the previous one (the GPU default),
    so the ranks' device times arrive a step late, with the next step's collective."""
    queued = ("training.optimizer=adamw_8bit", "distributed.verify_every=0", "training.max_steps=8")
    slow = "slow:rank=1:step=1:until=999:us=200"
    # 8 samples per rank: a one-sample move fits the memory bound (a faster rank's micro-batch grows 1.25x at most)
    train(
        tmp_path / "two",
        "distributed.num_gpus=2",
        "training.micro_batch_size=8",
        "distributed.balance_speed=true",
        *queued,
        MGPU_INJECT_FAULT=slow,
    )
    train(tmp_path / "one", "distributed.num_gpus=1", "training.micro_batch_size=16", *queued)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["look_ahead"] is True
    rows = [json.loads(line) for line in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["rank_speeds"] is None  # the first steps split by tokens alone
    assert rows[0]["rank_compute_tokens"][0] == rows[0]["rank_compute_tokens"][1]  # this data: equal widths
    late = [r for r in rows if r["rank_speeds"] is not None]
    assert len(late) >= 3 and all(r["rank_speeds"][1] < 0.95 < 1.05 < r["rank_speeds"][0] for r in late), rows
    assert all(r["rank_compute_tokens"][1] < r["rank_compute_tokens"][0] for r in late), late
    two, one = adapter(tmp_path / "two"), adapter(tmp_path / "one")
    assert all(float(v.abs().max()) > 1e-4 for k, v in one.items() if "lora_B" in k)
    # 8-bit state: 1e-3 as in test_two_workers_equal_one_worker_with_the_8bit_optimizer; ten times below the
    # near miss (`mean` aggregation)
    assert max_rel_diff(two, one) < 1e-3
    assert max_rel_diff(two, one) < max_rel_diff(adapter(runs / "control"), adapter(runs / "one")) / 10


def test_drifting_replicas_are_caught(tmp_path):
    proc = train(
        tmp_path / "drift",
        "distributed.num_gpus=2",
        "training.micro_batch_size=2",
        expect=1,
        MGPU_INJECT_FAULT="perturb:rank=1:step=2",
    )
    err = proc.stdout + proc.stderr
    assert "differ across ranks at step 2" in err
    # the one tensor perturbed (the first trainable one) is named, with its dtype
    assert "on 1 of 28 tensors: base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight (float32)" in err
    assert "rank" in err and "failed" in err
    assert not (tmp_path / "drift" / "adapter").exists()


def test_full_fine_tuning_writes_a_model_that_loads_with_transformers(tmp_path):
    from transformers import AutoModelForCausalLM

    from unsloth_mgpu_cli.models import ensure_builtin_model

    out = tmp_path / "full"
    # 8-bit AdamW: the look-ahead loop's undo would copy the whole model each step, so full fine-tuning settles
    # every step first
    args = ("lora=null", "distributed.num_gpus=2", "training.micro_batch_size=2", "training.optimizer=adamw_8bit")
    train(out, *args, "training.max_steps=3")
    assert json.loads((out / "summary.json").read_text())["look_ahead"] is False
    assert (out / "model" / "model.safetensors").exists() and not (out / "adapter").exists()
    tuned = AutoModelForCausalLM.from_pretrained(str(out / "model"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")), dtype=torch.float32)
    changed = [n for n, p in tuned.named_parameters() if not torch.equal(p, dict(base.named_parameters())[n])]
    assert len(changed) > len(list(base.parameters())) // 2  # every layer trained, not only an adapter
    # `mgpu generate` prompts the tuned model/ (there is no adapter to put on a base)
    from unsloth_mgpu_cli.generate import GenerationArgs, load_run

    loaded = load_run(out, GenerationArgs(device="cpu"))
    assert not hasattr(loaded.model, "peft_config")
    assert all(torch.equal(p, dict(tuned.named_parameters())[n]) for n, p in loaded.model.named_parameters())


def test_longest_row_is_the_padded_width_or_the_packed_length():
    from types import SimpleNamespace

    import numpy as np

    from unsloth_mgpu_cli.data import StepPlanner
    from unsloth_mgpu_cli.trainer import Trainer

    lengths = np.array([5, 9, 3, 17, 2])
    planner = StepPlanner(5, lengths, 1, 1, 1, seed=0, lengths=lengths, pad_to=8)
    padded = SimpleNamespace(packed=False, lengths=lengths, planner=planner)
    assert Trainer._longest_row(padded, [[0, 2], [1, 4], []]) == 16  # 9 rounded up to a multiple of 8
    packed = SimpleNamespace(packed=True, lengths=lengths, planner=planner)
    assert Trainer._longest_row(packed, [[0, 2], [1, 3]]) == 26  # one row of 9 + 17 tokens
    assert Trainer._longest_row(padded, []) == 0


def test_garbage_collection_runs_on_the_loops_schedule_and_is_restored():
    import gc

    from unsloth_mgpu_cli.trainer import GarbageCollection

    collector = GarbageCollection(every=3)
    assert gc.isenabled()
    collector.start()
    try:
        assert not gc.isenabled() and gc.get_freeze_count() > 0  # what existed before training is left alone
        before = gc.get_stats()[1]["collections"]
        for step in range(1, 7):
            collector.after_step(step)
        assert gc.get_stats()[1]["collections"] - before == 2  # steps 3 and 6
    finally:
        collector.stop()
    assert gc.isenabled() and gc.get_freeze_count() == 0


def test_graphs_compiled_counts_torch_compile_frames():
    from unsloth_mgpu_cli.trainer import _graphs_compiled

    f = torch.compile(lambda x: x * 3 + 1, backend="eager")
    before = _graphs_compiled()
    f(torch.ones(3))
    f(torch.ones(3))  # same shape: no new frame
    assert _graphs_compiled() - before == 1
    f(torch.ones(4, 2))  # another rank of tensor: compiled again
    assert _graphs_compiled() - before == 2


@pytest.fixture
def sdp_flags():
    """PyTorch's global attention-kernel switches, restored after the test."""
    b = torch.backends.cuda
    saved = (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.cudnn_sdp_enabled(), b.math_sdp_enabled())
    yield b
    setters = (b.enable_flash_sdp, b.enable_mem_efficient_sdp, b.enable_cudnn_sdp, b.enable_math_sdp)
    for enable, on in zip(setters, saved, strict=True):
        enable(on)


def test_attention_choice_sets_pytorch_kernels(sdp_flags):
    from unsloth_mgpu_cli.trainer import ATTENTION_KERNELS, select_attention

    everything = dict.fromkeys(ATTENTION_KERNELS, True)
    assert select_attention("pytorch", "cuda") == everything  # PyTorch's own order: untouched
    assert select_attention("auto", "cpu") == everything  # on CPU auto leaves PyTorch's choice
    # auto on CUDA: no cuDNN (a host-side plan per new batch shape), the rest in PyTorch's order
    assert select_attention("auto", "cuda") == {**everything, "cudnn": False}
    assert not sdp_flags.cudnn_sdp_enabled() and sdp_flags.flash_sdp_enabled()
    for name in ATTENTION_KERNELS:  # a named kernel: that one alone
        assert select_attention(name, "cuda") == {k: k == name for k in ATTENTION_KERNELS}


def test_a_fractional_epoch_count_ends_within_a_pass(tmp_path):
    """training.epochs: 1.5 (axolotl and transformers take fractions): 40 samples at a global batch of 4 are 10
    steps an epoch, so 15 steps, the last 5 of them the first half of the second pass (its own shuffle)."""
    out = tmp_path / "run"
    train(out, "training.max_steps=null", "training.epochs=1.5", "dataset.max_samples=40", "distributed.num_gpus=1",
          "training.micro_batch_size=4", "logging.steps=1")  # fmt: skip
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert [r["epoch"] for r in rows] == [0] * 10 + [1] * 5
    assert json.loads((out / "summary.json").read_text())["steps"] == 15
