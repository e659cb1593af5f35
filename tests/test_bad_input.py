"""Bad input: every case exits 2 with the cause and its location, no traceback, and no half-written output.

One table of cases across recipes, command-line arguments and data files. Each runs in-process through
typer's CliRunner (they all fail in the parent, before any worker starts); a few also run as real
subprocesses to prove that the user sees no traceback.
"""

from __future__ import annotations

import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, assert_user_error, run_mgpu
from typer.testing import CliRunner

from unsloth_mgpu_cli import cli

DATA = ROOT / "recipes" / "data" / "quickstart.jsonl"


def base_recipe(tmp: Path) -> dict:
    """A valid 2-CPU-worker recipe; each case breaks one thing."""
    return {
        "model": {"name": "builtin:tiny-llama", "max_seq_length": 128},
        "dataset": {"path": str(DATA), "format": "alpaca"},
        "training": {"max_steps": 2, "micro_batch_size": 2, "optimizer": "adamw", "learning_rate": 1e-3},
        "distributed": {"num_gpus": 2, "device": "cpu"},
        "output": {"dir": str(tmp / "out"), "save_steps": 0},
        "logging": {"progress": False},
    }


def write(tmp: Path, recipe: dict | str | bytes, name: str = "recipe.yaml") -> Path:
    path = tmp / name
    if isinstance(recipe, bytes):
        path.write_bytes(recipe)
    else:
        path.write_text(recipe if isinstance(recipe, str) else yaml.safe_dump(recipe, sort_keys=False))
    return path


NULL = object()  # set a key to YAML null (None deletes it)


def edit(**changes: object) -> Callable[[Path], tuple[Path, list[str]]]:
    """A case whose recipe is the base one with dotted keys set (None deletes the key, NULL makes it null)."""

    def make(tmp: Path) -> tuple[Path, list[str]]:
        r = base_recipe(tmp)
        for dotted, value in changes.items():
            *parents, last = dotted.split("__")
            node = r
            for p in parents:
                node = node.setdefault(p, {})
            if value is None:
                node.pop(last, None)
            else:
                node[last] = None if value is NULL else value
        return write(tmp, r), []

    return make


def data_file(text: str | bytes, suffix: str = ".jsonl", **changes: object) -> Callable[[Path], tuple[Path, list[str]]]:
    """A case whose dataset file holds `text`."""

    def make(tmp: Path) -> tuple[Path, list[str]]:
        f = tmp / f"data{suffix}"
        f.write_bytes(text if isinstance(text, bytes) else text.encode())
        return edit(dataset__path=str(f), **changes)(tmp)

    return make


def with_args(*args: str, setup: Callable[[Path], None] | None = None, **changes: object):
    def make(tmp: Path) -> tuple[Path, list[str]]:
        if setup is not None:
            setup(tmp)
        path, _ = edit(**changes)(tmp)
        return path, [a.replace("{tmp}", str(tmp)) for a in args]

    return make


def mix_second(text: str, weight: object = 1.0) -> Callable[[Path], tuple[Path, list[str]]]:
    """A case whose dataset is a mix of the good file and a second file holding `text`."""

    def make(tmp: Path) -> tuple[Path, list[str]]:
        f = tmp / "second.jsonl"
        f.write_text(text)
        return edit(dataset__path=None, dataset__mix=[{"path": str(DATA)}, {"path": str(f), "weight": weight}])(tmp)

    return make


