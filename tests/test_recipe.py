"""The recipe: loading, overrides, base recipes, interpolation, the schema, and errors for people."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, assert_user_error, mgpu_env, run_mgpu

from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.recipe import load_recipe, recipe_json_schema
from unsloth_mgpu_cli.templates import quickstart_jsonl

GOOD = """\
model:
  name: builtin:tiny-llama
  max_seq_length: 128
dataset:
  path: data.jsonl
training:
  max_steps: 10
output:
  dir: out
"""


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    return tmp_path


def write(workdir: Path, text: str, name: str = "r.yaml") -> Path:
    p = workdir / name
    p.write_text(text)
    return p


# -- every shipped recipe validates; the schema is fresh ----------------------------------------------


SHIPPED = sorted(ROOT.glob("recipes/**/*.yaml")) + sorted(ROOT.glob("benchmarks/recipes/*.yaml"))


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates(recipe: Path):
    loaded = load_recipe(recipe)
    assert loaded.recipe.model.name
    text = recipe.read_text()
    assert text.startswith("# yaml-language-server: $schema="), "recipes open with the schema line"
    assert "mgpu train" in text.split("model:")[0], "the header names the exact command"


@pytest.mark.parametrize("recipe", [p for p in SHIPPED if "preview with" in p.read_text()], ids=lambda p: p.stem)
def test_the_preview_command_in_a_recipes_header_sizes_its_model(recipe: Path):
    """`mgpu suggest --model <the recipe's model>` as the header writes it, with the GPUs given (none here): the
    hub id is sized from its real dimensions, without the hub (gemma-2-9b used to be refused)."""
    import shlex

    from typer.testing import CliRunner

    from unsloth_mgpu_cli import cli

    text = recipe.read_text()
    command = text.split("preview with `", 1)[1].split("`", 1)[0]
    args = shlex.split(command)
    assert args[:2] == ["mgpu", "suggest"], command
    result = CliRunner().invoke(cli.app, [*args[1:], "--gpu-memory", "80GB", "--gpus", "2", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    model = load_recipe(recipe, check_paths=False).recipe.model
    assert f"--model {model.name} " in command + " " and doc["load_in_4bit"] == model.load_in_4bit, doc
    assert doc["model"]["name"] == model.name and "from the size in the name" not in doc["model"]["source"], doc


@pytest.mark.parametrize("width", [80, 60])
def test_validate_shows_every_value_at_terminal_width(width, monkeypatch):
    """The resolved-recipe panel is YAML that reads back to the recipe: no line cut at the terminal's edge."""
    import yaml
    from rich.console import Console

    from unsloth_mgpu_cli import render
    from unsloth_mgpu_cli.recipe import to_yaml

    loaded = load_recipe(ROOT / "recipes/llama3_1/8B_qlora.yaml", check_paths=False)
    console = Console(width=width, record=True, color_system=None, highlight=False)
    monkeypatch.setattr(render, "console", console)
    render.print_recipe(loaded)
    lines = console.export_text().splitlines()
    body = [ln[2:-2].rstrip() for ln in lines[1 : lines.index(next(ln for ln in lines if ln.startswith("╰")))]]
    assert yaml.safe_load("\n".join(body)) == loaded.recipe.model_dump(mode="json")
    assert yaml.safe_load(to_yaml(loaded.recipe)) == loaded.recipe.model_dump(mode="json")  # the saved copy


def test_at_least_the_promised_model_families_ship():
    names = {p.relative_to(ROOT / "recipes").as_posix() for p in SHIPPED if "benchmarks" not in str(p)}
    for fam, size in (("llama3_1", "8B"), ("qwen2_5", "7B"), ("mistral", "7B"), ("gemma2", "9B")):
        assert {f"{fam}/{size}_qlora.yaml", f"{fam}/{size}_lora.yaml"} <= names


@pytest.mark.parametrize("copy", ["schemas/recipe.schema.json", "unsloth_mgpu_cli/schemas/recipe.schema.json"])
def test_committed_schema_is_fresh(copy):
    """The repository's schema and the copy installed with the package (what written recipes point at)."""
    committed = json.loads((ROOT / copy).read_text())
    assert committed == recipe_json_schema(), f"run `make schemas` and commit {copy}"


