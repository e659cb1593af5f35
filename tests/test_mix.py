"""Weighted mixing of several datasets (`dataset.mix`): the recipe keys, the per-source quotas (down- and
upsampling), each source tokenised with its own format, determinism, the cache key, bad data named by the
source's file:line, `mgpu prepare`'s per-source counts, and one `mgpu train` run of a mix on 2 CPU workers.

Every sample of a mixed cache is traced back to its source row by its exact token ids, so the counts below
are counts of real tokenised samples, not of a plan.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import ROOT, assert_user_error, run_mgpu

from unsloth_mgpu_cli import data as D
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.models import cache_dir
from unsloth_mgpu_cli.recipe import Recipe, load_recipe

# Distinct rows, so each tokenised sample names exactly one source row.
ALPACA = [{"instruction": f"Write the number {i} in words.", "input": "", "output": f"number {i}"} for i in range(40)]
CHATS = [
    {"messages": [{"role": "user", "content": f"What comes after {i}?"}, {"role": "assistant", "content": str(i + 1)}]}
    for i in range(10)
]


@pytest.fixture(autouse=True)
def _fresh_data_cache(data_cache):
    """Every test here tokenises into its own cache (conftest's data_cache)."""


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def files(tmp_path) -> tuple[Path, Path]:
    """An alpaca source of 40 rows and a chat source of 10."""
    return write_jsonl(tmp_path / "alpaca.jsonl", ALPACA), write_jsonl(tmp_path / "chat.jsonl", CHATS)


def mix_recipe(a: Path, c: Path, wa: float = 1.0, wc: float = 1.0, seed: int = 42, **dataset) -> Recipe:
    """alpaca source `a` (the dataset section's format) and chat source `c` (its own format)."""
    mix = [{"path": str(a), "weight": wa}, {"path": str(c), "weight": wc, "format": "chat"}]
    return Recipe.model_validate(
        {
            "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
            "dataset": {"mix": mix, **dataset},
            "training": {"seed": seed},
        }
    )


def traced(r: Recipe, model_path: str, tokenizer) -> tuple[list[tuple[int, int]], D.PrepareSummary, Path]:
    """Prepare the mix and name the (source, row) of every sample, checking its labels on the way."""
    folder, summary, _ = D.prepare(r, model_path)
    data = D.TokenizedData(folder)
    lookup = {}
    for k, src in enumerate(r.dataset.sources()):
        enc = D.encoding_of(r, src.section)  # the source's own format and masking
        for j, row in enumerate(D.load_rows(src.section).rows):
            ids, labels = D.encode_row(row, tokenizer, enc)
            lookup[tuple(ids)] = (k, j, tuple(labels))
    out = []
    for i in range(len(data)):
        ids, labels = data.sample(i)
        k, j, want = lookup[tuple(int(x) for x in ids)]  # KeyError: a sample no source row gives
        assert tuple(int(x) for x in labels) == want
        out.append((k, j))
    return out, summary, folder


# ---------------------------------------------------------------------------------------------------
# Quotas, down- and upsampling, formats
# ---------------------------------------------------------------------------------------------------


def test_quotas_add_up_and_stay_within_one_sample_of_the_exact_share():
    assert D.mix_quotas(50, [1, 1]) == [25, 25]
    assert D.mix_quotas(10, [1, 1, 1]) == [4, 3, 3]  # round() would give 9 samples
    assert D.mix_quotas(7, [0.5, 0.25, 0.25]) == [3, 2, 2]  # 3.5, 1.75, 1.75: the largest remainders get one
    assert D.mix_quotas(5, [1, 1000]) == [0, 5]
    rng = np.random.default_rng(0)
    for _ in range(200):
        w = rng.uniform(0.01, 10, size=int(rng.integers(1, 6)))
        total = int(rng.integers(1, 10_000))
        q = D.mix_quotas(total, list(w))
        assert sum(q) == total
        assert all(abs(qi - total * wi / w.sum()) < 1 for qi, wi in zip(q, w, strict=True))


def test_each_source_gives_its_weighted_share_with_its_own_format(files, model_path, tokenizer):
    a, c = files
    # N = 40 + 10 = 50, equal weights: 25 each. alpaca: 25 of its 40 rows, each at most once.
    # chat: 25 from 10 rows, i.e. two whole passes plus 5 rows drawn a third time.
    got, summary, _ = traced(mix_recipe(a, c), model_path, tokenizer)
    per_source = Counter(k for k, _ in got)
    assert per_source == {0: 25, 1: 25} and summary.samples == 50 and summary.rows == 50
    alpaca_rows = Counter(j for k, j in got if k == 0)
    assert len(alpaca_rows) == 25 and set(alpaca_rows.values()) == {1}  # without replacement
    chat_rows = Counter(j for k, j in got if k == 1)
    assert set(chat_rows) == set(range(10)) and sorted(chat_rows.values()) == [2] * 5 + [3] * 5
    owners = [k for k, _ in got]
    assert owners != sorted(owners) and owners != sorted(owners, reverse=True)  # stored interleaved
    m0, m1 = summary.mix
    fields = [(m.key, m.format, m.rows, m.taken, m.share, m.upsampled) for m in summary.mix]
    assert fields == [("dataset.mix.0", "alpaca", 40, 25, 0.5, False), ("dataset.mix.1", "chat", 10, 25, 0.5, True)]
    assert m0.source == str(a) and m1.source == str(c) and "upsampled x2.50" in m1.describe()
    assert "15 rows not drawn" in m0.describe()  # equal weights: 25 of its 40 rows, said (it looked like all)


def test_max_samples_sets_the_mix_size_and_weights_split_it(files, model_path, tokenizer):
    a, c = files
    got, summary, _ = traced(mix_recipe(a, c, wa=3, wc=1, max_samples=20), model_path, tokenizer)
    assert Counter(k for k, _ in got) == {0: 15, 1: 5}
    assert len({j for k, j in got if k == 1}) == 5  # 5 of the 10 chats: downsampled, no repeats
    assert [m.upsampled for m in summary.mix] == [False, False]
    # 3:1 of 50 is 37.5 / 12.5: the quotas still add up to 50
    got, summary, _ = traced(mix_recipe(a, c, wa=3, wc=1), model_path, tokenizer)
    assert Counter(k for k, _ in got) == {0: 38, 1: 12} and [m.taken for m in summary.mix] == [38, 12]
    assert [m.upsampled for m in summary.mix] == [False, True]


def test_a_text_source_trains_on_every_token_next_to_a_masked_alpaca_source(files, model_path, tokenizer):
    a, _ = files
    t = write_jsonl(a.parent / "text.jsonl", [{"text": f"plain text number {i}"} for i in range(6)])
    r = Recipe.model_validate(
        {
            "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
            "dataset": {"mix": [{"path": str(a)}, {"path": str(t), "format": "text", "weight": 2}]},
        }
    )
    got, summary, folder = traced(r, model_path, tokenizer)  # labels checked against each source's own masking
    data = D.TokenizedData(folder)
    text_samples = [i for i, (k, _) in enumerate(got) if k == 1]
    assert len(text_samples) == summary.mix[1].taken == 31  # 46 x 2/3 = 30.67
    assert all(data.loss_counts[i] == data.lengths()[i] - 1 for i in text_samples)
    assert all(data.loss_counts[i] < data.lengths()[i] / 2 for i, (k, _) in enumerate(got) if k == 0)


# ---------------------------------------------------------------------------------------------------
# Determinism and the cache key
# ---------------------------------------------------------------------------------------------------


def test_same_seed_same_cache_another_seed_another_draw_and_order(files, model_path, tokenizer, tmp_path, monkeypatch):
    a, c = files
    first, _, folder1 = traced(mix_recipe(a, c), model_path, tokenizer)
    monkeypatch.setenv("UNSLOTH_MGPU_CACHE", str(tmp_path / "another-cache"))  # tokenised again from scratch
    again, _, folder2 = traced(mix_recipe(a, c), model_path, tokenizer)
    assert folder1 != folder2 and folder1.name == folder2.name and first == again
    for name in ("input_ids.npy", "labels.npy", "offsets.npy"):
        assert (folder1 / name).read_bytes() == (folder2 / name).read_bytes()
    other, summary, folder3 = traced(mix_recipe(a, c, seed=7), model_path, tokenizer)
    assert folder3.name != folder1.name and other != first
    assert Counter(k for k, _ in other) == {0: 25, 1: 25}  # the quotas do not depend on the seed


def test_the_cache_key_covers_weights_formats_and_every_source(files, model_path, monkeypatch):
    a, c = files
    base = D._fingerprint(mix_recipe(a, c), model_path)
    assert D._fingerprint(mix_recipe(a, c), model_path) == base
    assert D._fingerprint(mix_recipe(a, c, wc=2.0), model_path) != base
    r = mix_recipe(a, c)
    r.dataset.mix[1].chat_template = "chatml"
    assert D._fingerprint(r, model_path) != base
    swapped = mix_recipe(c, a)
    swapped.dataset.mix[0].format, swapped.dataset.mix[1].format = "chat", None
    assert D._fingerprint(swapped, model_path) != base  # same files and formats, other order
    write_jsonl(c, CHATS[:9])  # the second source's bytes
    assert D._fingerprint(mix_recipe(a, c), model_path) != base
    # a hit reads the per-source counts back from the cache without loading the tokenizer
    _, s1, hit1 = D.prepare(mix_recipe(a, c), model_path)
    monkeypatch.setattr(D, "_load_tokenizer", lambda *a, **k: pytest.fail("tokenizer loaded on a cache hit"))
    _, s2, hit2 = D.prepare(mix_recipe(a, c), model_path)
    assert (hit1, hit2) == (False, True) and s1 == s2 and isinstance(s2.mix[1], D.SourceCount)


# ---------------------------------------------------------------------------------------------------
# Bad data and bad recipes
# ---------------------------------------------------------------------------------------------------


def user_error(r: Recipe, model_path: str) -> str:
    with pytest.raises(UserError) as exc:
        D.prepare(r, model_path)
    return str(exc.value)


def test_a_bad_row_in_the_second_source_is_named_by_its_file_and_line(files, model_path):
    a, c = files
    bot = {"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}
    write_jsonl(c, [*CHATS[:3], bot, *CHATS[4:]])
    msg = user_error(mix_recipe(a, c), model_path)
    assert f"{c}:4" in msg and "messages[1].role" in msg and "'bot'" in msg and str(a) not in msg
    # downsampled: only the drawn rows are tokenised, and a bad one is still named by its line in the file
    drawn = D.mix_rows(10, 5, 42, 1)  # what the chats give to 3:1 of max_samples=20 (seed 42, second source)
    row = int(drawn[-1])
    assert row != len(drawn) - 1  # its place among the drawn rows differs from its place in the file
    write_jsonl(c, [*CHATS[:row], bot, *CHATS[row + 1 :]])
    msg = user_error(mix_recipe(a, c, wa=3, max_samples=20), model_path)
    assert f"{c}:{row + 1}" in msg and "'bot'" in msg
    write_jsonl(c, CHATS)
    c.write_text(c.read_text().replace(json.dumps(CHATS[4]), '{"messages": [oops'))
    msg = user_error(mix_recipe(a, c), model_path)
    assert f"{c}:5" in msg and "malformed JSON line" in msg
    # problems in both sources are reported together, each with its own key
    write_jsonl(a, [{"question": "q", "output": "o"}])
    msg = user_error(mix_recipe(a, c), model_path)
    assert "needs column(s) ['instruction']" in msg and "dataset.mix.0.columns" in msg and f"{c}:5" in msg
    assert not list((a.parent / "cache").rglob("*.npy"))  # no cache written


def test_a_recipe_needs_exactly_one_of_path_and_mix_and_names_bad_mix_keys(tmp_path, files):
    a, c = files
    model = {"name": "builtin:tiny-llama"}

    def problems(dataset: dict, overrides: tuple[str, ...] = ()) -> str:
        with pytest.raises(UserError) as exc:
            load_recipe(None, list(overrides), data={"model": model, "dataset": dataset})
        return str(exc.value)

    both = problems({"path": str(a), "mix": [{"path": str(c)}]})
    assert "dataset.mix" in both and "not both" in both
    neither = problems({"format": "chat"})
    assert "dataset.path" in neither and "required key is missing" in neither and "dataset.mix" in neither
    msg = problems({"mix": [{"path": str(a)}, {"path": str(c), "weight": 0, "wieght": 2}]})
    assert "dataset.mix.1.weight" in msg and "greater than 0" in msg and "did you mean 'weight'" in msg
    assert "dataset.mix.0.weight (command line)" in problems({"mix": [{"path": str(a)}]}, ("dataset.mix.0.weight=-1",))
    msg = problems({"mix": [{"path": str(a)}, {"path": str(c), "format": "chat", "columns": {"output": "x"}}]})
    assert "dataset.mix.1.columns.output" in msg and "unknown column name for format chat" in msg
    msg = problems({"columns": {"output": "answer"}, "mix": [{"path": str(a)}, {"path": str(c), "format": "chat"}]})
    assert "dataset.mix.1.columns" in msg and "give the source its own columns" in msg
    msg = problems({"mix": [{"path": str(a)}, {"path": "./nope.jsonl"}]})
    assert "dataset.mix.1.path" in msg and "dataset file not found" in msg


def test_mix_paths_resolve_against_the_recipe_and_take_the_section_defaults(tmp_path, files, monkeypatch):
    a, c = files
    monkeypatch.chdir(ROOT)  # anywhere but the recipe's folder
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "builtin:tiny-llama"},
                "dataset": {
                    "format": "chat",
                    "split": "dev",
                    "mix": [{"path": a.name, "format": "alpaca", "weight": 3}, {"path": c.name}],
                },
            }
        )
    )
    r = load_recipe(recipe, ["dataset.mix.1.weight=0.5"]).recipe
    s0, s1 = r.dataset.sources()
    assert (s0.section.path, s0.section.format, s0.weight) == (str(a), "alpaca", 3.0)
    assert (s1.section.path, s1.section.format, s1.section.split, s1.weight) == (str(c), "chat", "dev", 0.5)
    assert s0.key_of("format") == "dataset.mix.0.format" and s1.key_of("format") == "dataset.format"
    assert r.dataset.mix[0].path == str(a)  # resolved in the recipe itself too (recipe.resolved.yaml)


