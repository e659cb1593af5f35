"""Data pipeline without a model run: formats, masking token by token, errors, length policy, the cache,
sharding (per-step sample sets, token balance on GSM8K), and packing (attention never crosses samples,
checked against the same samples run one by one with plain transformers)."""

from __future__ import annotations

import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import GSM8K, ROOT, assert_user_error, run_mgpu

from unsloth_mgpu_cli import data as D
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.recipe import Recipe

QUICKSTART_DATA = ROOT / "recipes" / "data" / "quickstart.jsonl"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "5"},
    {"role": "user", "content": "And 4+4?"},
    {"role": "assistant", "content": "eight"},
]


@pytest.fixture(autouse=True)
def _fresh_data_cache(data_cache):
    """Every test here tokenises into its own cache (conftest's data_cache)."""


def recipe(path: Path | str, max_seq_length: int = 128, **dataset) -> Recipe:
    return Recipe.model_validate(
        {
            "model": {"name": "builtin:tiny-llama", "max_seq_length": max_seq_length},
            "dataset": {"path": str(path), **dataset},
        }
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(r: Recipe, model_path: str) -> tuple[D.TokenizedData, D.PrepareSummary]:
    folder, summary, _ = D.prepare(r, model_path)
    return D.TokenizedData(folder), summary


# ---------------------------------------------------------------------------------------------------
# Formats and masking
# ---------------------------------------------------------------------------------------------------


def test_alpaca_masks_the_prompt_token_by_token(tmp_path, model_path, tokenizer):
    row = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5"}
    data, summary = prepared(recipe(write_jsonl(tmp_path / "a.jsonl", [row])), model_path)
    ids, labels = (np.asarray(a) for a in data.sample(0))
    prompt, response = D.render_alpaca(row)
    p_ids = tokenizer(prompt)["input_ids"]
    r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert ids.tolist() == p_ids + r_ids
    assert labels.tolist() == [-100] * len(p_ids) + r_ids
    assert data.loss_counts.tolist() == [len(r_ids)] == [summary.loss_tokens]


def test_chat_trains_on_assistant_turns_only_token_by_token(tmp_path, model_path, tokenizer):
    data, _ = prepared(recipe(write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}]), format="chat"), model_path)
    ids, labels = (np.asarray(a).tolist() for a in data.sample(0))
    full = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert ids == tokenizer(full)["input_ids"]  # the ids are those of the whole rendered text
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != -100]
    # exactly the two assistant contents with what the template closes them with (eos + newline)
    expected = tokenizer("5</s>\n", add_special_tokens=False)["input_ids"]
    expected += tokenizer("eight</s>\n", add_special_tokens=False)["input_ids"]
    assert trained == expected
    for i, lab in zip(ids, labels, strict=True):  # a label is the token itself or ignored, never another
        assert lab in (-100, i)
    assert tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab == -100]).count("What is 2+3?") == 1


def test_everything_is_trained_on_when_asked_and_for_text(tmp_path, model_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    data, _ = prepared(recipe(f, format="chat", train_on_responses_only=False), model_path)
    ids, labels = data.sample(0)
    assert np.array_equal(ids, labels) and data.loss_counts[0] == len(ids) - 1
    t = write_jsonl(tmp_path / "t.jsonl", [{"text": "hello world, plain text"}])
    data, _ = prepared(recipe(t, format="text"), model_path)
    ids, labels = data.sample(0)
    assert np.array_equal(ids, labels) and data.loss_counts[0] == len(ids) - 1


def test_columns_are_mapped_and_sharegpt_roles_accepted(tmp_path, model_path):
    plain = prepared(recipe(write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}]), format="chat"), model_path)[0]
    share = [
        {"from": {"system": "system", "user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]}
        for m in CHAT
    ]
    f = write_jsonl(tmp_path / "b.jsonl", [{"conversations": share}])
    r = recipe(f, format="chat", columns={"messages": "conversations", "role": "from", "content": "value"})
    mapped = prepared(r, model_path)[0]
    assert np.array_equal(mapped.input_ids, plain.input_ids) and np.array_equal(mapped.labels, plain.labels)


def test_csv_parquet_and_a_folder_give_the_same_tokens_as_jsonl(tmp_path, model_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:20]]
    ref = prepared(recipe(write_jsonl(tmp_path / "q.jsonl", rows), format="alpaca"), model_path)[0]
    table = pa.Table.from_pylist(rows)
    pacsv.write_csv(table, tmp_path / "q.csv")
    pq.write_table(table, tmp_path / "q.parquet")
    folder = tmp_path / "parts"
    folder.mkdir()
    write_jsonl(folder / "a.jsonl", rows[:7])
    pq.write_table(pa.Table.from_pylist(rows[7:]), folder / "b.parquet")
    for source in (tmp_path / "q.csv", tmp_path / "q.parquet", folder):
        got = prepared(recipe(source), model_path)[0]
        assert np.array_equal(got.input_ids, ref.input_ids), source
        assert np.array_equal(got.labels, ref.labels), source


def test_named_chat_template_and_a_missing_one(tmp_path, model_path, tokenizer):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}])
    data, _ = prepared(recipe(f, 256, format="chat", chat_template="chatml"), model_path)
    ids, labels = data.sample(0)
    trained = tokenizer.decode([int(i) for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained == "5<|im_end|>\neight<|im_end|>\n"
    with pytest.raises(ValueError) as exc:  # an unknown name: refused when the recipe is validated
        recipe(f, format="chat", chat_template="vicuna")
    assert "dataset.chat_template" in str(exc.value) and "chatml" in str(exc.value)


def test_a_system_prompt_opens_every_conversation_without_one(tmp_path, model_path, tokenizer):
    """dataset.system_prompt: the row is trained as if it held that system message; a row with its own keeps it."""
    chatml = D.NAMED_CHAT_TEMPLATES["chatml"]
    system = {"role": "system", "content": "Answer briefly."}
    talk = CHAT[1:]  # the conversation without its system message
    with_prompt = D.Encoding("chat", True, 256, "truncate", chatml, "Answer briefly.")
    plain = D.Encoding("chat", True, 256, "truncate", chatml)
    assert D.encode_row({"messages": talk}, tokenizer, with_prompt) == D.encode_row(
        {"messages": [system, *talk]}, tokenizer, plain
    )
    own = CHAT  # opens with its own system message
    assert D.encode_row({"messages": own}, tokenizer, with_prompt) == D.encode_row({"messages": own}, tokenizer, plain)
    assert D.encode_row({"messages": talk}, tokenizer, with_prompt) != D.encode_row(
        {"messages": talk}, tokenizer, plain
    )
    # through the recipe: the encoding, a cache of its own, and a refusal where there are no conversations
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": talk}])
    r = recipe(f, 256, format="chat", chat_template="chatml", system_prompt="Answer briefly.")
    assert D.encoding_of(r) == with_prompt
    assert D._fingerprint(r, model_path) != D._fingerprint(
        recipe(f, 256, format="chat", chat_template="chatml"), model_path
    )
    with pytest.raises(ValueError, match="dataset.system_prompt"):
        recipe(QUICKSTART_DATA, system_prompt="Answer briefly.")


def test_a_reply_token_that_starts_in_the_generation_prompt_is_trained_on(tokenizer):
    """A template whose generation prompt ends with a space ("[ASSISTANT] "): the reply's first token (" 5")
    starts on that space. It was masked, so the answers themselves ("5", "eight"'s first piece) were never
    trained on."""
    template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] | upper }}] {{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}\n{% endfor %}"
        "{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
    )
    enc = D.Encoding("chat", True, 256, "truncate", template)
    ids, labels = D.encode_row({"messages": CHAT}, tokenizer, enc)
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert trained.replace(" ", "") == "5</s>eight</s>", trained  # every piece of both replies, and nothing else
    assert "[" not in trained and "What" not in trained