def raw(text: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def make(tmp: Path) -> tuple[Path, list[str]]:
        return write(tmp, text.replace("{data}", str(DATA))), []

    return make


def _overrides(*items: str) -> Callable[[Path], tuple[Path, list[str]]]:
    def make(tmp: Path) -> tuple[Path, list[str]]:
        path, _ = edit()(tmp)
        return path, list(items)

    return make


def _missing_base(tmp: Path) -> tuple[Path, list[str]]:
    r = base_recipe(tmp)
    r["base"] = "nowhere/base.yaml"
    return write(tmp, r), []


def _base_loop(tmp: Path) -> tuple[Path, list[str]]:
    write(tmp, {"base": "b.yaml"}, "a.yaml")
    write(tmp, {"base": "a.yaml"}, "b.yaml")
    return tmp / "a.yaml", []


def _not_a_model(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "model").mkdir()
    (tmp / "model" / "weights.bin").write_text("x")
    return edit(model__name=str(tmp / "model"))(tmp)


def _output_is_file(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "file").write_text("x")
    return edit(output__dir=str(tmp / "file"))(tmp)


def _output_under_file(tmp: Path) -> tuple[Path, list[str]]:
    (tmp / "file").write_text("x")
    return edit(output__dir=str(tmp / "file" / "run"))(tmp)


def _holds_a_run(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "metrics.jsonl").write_text("{}\n")


def _finished_without_checkpoints(tmp: Path) -> None:
    """A run trained with output.save_steps: 0: its results, no checkpoint to resume."""
    _holds_a_run(tmp)
    (tmp / "out" / "summary.json").write_text("{}\n")
    (tmp / "out" / "adapter").mkdir()


def _other_files(tmp: Path) -> None:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine\n")


def _not_a_checkpoint(tmp: Path) -> None:
    (tmp / "ckpt").mkdir()


_BUSY: list[socket.socket] = []


def _busy_port(tmp: Path) -> tuple[Path, list[str]]:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    _BUSY.append(s)  # closed by the test after the command ran
    path, _ = edit()(tmp)
    return path, ["--nnodes", "2", "--node-rank", "0", "--rdzv-endpoint", f"127.0.0.1:{s.getsockname()[1]}"]


ALPACA_ROW = '{"instruction": "say hi", "input": "", "output": "hi"}\n'

# (id, command, setup, needles the user must see). Every case is a distinct cause.
CASES = [
    # --- recipe files ---
    ("recipe-missing", "validate", lambda t: (t / "nope.yaml", []), ["recipe file not found", "nope.yaml"]),
    ("recipe-empty", "validate", raw(""), ["the recipe is empty"]),
    ("recipe-not-a-mapping", "validate", raw("- a\n- b\n"), ["recipe.yaml:1", "expected a mapping"]),
    (
        "yaml-syntax",
        "validate",
        raw("model:\n  name: [unclosed\n"),
        ["recipe.yaml:2:9: YAML syntax error", "flow sequence that starts at line 2, column 9"],
    ),
    (
        "yaml-duplicate-key",
        "validate",
        raw(
            "model:\n  name: builtin:tiny-llama\ndataset:\n  path: {data}\n"
            "training:\n  epochs: 1\ntraining:\n  seed: 3\n"
        ),
        ["recipe.yaml:7", "key 'training' appears twice", "first at line 5"],
    ),
    (
        "recipe-not-utf8",
        "validate",
        lambda t: (write(t, b"model:\n  name: caf\xe9\n"), []),
        ["recipe.yaml:2", "not UTF-8 text: byte 0xe9"],
    ),
    (
        "yaml-python-tag",
        "validate",
        raw("model: !!python/object/apply:os.system ['true']\n"),
        ["recipe.yaml:1", "YAML syntax error", "YAML tags such as !!python/... are not allowed"],
    ),
    ("base-missing", "validate", _missing_base, ["base recipe not found", "nowhere/base.yaml"]),
    ("base-loop", "validate", _base_loop, ["extend each other in a loop"]),
    ("unknown-section", "validate", edit(trainng={"epochs": 1}), ["unknown key 'trainng'", "did you mean 'training'"]),
    (
        "unknown-key",
        "validate",
        edit(training__learning_rat=1e-3),
        ["training.learning_rat", "recipe.yaml:", "did you mean 'learning_rate'"],
    ),
    (
        "key-in-another-section",
        "validate",
        edit(training__lora_r=8),
        ["training.lora_r", "recipe.yaml:", "did you mean 'lora.r'? (a key of the lora section)"],
    ),
    ("missing-model", "validate", edit(model=None), ["model", "required key is missing"]),
    ("missing-dataset-path", "validate", edit(dataset__path=None), ["dataset.path", "required key is missing"]),
    ("lr-wrong-type", "validate", edit(training__learning_rate="fast"), ["training.learning_rate", "'fast'"]),
    ("lr-negative", "validate", edit(training__learning_rate=-1e-4), ["training.learning_rate", "greater than 0"]),
    ("bad-dtype", "validate", edit(model__dtype="float8"), ["model.dtype", "'float8'"]),
    ("warmup-ge-max-steps", "validate", edit(training__warmup_steps=2), ["training.warmup_steps", "fewer than"]),
    ("4bit-on-cpu", "validate", edit(model__load_in_4bit=True), ["model.load_in_4bit", "needs CUDA"]),
    (
        "4bit-full-finetune",
        "validate",
        edit(model__load_in_4bit=True, lora=NULL, distributed__device="auto"),
        ["model.load_in_4bit", "cannot be fully fine-tuned"],
    ),
    ("micro-batch-zero", "validate", edit(training__micro_batch_size=0), ["training.micro_batch_size", "found 0"]),
    ("num-gpus-zero", "validate", edit(distributed__num_gpus=0), ["distributed.num_gpus", "found 0"]),
    ("aggregation-unknown", "validate", edit(distributed__aggregation="avg"), ["distributed.aggregation", "'avg'"]),
    (
        "balance-speed-with-mean",
        "validate",
        edit(distributed__balance_speed=True, distributed__aggregation="mean"),
        ["distributed.balance_speed", "needs distributed.aggregation: weighted", "found distributed.aggregation: mean"],
    ),
    ("timeout-too-small", "validate", edit(distributed__timeout_seconds=5), ["distributed.timeout_seconds", "10"]),
    ("max-skipped-zero", "validate", edit(training__max_skipped_steps=0), ["training.max_skipped_steps"]),
    ("lora-dropout-one", "validate", edit(lora={"dropout": 1.0}), ["lora.dropout", "less than 1"]),
    ("bad-endpoint", "validate", edit(distributed__rdzv_endpoint="nohost"), ["distributed.rdzv_endpoint", "HOST:PORT"]),
    ("nnodes-no-endpoint", "validate", edit(distributed__nnodes=2), ["distributed.rdzv_endpoint", "several nodes"]),
    ("node-rank-too-big", "validate", edit(distributed__node_rank=3), ["distributed.node_rank", "found 3"]),
    ("interpolation-missing", "validate", edit(training__seed="${training.nope}"), ["interpolation failed"]),
    (
        "unknown-builtin",
        "validate",
        edit(model__name="builtin:tiny-lama"),
        ["model.name", "unknown builtin model", "did you mean 'builtin:tiny-llama'"],
    ),
    ("model-folder-missing", "validate", edit(model__name="./no-such-model"), ["model.name", "model folder not found"]),
    ("not-a-model", "validate", _not_a_model, ["model.name", "not a model folder (no config.json)"]),
    ("dataset-missing", "validate", edit(dataset__path="./missing.jsonl"), ["dataset.path", "dataset file not found"]),
    ("mix-and-path", "validate", edit(dataset__mix=[{"path": str(DATA)}]), ["dataset.mix", "not both"]),
    ("mix-weight-zero", "validate", mix_second(ALPACA_ROW, weight=0), ["dataset.mix.1.weight", "greater than 0"]),
    (
        "mix-source-missing",
        "validate",
        edit(dataset__path=None, dataset__mix=[{"path": str(DATA)}, {"path": "./missing.jsonl"}]),
        ["dataset.mix.1.path", "dataset file not found"],
    ),
    ("output-is-a-file", "validate", _output_is_file, ["output.dir", "expected a folder, found a file"]),
    ("output-under-a-file", "validate", _output_under_file, ["output.dir", "is a file"]),
    # --- command-line arguments ---
    ("override-no-equals", "validate", _overrides("training.learning_rate"), ["'training.learning_rate'", "KEY=VALUE"]),
    ("override-unknown-key", "validate", _overrides("training.lr=1e-3"), ["training.lr (command line)", "unknown key"]),
    (
        "override-bad-value",
        "validate",
        _overrides("training.epochs=many"),
        ["training.epochs (command line)", "'many'"],
    ),
    (
        "override-under-a-value",
        "validate",
        _overrides("model.name.x=1"),
        ["model.name.x (command line)", "model.name is a value", "not a section", "model.name=VALUE"],
    ),
    ("override-unknown-section", "validate", _overrides("nope.key=1"), ["nope (command line)", "unknown key 'nope'"]),
    ("resume-and-overwrite", "train", with_args("--resume", "auto", "--overwrite"), ["--resume and --overwrite"]),
    (
        "resume-not-a-checkpoint",
        "train",
        with_args("--resume", "{tmp}/ckpt", setup=_not_a_checkpoint),
        ["--resume", "not a checkpoint folder"],
    ),
    ("resume-empty", "train", with_args("--resume", "", setup=_holds_a_run), ["argument --resume", "empty value"]),
    (
        "resume-auto-over-a-finished-run",
        "train",
        with_args("--resume", "auto", setup=_finished_without_checkpoints),
        ["output.dir", "--resume auto found no checkpoint", "finished run (adapter/, summary.json)", "--overwrite"],
    ),
    (
        "resume-auto-among-other-files",
        "train",
        with_args("--resume", "auto", setup=_other_files),
        ["output.dir", "--resume auto found no checkpoint", "not a run's: notes.txt", "new or empty folder"],
    ),
    ("output-holds-a-run", "train", with_args(setup=_holds_a_run), ["output.dir", "already holds a run", "--resume"]),
    ("output-in-proc", "train", edit(output__dir="/proc/mgpu-out"), ["output.dir", "cannot write to /proc/mgpu-out"]),
    (
        "cuda-without-gpu",
        "train",
        edit(distributed__device="cuda"),
        ["distributed.device (", "recipe.yaml:", "no GPU is visible"],
    ),
    (
        "node-rank-arg",
        "train",
        with_args("--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29999"),
        ["--node-rank", "expected 0..1", "found 2"],
    ),
    ("nnodes-arg-no-endpoint", "train", with_args("--nnodes", "2"), ["--rdzv-endpoint", "HOST:PORT"]),
    ("rdzv-port-in-use", "train", _busy_port, ["argument --rdzv-endpoint", "already in use"]),
    # --- data files ---
    ("data-empty-file", "train", data_file(""), ["dataset.path", "the dataset file is empty"]),
    (
        "data-malformed-jsonl",
        "train",
        data_file(ALPACA_ROW * 3 + '{"instruction": "x", "output": \n' + ALPACA_ROW),
        ["data.jsonl:4", "malformed JSON line"],
    ),
    (
        "data-missing-column",
        "train",
        data_file('{"instruction": "a", "answer": "b"}\n' * 8),
        ["data.jsonl", "needs column(s) ['output']"],
    ),
    (
        "data-not-utf8",
        "train",
        data_file((ALPACA_ROW * 2).encode() + '{"instruction": "caf\u00e9", "output": "b"}\n'.encode("latin-1")),
        ["data.jsonl:3", "not UTF-8 text: byte 0xe9", "iconv"],
    ),
    (
        "data-csv-not-utf8",
        "train",
        data_file(b"instruction,output\n" + "caf\u00e9,b\n".encode("latin-1") * 8, suffix=".csv"),
        ["data.csv: row 2", "instruction: not UTF-8 text", "iconv"],
    ),
    ("data-unsupported-type", "train", data_file("hello\n", suffix=".txt"), ["unsupported file type '.txt'"]),
    (
        "data-mix-second-malformed",
        "train",
        mix_second(ALPACA_ROW * 2 + '{"instruction": "x", "output": \n'),
        ["second.jsonl:3", "malformed JSON line"],
    ),
    (
        "data-null-field",
        "train",
        data_file(ALPACA_ROW * 4 + '{"instruction": null, "output": "x"}\n' + ALPACA_ROW * 4),
        ["data.jsonl:5", "instruction is empty"],
    ),
    (
        "data-text-empty",
        "train",
        data_file('{"text": "ok"}\n{"text": ""}\n' * 4, dataset__format="text"),
        ["data.jsonl:2", "text"],
    ),
    (
        "data-field-not-a-string",
        "train",
        data_file('{"text": "ok"}\n{"text": true}\n' * 4, dataset__format="text"),
        ["data.jsonl:2", "text: expected text (a string or a number), found the boolean true"],
    ),
    (
        "data-all-too-long",
        "train",
        data_file(ALPACA_ROW.replace("hi", "hi " * 40) * 8, model__max_seq_length=16, dataset__too_long="drop"),
        ["no samples left", "max_seq_length"],
    ),
    ("global-batch-too-big", "train", data_file(ALPACA_ROW * 3), ["training.micro_batch_size", "dataset has 3"]),
    (
        "global-batch-too-big-after-eval-split",  # was refused only in the workers (exit 1, output.dir written)
        "train",
        data_file(ALPACA_ROW * 5, dataset__eval_ratio=0.3),
        ["training.micro_batch_size", "dataset has 3 to train on (2 of 5 held out by dataset.eval_ratio)"],
    ),
    # --- mistakes that used to surface only in the workers, after the model loaded ---
    (
        "lora-target-typo",
        "train",
        edit(lora__target_modules=["q_prj", "v_proj"]),
        ["lora.target_modules", "no layer named 'q_prj'", "did you mean 'q_proj'?"],
    ),
    ("attention-kernel-needs-cuda", "train", edit(model__attention="cudnn"), ["model.attention", "only on CUDA"]),
    ("seed-too-large", "train", edit(training__seed=2**64), ["training.seed", "4294967295"]),
    (
        "model-not-cached-offline",
        "train",
        edit(model__name="unsloth/not-cached-model"),
        ["model.name (unsloth/not-cached-model)", "cannot load its tokenizer", "download the model once"],
    ),
    # --- silently read another way before ---
    ("number-given-a-boolean", "validate", edit(lora__r=True), ["lora.r", "found the boolean true"]),
    ("dataset-folder-missing", "validate", edit(dataset__path="nosuchfolder/"), ["dataset.path", "not found"]),
]


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    for k, v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "UNSLOTH_DISABLE_STATISTICS": "1"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)


