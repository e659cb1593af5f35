"""Each data format trained end to end by the real `mgpu train` (2 CPU workers, gloo, real Unsloth), one run
per format, each with another batching mode; and Unsloth's handling of packed rows checked against
the same samples run one by one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, packing_probe, run_mgpu

from unsloth_mgpu_cli import data as D
from unsloth_mgpu_cli.models import resolve_model_path
from unsloth_mgpu_cli.recipe import DatasetSection, load_recipe

pytestmark = pytest.mark.integration

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
BASE = [
    "training.max_steps=3",
    "training.warmup_steps=0",
    "output.save_steps=0",
    "logging.progress=false",
    "distributed.num_gpus=2",
    "training.micro_batch_size=4",
    "training.gradient_accumulation_steps=2",
    "model.max_seq_length=160",
]


def rows() -> list[dict]:
    return [json.loads(line) for line in (ROOT / "recipes" / "data" / "quickstart.jsonl").read_text().splitlines()]


def make_data(folder: Path, fmt: str) -> Path:
    if fmt == "alpaca":
        return ROOT / "recipes" / "data" / "quickstart.jsonl"
    path = folder / f"{fmt}.jsonl"
    out = []
    for r in rows()[:128]:
        if fmt == "chat":
            user = f"{r['instruction']}\n{r['input']}"
            out.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": r["output"]}]})
        else:
            out.append({"text": f"{r['instruction']} {r['input']} => {r['output']}"})
    path.write_text("".join(json.dumps(x) + "\n" for x in out))
    return path


RUNS = {"alpaca": "padded", "chat": "packed", "text": "balanced"}


def run_overrides(fmt: str, data: Path, out: Path) -> list[str]:
    return [f"dataset.path={data}", f"dataset.format={fmt}", f"dataset.batching={RUNS[fmt]}", f"output.dir={out}"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("formats")
    done = {}
    for fmt in RUNS:
        data = make_data(base, fmt)
        out = base / fmt
        proc = run_mgpu("train", str(QUICKSTART), *BASE, *run_overrides(fmt, data, out), timeout=400)
        done[fmt] = (proc, out, data)
    return done


@pytest.mark.parametrize("fmt", list(RUNS))
def test_each_format_trains_on_two_workers_with_the_planned_loss_tokens(runs, fmt):
    proc, out, data = runs[fmt]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"batching {RUNS[fmt]}" in proc.stdout
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    # The engine saw exactly the loss tokens the data plan gives for those steps (masking reached training).
    # The run's own cache folder: the same recipe prepared again is a cache hit on it (other tests tokenise the
    # same file with other settings, so the source path alone does not name it).
    recipe = load_recipe(QUICKSTART, [*BASE, *run_overrides(fmt, data, out)]).recipe
    folder, _, hit = D.prepare(recipe, resolve_model_path(recipe.model.name))
    assert hit, "the run's tokenised data should already be cached"
    tok = D.TokenizedData(folder)
    pad_to = DatasetSection.model_fields["pad_to_multiple_of"].default  # the runs keep the default (8)
    plan = D.StepPlanner(
        len(tok), tok.loss_counts, 4, 2, 2, 42, lengths=tok.lengths(), batching=RUNS[fmt], pad_to=pad_to
    )
    for m in metrics:
        b = plan.batches(m["step"] - 1)
        assert m["loss_tokens"] == b.global_loss_tokens and m["tokens"] == sum(b.rank_tokens)
        assert m["compute_tokens"] == sum(b.compute_tokens)
    if fmt == "chat":
        assert all(m["compute_tokens"] == m["tokens"] for m in metrics)  # packed: no padding at all
        assert all(m["loss_tokens"] < m["tokens"] / 2 for m in metrics)  # user turns masked


def test_unsloth_packed_rows_do_not_attend_across_samples():
    r = packing_probe()
    assert abs(r["packed"] - r["one_by_one"]) < 1e-5 * r["one_by_one"], r
    assert abs(r["packed_lengths"] - r["one_by_one"]) < 1e-5 * r["one_by_one"], r
    assert abs(r["naive"] - r["one_by_one"]) > 1e-4 * r["one_by_one"], r  # control
    # how Unsloth attends a packed row (the GPU warning reads it): its CPU fallback does not load the GPU dispatch
    # module, so it says nothing (None); never a variable-length kernel on CPU. tests/test_gpu.py checks the GPU side.
    assert r["route"] in (None, "per sample"), r


def test_the_chat_template_trained_with_is_the_one_saved_with_the_adapter_and_the_export(tmp_path):
    """dataset.chat_template rendered the training conversations, but adapter/ and merged/ kept the tokenizer's own
    template: apply_chat_template at inference gave a format the model never saw."""
    from unsloth_mgpu_cli.data import NAMED_CHAT_TEMPLATES

    def saved_template(folder: Path) -> str:
        jinja = folder / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        return json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template", "")

    out = tmp_path / "run"
    proc = run_mgpu(
        "train",
        str(QUICKSTART),
        *BASE,
        "distributed.num_gpus=1",
        f"dataset.path={make_data(tmp_path, 'chat')}",
        "dataset.format=chat",
        "dataset.chat_template=chatml",
        f"output.dir={out}",
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert saved_template(out / "adapter") == NAMED_CHAT_TEMPLATES["chatml"]
    proc = run_mgpu("export", str(out), timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert saved_template(out / "merged") == NAMED_CHAT_TEMPLATES["chatml"]
    # the control: a run that chose no template keeps the tokenizer's own
    own = tmp_path / "own"
    proc = run_mgpu("train", str(QUICKSTART), *BASE, "distributed.num_gpus=1", f"output.dir={own}", timeout=400)
    assert proc.returncode == 0 and saved_template(own / "adapter") != NAMED_CHAT_TEMPLATES["chatml"]
