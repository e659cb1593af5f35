"""What README.md and docs/ show is what the code does.

- Every `mgpu ...` command in a shell block parses with the CLI as written (subcommand, options, their values),
  and the `key=value` overrides of `train`/`validate`/`prepare` validate against the recipe it names (a
  placeholder such as `recipe.yaml` stands for the quick-start recipe).
- Every YAML recipe fragment names real recipe keys with values the recipe accepts.
- Every Python block calls the API with arguments its functions take; the advanced-configuration block runs.
- The output shown for `mgpu suggest` is what the command prints today.

The commands that train are run by their own tests (test_examples.py, test_engine_cpu.py, ...); here each is
only parsed, so this file is quick.
"""

from __future__ import annotations

import ast
import inspect
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, mgpu_env, run_mgpu
from typer.main import get_command

import unsloth_multigpu
from unsloth_mgpu_cli import cli
from unsloth_mgpu_cli.errors import UserError
from unsloth_mgpu_cli.recipe import load_recipe

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
SHELL_END = {"|", "||", "&&", ";", ">", ">>", "<", "2>&1"}
ENV_ASSIGNMENT = re.compile(r"^[A-Z_][A-Z0-9_]*=\S*\s+")
LAUNCHER = re.compile(r"^(srun|torchrun|python3? -m torch\.distributed\.run)\s.*?\b(mgpu|-m unsloth_mgpu_cli)\s+")
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"


def blocks(*langs: str) -> list[tuple[str, str]]:
    """(file:line of the block's first line, text) of every fenced block in one of `langs`."""
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for m in FENCE.finditer(text):
            if m.group(1) in langs:
                line = text.count("\n", 0, m.start()) + 2
                found.append((f"{doc.relative_to(ROOT)}:{line}", m.group(2)))
    return found


def mgpu_commands() -> list[tuple[str, list[str]]]:
    """(file:line, argv after `mgpu`) of every command line in a shell block."""
    commands = []
    for where, text in blocks("bash", "sh", ""):
        file, first = where.rsplit(":", 1)
        for i, line in enumerate(text.splitlines()):
            line = line.strip()
            while ENV_ASSIGNMENT.match(line):
                line = ENV_ASSIGNMENT.sub("", line, count=1)
            line = LAUNCHER.sub("mgpu ", line)  # `srun [its options] mgpu ...`, `torchrun ... -m unsloth_mgpu_cli`
            if not line.startswith("mgpu "):
                continue
            argv = []
            for token in shlex.split(line, comments=True)[1:]:  # up to a pipe, redirection or next command
                if token in SHELL_END:
                    break
                if token.endswith(";"):
                    argv.append(token[:-1])
                    break
                argv.append(token)
            commands.append((f"{file}:{int(first) + i}", argv))
    return commands


COMMANDS = mgpu_commands()


def test_the_docs_show_commands_of_every_kind():
    # the extraction itself can fail: it must find the commands people copy most
    subcommands = {argv[0] for _, argv in COMMANDS}
    assert {"train", "doctor", "suggest", "prepare", "export", "report"} <= subcommands, subcommands
    assert len(COMMANDS) >= 20, COMMANDS


@pytest.mark.parametrize(("where", "argv"), COMMANDS, ids=[w for w, _ in COMMANDS])
def test_documented_command_parses(where, argv):
    group = get_command(cli.app)
    name, args = argv[0], argv[1:]
    command = group.commands.get(name)
    assert command is not None, f"{where}: `mgpu {name}` is not a command (have: {sorted(group.commands)})"
    try:
        command.make_context(name, list(args))
    except Exception as exc:  # typer's click: NoSuchOption, BadParameter, MissingParameter, ...
        pytest.fail(f"{where}: `mgpu {shlex.join(argv)}` does not parse: {type(exc).__name__}: {exc}")


RECIPE_COMMANDS = [(w, a) for w, a in COMMANDS if a[0] in ("train", "validate", "prepare")]


@pytest.mark.parametrize(("where", "argv"), RECIPE_COMMANDS, ids=[w for w, _ in RECIPE_COMMANDS])
def test_documented_overrides_validate(where, argv):
    positional = [a for a in argv[1:] if not a.startswith("-")]
    # option values (--resume auto, --nnodes 2, ...) are not overrides: only key=value is
    overrides = [a for a in positional if "=" in a]
    recipe = ROOT / positional[0] if positional and "=" not in positional[0] else None
    recipe = recipe if recipe is not None and recipe.is_file() else QUICKSTART
    try:
        load_recipe(recipe, overrides, check_paths=False)
    except UserError as exc:
        pytest.fail(f"{where}: `mgpu {shlex.join(argv)}` is not a valid recipe: {exc}")


def _with_defaults(fragment: dict, base: dict) -> dict:
    merged = dict(base)
    for key, value in fragment.items():
        merged[key] = _with_defaults(value, base.get(key) or {}) if isinstance(value, dict) else value
    return merged


RECIPE_SECTIONS = {"model", "lora", "dataset", "training", "distributed", "memory", "output", "logging"}
FRAGMENTS = [(w, t) for w, t in blocks("yaml") if set(yaml.safe_load(t) or {}) <= RECIPE_SECTIONS]