def test_schema_command_prints_the_committed_schema():
    proc = run_mgpu("schema")
    assert proc.returncode == 0
    assert json.loads(proc.stdout) == json.loads((ROOT / "schemas" / "recipe.schema.json").read_text())


def test_every_field_has_a_description():
    def walk(node, path):
        if isinstance(node, dict):
            if "properties" in node:
                for k, v in node["properties"].items():
                    assert v.get("description"), f"{path}.{k} has no description"
            for k, v in node.items():
                walk(v, f"{path}.{k}")

    walk(recipe_json_schema(), "")


def test_quickstart_data_matches_its_generator():
    assert (ROOT / "recipes" / "data" / "quickstart.jsonl").read_text() == quickstart_jsonl()


# -- loading features -----------------------------------------------------------------------------------


def test_overrides_apply_before_validation_and_paths_resolve_against_the_recipe(workdir):
    r = load_recipe(
        write(workdir, GOOD),
        ["training.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]", "distributed.num_gpus=3"],
    ).recipe
    assert r.training.learning_rate == 1e-4
    assert r.lora.target_modules == ["q_proj", "v_proj"]
    assert r.distributed.num_gpus == 3
    assert r.dataset.path == str(workdir / "data.jsonl")
    assert r.output.dir == str(workdir / "out")


def test_base_recipe_is_extended_and_overridden(workdir):
    write(workdir, GOOD + "lora:\n  r: 8\n  alpha: 32\n", "base.yaml")
    child = write(workdir, "base: base.yaml\nlora:\n  r: 4\ntraining:\n  learning_rate: 0.001\n")
    r = load_recipe(child).recipe
    assert (r.lora.r, r.lora.alpha) == (4, 32)
    assert r.training.learning_rate == 0.001 and r.training.max_steps == 10