# ---------------------------------------------------------------------------------------------------
# Bad data, length policy, cache
# ---------------------------------------------------------------------------------------------------


def user_error(r: Recipe, model_path: str) -> str:
    with pytest.raises(UserError) as exc:
        D.prepare(r, model_path)
    return str(exc.value)


def test_bad_data_is_named_by_file_and_line(tmp_path, model_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": \n')
    assert f"{bad}:3" in user_error(recipe(bad), model_path)
    cols = write_jsonl(tmp_path / "cols.jsonl", [{"q": "a", "a": "b"}])
    msg = user_error(recipe(cols), model_path)
    assert "instruction" in msg and "'q'" in msg and "dataset.columns" in msg
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "empty" in user_error(recipe(empty), model_path)
    chats = [{"messages": CHAT}, {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}]
    role = write_jsonl(tmp_path / "role.jsonl", chats)
    msg = user_error(recipe(role, format="chat"), model_path)
    assert f"{role}:2" in msg and "messages[1].role" in msg and "'bot'" in msg and "ShareGPT's human and gpt" in msg
    blank = write_jsonl(
        tmp_path / "blank.jsonl", [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": " "}]
    )
    msg = user_error(recipe(blank), model_path)
    assert f"{blank}:2" in msg and "output is empty" in msg and "fill it in, or drop the row" in msg
    csv = tmp_path / "gap.csv"
    csv.write_text("instruction,output\nfine,ok\nmissing answer,\n")
    assert f"{csv}: row 3" in user_error(recipe(csv), model_path) and not list((tmp_path / "cache").rglob("*.npy"))


def test_chat_content_follows_the_rules_of_the_other_formats(tmp_path, model_path, tokenizer):
    """docs/data.md: a number is text, and content must be non-empty (a system message's may be empty). A number
    was refused and an empty reply accepted (trained on the end-of-turn token alone)."""
    enc = D.encoding_of(recipe(tmp_path / "unused.jsonl", 256, format="chat", chat_template="chatml"))
    number = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": 5}]
    ids, labels = D.encode_row({"messages": number}, tokenizer, enc)
    assert tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100]).startswith("5")
    quiet = [{"role": "system", "content": ""}, *number]
    assert D.encode_row({"messages": quiet}, tokenizer, enc)[0]  # an empty system prompt is fine
    empty = write_jsonl(
        tmp_path / "e.jsonl", [{"messages": number}, {"messages": [number[0], {"role": "assistant", "content": " "}]}]
    )
    msg = user_error(recipe(empty, format="chat", chat_template="chatml"), model_path)
    assert f"{empty}:2" in msg and "messages[1].content is empty (an assistant message)" in msg


def test_an_alpaca_answer_keeps_its_leading_indentation(tokenizer):
    prompt, response = D.render_alpaca({"instruction": " Indent it. ", "output": "    y = x + 1\n    return y\n"})
    assert response == "    y = x + 1\n    return y" and prompt.endswith(
        "### Instruction:\nIndent it.\n\n### Response:\n"
    )


def test_prepare_checks_and_describes_the_eval_data_too(tmp_path, model_path):
    """`mgpu prepare` ignored dataset.eval_path: a bad eval row surfaced only in `mgpu train`."""
    good = write_jsonl(tmp_path / "eval.jsonl", [{"instruction": "2+2?", "output": "4"}] * 3)
    rep = D.report(recipe(QUICKSTART_DATA, eval_path=str(good)))
    assert rep.eval_note is not None and rep.eval_note.startswith(f"3 samples from {good}")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "2+2?", "output": "4"}, {"instruction": "no answer"}])
    with pytest.raises(UserError) as exc:
        D.report(recipe(QUICKSTART_DATA, eval_path=str(bad)))
    assert f"{bad}:2" in exc.value.render()  # the eval file, by line
    held = D.report(recipe(QUICKSTART_DATA, eval_ratio=0.1)).eval_note
    assert held == "51 of the 512 samples held out (dataset.eval_ratio 0.1)"
    # what the batching table assumed for an auto batch size (it silently used 8)
    r = recipe(QUICKSTART_DATA)
    auto = r.model_copy(update={"training": r.training.model_copy(update={"micro_batch_size": "auto"})})
    assert "training.micro_batch_size, distributed.num_gpus auto: the batching table assumes micro-batch 8 x" in (
        D.report(auto).batch_note or ""
    )


def test_the_eval_file_is_neither_cut_by_max_samples_nor_trained_on_from_the_training_folder(tmp_path, model_path):
    """max_samples (of the training data) cut the eval file to its size too, silently; an eval file inside the
    training folder was read for training as well, and then scored as unseen data."""
    row = {"instruction": "2+2?", "output": "4"}
    train = write_jsonl(tmp_path / "train.jsonl", [row] * 10)
    held = write_jsonl(tmp_path / "eval.jsonl", [row] * 51)
    rep = D.report(recipe(train, eval_path=str(held), max_samples=5))
    assert rep.summary.samples == 5 and rep.eval_note.startswith("51 samples from"), rep.eval_note
    folder = tmp_path / "data"
    folder.mkdir()
    write_jsonl(folder / "all.jsonl", [row] * 10)
    inside = write_jsonl(folder / "eval.jsonl", [row] * 5)
    msg = user_error(recipe(folder, eval_path=str(inside)), model_path)
    assert f"dataset.path ({folder})" in msg and f"dataset.eval_path ({inside}) is among them" in msg, msg
    assert "move the evaluation data out of the training folder" in msg
    (folder / "all.jsonl").rename(folder / "train.jsonl")  # named by dataset.split: the folder's train data only
    assert D.report(recipe(folder, eval_path=str(inside))).summary.samples == 10