def test_every_yaml_block_is_a_recipe_fragment():
    assert len(FRAGMENTS) == len(blocks("yaml")) >= 4


@pytest.mark.parametrize(("where", "text"), FRAGMENTS, ids=[w for w, _ in FRAGMENTS])
def test_documented_recipe_fragment_validates(where, text):
    """The fragment on top of the quick-start recipe validates; file paths in it are placeholders."""
    base = yaml.safe_load(QUICKSTART.read_text())
    merged = _with_defaults(yaml.safe_load(text), base)
    if "mix" in merged["dataset"]:
        merged["dataset"].pop("path", None)
    try:
        load_recipe(None, data=merged, check_paths=False)
    except UserError as exc:
        pytest.fail(f"{where}: the recipe fragment does not validate: {exc}")


# -- Python blocks --------------------------------------------------------------------------------------


def _api_callable(call: ast.Call, names: dict[str, object]) -> object | None:
    """The API object a call goes to: `enable_multi_gpu(...)`, `unsloth_multigpu.X(...)`, `Manager().method(...)`."""
    f = call.func
    if isinstance(f, ast.Name):
        return names.get(f.id)
    if isinstance(f, ast.Attribute):
        if isinstance(f.value, ast.Name) and f.value.id == "unsloth_multigpu":
            return getattr(unsloth_multigpu, f.attr, None)
        if isinstance(f.value, ast.Call):  # ConfigManager().get_optimal_config(...)
            owner = _api_callable(f.value, names)
            return getattr(owner, f.attr, None) if isinstance(owner, type) else None
        if isinstance(f.value, ast.Name) and isinstance(names.get(f.value.id), type):  # trainer.setup()
            return getattr(names[f.value.id], f.attr, None)
    return None


PYTHON_BLOCKS = blocks("python")


@pytest.mark.parametrize(("where", "text"), PYTHON_BLOCKS, ids=[w for w, _ in PYTHON_BLOCKS])
def test_documented_python_calls_match_the_api(where, text):
    tree = ast.parse(text)
    names: dict[str, object] = {}
    checked = 0
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "unsloth_multigpu":
            for alias in node.names:
                assert hasattr(unsloth_multigpu, alias.name), f"{where}: unsloth_multigpu has no {alias.name}"
                names[alias.asname or alias.name] = getattr(unsloth_multigpu, alias.name)
    names.setdefault("enable_multi_gpu", unsloth_multigpu.enable_multi_gpu)
    # variables bound to an instance of an API class: `trainer = MultiGPUTrainer(...)` -> trainer.setup()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            target = _api_callable(node.value, names)
            if isinstance(target, type) and isinstance(node.targets[0], ast.Name):
                names[node.targets[0].id] = target
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        target = _api_callable(node, names)
        if target is None or not callable(target):
            continue
        signature = inspect.signature(target)
        params = list(signature.parameters)
        if params and params[0] == "self":  # a method looked up on the class
            signature = signature.replace(parameters=list(signature.parameters.values())[1:])
        args = [None] * sum(not isinstance(a, ast.Starred) for a in node.args)
        kwargs = {k.arg: None for k in node.keywords if k.arg is not None}
        try:
            signature.bind_partial(*args, **kwargs)
        except TypeError as exc:
            pytest.fail(f"{where}: {ast.unparse(node)[:80]}: {exc}")
        checked += 1
    assert checked, f"{where}: no call into unsloth_multigpu found"


@pytest.mark.integration
def test_the_advanced_configuration_block_runs(tmp_path):
    """docs/python-api.md's block as written: devices, optimal config, the fit check, enable_multi_gpu."""
    where, text = next((w, t) for w, t in PYTHON_BLOCKS if "get_optimal_config" in t and "python-api" in w)
    script = tmp_path / "advanced.py"
    script.write_text(text + "\nprint('settings', settings.num_gpus, settings.batch_size_per_gpu)\n")
    proc = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=mgpu_env(), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, f"{where}:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    assert re.search(r"^settings \d+ \d+$", proc.stdout, re.M), proc.stdout[-2000:]


# -- shown output ---------------------------------------------------------------------------------------


def _shown_output(doc: str, command: str) -> tuple[str, list[str]]:
    """The `text` block that follows the line showing `command` in `doc`."""
    for where, text in blocks("text"):
        if where.startswith(doc):
            before = (ROOT / doc).read_text().splitlines()[: int(where.rsplit(":", 1)[1]) - 2]
            if any(command in line for line in before[-12:]):
                return where, text.splitlines()
    raise AssertionError(f"no text block after `{command}` in {doc}")


def test_suggest_output_in_the_docs_is_what_it_prints():
    command = "mgpu suggest --model 8B --gpus 2 --gpu-memory 24GB --method qlora"
    where, shown = _shown_output("docs/suggest.md", command)
    proc = run_mgpu(*shlex.split(command)[1:], COLUMNS="100")
    assert proc.returncode == 0, proc.stderr
    printed = [line.rstrip() for line in proc.stdout.splitlines()]
    assert [line.rstrip() for line in shown] == printed, (
        f"{where} shows other output than `{command}` prints now: paste the output of "
        f"`COLUMNS=100 {command} | sed 's/ *$//'` there:\n" + proc.stdout
    )