def test_a_base_recipes_paths_are_resolved_against_its_own_folder(workdir):
    """Each relative path is read against the folder of the file that writes it; the child's own win."""
    write(workdir, GOOD.replace("  dir: out", "  dir: runs/${model.max_seq_length}"), "base.yaml")
    child = workdir / "experiments" / "a"
    child.mkdir(parents=True)
    r = load_recipe(write(child, "base: ../../base.yaml\ntraining:\n  max_steps: 4\n", "c.yaml")).recipe
    assert r.dataset.path == str(workdir / "data.jsonl")
    assert r.output.dir == str(workdir / "runs" / "128")
    assert r.model.name == "builtin:tiny-llama"
    (child / "mine.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    own = "base: ../../base.yaml\ndataset:\n  path: mine.jsonl\noutput:\n  dir: out\n"
    r = load_recipe(write(child, own, "d.yaml")).recipe
    assert (r.dataset.path, r.output.dir) == (str(child / "mine.jsonl"), str(child / "out"))


def test_relative_paths_on_the_command_line_mean_the_current_folder(workdir, monkeypatch):
    """`mgpu train recipes/x.yaml output.dir=outputs/run` from the repository root writes ./outputs/run (it went
    to recipes/outputs/run, next to the recipe); paths written in the recipe still mean the recipe's folder."""
    (workdir / "recipes").mkdir()
    (workdir / "recipes" / "data.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    recipe = write(workdir / "recipes", GOOD)
    shell = workdir / "shell"
    (shell / "data").mkdir(parents=True)
    (shell / "data" / "mine.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(shell)
    r = load_recipe(recipe, ["output.dir=outputs/run", "dataset.path=data/mine.jsonl"]).recipe
    assert (r.output.dir, r.dataset.path) == (str(shell / "outputs" / "run"), str(shell / "data" / "mine.jsonl"))
    assert load_recipe(recipe).recipe.output.dir == str(workdir / "recipes" / "out")
    with pytest.raises(UserError) as exc:
        load_recipe(recipe, ["dataset.path=data/none.jsonl"])
    assert f"dataset file not found: {shell / 'data' / 'none.jsonl'}" in exc.value.render()
    assert "on the command line are resolved against the current folder" in exc.value.render()


def test_a_cross_key_error_names_the_line_that_set_each_key(workdir):
    """max_steps on the command line, warmup_steps in the file: the warmup line is the file's (an override of one
    training key used to mark the whole section as set on the command line)."""
    p = write(workdir, GOOD.replace("max_steps: 10", "max_steps: 10\n  warmup_steps: 5"))
    with pytest.raises(UserError) as exc:
        load_recipe(p, ["training.max_steps=4"])
    line = next(i for i, text in enumerate(p.read_text().splitlines(), 1) if "warmup_steps" in text)
    assert f"training.warmup_steps ({p}:{line}): expected fewer than training.max_steps (4)" in exc.value.render()
    assert "For a short try run, add training.warmup_steps=0" in exc.value.render()  # the starter recipe's smoke test


def test_interpolation_resolves(workdir):
    p = write(
        workdir,
        GOOD.replace("max_steps: 10", "max_steps: 10\n  warmup_steps: ${training.max_steps}").replace(
            "warmup_steps: ${training.max_steps}", "warmup_steps: 2\n  seed: ${training.max_steps}"
        ),
    )
    assert load_recipe(p).recipe.training.seed == 10


def test_all_problems_are_reported_at_once(workdir):
    p = write(
        workdir,
        GOOD.replace("max_seq_length: 128", "max_seq_length: 4\n  dtyp: float32").replace(
            "max_steps: 10", "max_steps: 10\n  learning_rate: -1"
        ),
    )
    with pytest.raises(UserError) as info:
        load_recipe(p)
    text = info.value.render()
    assert "model.max_seq_length" in text and "model.dtyp" in text and "training.learning_rate" in text
    assert len(info.value.problems) == 3


@pytest.mark.parametrize(
    "override, where, hint",
    [
        ("training.lora_r=8", "training.lora_r", "did you mean 'lora.r'? (a key of the lora section)"),
        ("training.max_seq_length=64", "training.max_seq_length", "did you mean 'model.max_seq_length'?"),
        ("learning_rate=1e-4", "learning_rate", "did you mean 'training.learning_rate'?"),
        ("lr=1e-4", "lr", "did you mean 'training.learning_rate'?"),  # an alias, not difflib's 'lora'
        ("training.lr=1e-4", "training.lr", "did you mean 'learning_rate'?"),  # its own section first
        ("neftune_noise_alpha=5", "neftune_noise_alpha", "did you mean 'training.neftune_noise_alpha'?"),
        ("training.noisy_embedding_alpha=5", "training.noisy_embedding_alpha", "did you mean 'neftune_noise_alpha'?"),
        ("training.zork=1", "training.zork", "valid keys here: epochs"),
        # the exact name in another section, not a look-alike here ('max_steps')
        ("training.save_steps=5", "training.save_steps", "did you mean 'output.save_steps'?"),
    ],
)
def test_a_key_in_the_wrong_section_is_pointed_to_its_section(override, where, hint, workdir):
    with pytest.raises(UserError) as info:
        load_recipe(write(workdir, GOOD), [override])
    (problem,) = info.value.problems
    assert problem.where.startswith(where) and "unknown key" in problem.message
    assert hint in (problem.hint or ""), problem.hint


# -- bad recipes: exit 2, the key or file:line named, no traceback ---------------------------------------

BAD = {
    "unknown key with suggestion": (
        GOOD.replace("max_steps: 10", "max_step: 10"),
        ["training.max_step", "did you mean 'max_steps'"],
    ),
    "unknown section": (GOOD + "trainer:\n  x: 1\n", ["trainer", "unknown key"]),
    "wrong type": (GOOD.replace("max_steps: 10", "max_steps: ten"), ["training.max_steps", "'ten'"]),
    "out of range": (GOOD.replace("max_seq_length: 128", "max_seq_length: 0"), ["model.max_seq_length", "r.yaml:3"]),
    "negative learning rate": (
        GOOD + "  learning_rate: -0.1\n"
        if False
        else GOOD.replace("max_steps: 10", "max_steps: 10\n  learning_rate: -0.1"),
        ["training.learning_rate", "expected greater than 0"],
    ),
    "bad enum": (GOOD.replace("max_steps: 10", "max_steps: 10\n  optimizer: adam9"), ["training.optimizer", "adam9"]),
    "bad dtype": (GOOD.replace("max_seq_length: 128", "max_seq_length: 128\n  dtype: fp8"), ["model.dtype", "fp8"]),
    "bad micro batch": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  micro_batch_size: 0"),
        ["training.micro_batch_size", "'auto'"],
    ),
    "bad aggregation": (GOOD + "distributed:\n  aggregation: avg\n", ["distributed.aggregation", "avg"]),
    "4-bit full fine-tune": (
        GOOD.replace("max_seq_length: 128", "max_seq_length: 128\n  load_in_4bit: true") + "lora: null\n",
        ["model.load_in_4bit", "fully fine-tuned"],
    ),
    "4-bit on cpu": (
        GOOD.replace("max_seq_length: 128", "max_seq_length: 128\n  load_in_4bit: true")
        + "distributed:\n  device: cpu\n",
        ["model.load_in_4bit", "CUDA"],
    ),
    "warmup beyond max_steps": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  warmup_steps: 10"),
        ["training.warmup_steps", "fewer than training.max_steps"],
    ),
    "warmup given twice": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  warmup_steps: 2\n  warmup_ratio: 0.1"),
        ["training.warmup_ratio", "found both"],
    ),
    "warmup ratio of one": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  warmup_ratio: 1.0"),
        ["training.warmup_ratio", "less than 1"],
    ),
    "min lr without cosine": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  lr_scheduler: linear\n  min_lr_ratio: 0.1"),
        ["training.min_lr_ratio", "lr_scheduler: cosine"],
    ),
    "cycles without restarts": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  lr_cycles: 3"),
        ["training.lr_cycles", "lr_scheduler: cosine_with_restarts, found lr_scheduler cosine"],
    ),
    "decay ratio without wsd": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  lr_scheduler: linear\n  decay_ratio: 0.2"),
        ["training.decay_ratio", "Set training.lr_scheduler=warmup_stable_decay"],
    ),
    "early stopping without evaluations": (
        GOOD.replace("max_steps: 10", "max_steps: 10\n  early_stopping_patience: 3"),
        ["training.early_stopping_patience", "training.eval_steps"],
    ),
    "keep best without evaluations": (GOOD + "  keep_best: true\n", ["output.keep_best", "training.eval_steps"]),
    "node rank outside nnodes": (
        GOOD + "distributed:\n  nnodes: 2\n  node_rank: 2\n  rdzv_endpoint: h:1\n",
        ["distributed.node_rank"],
    ),
    "several nodes without endpoint": (GOOD + "distributed:\n  nnodes: 2\n", ["distributed.rdzv_endpoint"]),
    "malformed endpoint": (GOOD + "distributed:\n  rdzv_endpoint: nohostport\n", ["distributed.rdzv_endpoint"]),
    "port out of range": (GOOD + "distributed:\n  rdzv_endpoint: h:99999\n", ["distributed.rdzv_endpoint", "65535"]),
    "lora rank zero": (GOOD + "lora:\n  r: 0\n", ["lora.r"]),
    "dropout of one": (GOOD + "lora:\n  dropout: 1.0\n", ["lora.dropout"]),
    "missing model": ("dataset:\n  path: data.jsonl\n", ["model", "required"]),
    "missing dataset path": (GOOD.replace("  path: data.jsonl\n", "  format: alpaca\n"), ["dataset.path", "required"]),
    "missing dataset file": (GOOD.replace("data.jsonl", "nope.jsonl"), ["dataset.path", "not found"]),
    "missing eval file": (
        GOOD.replace("  path: data.jsonl\n", "  path: data.jsonl\n  eval_path: nope.jsonl\n"),
        ["dataset.eval_path", "eval file not found"],
    ),
    "model folder missing": (GOOD.replace("builtin:tiny-llama", "./no-model"), ["model.name", "not found"]),
    "unknown builtin": (GOOD.replace("builtin:tiny-llama", "builtin:tiny-lama"), ["model.name", "tiny-llama"]),
    "yaml syntax error": (GOOD.replace("max_steps: 10", "max_steps: [10"), ["r.yaml:", "YAML syntax error"]),
    "not a mapping": ("- just\n- a list\n", ["expected a mapping"]),
    "empty recipe": ("", ["empty"]),
    "python object tag": ("!!python/object/apply:os.system ['echo hacked']\n", ["YAML"]),
    "missing base": ("base: nowhere.yaml\n" + GOOD, ["base recipe not found"]),
    "bad interpolation": (GOOD.replace("max_steps: 10", "max_steps: ${training.nope}"), ["interpolation"]),
    "output dir is a file": (GOOD.replace("dir: out", "dir: data.jsonl"), ["output.dir", "found a file"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_recipe_is_rejected_for_people(case, workdir):
    text, needles = BAD[case]
    recipe = write(workdir, text)
    assert_user_error(run_mgpu("validate", str(recipe), cwd=workdir), *needles)


@pytest.mark.parametrize(
    "args, needle",
    [
        (["notakey"], "expected KEY=VALUE"),
        (["training.nope=1"], "training.nope"),
        (["training.max_steps=x"], "training.max_steps"),
        (["model=builtin:tiny-llama"], "`model.name=builtin:tiny-llama`"),
        (["training.lr=1e-3"], "did you mean 'learning_rate'?"),
        (["lora.lora_alpha=32"], "did you mean 'alpha'?"),
    ],
)
def test_bad_override_is_rejected(args, needle, workdir):
    assert_user_error(
        run_mgpu("validate", str(write(workdir, GOOD)), *args),
        needle,
        "command line" if "=" in args[0] and needle != "expected KEY=VALUE" else needle,
    )


def test_path_problems_are_listed_with_the_other_problems(workdir):
    """One run of validate names every problem: a misspelt key does not hide a missing file or a builtin typo."""
    proc = run_mgpu(
        "validate", str(write(workdir, GOOD)), "model.name=builtin:tiny-lama", "dataset.path=x.jsonl", "trainng.x=1"
    )
    assert_user_error(proc, "(3 problems)", "unknown key 'trainng'", "unknown builtin model", "dataset file not found")


def test_a_list_index_beyond_the_list_is_named(workdir):
    mix = GOOD.replace("  path: data.jsonl\n", "  mix:\n    - path: data.jsonl\n    - path: data.jsonl\n")
    assert_user_error(
        run_mgpu("validate", str(write(workdir, mix)), "dataset.mix.5.weight=3"),
        "dataset.mix.5",
        "has 2 items, so an index from 0 to 1; found 5",
    )


def test_an_override_under_a_list_item_that_is_a_value_is_named_as_the_command_lines(workdir):
    """`lora.target_modules.0.x=1`: the list's item is a string, no section; merging would replace it with one and
    the error would point at the recipe file's line."""
    recipe = write(workdir, GOOD + "lora:\n  target_modules: [q_proj, v_proj]\n")
    with pytest.raises(UserError) as exc:
        load_recipe(recipe, ["lora.target_modules.0.x=1"])
    [problem] = exc.value.problems
    assert problem.where == "lora.target_modules.0.x (command line)"
    assert "lora.target_modules.0 is a value ('q_proj'), not a section" in problem.message


def test_validate_yaml_prints_a_recipe_file_that_loads_back_to_the_same_recipe(workdir):
    write(workdir, GOOD, "base.yaml")
    child = write(workdir, "base: base.yaml\nlora:\n  r: 4\n")
    proc = run_mgpu("validate", str(child), "--yaml", "training.max_steps=7", cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("# yaml-language-server: $schema=") and "\nvalid" not in proc.stdout
    full = write(workdir, proc.stdout, "full.yaml")
    expected = load_recipe(child, ["training.max_steps=7"]).recipe
    assert load_recipe(full).recipe.model_dump() == expected.model_dump()


def test_missing_recipe_file(workdir):
    assert_user_error(run_mgpu("validate", str(workdir / "nope.yaml")), "recipe file not found")


# -- the CLI starts fast and light ----------------------------------------------------------------------


def test_help_does_not_import_torch_or_unsloth():
    code = (
        "import sys; from unsloth_mgpu_cli.cli import app; from typer.testing import CliRunner; "
        "r = CliRunner().invoke(app, ['--help']); assert r.exit_code == 0, r.output; "
        "print(sorted(m for m in ('torch', 'unsloth', 'transformers') if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mgpu_env())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_help_answers_in_under_a_second():
    import time

    t = time.perf_counter()
    proc = run_mgpu("--help")
    assert proc.returncode == 0 and "train" in proc.stdout
    assert time.perf_counter() - t < 1.5  # includes interpreter start; the import itself is ~0.15 s


def test_validate_does_not_import_torch(workdir):
    code = (
        "import sys; from unsloth_mgpu_cli.cli import app; from typer.testing import CliRunner; "
        f"r = CliRunner().invoke(app, ['validate', {str(write(workdir, GOOD))!r}]); "
        "assert r.exit_code == 0, r.output; print('torch' in sys.modules, 'unsloth' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=mgpu_env())
    assert proc.stdout.strip() == "False False", proc.stderr


def test_version():
    proc = run_mgpu("--version")
    assert proc.returncode == 0 and "0.1.0" in proc.stdout


def test_init_writes_a_valid_starter_and_refuses_to_overwrite(tmp_path):
    assert run_mgpu("init", "starter.yaml", cwd=tmp_path).returncode == 0
    assert load_recipe(tmp_path / "starter.yaml").recipe.model.name == "builtin:tiny-llama"
    assert (tmp_path / "data" / "quickstart.jsonl").exists()
    assert_user_error(run_mgpu("init", "starter.yaml", cwd=tmp_path), "--force")


def test_help_shows_no_value_beside_a_flag():
    # typer prints `<bool>` beside a flag unless told otherwise, which reads as if `--overwrite true` were meant.
    for command in ("train", "export", "validate", "doctor", "suggest", ""):  # "": mgpu --help
        proc = run_mgpu(*filter(None, [command]), "--help")
        assert proc.returncode == 0, proc.stderr
        flags = [
            line
            for line in proc.stdout.splitlines()
            if re.search(r"--(overwrite|merged|yaml|json|probe|force|help)\b", line)
        ]
        assert flags, (command, proc.stdout)
        assert not any("<bool>" in line for line in flags), (command, flags)


def test_a_dataset_format_named_as_other_tools_name_it_gets_ours_as_a_hint(workdir):
    """axolotl's `type: sharegpt` is our `chat` with a column mapping; the refusal did not say so."""
    p = write(workdir, GOOD)
    with pytest.raises(UserError) as exc:
        load_recipe(p, ["dataset.format=sharegpt"])
    text = exc.value.render()
    assert "expected 'alpaca', 'chat' or 'text'; found 'sharegpt'" in text
    assert "dataset.columns: {messages: conversations, role: from, content: value}" in text, text
    with pytest.raises(UserError) as exc:
        load_recipe(p, ["dataset.format=completion"])
    assert "that is format text here" in exc.value.render()


def test_a_flag_that_names_a_recipe_key_is_answered_with_the_override_that_sets_it():
    """`--max-steps 5` got click's bare "No such option"; a flag that is no recipe key still gets click's error."""
    quickstart = str(ROOT / "recipes" / "quickstart.yaml")
    proc = run_mgpu("validate", quickstart, "--max-steps", "5")
    assert_user_error(proc, "option --max-steps", "has no such option", "hint: training.max_steps=5")
    proc = run_mgpu("train", quickstart, "--lr=1e-4")
    assert_user_error(proc, "option --lr", "hint: training.learning_rate=1e-4")
    proc = run_mgpu("validate", quickstart, "--bogus")
    assert proc.returncode == 2 and "No such option: --bogus" in proc.stderr and "KEY=VALUE after" not in proc.stderr
    assert run_mgpu("validate", quickstart, "--yaml").returncode == 0  # a real option is left alone
    proc = run_mgpu("validate", quickstart)  # and says what "valid" covers: the rows are read by prepare
    assert proc.returncode == 0 and "valid (the recipe; the data's rows are checked by `mgpu prepare`)" in proc.stdout


def test_an_empty_lora_section_is_refused_rather_than_read_as_full_fine_tuning(tmp_path):
    """`lora:` with its keys commented out is null in YAML: a full fine-tune of every weight, silently (and the
    starter recipe's comment said that removing the section meant full fine-tuning; it means the default LoRA)."""
    base = "model:\n  name: builtin:tiny-llama\ndataset:\n  path: d.jsonl\n"
    (tmp_path / "d.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    empty = tmp_path / "empty.yaml"
    empty.write_text(base + "lora:\n  # r: 16\n  # alpha: 16\n")
    with pytest.raises(UserError) as exc:
        load_recipe(empty, [])
    text = exc.value.render()
    assert f"{empty}:5: lora is empty" in text and "write `lora: null` to fine-tune every weight" in text
    # the controls: `lora: null` is full fine-tuning as asked, and no section at all is the default LoRA
    explicit = tmp_path / "null.yaml"
    explicit.write_text(base + "lora: null\n")
    assert load_recipe(explicit, []).recipe.lora is None
    without = tmp_path / "without.yaml"
    without.write_text(base)
    assert load_recipe(without, []).recipe.lora.r == 16
    from unsloth_mgpu_cli.templates import STARTER_RECIPE

    assert "`lora: null` for full fine-tuning (without this section: default LoRA)" in STARTER_RECIPE


@pytest.mark.parametrize(
    ("override", "hint"),
    [
        ("train_on_inputs=false", "use dataset.train_on_responses_only, the opposite"),
        ("training.logging_steps=5", "use logging.steps"),
        ("sample_packing=true", "use dataset.batching: packed"),
        ("val_set_size=0.05", "use dataset.eval_ratio"),
        ("dataset.type=alpaca", "use dataset.format: alpaca, chat or text"),
        ("training.per_device_eval_batch_size=8", "evaluation uses training.micro_batch_size"),
        ("logging.wandb_entity=me", "set WANDB_ENTITY in the environment"),
        ("model.load_in_8bit=true", "8-bit loading is not supported"),
        ("training.load_best_model_at_end=true", "use output.keep_best: true"),
        ("hub_model_id=me/run", "use output.push_to_hub: {repo_id: your-name/run-1}"),
    ],
)
def test_keys_of_other_trainers_get_their_counterpart_not_a_look_alike(override, hint):
    """A did-you-mean pointed `train_on_inputs` at `training`, `logging_steps` at `eval_steps`, `use_dora` at
    `use_rslora` (lora.use_dora is a key now) and an eval batch size at the training one."""
    with pytest.raises(UserError) as exc:
        load_recipe(ROOT / "recipes" / "quickstart.yaml", [override])
    text = exc.value.render()
    assert f"unknown key '{override.split('=')[0].split('.')[-1]}'" in text and hint in text, text
    assert "did you mean" not in text


def test_a_list_of_datasets_is_pointed_at_dataset_mix(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model:\n  name: builtin:tiny-llama\ndataset:\n  - path: a.jsonl\n    type: alpaca\n")
    with pytest.raises(UserError, match="several datasets go under dataset.mix"):
        load_recipe(recipe, [])


def test_chat_template_names_and_all_linear_are_settled_when_the_recipe_is_validated():
    """`mgpu validate` said valid, and `mgpu prepare` refused the name ('gemma', 'chatm1') or `train` the modules
    ('all-linear': no layer of that name)."""
    quick = ROOT / "recipes" / "quickstart.yaml"
    chat = ["dataset.format=chat"]
    assert load_recipe(quick, [*chat, "dataset.chat_template=ChatML"]).recipe.dataset.chat_template == "chatml"
    with pytest.raises(UserError, match=r"unknown template name 'chatm1'.*did you mean 'chatml'\?"):
        load_recipe(quick, [*chat, "dataset.chat_template=chatm1"])
    with pytest.raises(UserError, match=r"unknown template name 'gemma': expected chatml, llama3, zephyr"):
        load_recipe(quick, [*chat, "dataset.chat_template=gemma"])
    jinja = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # the control: a Jinja template as given
    assert load_recipe(quick, [*chat, f"dataset.chat_template={jinja}"]).recipe.dataset.chat_template == jinja
    seven = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for given in ("lora.target_modules=all-linear", "lora.target_modules=[all-linear]"):
        assert load_recipe(quick, [given]).recipe.lora.target_modules == seven


@pytest.mark.parametrize(
    ("settings", "total", "expected"),
    [
        # warmup_ratio 0.1 of 25 steps: ceil(2.5) = 3 warmup steps, then cosine to 0
        ({"warmup_ratio": 0.1}, 25, {0: 0.0, 1: 1 / 3, 3: 1.0, 25: 0.0}),
        ({"warmup_steps": 3}, 25, {0: 0.0, 1: 1 / 3, 3: 1.0, 25: 0.0}),
        # cosine down to 10% of the peak: halfway 0.1 + 0.9 * 0.5
        ({"min_lr_ratio": 0.1}, 20, {0: 1.0, 10: 0.55, 20: 0.1}),
        ({"lr_scheduler": "linear", "warmup_ratio": 0.5}, 4, {0: 0.0, 1: 0.5, 2: 1.0, 3: 0.5, 4: 0.0}),
        # two cosine cycles of 5 steps each after 2 warmup steps: back at the peak at step 7
        (
            {"lr_scheduler": "cosine_with_restarts", "lr_cycles": 2, "warmup_steps": 2},
            12,
            {2: 1.0, 7: 1.0, 6: 0.095492},
        ),
        # 1/sqrt(step / warmup) after the warmup
        ({"lr_scheduler": "inverse_sqrt", "warmup_steps": 4}, 20, {2: 0.5, 4: 1.0, 16: 0.5}),
        # warmup from the floor (transformers' WSD), flat at the peak, then a cosine over the last 5 steps (0.25
        # of 20) down to the floor of 0.1
        (
            {"lr_scheduler": "warmup_stable_decay", "decay_ratio": 0.25, "min_lr_ratio": 0.1, "warmup_steps": 2},
            20,
            {0: 0.1, 1: 0.55, 2: 1.0, 15: 1.0, 20: 0.1},
        ),
        ({"lr_scheduler": "warmup_stable_decay"}, 20, {0: 1.0, 18: 1.0, 20: 0.0}),  # decay_ratio: 0.1 by default
    ],
)
def test_the_schedule_follows_the_recipe(workdir, settings, total, expected):
    import torch

    from unsloth_mgpu_cli.optim import build_scheduler

    overrides = [f"training.{k}={v}" for k, v in settings.items()] + ["training.max_steps=null"]
    recipe = load_recipe(write(workdir, GOOD), overrides).recipe
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.training.learning_rate)
    sched = build_scheduler(opt, recipe, total)
    seen = {}
    for step in range(total + 1):
        seen[step] = opt.param_groups[0]["lr"] / recipe.training.learning_rate
        opt.step()
        sched.step()
    assert {k: round(seen[k], 6) for k in expected} == {k: round(v, 6) for k, v in expected.items()}, seen


def test_init_from_takes_an_adapter_or_its_run_folder_with_the_same_lora_settings(tmp_path):
    adapter_dir = tmp_path / "run" / "adapter"
    adapter_dir.mkdir(parents=True)
    config = {"r": 16, "lora_alpha": 16, "target_modules": ["v_proj", "q_proj"], "use_dora": False}
    (adapter_dir / "adapter_config.json").write_text(json.dumps(config))
    quick = ROOT / "recipes" / "quickstart.yaml"
    two = ["lora.target_modules=[q_proj,v_proj]"]
    with pytest.raises(UserError, match=r"no adapter weights in .*adapter_model.safetensors"):
        load_recipe(quick, [*two, f"lora.init_from={tmp_path / 'run'}"])
    (adapter_dir / "adapter_model.safetensors").write_bytes(b"")
    for given in (tmp_path / "run", adapter_dir):  # the run folder, or its adapter/
        assert load_recipe(quick, [*two, f"lora.init_from={given}"]).recipe.lora.init_from == str(adapter_dir)
    with pytest.raises(UserError) as exc:
        load_recipe(quick, [f"lora.init_from={adapter_dir}", "lora.r=8"])
    text = exc.value.render()
    assert "trained with r 16, target_modules ['q_proj', 'v_proj']; this recipe gives lora.r 8" in text, text
    assert "set lora.r=16 lora.target_modules=[q_proj,v_proj] to continue from it" in text
    with pytest.raises(UserError, match=r"lora.init_from \(command line\): no adapter in"):
        load_recipe(quick, [f"lora.init_from={tmp_path / 'nowhere'}"])