def test_a_csv_column_named_twice_and_a_json_file_of_one_object_are_refused(tmp_path, model_path):
    """A CSV header naming a column twice kept the last column silently; a pretty-printed .json holding one object
    (`{"data": [...]}`) gave a "malformed JSON line" error for each of its lines."""
    dup = tmp_path / "dup.csv"
    dup.write_text("instruction,output,output\nq,a1,a2\n")
    msg = user_error(recipe(dup), model_path)
    assert f"{dup}: row 1" in msg and "names a column twice: 'output' (fields 2 and 3)" in msg, msg
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"version": 1, "data": [{"instruction": "q", "output": "a"}] * 3}, indent=2))
    msg = user_error(recipe(wrapped), model_path)
    assert "expected a JSON array of objects (one per row), found one object with keys ['data', 'version']" in msg
    assert "jq '.data' wrapped.json" in msg and "malformed" not in msg, msg
    one_line = write_jsonl(tmp_path / "one.json", [{"instruction": "q", "output": "a"}])  # JSON Lines: one row
    assert D.report(recipe(one_line)).summary.samples == 1


def test_nothing_to_train_on_says_why_and_names_the_file(tmp_path, model_path):
    """It said `dataset: no sample has a token to train on` whatever the cause, naming no file."""
    long_prompt = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "word " * 200, "output": "a"}] * 3)
    msg = user_error(recipe(long_prompt, 64), model_path)
    assert f"dataset.path ({long_prompt})" in msg and "none of the 3 samples has a token to train on" in msg, msg
    assert "all were cut to model.max_seq_length=64 before their response" in msg and "too_long: drop" in msg
    no_reply = write_jsonl(tmp_path / "sys.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}] * 2)
    msg = user_error(recipe(no_reply, format="chat", chat_template="chatml"), model_path)
    assert "a conversation without an assistant turn" in msg and "train_on_responses_only: false" in msg, msg
    short = write_jsonl(tmp_path / "short.jsonl", [{"instruction": "2+2?", "output": "4"}] * 3)
    with pytest.raises(UserError) as exc:
        D.report(recipe(short, 64, eval_path=str(long_prompt)))
    held = exc.value.render()
    assert f"dataset.eval_path ({long_prompt})" in held, held  # the eval file is named as the user wrote it


def test_an_assistant_turn_that_opens_the_conversation_has_its_header_masked(tokenizer):
    """The first message's span started at character 0: the template's `<|assistant|>` header was trained on."""
    enc = D.encoding_of(recipe("unused.jsonl", 256, format="chat", chat_template="chatml"))
    msgs = [
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "x"},
    ]
    ids, labels = D.encode_row({"messages": msgs}, tokenizer, enc)
    trained = tokenizer.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
    assert "assistant" not in trained and trained.startswith("hi"), trained


def test_a_chat_template_for_a_format_without_messages_and_the_training_file_as_eval_data_are_refused(
    tmp_path, model_path
):
    """Both were accepted silently: the template did nothing (alpaca renders its own prompt), and the evaluation
    scored samples the run had trained on (the folder case was refused already)."""
    for fmt in ("alpaca", "text"):
        with pytest.raises(Exception, match=f"format {fmt} does not use a chat template"):
            recipe("x.jsonl", format=fmt, chat_template="chatml")
    assert recipe("x.jsonl", format="chat", chat_template="chatml").dataset.chat_template == "chatml"  # the control
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}] * 4)
    msg = user_error(recipe(f, eval_path=str(f)), model_path)
    assert "dataset.eval_path is the training file itself" in msg and "dataset.eval_ratio" in msg
    other = write_jsonl(tmp_path / "held.jsonl", [{"instruction": "c", "output": "d"}] * 2)
    assert prepared(recipe(f, eval_path=str(other)), model_path)[1].samples == 4  # the control: another file


def test_responses_only_with_the_text_format_is_refused():
    with pytest.raises(Exception, match="format text has no responses"):
        recipe("x.jsonl", format="text", train_on_responses_only=True)


def test_an_uncached_hub_dataset_is_a_clear_error(model_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    msg = user_error(recipe("nobody-here/no-such-dataset-xyz"), model_path)
    assert "dataset.path (nobody-here/no-such-dataset-xyz)" in msg and "offline" in msg


def test_uncached_hub_models_and_datasets_fail_at_once_when_the_hub_cannot_resolve(tmp_path, monkeypatch, model_path):
    # downloads on, but the hub's name cannot resolve: refused before the hub client's ~50 s of retries
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://no-such-host.invalid")
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}])
    msg = user_error(recipe(f), "nobody-here/no-such-model-xyz")
    assert "model.name (nobody-here/no-such-model-xyz)" in msg and "(no-such-host.invalid) does not resolve" in msg
    assert "give a local folder" in msg
    # a hub dataset: the same, naming dataset.path
    msg = user_error(recipe("nobody-here/no-such-dataset-xyz"), model_path)
    assert "dataset.path (nobody-here/no-such-dataset-xyz)" in msg and "(no-such-host.invalid) does not resolve" in msg
    # behind a proxy the name need not resolve on this machine: nothing is refused on that ground
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    D._refuse_unreachable_hub("nobody-here/no-such-model-xyz")


def test_too_long_samples_are_truncated_or_dropped_and_reported(tmp_path, model_path, tokenizer):
    rows = [{"text": "word " * n} for n in (5, 200, 300)]
    full = [len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows]  # + eos
    f = write_jsonl(tmp_path / "t.jsonl", rows)
    data, s = prepared(recipe(f, max_seq_length=64, format="text"), model_path)
    assert (s.samples, s.truncated, s.dropped, s.longest, s.longest_before) == (3, 2, 0, 64, full[2])
    assert s.tokens_cut == (full[1] - 64) + (full[2] - 64)
    assert data.lengths().tolist() == [full[0], 64, 64]
    assert f"2 truncated to 64 tokens (longest was {full[2]}" in s.describe(64)
    data, s = prepared(recipe(f, max_seq_length=64, format="text", too_long="drop"), model_path)
    assert (s.samples, s.truncated, s.dropped) == (1, 0, 2) and "2 dropped as longer than 64" in s.describe(64)
    assert data.lengths().tolist() == [full[0]]
    # an alpaca prompt longer than the limit leaves its row nothing to train on: said, with the fix
    long = write_jsonl(
        tmp_path / "a.jsonl",
        [{"instruction": "word " * 200, "output": "ok"}, *[{"instruction": "a", "output": "b"}] * 3],
    )
    _, s = prepared(recipe(long, max_seq_length=64), model_path)
    assert (s.truncated, s.no_loss) == (1, 1)
    assert "1 (25%) with nothing to train on (most likely cut before their response): set dataset.too_long: drop" in (
        s.describe(64)
    )