def test_an_eval_file_next_to_a_mix_is_read_with_the_dataset_format(files, model_path):
    a, c = files
    e = write_jsonl(a.parent / "eval.jsonl", ALPACA[:7])
    r = mix_recipe(a, c, eval_path=str(e))
    folder, summary, _ = D.prepare_eval(r, model_path)
    assert summary.samples == 7 and summary.mix == [] and D.TokenizedData(folder).meta["source"] == str(e)


# ---------------------------------------------------------------------------------------------------
# The real CLI
# ---------------------------------------------------------------------------------------------------


def write_recipe(folder: Path, a: Path, c: Path, **extra) -> Path:
    r = {
        "model": {"name": "builtin:tiny-llama", "max_seq_length": 96},
        "dataset": {"mix": [{"path": a.name, "weight": 1}, {"path": c.name, "weight": 1, "format": "chat"}]},
        "training": {"micro_batch_size": 4, "max_steps": 3, "optimizer": "adamw", "seed": 42},
        "distributed": {"num_gpus": 2, "device": "cpu", "aggregation": "weighted"},
        "output": {"dir": "out", "save_steps": 0},
        "logging": {"progress": False},
        **extra,
    }
    path = folder / "mix.yaml"
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def test_mgpu_prepare_prints_per_source_counts_and_bad_data_exits_2(files, tmp_path, monkeypatch):
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")  # the subprocess finds the tiny model in the default cache
    a, c = files
    recipe = write_recipe(tmp_path, a, c)
    proc = run_mgpu("prepare", str(recipe), cwd=tmp_path, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "50 (of 50 rows)" in out and "mix: samples drawn from each source" in out
    rows = {line.split("│")[1].strip(): [x.strip() for x in line.split("│")[2:-1]] for line in out.splitlines()
            if line.startswith("│ 0 ") or line.startswith("│ 1 ")}  # fmt: skip
    assert rows["0"] == ["alpaca.jsonl", "alpaca", "1", "40", "25", "50.0%", "x0.62"]
    assert rows["1"] == ["chat.jsonl", "chat", "1", "10", "25", "50.0%", "x2.50"]
    bad = [*CHATS[:5], {"messages": [{"role": "user", "content": [3]}]}, *CHATS[6:]]
    write_jsonl(c, bad)
    proc = run_mgpu("prepare", str(recipe), cwd=tmp_path, timeout=300)
    assert_user_error(proc, f"{c}:6", "messages[0].content: expected text")


@pytest.mark.integration
def test_mgpu_train_on_a_mix_with_two_workers_trains_the_planned_samples(files, tmp_path, monkeypatch, model_path):
    monkeypatch.delenv("UNSLOTH_MGPU_CACHE")
    a, c = files
    recipe = write_recipe(tmp_path, a, c)
    proc = run_mgpu("train", str(recipe), cwd=tmp_path, timeout=400)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "dataset.mix.1: " in proc.stdout and "upsampled x2.50" in proc.stdout
    metrics = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3] and all(np.isfinite(m["loss"]) for m in metrics)
    # the engine trained on the mixed cache, step by step as the unchanged planner lays it out
    loaded = load_recipe(recipe).recipe
    tok = D.TokenizedData(cache_dir() / "data" / D._fingerprint(loaded, model_path))
    assert len(tok) == 50 and tok.meta["format"] == "mix"
    plan = D.StepPlanner(len(tok), tok.loss_counts, 4, 1, 2, 42, lengths=tok.lengths(), batching="balanced")
    for m in metrics:
        b = plan.batches(m["step"] - 1)
        assert m["loss_tokens"] == b.global_loss_tokens and m["tokens"] == sum(b.rank_tokens)
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").exists()
    resolved = yaml.safe_load((tmp_path / "out" / "recipe.resolved.yaml").read_text())
    assert [s["path"] for s in resolved["dataset"]["mix"]] == [str(a), str(c)] and resolved["dataset"]["path"] is None