def documented_excerpts() -> dict[str, str]:
    """docs/reliability.md's bad-input table: case -> the first `quoted` excerpt of "the user sees"."""
    text = (ROOT / "docs" / "reliability.md").read_text()
    table = text.split("## Bad input (exit 2", 1)[1].split("\n## ", 1)[0]
    out = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and (quoted := re.search(r"`([^`]+)`", cells[2])):
            out[cells[0]] = quoted.group(1)
    return out


DOCUMENTED = documented_excerpts()
UNDOCUMENTED: set[str] = set()  # cases deliberately left out of the docs table (none)


def matches_excerpt(excerpt: str, out: str) -> bool:
    """The excerpt's text appears in `out` in order, whitespace aside; `...` elides, and `N`, `L:C`, `P` stand for
    numbers (a line, a column, a port)."""
    flat = " ".join(out.split())
    parts = []
    for piece in re.split(r"\.\.\.|; hint:", " ".join(excerpt.split())):
        piece = re.escape(piece.strip())
        piece = re.sub(r"\bL:C\b", r"\\d+:\\d+", piece)
        piece = re.sub(r"(?<=:)N\b|\bP\b", r"\\d+", piece)
        parts.append(piece)
    return re.search(".*?".join(parts), flat) is not None


def test_every_case_is_in_the_docs_table_and_every_row_is_a_case():
    elsewhere = {"cache-is-a-file"}  # test_train_with_a_cache_that_is_a_file_is_refused_before_the_model_is_built
    assert set(DOCUMENTED) - {c[0] for c in CASES} == elsewhere, "documented rows without a case"
    missing = [c[0] for c in CASES if c[0] not in DOCUMENTED and c[0] not in UNDOCUMENTED]
    assert missing == [], "cases missing from docs/reliability.md"


