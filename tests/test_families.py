"""`mgpu train` on a model family other than the builtin Llama: a small Gemma 2 (the family of the shipped
recipes/gemma2/ recipes, with its soft-capping, four norms per layer and a SentencePiece tokenizer), on CPU with
real Unsloth and gloo. Two workers equal one over the same global batch, and the run's GGUF export reads back to
the merged model. On CUDA (tests/test_gpu.py) Unsloth's block compile is turned off for it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import EQUIVALENCE_RUN, ROOT, adapter, max_rel_diff, run_mgpu
from sentencepiece_models import sentencepiece_base

from unsloth_mgpu_cli.trainer import avoid_broken_block_compile

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def gemma2_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma2")
    base = sentencepiece_base("gemma2", folder)
    runs = {
        # global batch 8 in each: 2 workers x 4, or 1 worker x 8; the first also exports when training ends
        "two": ["distributed.num_gpus=2", "training.micro_batch_size=4", "output.export=[hf,gguf]"],
        "one": ["distributed.num_gpus=1", "training.micro_batch_size=8"],
        # the near miss: each worker's mean gradient weighted alike, whatever its share of the tokens
        "control": ["distributed.num_gpus=2", "training.micro_batch_size=4", "distributed.aggregation=mean"],
    }
    for name, overrides in runs.items():
        args = [
            *EQUIVALENCE_RUN,
            f"model.name={base}",
            f"output.dir={folder / name}",
            "output.gguf_quant=f32",
            "output.export_dtype=float32",
        ]
        proc = run_mgpu("train", str(QUICKSTART), *args, *overrides, timeout=400)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return folder


@pytest.mark.integration
def test_gemma2_two_workers_equal_one_over_the_same_global_batch(gemma2_runs):
    one = adapter(gemma2_runs / "one")
    assert max_rel_diff(adapter(gemma2_runs / "two"), one) < 1e-4
    assert max_rel_diff(adapter(gemma2_runs / "control"), one) > 1e-3  # the comparison can fail


@pytest.mark.integration
def test_gemma2_runs_gguf_export_reads_back_to_its_merged_model(gemma2_runs):
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = gemma2_runs / "two"
    path = run / "gguf" / "two.F32.gguf"
    fields = gguf.GGUFReader(path).fields
    assert fields["general.architecture"].contents() == "gemma2"
    assert fields["tokenizer.ggml.model"].contents() == "llama"  # SentencePiece, from the base's tokenizer.model
    tok = AutoTokenizer.from_pretrained(str(run / "merged"))
    ids = torch.tensor([tok("<start_of_turn>user\nAdd 49 and 97.<end_of_turn>").input_ids])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32)(ids).logits
        back = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        read = back(ids).logits
    # transformers' reader takes llama.cpp's norms (1 + weight) back to Gemma's
    assert float((read - merged).abs().max()) < 1e-5 * float(merged.abs().max())


def test_unsloths_block_compile_is_turned_off_for_gemma2_on_cuda_only(tmp_path):
    for family in ("gemma2", "llama"):
        (tmp_path / family).mkdir()
        (tmp_path / family / "config.json").write_text(json.dumps({"model_type": family}))
    env: dict[str, str] = {}
    note = avoid_broken_block_compile(str(tmp_path / "gemma2"), "cuda", env)
    assert env == {"UNSLOTH_BLOCK_COMPILE": "0"} and "UNSLOTH_BLOCK_COMPILE=1" in note
    for path, device, before in (
        ("llama", "cuda", {}),  # a family it compiles
        ("gemma2", "cpu", {}),  # Unsloth compiles blocks on CUDA only
        ("gemma2", "cuda", {"UNSLOTH_BLOCK_COMPILE": "1"}),  # the user's choice stands
        ("gemma2", "cuda", {"UNSLOTH_COMPILE_DISABLE": "1"}),
        ("missing", "cuda", {}),  # no config.json: loading the model says what is wrong
    ):
        env = dict(before)
        assert avoid_broken_block_compile(str(tmp_path / path), device, env) is None and env == before