def test_second_prepare_hits_the_cache_without_loading_the_tokenizer(tmp_path, model_path, monkeypatch):
    r = recipe(QUICKSTART_DATA)
    first, s1, hit1 = D.prepare(r, model_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the tokenizer was loaded on a cache hit")

    monkeypatch.setattr(D, "_load_tokenizer", refuse)
    second, s2, hit2 = D.prepare(
        r.model_copy(update={"dataset": r.dataset.model_copy(update={"batching": "packed"})}), model_path
    )
    assert (hit1, hit2) == (False, True) and first == second and s1 == s2
    # a setting that changes tokens is a different cache
    with pytest.raises(AssertionError, match="tokenizer was loaded"):
        D.prepare(recipe(QUICKSTART_DATA, max_seq_length=64), model_path)


def test_every_tokenizer_file_is_part_of_the_cache_key(tmp_path, model_path):
    """A changed special_tokens_map.json (the eos token) reused the old tokens: only 4 files were hashed."""
    import shutil

    model = tmp_path / "model"
    shutil.copytree(model_path, model)
    r = recipe(QUICKSTART_DATA)
    before = D._fingerprint(r, str(model))
    for name in ("special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt"):
        f = model / name
        original = f.read_bytes() if f.exists() else None
        f.write_text('{"eos_token": "<unk>"}')
        assert D._fingerprint(r, str(model)) != before, name
        f.unlink() if original is None else f.write_bytes(original)
    assert D._fingerprint(r, str(model)) == before
    (model / "model.safetensors.index.json").write_text("{}")  # not the tokenizer's: the same cache
    assert D._fingerprint(r, str(model)) == before


# ---------------------------------------------------------------------------------------------------
# Sharding
# ---------------------------------------------------------------------------------------------------


def planners(lengths: np.ndarray, mb: int, ga: int, world: int, mode: str) -> D.StepPlanner:
    return D.StepPlanner(len(lengths), lengths // 2, mb, ga, world, seed=3, lengths=lengths, batching=mode)


@pytest.mark.parametrize("mode", ["padded", "balanced", "packed"])
def test_step_sample_sets_do_not_depend_on_the_number_of_workers(mode):
    lengths = np.random.default_rng(0).integers(5, 500, size=997)
    ref = planners(lengths, 16, 2, 1, "padded")  # 32 samples per step, as every layout below
    for world, mb in ((1, 16), (2, 8), (4, 4), (8, 2)):
        p = planners(lengths, mb, 2, world, mode)
        for step in (0, 1, 30, ref.steps_per_epoch + 2):  # the last one in the second epoch
            b = p.batches(step)
            got = sorted(i for rank in b.per_rank for m in rank for i in m)
            assert got == sorted(int(i) for rank in ref.batches(step).per_rank for m in rank for i in m)
            assert all(len(rank) == 2 and all(m for m in rank) for rank in b.per_rank)  # ga non-empty each
            assert b.loss_tokens == [int((lengths[[i for m in r for i in m]] // 2).sum()) for r in b.per_rank]


@pytest.fixture(scope="module")
def gsm8k_lengths(model_path, tmp_path_factory):
    if not GSM8K.exists():  # the project's shared data sits beside the checkout; CI has it, so there it must run
        (pytest.fail if os.environ.get("CI") else pytest.skip)(f"{GSM8K} not present (../shared/data)")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("UNSLOTH_MGPU_CACHE", str(tmp_path_factory.mktemp("gsm8k-cache")))
        data, _ = prepared(recipe(GSM8K, max_seq_length=512), model_path)
        return np.asarray(data.lengths())


@pytest.mark.parametrize("world", [1, 2, 4])
def test_packed_rows_hold_as_many_samples_as_fit_in_micro_batch_times_max_seq_length(world):
    """Packed rows are bounded by tokens (micro_batch_size x model.max_seq_length), not samples: short samples share
    one forward. Every rank runs the same number of rows (FSDP's collectives stay in step), never more than the
    accumulation steps, and the step's samples are those of the plan without the bound."""
    lengths = np.random.default_rng(1).integers(20, 300, size=997)
    mb, ga, cap = 8 // world, 4, (8 // world) * 512
    bound = D.StepPlanner(
        len(lengths), lengths // 2, mb, ga, world, 3, lengths=lengths, batching="packed", row_tokens=cap
    )
    plain = planners(lengths, mb, ga, world, "packed")
    fewer = 0
    for step in range(20):
        b, ref = bound.batches(step), plain.batches(step)
        rows = {len(rank) for rank in b.per_rank}
        assert len(rows) == 1 and 1 <= rows.pop() <= ga
        assert all(m and int(lengths[m].sum()) <= cap for rank in b.per_rank for m in rank)
        assert sorted(i for r in b.per_rank for m in r for i in m) == sorted(
            i for r in ref.per_rank for m in r for i in m
        )
        assert all(len(rank) == ga for rank in ref.per_rank)  # control: without the bound, one row per micro-batch
        fewer += len(b.per_rank[0]) < ga
    assert fewer == 20  # 32 samples of ~160 tokens per step: about 5,000 tokens, 2 rows of 4,096 instead of 4


def test_packed_rows_keep_the_accumulation_steps_when_samples_do_not_fit_fewer():
    lengths = np.full(64, 512)
    full = D.StepPlanner(64, lengths // 2, 2, 4, 2, 3, lengths=lengths, batching="packed", row_tokens=2 * 512)
    assert [len(rank) for rank in full.batches(0).per_rank] == [4, 4]  # 8 samples of 512 per rank: 4 rows of 2
    assert all(len(m) == 2 for rank in full.batches(0).per_rank for m in rank)
    tiny = D.StepPlanner(64, lengths // 2, 2, 4, 2, 3, lengths=lengths, batching="packed", row_tokens=100)
    assert [len(rank) for rank in tiny.batches(0).per_rank] == [4, 4]  # a bound below one sample: as before


def test_min_max_cuts_give_the_smallest_largest_run():
    import itertools

    rng = np.random.default_rng(2)
    for _ in range(200):
        sizes = [int(x) for x in rng.integers(1, 50, size=int(rng.integers(1, 9)))]
        parts = int(rng.integers(1, len(sizes) + 1))
        cuts = D.min_max_cuts(sizes, parts)
        bounds = [0, *cuts, len(sizes)]
        assert len(cuts) == parts - 1 and all(a < b for a, b in zip(bounds[:-1], bounds[1:], strict=True))
        best = min(
            max(sum(sizes[a:b]) for a, b in zip((0, *c), (*c, len(sizes)), strict=True))
            for c in itertools.combinations(range(1, len(sizes)), parts - 1)
        )
        assert max(sum(sizes[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)) == best, (sizes, parts)


def test_packed_shards_balance_tokens_within_ten_percent_on_gsm8k(gsm8k_lengths):
    for world in (2, 4, 8):
        p = planners(gsm8k_lengths, 8, 1, world, "packed")
        padded = planners(gsm8k_lengths, 8, 1, world, "padded")
        worst = worst_padded = 0.0
        for step in range(150):
            t = np.asarray(p.batches(step).rank_tokens, dtype=float)
            worst = max(worst, float(np.abs(t / t.mean() - 1).max()))
            t = np.asarray(padded.batches(step).rank_tokens, dtype=float)
            worst_padded = max(worst_padded, float(np.abs(t / t.mean() - 1).max()))
        assert worst < 0.10, (world, worst)
        assert worst_padded > 0.15  # control: the plain split is far off, so the bound above means something


def test_balanced_shards_keep_the_slowest_rank_within_ten_percent_on_gsm8k(gsm8k_lengths):
    # balanced: a padded micro-batch costs rows x longest; the step waits for the rank that processes the most
    padded_worst = 0.0
    # (4, 2, 2): the length groups alone leave a rank 16% over; moving/swapping single samples brings it under 7%
    for mb, ga, world in ((16, 1, 2), (32, 1, 4), (16, 1, 8), (8, 4, 4), (2, 4, 8), (4, 2, 2)):
        over = {}
        for mode in ("balanced", "padded"):
            p = planners(gsm8k_lengths, mb, ga, world, mode)
            worst = 0.0
            for step in range(120):
                t = np.asarray(p.batches(step).compute_tokens, dtype=float)
                worst = max(worst, float(t.max() / t.mean() - 1))
            over[mode] = worst
        assert over["balanced"] < 0.10, (mb, ga, world, over)
        padded_worst = max(padded_worst, over["padded"])
    # control: the plain split breaks the bound (where lengths vary: samples truncated to 512 pad every rank alike)
    assert padded_worst > 0.2, padded_worst


def test_balanced_two_ranks_reach_the_best_possible_split(gsm8k_lengths):
    """With few samples per rank the remaining imbalance is the optimum's: brute force over every split agrees."""
    p = planners(gsm8k_lengths, 6, 1, 2, "balanced")
    for step in range(25):
        b = p.batches(step)
        lens = sorted((int(gsm8k_lengths[i]) for r in b.per_rank for m in r for i in m), reverse=True)
        best = min(
            max(len(a) * a[0], len(o) * max(o))
            for mask in range(1, 1 << (len(lens) - 1))
            for a, o in [
                (
                    [lens[0]] + [x for k, x in enumerate(lens[1:]) if mask >> k & 1 == 0],
                    [x for k, x in enumerate(lens[1:]) if mask >> k & 1],
                )
            ]
        )
        assert max(b.compute_tokens) == best, (step, b.compute_tokens, best)


def test_balanced_batching_cuts_padding_and_never_exceeds_the_padded_micro_batch(gsm8k_lengths):
    for mb, ga, world in ((8, 1, 2), (4, 2, 2), (8, 4, 4)):
        eff = {}
        for mode in ("padded", "balanced"):
            p = planners(gsm8k_lengths, mb, ga, world, mode)
            real = work = slowest = 0
            for step in range(100):
                b = p.batches(step)
                real += sum(b.rank_tokens)
                work += sum(b.compute_tokens)
                slowest += max(b.compute_tokens) * world
                for rank in b.per_rank:
                    for m in rank:  # memory: no padded micro-batch larger than the plain split's worst case
                        assert len(m) * gsm8k_lengths[m].max() <= mb * 512
            eff[mode] = (real / work, real / slowest)
        assert eff["balanced"][0] > eff["padded"][0] + 0.1, eff  # less padding
        assert eff["balanced"][1] > eff["padded"][1] + 0.05, eff  # and more real tokens per unit of step time


@pytest.mark.parametrize("mode", ["balanced", "packed"])
def test_a_slower_rank_gets_fewer_tokens_and_the_ranks_finish_together(gsm8k_lengths, mode):
    """`speeds` (SpeedBalance: a GPU slowed by its power cap): each rank's work divided by its speed evens out;
    the step's samples, the micro-batch count and the memory bound stay."""
    key = "compute_tokens" if mode == "balanced" else "rank_tokens"
    for mb, ga, world, speeds in (
        (64, 1, 2, (1.15, 0.85)),  # the benchmark's shape: 1B, global batch 128 on 2 GPUs
        (16, 1, 2, (0.8, 1.2)),
        (8, 4, 4, (1.1, 1.1, 0.8, 1.0)),
        (16, 1, 8, (1.0,) * 7 + (0.8,)),
    ):
        p = planners(gsm8k_lengths, mb, ga, world, mode)
        late = {"speeds": 0.0, "blind": 0.0}  # mean over steps of how far the last rank ends behind the ideal
        for step in range(60):
            b, blind = p.batches(step, speeds), p.batches(step)
            assert b.speeds == speeds and blind.speeds is None
            assert sorted(i for r in b.per_rank for m in r for i in m) == sorted(
                i for r in blind.per_rank for m in r for i in m
            )
            assert all(len(rank) == ga and all(m for m in rank) for rank in b.per_rank)
            if mode == "balanced":  # memory: a faster rank's micro-batch grows by its speed at most
                grow = max(speeds) * world / sum(speeds)  # the largest speed over the mean
                cap = max(len(m) * gsm8k_lengths[m].max() for r in blind.per_rank for m in r) * grow
                assert all(len(m) * gsm8k_lengths[m].max() <= cap for r in b.per_rank for m in r)
            ideal = sum(getattr(b, key)) / sum(speeds)  # every rank busy for the same time
            for name, plan in (("speeds", b), ("blind", blind)):
                late[name] += (max(w / s for w, s in zip(getattr(plan, key), speeds, strict=True)) / ideal - 1) / 60
        assert late["speeds"] < 0.08, (mb, ga, world, late)
        assert late["blind"] > late["speeds"] + 0.08, (mb, ga, world, late)  # control: the speed-blind split lags


# ---------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------


def test_pad_to_multiple_of_pads_the_batch_and_the_planner_counts_it(tmp_path, model_path, gsm8k_lengths):
    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:3]]
    data, _ = prepared(recipe(write_jsonl(tmp_path / "q.jsonl", rows)), model_path)
    longest = int(data.lengths()[[0, 1, 2]].max())
    batch = data.collate([0, 1, 2], pad_to=64)
    assert batch["input_ids"].shape == (3, -(-longest // 64) * 64)
    assert int(batch["attention_mask"].sum()) == int(data.lengths()[[0, 1, 2]].sum())  # padding stays masked
    # the planner's processed-token count follows the same rounding (balanced cost and metrics' compute_tokens)
    p = D.StepPlanner(
        len(gsm8k_lengths), gsm8k_lengths // 2, 8, 1, 2, seed=3, lengths=gsm8k_lengths, batching="balanced", pad_to=64
    )
    b = p.batches(0)
    rounded = -(-gsm8k_lengths // 64) * 64
    assert b.compute_tokens == [sum(len(m) * int(rounded[m].max()) for m in r) for r in b.per_rank]


def test_padded_collate_is_each_sample_right_padded(tmp_path, model_path):
    """The batch gather equals padding each sample by hand, in any index order, with repeats and pad_to."""
    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:12]]
    data, _ = prepared(recipe(write_jsonl(tmp_path / "q.jsonl", rows)), model_path)
    for indices, pad_to in (([5, 0, 11, 3], 1), ([7], 8), ([2, 2, 9, 1, 0], 64)):
        batch = data.collate(indices, pad_to=pad_to)
        width = batch["input_ids"].shape[1]
        assert width % pad_to == 0 and width == -(-int(data.lengths()[indices].max()) // pad_to) * pad_to
        for row, i in enumerate(indices):
            x, y = (np.asarray(a, dtype=np.int64) for a in data.sample(i))
            n = len(x)
            assert batch["input_ids"][row, :n].tolist() == x.tolist()
            assert batch["labels"][row, :n].tolist() == y.tolist()
            assert set(batch["input_ids"][row, n:].tolist()) <= {data.pad_token_id}
            assert set(batch["labels"][row, n:].tolist()) <= {-100}
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert all(t.dtype == torch.long for t in batch.values())


def test_packed_collate_restarts_positions_and_masks_boundaries(tmp_path, model_path):
    import torch

    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:4]]
    data, _ = prepared(recipe(write_jsonl(tmp_path / "q.jsonl", rows), train_on_responses_only=False), model_path)
    batch = data.collate([2, 0, 3], packed=True)
    lens = [int(data.lengths()[i]) for i in (2, 0, 3)]
    assert batch["input_ids"].shape == (1, sum(lens)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [p for n in lens for p in range(n)]
    assert batch["packed_seq_lengths"].tolist() == lens and batch["packed_seq_lengths"].dtype == torch.int32
    starts = np.cumsum([0] + lens[:-1])
    assert all(int(batch["labels"][0, s]) == -100 for s in starts)  # no sample predicts the next one's start
    assert int((batch["labels"][0, 1:] != -100).sum()) == int(data.loss_counts[[2, 0, 3]].sum())


def test_packed_loss_equals_samples_run_one_by_one(tmp_path, model_path):
    """Plain transformers (SDPA): a packed row gives the one-by-one loss; naive concatenation does not."""
    import torch
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in QUICKSTART_DATA.read_text().splitlines()[:5]]
    data, _ = prepared(recipe(write_jsonl(tmp_path / "q.jsonl", rows)), model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, attn_implementation="sdpa").eval()
    idx = [0, 1, 2, 3, 4]

    def loss_sum(batch) -> float:
        n = int((batch["labels"][:, 1:] != -100).sum())
        with torch.no_grad():
            return float(model(**batch, use_cache=False).loss) * n  # a KV cache turns packed detection off

    one_by_one = sum(loss_sum(data.collate([i])) for i in idx)
    padded = loss_sum(data.collate(idx))
    packed_batch = data.collate(idx, packed=True)
    packed = loss_sum(packed_batch)
    naive = loss_sum({k: v for k, v in packed_batch.items() if k not in ("position_ids", "packed_seq_lengths")})
    assert abs(padded - one_by_one) < 1e-5 * one_by_one
    assert abs(packed - one_by_one) < 2e-6 * one_by_one
    assert abs(naive - one_by_one) > 1e-4 * one_by_one  # control: attention across samples changes the loss


# ---------------------------------------------------------------------------------------------------
# `mgpu prepare`
# ---------------------------------------------------------------------------------------------------


def test_mgpu_prepare_prints_statistics_and_a_masked_example(tmp_path, monkeypatch):
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")  # the subprocess finds the tiny model in the default cache
    # a copy of the data: a fresh cache entry, while the tiny model stays in the default cache
    copy = tmp_path / "quickstart.jsonl"
    copy.write_bytes(QUICKSTART_DATA.read_bytes())
    args = ("prepare", str(ROOT / "recipes" / "quickstart.yaml"), "model.max_seq_length=96", f"dataset.path={copy}")
    proc = run_mgpu(*args, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    for needle in (
        "512 (of 512 rows)",
        "masked share",
        "p50",
        "p90",
        "p99",
        "truncated to 96",
        "masked:",
        "trained on:",
        "(written)",
        "padded",
        "balanced",
        "packed",
    ):
        assert needle in out, (needle, out)
    masked = next(line for line in out.splitlines() if line.startswith("masked:"))
    trained = next(line for line in out.splitlines() if line.startswith("trained on:"))
    assert "### Instruction" in masked and "### Response" in masked and "###" not in trained
    again = run_mgpu(*args)
    assert again.returncode == 0 and "hit: not re-tokenised" in again.stdout


def test_mgpu_prepare_bad_data_exits_2_without_traceback(tmp_path, monkeypatch):
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": oops}\n')
    proc = run_mgpu("prepare", str(ROOT / "recipes" / "quickstart.yaml"), f"dataset.path={bad}")
    assert_user_error(proc, f"{bad}:2", "malformed JSON")


# ---------------------------------------------------------------------------------------------------
# Tokenising large data
# ---------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tokenising_in_two_processes_gives_the_samples_of_one(tmp_path, model_path):
    """`dataset.num_proc: 2` splits the rows over forked processes; the samples come back in order, the same."""
    src = write_jsonl(tmp_path / "gsm8k.jsonl", json.loads(GSM8K.read_text())[:3000])
    data = {}
    for procs in (1, 2):
        cache = tmp_path / f"cache{procs}"
        args = (f"model.name={model_path}", f"dataset.path={src}", f"dataset.num_proc={procs}")
        proc = run_mgpu("prepare", str(ROOT / "recipes" / "quickstart.yaml"), *args, UNSLOTH_MGPU_CACHE=str(cache))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (folder,) = (cache / "data").iterdir()
        data[procs] = D.TokenizedData(folder)
    assert len(data[2]) == 3000
    for name in ("input_ids", "labels", "offsets", "loss_counts"):
        assert np.array_equal(getattr(data[1], name), getattr(data[2], name)), name


class _Terminal(io.StringIO):
    def isatty(self) -> bool:  # the edge: a terminal that pytest's captured output is not
        return True


def test_tokenising_large_data_shows_rows_per_second_on_a_terminal(tmp_path, model_path, monkeypatch):
    src = write_jsonl(tmp_path / "gsm8k.jsonl", json.loads(GSM8K.read_text())[:1200])
    screen = _Terminal()
    monkeypatch.setattr(sys, "stdout", screen)
    monkeypatch.setattr(D, "PROGRESS_ROWS", 1000)
    ref = prepared(recipe(src), model_path)[0]
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())  # without colours and cursor moves
    assert "tokenising" in shown and "1200/1200 rows" in shown and "rows/s" in shown, shown[-500:]
    # below the threshold nothing is drawn; the samples are the same either way
    monkeypatch.setattr(D, "PROGRESS_ROWS", 5000)
    monkeypatch.setenv("UNSLOTH_MGPU_CACHE", str(tmp_path / "other-cache"))
    screen.seek(0)
    screen.truncate()
    got = prepared(recipe(src), model_path)[0]
    assert "tokenising" not in screen.getvalue()
    assert np.array_equal(got.input_ids, ref.input_ids) and np.array_equal(got.labels, ref.labels)


def test_tokenising_large_data_in_a_log_says_so_and_reports_progress_every_ten_seconds(monkeypatch, capsys):
    """Without a terminal (CI, nohup, SLURM) tokenising 50,000 rows showed nothing for its whole duration."""
    now = [100.0]
    monkeypatch.setattr(D.time, "monotonic", lambda: now[0])
    with D.work_progress(50_000, "tokenising (2 processes)") as advance:
        for _ in range(10):  # 5,000 rows every 4 s
            now[0] += 4.0
            advance(5_000)
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "tokenising (2 processes) 50,000 rows",
        "tokenising (2 processes): 15,000/50,000 rows, 1,250 rows/s, ETA 28 s",
        "tokenising (2 processes): 30,000/50,000 rows, 1,250 rows/s, ETA 16 s",
        "tokenising (2 processes): 45,000/50,000 rows, 1,250 rows/s, ETA 4 s",
    ], lines
    with D.work_progress(D.PROGRESS_ROWS - 1, "tokenising") as advance:  # small data: nothing to wait for
        advance(D.PROGRESS_ROWS - 1)
    assert capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------------
# Bad input: every bad row named with what was expected and found (audit of the data path)
# ---------------------------------------------------------------------------------------------------


def test_a_field_that_is_no_text_is_refused_naming_line_field_and_type(tmp_path, model_path):
    f = write_jsonl(tmp_path / "t.jsonl", [{"text": 5}, {"text": True}, {"text": "fine"}, {"text": ["a"]}])
    msg = user_error(recipe(f, format="text"), model_path)
    assert f"{f}:2: text: expected text (a string or a number), found the boolean true" in msg
    assert "quote it in the file" in msg
    assert f"{f}:4: text: expected text (a string or a number), found a list of 1" in msg
    assert f"{f}:1" not in msg and f"{f}:3" not in msg  # a number is text: the answer of a maths dataset


def test_nan_infinity_blank_text_a_conversation_in_a_csv_and_cr_line_ends_are_named_as_such(tmp_path, model_path):
    """Python's json reads NaN and Infinity (JSON has neither): NaN is a missing value, and Infinity is no text to
    train on (it was trained as "inf"). A conversation stored as a CSV cell, and a file whose lines end in CR alone,
    get a hint that says what to change."""
    lines = [
        '{"instruction": "a", "output": NaN}',
        '{"instruction": "b", "output": Infinity}',
        '{"instruction": "c", "output": "  "}',
        '{"instruction": "d", "output": "fine"}',
    ]
    f = tmp_path / "odd.jsonl"
    f.write_text("\n".join(lines) + "\n")
    msg = user_error(recipe(f), model_path)
    assert f"{f}:1: output is empty (NaN: a missing value)" in msg
    assert f"{f}:2: output: expected text (a string or a number), found Infinity" in msg
    assert f"{f}:3: output is empty (only whitespace)" in msg and f"{f}:4" not in msg
    chats = [{"role": "user", "content": float("nan")}, {"role": "assistant", "content": float("-inf")}]
    c = tmp_path / "c.jsonl"
    c.write_text("".join(json.dumps({"messages": [m, {"role": "assistant", "content": "x"}]}) + "\n" for m in chats))
    msg = user_error(recipe(c, format="chat", chat_template="chatml"), model_path)
    assert f"{c}:1: messages[0].content: expected text (a string or a number), found NaN" in msg
    assert f"{c}:2: messages[0].content: expected text (a string or a number), found -Infinity" in msg
    cell = json.dumps([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}])
    csv = tmp_path / "chat.csv"
    csv.write_text('messages\n"' + cell.replace('"', '""') + '"\n')
    msg = user_error(recipe(csv, format="chat", chat_template="chatml"), model_path)
    assert f"{csv}: row 2: messages: expected a non-empty list" in msg and "write the data as JSON Lines" in msg
    cr = tmp_path / "cr.jsonl"
    cr.write_text("\r".join(json.dumps({"instruction": x, "output": x}) for x in "ab") + "\r", newline="")
    msg = user_error(recipe(cr), model_path)
    assert f"{cr}:1: malformed JSON line" in msg and "end in a carriage return (CR) alone" in msg
    crlf = tmp_path / "crlf.jsonl"  # Windows line ends are fine
    crlf.write_text("\r\n".join(json.dumps({"instruction": x, "output": x}) for x in "ab") + "\r\n", newline="")
    assert prepared(recipe(crlf), model_path)[1].samples == 2


def test_numbers_are_trained_as_their_text(tmp_path, model_path):
    numbers = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "6*7?", "input": 7, "output": 42}] * 4)
    text = write_jsonl(tmp_path / "t.jsonl", [{"instruction": "6*7?", "input": "7", "output": "42"}] * 4)
    (a, summary), (b, _) = prepared(recipe(numbers), model_path), prepared(recipe(text), model_path)
    assert summary.samples == 4
    assert [a.sample(i)[0].tolist() for i in range(4)] == [b.sample(i)[0].tolist() for i in range(4)]


def test_a_missing_field_is_named_missing_with_the_row_fields_and_the_mapping_to_fix_it(tmp_path, model_path):
    import pickle

    good = {"instruction": "a", "output": "b"}
    f = write_jsonl(tmp_path / "m.jsonl", [good, {"instruction": "a", "answer": "b"}, {"text": "raw"}])
    msg = user_error(recipe(f), model_path)
    assert f"{f}:2: output: missing" in msg and "['answer', 'instruction']" in msg
    assert "dataset.columns={output: <column>}" in msg and "is empty" not in msg
    assert f"{f}:3: instruction: missing" in msg and "dataset.format=text" in msg
    # in a mix the hint names the source's own key
    mixed = Recipe.model_validate(
        {
            "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
            "dataset": {"mix": [{"path": str(QUICKSTART_DATA)}, {"path": str(f), "weight": 100}]},
        }
    )
    assert "dataset.mix.1.columns={output: <column>}" in user_error(mixed, model_path)
    # the hint survives the trip back from a tokenizer process (dataset.num_proc > 1)
    assert pickle.loads(pickle.dumps(D._RowError("m", "h"))).hint == "h"


def test_csv_rows_that_cannot_be_parsed_are_each_named_by_row(tmp_path, model_path):
    csv = tmp_path / "p.csv"
    csv.write_text('instruction,output\nfine,ok\nc\n"x,3\n4,5\n6,"7"8\nalso,fine\nd,e,f\n')
    msg = user_error(recipe(csv), model_path)
    assert f"{csv}: row 3: expected 2 fields, as the header ['instruction', 'output'], found 1" in msg
    assert f"{csv}: row 4: cannot parse the CSV row (it runs to line 6)" in msg
    assert f"{csv}: row 8: expected 2 fields" in msg and "must be quoted" in msg
    swapped = tmp_path / "s.csv"  # the header as written, not sorted
    swapped.write_text("output,instruction\nok,fine\nc\n")
    assert "as the header ['output', 'instruction'], found 1" in user_error(recipe(swapped), model_path)
    assert f"{csv}: row 2" not in msg and f"{csv}: row 7" not in msg


def test_a_field_that_is_not_utf8_flags_only_its_row_and_csv_fields_stay_text(tmp_path, model_path):
    csv = tmp_path / "l1.csv"
    csv.write_bytes(b"instruction,output\ncaf\xe9,b\ngood,row\nok,na\xefve\n")
    msg = user_error(recipe(csv), model_path)
    assert f"{csv}: row 2: instruction: not UTF-8 text: byte 0xe9" in msg and "iconv" in msg
    assert f"{csv}: row 4: output: not UTF-8 text: byte 0xef" in msg and f"{csv}: row 3" not in msg
    # a column of numbers is text in a CSV (no type is guessed), and a field may span lines
    nums = tmp_path / "n.csv"
    nums.write_text('instruction,output\nAdd 2 and 3.,5\n"Add 4\nand 4.",8\n')
    data, s = prepared(recipe(nums), model_path)
    assert s.samples == 2 and data.loss_counts.min() > 0


def test_a_column_mapping_that_matches_no_column_is_refused(tmp_path, model_path):
    f = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    msg = user_error(recipe(f, columns={"instruction": "question"}), model_path)
    assert "dataset.columns.instruction: maps the column 'question' to instruction" in msg
    assert "its columns: ['instruction', 'output']" in msg
    share = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    c = write_jsonl(tmp_path / "c.jsonl", [{"conversations": share}])
    r = recipe(c, format="chat", columns={"messages": "conversations", "role": "role", "content": "value"})
    msg = user_error(r, model_path)
    assert "dataset.columns.role: maps the message key 'role'" in msg and "['from', 'value']" in msg


def test_a_malformed_line_does_not_hide_the_bad_rows_before_it(tmp_path, model_path):
    f = tmp_path / "six.jsonl"
    f.write_bytes(
        b'{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ""}\n{"text": 5}\n'
        b'{"instruction": "a", "answer": "b"}\n{"instruction": "a", "output": true}\n{"instruction": oops\n'
        b'[1, 2]\n{"instruction": "caf\xe9", "output": "b"}\n{"instruction": "a", "output": "b"}\n'
    )
    msg = user_error(recipe(f), model_path)
    found = [int(n) for n in re.findall(rf"{re.escape(str(f))}:(\d+)", msg)]
    assert found == [2, 3, 4, 5, 6, 7, 8], msg  # every bad line, in file order
    assert "malformed JSON line" in msg and "found a list of 2" in msg and "not UTF-8 text: byte 0xe9" in msg
    # past 20 problems the rest are counted
    many = tmp_path / "many.jsonl"
    many.write_text("{oops\n" * 25 + '{"instruction": "a", "output": ""}\n')
    assert "... and 6 more bad rows" in user_error(recipe(many), model_path)


def test_jsonl_strings_may_hold_unicode_line_separators(tmp_path, model_path):
    f = tmp_path / "u.jsonl"
    f.write_text(json.dumps({"text": "one\u2028two\x1cthree"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert prepared(recipe(f, format="text"), model_path)[1].samples == 1


def test_prepare_counts_rows_before_max_samples_and_warns_when_train_would_refuse(tmp_path, model_path, monkeypatch):
    _, s = prepared(recipe(QUICKSTART_DATA, max_samples=100), model_path)
    assert (s.samples, s.rows) == (100, 512)
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")  # the subprocess finds the tiny model in the default cache
    copy = tmp_path / "quickstart.jsonl"
    copy.write_bytes(QUICKSTART_DATA.read_bytes())
    batch = ("training.micro_batch_size=4", "distributed.num_gpus=2", "training.gradient_accumulation_steps=1")
    args = ("prepare", str(ROOT / "recipes" / "quickstart.yaml"), f"dataset.path={copy}", *batch)
    proc = run_mgpu(*args, "dataset.max_samples=5", timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "5 (of 512 rows)" in out
    assert "mgpu train will refuse" in out and "training.micro_batch_size: one optimizer step needs 8 samples" in out
    assert "dataset has 5" in out and "lower the batch settings or add data" in out
    assert "no batching table: a global batch of 8 samples is more than the 5 there are" in out


def test_a_chat_template_that_does_not_compile_or_refuses_a_row_is_named(tmp_path, model_path, monkeypatch):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT[1:3]}, {"messages": CHAT}])
    refuse = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first turn must be the user') }}{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    msg = user_error(recipe(f, format="chat", chat_template=refuse), model_path)
    assert f"{f}:2: the chat template refused this conversation: the first turn must be the user" in msg
    assert f"{f}:1" not in msg
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")
    broken = "dataset.chat_template={% for m in messages %}{{ m.content }{% endfor %}"
    args = ("prepare", str(ROOT / "recipes" / "quickstart.yaml"), f"dataset.path={f}", "dataset.format=chat", broken)
    assert_user_error(
        run_mgpu(*args), "dataset.chat_template (command line): the Jinja template does not compile: line 1"
    )


def test_an_unusable_cache_folder_is_named_without_a_traceback(tmp_path, monkeypatch):
    a_file = tmp_path / "afile"
    a_file.write_text("")
    recipe_path = str(ROOT / "recipes" / "quickstart.yaml")
    proc = run_mgpu("prepare", recipe_path, UNSLOTH_MGPU_CACHE=str(a_file))
    assert_user_error(proc, f"UNSLOTH_MGPU_CACHE ({a_file}): expected a folder, found a file")
    proc = run_mgpu("prepare", recipe_path, UNSLOTH_MGPU_CACHE=str(a_file / "sub"))
    assert_user_error(proc, "UNSLOTH_MGPU_CACHE", f"{a_file} is a file")
    monkeypatch.setenv("UNSLOTH_MGPU_CACHE", "/proc/mgpu-cache")  # not writable, even for root
    with pytest.raises(UserError, match=r"UNSLOTH_MGPU_CACHE \(/proc/mgpu-cache\): cannot write to /proc"):
        D.report(recipe(QUICKSTART_DATA))
    assert not a_file.read_text() and [p.name for p in tmp_path.iterdir()] == ["afile"]


def test_a_missing_local_path_is_not_looked_up_on_the_hub(tmp_path, model_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    for path, reason in (("nosuchfolder/", "ends with '/'"), ("a/b/c", "more than one '/'"), ("x.jsonl", ".jsonl")):
        msg = user_error(recipe(path), model_path)
        assert f"dataset.path ({path}): no such file or folder, and it cannot be a hub dataset id" in msg
        assert reason in msg and "hub dataset:" not in msg
    # a name that could be a hub id is looked up there; when that fails, the error says no local one exists either
    msg = user_error(recipe("nosuchfolder"), model_path)
    assert "dataset.path (nosuchfolder): no local file or folder of that name exists" in msg and "offline" in msg


def test_a_mapping_a_mix_source_inherits_may_be_unneeded_there(tmp_path, model_path):
    """dataset.columns maps `question` for the source that has it; a source with the format's own columns is fine."""
    q = write_jsonl(tmp_path / "q.jsonl", [{"question": "a", "output": "b"}] * 4)
    n = write_jsonl(tmp_path / "n.jsonl", [{"instruction": "c", "output": "d"}] * 4)
    mixed = Recipe.model_validate(
        {
            "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
            "dataset": {"columns": {"instruction": "question"}, "mix": [{"path": str(q)}, {"path": str(n)}]},
        }
    )
    _, summary = prepared(mixed, model_path)
    assert summary.samples == 8
    neither = write_jsonl(tmp_path / "x.jsonl", [{"prompt": "c", "output": "d"}] * 4)
    mixed.dataset.mix[1].path = str(neither)
    assert "needs column(s) ['instruction']" in user_error(mixed, model_path)