@pytest.mark.parametrize(("case", "cmd", "setup", "needles"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_the_cause_and_writes_nothing(tmp_path, case, cmd, setup, needles):
    recipe, args = setup(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    try:
        result = CliRunner().invoke(cli.app, [cmd, str(recipe), *args])
    finally:
        while _BUSY:
            _BUSY.pop().close()
    out = result.output
    assert result.exit_code == 2, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert "Traceback" not in out
    for needle in needles:
        assert needle in out, f"{needle!r} not in:\n{out}"
    if case in DOCUMENTED:  # what docs/reliability.md quotes is what the user sees
        assert matches_excerpt(DOCUMENTED[case], out), f"docs/reliability.md quotes {DOCUMENTED[case]!r}; got:\n{out}"
    # nothing half-written: the folder holds exactly what the case put there
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_the_table_has_at_least_30_distinct_causes():
    assert len({c[0] for c in CASES}) == len(CASES) >= 30


def test_a_yaml_python_tag_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    recipe = write(tmp_path, f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    proc = run_mgpu("validate", str(recipe), timeout=60)
    assert_user_error(proc, "YAML syntax error")
    assert not marker.exists()


@pytest.mark.parametrize("case", ["unknown-key", "data-malformed-jsonl", "output-under-a-file"])
def test_real_subprocess_shows_no_traceback(tmp_path, case):
    cmd, setup, needles = next(c[1:] for c in CASES if c[0] == case)
    recipe, args = setup(tmp_path)
    proc = run_mgpu(cmd, str(recipe), *args, cwd=tmp_path, timeout=120)
    assert_user_error(proc, *needles)
    assert not (tmp_path / "out").exists()


def test_train_with_a_cache_that_is_a_file_is_refused_before_the_model_is_built(tmp_path):
    recipe, _ = edit()(tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    proc = run_mgpu("train", str(recipe), cwd=tmp_path, timeout=120, UNSLOTH_MGPU_CACHE=str(tmp_path / "cache"))
    assert_user_error(proc, "UNSLOTH_MGPU_CACHE", "expected a folder, found a file")
    assert matches_excerpt(DOCUMENTED["cache-is-a-file"], proc.stdout + proc.stderr)  # its row in the docs' table
    assert not (tmp_path / "out").exists()


def test_a_disk_without_room_is_refused_before_training(tmp_path, monkeypatch):
    """The failing disk is the edge here: `shutil.disk_usage` reports 1 kB free."""
    recipe, _ = edit()(tmp_path)
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1024))
    result = CliRunner().invoke(cli.app, ["train", str(recipe)])
    assert result.exit_code == 2, result.output
    assert "not enough disk space" in result.output and "output.dir" in result.output
    assert "has 1 KiB free; this run writes about" in " ".join(result.output.split())  # not "0.00 GB"
    assert not (tmp_path / "out").exists()
