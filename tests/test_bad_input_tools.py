"""Bad input to the tools around training (`report`, `suggest`, `doctor`, `init`): exit 2, no traceback, the flag or
file named, nothing written. Each test runs the real `mgpu` in a subprocess (CPU only, no training).

The run folders are synthetic: `metrics.jsonl` and `summary.json` in the format `mgpu train` writes (trainer.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import LLAMA_CONFIG, ROOT, assert_user_error, run_mgpu

# --- mgpu report -------------------------------------------------------------------------------------------


def _row(step: int, gpus: int = 2) -> dict:
    """One logged step as the engine writes it (the fields the report reads, and a few more)."""
    return {
        "step": step,
        "epoch": 0,
        "loss": 3.0 - step / 10,
        "learning_rate": 1e-3,
        "grad_norm": 1.0,
        "tokens": 100,
        "loss_tokens": 80,
        "tokens_per_second": 50.0,
        "elapsed_s": 2.0 * step,
        "peak_memory_gb": [1.0 + step / 10] * gpus,
        "skipped_steps": 0,
    }


def _run_folder(path: Path, rows: list[dict] | None = None, summary: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    rows = rows if rows is not None else [_row(s) for s in (1, 2, 3)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if summary is not None:
        (path / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return path


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_a_synthetic_run_reports_and_plots(tmp_path):
    """The control: the folder the other report tests damage is a good run."""
    run = _run_folder(tmp_path / "run", summary={"steps": 3, "run_tokens": 300, "device_type": "cpu"})
    proc = run_mgpu("report", str(run), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "per worker (2 workers)" in proc.stdout and "skipped" not in proc.stdout
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ("{bad", ["summary.json:1", "not valid JSON", "mv "]),
        ("[1, 2]", ["summary.json", "expected a JSON object", "found list"]),
        ('{"run_tokens": "many"}', ["summary.json", "run_tokens: expected a number", '"many"']),
    ],
    ids=["garbled", "a-list", "wrong-type"],
)
def test_a_damaged_summary_is_an_error_naming_the_file(tmp_path, text, needles):
    run = _run_folder(tmp_path / "run")
    (run / "summary.json").write_text(text, encoding="utf-8")
    before = _files(tmp_path)
    assert_user_error(run_mgpu("report", str(run), timeout=120), *needles)
    assert _files(tmp_path) == before  # no report.png


def test_damaged_metrics_lines_are_skipped_with_a_warning_naming_file_and_line(tmp_path):
    """A hand-edited row and the half-written last line of a killed run: the other steps are still reported."""
    run = _run_folder(tmp_path / "run")
    with (run / "metrics.jsonl").open("a", encoding="utf-8") as f:
        f.write('{"step": 4, "loss": "x"}\n{"step": 5, "lo')
    proc = run_mgpu("report", str(run), timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "Traceback" not in out
    assert f'{run / "metrics.jsonl"}:4: loss: expected a number, found "x"' in proc.stderr, proc.stderr
    assert f"{run / 'metrics.jsonl'}:5: not a JSON line" in proc.stderr, proc.stderr
    assert "2 damaged line(s)" in proc.stdout and "2.7000" in proc.stdout  # step 3's loss: the last good row
    assert (run / "report.png").read_bytes()[:4] == b"\x89PNG"


def test_metrics_without_a_usable_line_are_an_error_naming_file_and_line(tmp_path):
    run = _run_folder(tmp_path / "run", rows=[])
    (run / "metrics.jsonl").write_text("[1]\n" + json.dumps({"step": "one", "loss": 1.0}) + "\n", encoding="utf-8")
    before = _files(tmp_path)
    proc = run_mgpu("report", str(run), timeout=120)
    assert_user_error(proc, "metrics.jsonl:1: expected a JSON object", "metrics.jsonl:2: step: expected an integer")
    assert "no usable row" in proc.stderr
    assert _files(tmp_path) == before


def test_rows_of_different_gpu_counts_are_reported(tmp_path):
    """A sharded run resumed on more GPUs logs rows of different lengths (an IndexError before)."""
    run = _run_folder(tmp_path / "run", rows=[_row(1, gpus=1), _row(2, gpus=2), _row(3, gpus=2)])
    proc = run_mgpu("report", str(run), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1.30 / 1.30 GB per GPU" in proc.stdout, proc.stdout


@pytest.mark.parametrize(
    ("png", "needles"),
    [
        ("x.txt", ["argument --png", "expected a file name ending in .png, found 'x.txt'", "--png x.png"]),
        (".", ["argument --png", "found the folder .", "--png report.png"]),
        ("nonexist/dir/r.png", ["argument --png", "folder nonexist/dir does not exist", "mkdir -p nonexist/dir"]),
        ("run/metrics.jsonl/r.png", ["argument --png", "is a file, not a folder"]),
    ],
    ids=["not-png", "a-folder", "missing-folder", "under-a-file"],
)
def test_a_bad_png_path_is_refused_before_anything_is_written(tmp_path, png, needles):
    _run_folder(tmp_path / "run")
    before = _files(tmp_path)
    assert_user_error(run_mgpu("report", "run", "--png", png, cwd=tmp_path, timeout=120), *needles)
    assert _files(tmp_path) == before  # no ./.png, no nonexist/, no run/report.png


def test_a_png_path_in_an_existing_folder_is_written(tmp_path):
    run = _run_folder(tmp_path / "run")
    (tmp_path / "plots").mkdir()
    proc = run_mgpu("report", str(run), "--png", str(tmp_path / "plots" / "r.png"), timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "plots" / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["r.png"]  # no temporary file left


# --- mgpu suggest --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "needles"),
    [
        ([1], ["expected a JSON object of model settings, found list"]),
        ({**LLAMA_CONFIG, "num_attention_heads": 0}, ["num_attention_heads: expected a positive integer, found 0"]),
        ({**LLAMA_CONFIG, "hidden_size": "1024"}, ['hidden_size: expected a positive integer, found "1024"']),
        ({**LLAMA_CONFIG, "num_key_value_heads": -4}, ["num_key_value_heads: expected a positive integer, found -4"]),
        ({"text_config": [LLAMA_CONFIG]}, ["text_config: expected an object, found list"]),
        ({"text_config": {**LLAMA_CONFIG, "vocab_size": 1.5}}, ["text_config.vocab_size: expected a positive"]),
    ],
    ids=["a-list", "zero-heads", "string-width", "negative-kv-heads", "text-config-list", "fractional-vocab"],
)
def test_a_bad_config_json_is_an_error_naming_the_file_and_the_field(tmp_path, config, needles):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    proc = run_mgpu("suggest", "--model", str(model), "--gpu-memory", "24GB", timeout=60)
    assert_user_error(proc, "argument --model", str(model / "config.json"), *needles)


def test_a_good_config_json_still_plans(tmp_path):
    """The control for the config checks: dense with `num_experts: 0` and `head_dim: null`, as some configs write."""
    model = tmp_path / "m"
    model.mkdir()
    config = {**LLAMA_CONFIG, "num_experts": 0, "head_dim": None}
    (model / "config.json").write_text(json.dumps(config), encoding="utf-8")
    proc = run_mgpu("suggest", "--model", str(model), "--gpu-memory", "24GB", "--json", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(proc.stdout)["fits"] is True


@pytest.mark.parametrize(
    ("model", "needles"),
    [
        ("7", ["argument --model", "a number without its unit, '7'", "did you mean '7B'?"]),
        ("1.5", ["argument --model", "a number without its unit, '1.5'", "did you mean '1.5B'?"]),
        ("", ["argument --model", "found an empty value", "known sizes: 0.5B, 1B"]),
        ("./no/such/dir", ["argument --model", "no such file or folder", "no/such/dir"]),
    ],
    ids=["no-unit", "no-unit-decimal", "empty", "missing-folder"],
)
def test_suggest_names_a_model_it_cannot_size(model, needles):
    assert_user_error(run_mgpu("suggest", "--model", model, "--gpu-memory", "24GB", timeout=60), *needles)


def test_suggest_output_refuses_an_existing_file_without_force_like_init(tmp_path):
    out = tmp_path / "r.yaml"
    out.write_text("mine\n", encoding="utf-8")
    args = ["suggest", "--model", "8B", "--gpu-memory", "24GB", "--output", str(out)]
    proc = run_mgpu(*args, timeout=60)
    assert_user_error(proc, "argument --output", f"{out} exists", "--force")
    assert proc.stdout == ""  # refused before the plan was printed
    assert out.read_text() == "mine\n"
    proc = run_mgpu(*args, "--force", timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "micro_batch_size" in out.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # no temporary file left


@pytest.mark.parametrize(
    ("output", "needles"),
    [
        ("nonexist/dir/r.yaml", ["argument --output", "folder nonexist/dir does not exist", "mkdir -p"]),
        (".", ["argument --output", "expected a file path, found the folder .", "--output recipe.yaml"]),
        ("afile/r.yaml", ["argument --output", "afile is a file, not a folder"]),
    ],
    ids=["missing-folder", "a-folder", "under-a-file"],
)
def test_a_bad_suggest_output_is_refused_before_the_plan_is_printed(tmp_path, output, needles):
    (tmp_path / "afile").write_text("x", encoding="utf-8")
    before = _files(tmp_path)
    proc = run_mgpu(
        "suggest", "--model", "8B", "--gpu-memory", "24GB", "--json", "--output", output, cwd=tmp_path, timeout=60
    )
    assert_user_error(proc, *needles)
    assert proc.stdout == ""  # no `"fits": true` document beside exit code 2
    assert _files(tmp_path) == before


def test_suggest_output_problems_come_with_the_other_argument_problems(tmp_path):
    proc = run_mgpu(
        "suggest", "--model", "8B", "--gpu-memory", "24GB", "--gpus", "0", "--output", ".", cwd=tmp_path, timeout=60
    )
    assert_user_error(proc, "2 problems", "argument --gpus", "argument --output")


# --- mgpu doctor -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "nan"])
def test_doctor_refuses_a_probe_timeout_that_is_not_positive(value):
    proc = run_mgpu("doctor", "--probe", "--probe-timeout", value, timeout=120)
    assert_user_error(proc, "argument --probe-timeout", "expected a positive number of seconds")
    assert "timed out" not in proc.stdout  # refused before any probe ran


# --- mgpu init -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("path", ["x", "new/"], ids=["a-folder", "a-new-folder"])
def test_init_refuses_a_folder_without_suggesting_force(tmp_path, force, path):
    """A folder, or a path that names one (`new/`: it wrote a recipe file called `new`)."""
    (tmp_path / "x").mkdir()
    before = _files(tmp_path)
    proc = run_mgpu("init", path, *(["--force"] if force else []), cwd=tmp_path, timeout=60)
    name = path.rstrip("/")
    assert_user_error(proc, "argument PATH", f"found the folder {name}", f"mgpu init {name}/recipe.yaml")
    assert "--force" not in proc.stderr
    assert _files(tmp_path) == before  # no data/quickstart.jsonl beside it


@pytest.mark.parametrize(
    ("setup", "path", "needles"),
    [
        ("", "myrun", ["argument PATH", "expected a recipe file ending in .yaml, found 'myrun'", "myrun/recipe.yaml"]),
        ("data", "r.yaml", ["argument PATH", "the starter's data folder data is a file"]),
        ("proj", "proj/recipe.yaml", ["argument PATH", "the recipe's folder proj is a file"]),
        ("r.yaml", "r.yaml", ["argument PATH", "r.yaml exists", "--force"]),
    ],
    ids=["no-suffix", "data-is-a-file", "folder-is-a-file", "exists"],
)
def test_init_refuses_what_it_cannot_write_before_writing_anything(tmp_path, setup, path, needles):
    if setup:
        (tmp_path / setup).write_text("mine\n", encoding="utf-8")
    before = _files(tmp_path)
    proc = run_mgpu("init", path, cwd=tmp_path, timeout=60)
    assert_user_error(proc, *needles)
    assert _files(tmp_path) == before


def test_init_keeps_a_dataset_already_beside_the_recipe_and_says_so(tmp_path):
    mine = tmp_path / "data" / "quickstart.jsonl"
    mine.parent.mkdir()
    mine.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    proc = run_mgpu("init", "r.yaml", cwd=tmp_path, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "kept the existing data/quickstart.jsonl" in proc.stdout
    assert mine.read_text() == '{"instruction": "a", "output": "b"}\n'
    proc = run_mgpu("init", "again.yaml", cwd=tmp_path / "data", timeout=60)  # the starter's own data: nothing said
    assert proc.returncode == 0 and "kept" not in proc.stdout, proc.stdout + proc.stderr


# --- mgpu schema ---------------------------------------------------------------------------------------------------


def test_schema_output_replaces_a_schema_but_not_another_file_without_force(tmp_path):
    mine, schema = tmp_path / "mine.json", tmp_path / "recipe.schema.json"
    mine.write_text("keep\n", encoding="utf-8")
    proc = run_mgpu("schema", "--output", str(mine), timeout=60)
    assert_user_error(proc, "argument --output", "exists and is not a recipe schema", "--force")
    assert mine.read_text() == "keep\n"
    other = tmp_path / "tsconfig.schema.json"  # another tool's JSON Schema is not a recipe schema either
    other.write_text('{"$schema": "http://json-schema.org/draft-07/schema#", "title": "tsconfig"}\n', encoding="utf-8")
    proc = run_mgpu("schema", "--output", str(other), timeout=60)
    assert_user_error(proc, "argument --output", "exists and is not a recipe schema")
    for _ in range(2):  # written, then regenerated over itself (make schemas)
        proc = run_mgpu("schema", "--output", str(schema), timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(schema.read_text()) == json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
    proc = run_mgpu("schema", "--output", str(mine), "--force", timeout=60)
    assert proc.returncode == 0 and mine.read_text() == schema.read_text()
    proc = run_mgpu("schema", "--output", str(tmp_path), timeout=60)
    assert_user_error(proc, "argument --output", "found the folder")


# --- the schema line of written recipes ---------------------------------------------------------------------------


def test_written_recipes_point_at_a_schema_file_that_exists(tmp_path):
    """README: the `# yaml-language-server: $schema=...` line lets editors validate; it must resolve offline."""
    run_mgpu("init", str(tmp_path / "a.yaml"), timeout=60)
    run_mgpu("suggest", "--model", "8B", "--gpu-memory", "24GB", "--output", str(tmp_path / "b.yaml"), timeout=60)
    for name in ("a.yaml", "b.yaml"):
        first = (tmp_path / name).read_text(encoding="utf-8").splitlines()[0]
        ref = first.split("$schema=", 1)[1].removeprefix("file://")
        schema = (tmp_path / ref) if not Path(ref).is_absolute() else Path(ref)
        assert schema.is_file(), first
        assert json.loads(schema.read_text()) == json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())
