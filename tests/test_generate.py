"""`mgpu generate`: a run's model, prompted as it was trained (real tokenizer, transformers and peft on CPU)."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
import torch
from conftest import EQUIVALENCE_RUN, ROOT, mgpu_env, run_mgpu

from unsloth_mgpu_cli.data import IGNORE_INDEX, NAMED_CHAT_TEMPLATES, Encoding, encode_prompt, encode_row
from unsloth_mgpu_cli.generate import GenerationArgs, LoadedRun, generate, load_run, prompt_ids
from unsloth_mgpu_cli.models import ensure_builtin_model

QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")))


def prompt_part(ids: list[int], labels: list[int]) -> list[int]:
    """The tokens before the first one trained on: what the model saw before it had to answer."""
    return ids[: next(i for i, y in enumerate(labels) if y != IGNORE_INDEX)]


@pytest.mark.parametrize("context", ["", "49 + 97"])
def test_an_alpaca_prompt_is_what_training_put_before_the_response(tokenizer, context):
    row = {"instruction": "Add the two numbers.", "input": context, "output": "146"}
    ids, labels = encode_row(row, tokenizer, Encoding("alpaca", True, 256, "truncate"))
    assert encode_prompt(tokenizer, "alpaca", None, row["instruction"], context) == prompt_part(ids, labels)


def test_a_chat_prompt_is_what_training_put_before_the_assistant_turn(tokenizer):
    chatml = NAMED_CHAT_TEMPLATES["chatml"]
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Red."},
    ]
    ids, labels = encode_row({"messages": msgs}, tokenizer, Encoding("chat", True, 256, "truncate", chatml))
    prompt = encode_prompt(tokenizer, "chat", chatml, "Name a colour.", system="Be brief.")
    assert prompt == prompt_part(ids, labels)
    assert tokenizer.decode(prompt).endswith("<|im_start|>assistant\n")


def test_a_chat_runs_system_prompt_frames_the_prompt_unless_system_is_given(tokenizer):
    chatml = NAMED_CHAT_TEMPLATES["chatml"]
    run = LoadedRun(None, tokenizer, "chat", chatml, "cpu", system_prompt="Answer briefly.")
    framed = prompt_ids(run, "Name a colour.", GenerationArgs())
    assert framed == encode_prompt(tokenizer, "chat", chatml, "Name a colour.", system="Answer briefly.")
    given = prompt_ids(run, "Name a colour.", GenerationArgs(system="Be verbose."))
    assert given == encode_prompt(tokenizer, "chat", chatml, "Name a colour.", system="Be verbose.") != framed


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("generate") / "run"
    proc = run_mgpu("train", str(QUICKSTART), *EQUIVALENCE_RUN, "distributed.num_gpus=1", f"output.dir={out}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def last_logits(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


@pytest.mark.integration
def test_the_model_is_the_trained_adapter_on_its_base(run):
    """The adapter is applied: the logits are those of the merged export (another path: PEFT's merge, saved and
    loaded with transformers alone), and not those of the base model (the control)."""
    from transformers import AutoModelForCausalLM

    args = GenerationArgs(device="cpu")
    loaded = load_run(run, args)
    ids = prompt_ids(loaded, "Add the two numbers.", args)
    proc = run_mgpu("export", str(run), "--dtype", "float32", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    merged = AutoModelForCausalLM.from_pretrained(str(run / "merged"), dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")), dtype=torch.float32)
    ours = last_logits(loaded.model, ids)
    scale = float(ours.abs().max())
    assert float((ours - last_logits(merged, ids)).abs().max()) < 1e-4 * scale
    assert float((ours - last_logits(base, ids)).abs().max()) > 1e-2 * scale


@pytest.mark.integration
def test_mgpu_generate_streams_the_greedy_replies(run):
    args = GenerationArgs(max_new_tokens=6, device="cpu")
    stream = io.StringIO()
    replies = generate(run, ["Add the two numbers.", "Reverse the order of the words."], args, stream=stream)
    assert len(replies) == 2 and all(1 <= len(r) <= 6 for r in replies)
    tok = load_run(run, args).tokenizer
    texts = [tok.decode(r, skip_special_tokens=True) for r in replies]
    assert stream.getvalue() == f"{texts[0]}\n\n{texts[1]}\n"
    # greedy: the same replies again, and from the command line
    assert generate(run, ["Add the two numbers."], args, stream=None) == replies[:1]
    proc = run_mgpu("generate", str(run), "Add the two numbers.", "--max-new-tokens", "6", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == f"{texts[0]}\n"
    # `-`: one prompt per line from stdin
    proc = run_mgpu(
        "generate",
        str(run),
        "-",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
        input="Add the two numbers.\n\nReverse the order of the words.\n",
    )
    assert proc.returncode == 0 and proc.stdout == stream.getvalue(), proc.stderr[-2000:]
    # sampling follows --seed
    hot = GenerationArgs(max_new_tokens=6, device="cpu", temperature=5.0, seed=3)
    assert generate(run, ["Add the two numbers."], hot, stream=None) == generate(
        run, ["Add the two numbers."], hot, stream=None
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--max-new-tokens", "0"], "argument --max-new-tokens: expected 1 or more, found 0"),
        (["--temperature", "-1"], "argument --temperature: expected 0 (greedy) or more"),
        (["--format", "sharegpt"], "argument --format: expected one of alpaca, chat, text, found 'sharegpt'"),
        (["--device", "tpu"], "argument --device: expected one of auto, cpu, cuda"),
    ],
)
def test_bad_arguments_exit_2_before_anything_loads(tmp_path, args, expected):
    proc = run_mgpu("generate", str(tmp_path), "hello", *args)
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_folder_without_a_trained_model_exits_2_and_says_why(tmp_path):
    proc = run_mgpu("generate", str(tmp_path / "nowhere"), "hello")
    assert proc.returncode == 2 and "not a folder" in proc.stderr, proc.stderr
    (tmp_path / "recipe.resolved.yaml").write_text(json.dumps({"model": {"name": "builtin:tiny-llama"}}))
    proc = run_mgpu("generate", str(tmp_path), "hello")
    assert proc.returncode == 2, proc.stderr
    assert "nothing to generate" in proc.stderr and "no adapter in" in proc.stderr
    assert "once it has" in proc.stderr or "--resume auto" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_generate_does_not_import_unsloth(run):
    """transformers and peft only, as `mgpu export`: no Unsloth patches, no GPU needed."""
    code = (
        "import sys; from pathlib import Path; from unsloth_mgpu_cli.generate import GenerationArgs, generate; "
        f"generate(Path({str(run)!r}), ['hi'], GenerationArgs(max_new_tokens=2, device='cpu'), stream=None); "
        "print('unsloth' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mgpu_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == "False"
