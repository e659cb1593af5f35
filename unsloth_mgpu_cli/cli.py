"""The `mgpu` command line: parses arguments, calls one engine function, maps the outcome to an exit code.

    mgpu validate recipes/quickstart.yaml training.learning_rate=1e-4
    mgpu train recipes/quickstart.yaml
    mgpu export outputs/quickstart --merged
    mgpu generate outputs/quickstart "Add 17 and 25."
    mgpu report outputs/quickstart
    mgpu prepare recipes/quickstart.yaml dataset.batching=packed

Heavy imports (torch, transformers, unsloth) happen inside the commands that need them, so `--help`,
`validate`, `schema`, `init` and `doctor` start fast and work without a GPU.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand, TyperGroup

from . import __version__
from .errors import Interrupted, Problem, TrainingFailed, UserError


class _HelpFlag:
    """--help is a flag too: typer's own help option showed `<bool>` beside it (see _flag)."""

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)  # type: ignore[misc]
        if option is not None:
            option.metavar = ""
        return option


class _Group(_HelpFlag, TyperGroup):
    pass


class _Command(_HelpFlag, TyperCommand):
    def invoke(self, ctx: Any) -> Any:
        """Ctrl-C in a command that does not handle it itself (export, push, generate, ...): typer turned it into
        a silent exit 130; it is said, as train and prepare say theirs."""
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            _fail(Interrupted(f"mgpu {self.name} stopped before it finished"))


app = typer.Typer(
    name="mgpu",
    help="Fine-tune LLMs with Unsloth on every GPU you have, from one YAML recipe.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    add_completion=False,
    cls=_Group,
)

_state = {"debug": False}

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False, metavar="RECIPE")]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="Dotted KEY=VALUE overrides applied before validation, e.g. training.learning_rate=1e-4.",
        show_default=False,
        metavar="KEY=VALUE",
    ),
]


def _flag(*names: str, **kwargs: Any) -> Any:
    """A boolean --flag. Without a metavar typer's help shows `<bool>` beside it, as if it took a value."""
    return typer.Option(*names, metavar="", **kwargs)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mgpu (unsloth-mgpu) {__version__}")
        raise typer.Exit(0)


@app.callback()
def _main(
    debug: Annotated[bool, _flag("--debug", help="Show full tracebacks for every error.")] = False,
    version: Annotated[
        bool, _flag("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    _state["debug"] = debug or os.environ.get("MGPU_DEBUG") == "1"
    if _state["debug"]:
        os.environ["MGPU_DEBUG"] = "1"  # workers and the launcher show everything too


def _offline_if_hub_unreachable(recipe: Any) -> None:
    """Before anything imports huggingface_hub: hub ids in a recipe on a machine that cannot resolve the hub's name
    load from the cache only, at once, instead of after the hub client's retries (hub.py)."""
    from .hub import work_offline_if_unreachable

    names = [recipe.model.name, recipe.dataset.eval_path, *(src.section.path for src in recipe.dataset.sources())]
    work_offline_if_unreachable(names)


def _fail(exc: BaseException) -> None:
    """Print an error for people and exit with its code; --debug adds the traceback."""
    from rich.markup import escape

    from .render import people_console

    console = people_console(stderr=True)
    if _state["debug"]:
        console.print_exception()
    # Messages quote paths and upstream errors (gloo: "[/path/unbound_buffer.cc:129] Timed out"): never markup.
    if isinstance(exc, UserError):
        console.print(f"[bold red]error:[/] {escape(exc.render())}", markup=True, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, TrainingFailed):
        console.print(f"[bold red]{escape(exc.title)}:[/] {escape(str(exc))}", soft_wrap=True)
        if exc.details:
            console.print(exc.details, markup=False, soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    if isinstance(exc, Interrupted):
        console.print(f"[yellow]interrupted:[/] {escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(exc.exit_code)
    raise exc


@app.command(cls=_Command)
def train(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    resume: Annotated[
        str | None, typer.Option("--resume", help="Continue a run: 'auto' (newest checkpoint) or a checkpoint folder.")
    ] = None,
    overwrite: Annotated[
        bool,
        _flag(
            "--overwrite",
            help="Delete the earlier run in output.dir first (only what mgpu wrote; refuses other files there).",
        ),
    ] = False,
    nnodes: Annotated[
        int | None, typer.Option("--nnodes", min=1, help="Number of hosts (same command on each).")
    ] = None,
    node_rank: Annotated[int | None, typer.Option("--node-rank", min=0, help="This host's index.")] = None,
    rdzv_endpoint: Annotated[
        str | None, typer.Option("--rdzv-endpoint", help="HOST:PORT of node 0's rendezvous (several hosts).")
    ] = None,
) -> None:
    """Train: validate, fill `auto`s, tokenise once, start one worker per GPU, save the adapter."""
    from .recipe import load_recipe

    if not _state["debug"]:
        # c10d's C++ warnings (a store connection closed when another node ends: 27 lines of C++ frames per
        # warning) are read before torch is imported; the failure is reported by us. Set it yourself to see them.
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")

    try:
        loaded = load_recipe(recipe, overrides or [])
        if resume is not None and overwrite:
            raise UserError("--resume and --overwrite contradict each other; pass one of them")
        if resume is not None and not resume.strip():
            raise UserError(
                Problem(
                    "argument --resume",
                    "expected auto or a checkpoint folder; found an empty value",
                    "pass --resume auto (the newest checkpoint) or a folder such as OUTPUT_DIR/checkpoints/step-N",
                ),
                "invalid arguments",
            )
        _offline_if_hub_unreachable(loaded.recipe)
        node0 = (node_rank or 0) == 0 and "RANK" not in os.environ
        exports = loaded.recipe.output.export and node0
        if exports:  # hours of training should not end in a refusal
            from .export import check_recipe_exports

            check_recipe_exports(loaded.recipe)
        pushes = loaded.recipe.output.push_to_hub is not None and node0
        if pushes:  # nor in a refused repo id or a missing token
            from .push import check_repo_id, hub_token

            try:
                check_repo_id(loaded.recipe.output.push_to_hub.repo_id, "output.push_to_hub.repo_id")
                hub_token(os.environ)
            except UserError as exc:
                raise loaded.locate(exc) from None
        from .engine import train as run_training

        try:
            summary = run_training(
                loaded,
                overwrite=overwrite,
                resume=resume,
                nnodes=nnodes,
                node_rank=node_rank,
                rdzv_endpoint=rdzv_endpoint,
            )
        except UserError as exc:
            raise loaded.locate(exc) from None
        except KeyboardInterrupt:  # before the launcher's handlers: the checks, tokenising (typer would say nothing)
            raise Interrupted("stopped before training started (no step ran); run the same command again") from None
        except TrainingFailed as exc:
            from .engine import resume_hint

            hint = resume_hint(loaded, {"--nnodes": nnodes, "--node-rank": node_rank, "--rdzv-endpoint": rdzv_endpoint})
            if hint and "continue with:" not in exc.details.lower():
                exc.details = (exc.details + "\n" if exc.details else "") + hint
            raise
    except (UserError, TrainingFailed, Interrupted) as exc:
        _fail(exc)
    from .render import print_summary

    rewritten = frozenset("merged/" if kind == "hf" else "gguf/" for kind in loaded.recipe.output.export)
    print_summary(summary, rewritten if exports else frozenset())
    if exports:
        _export_after_training(loaded.recipe)
    if pushes:
        _push_after_training(loaded.recipe)


def _push_after_training(recipe: Any) -> None:
    """output.push_to_hub, once training and exports have ended; a refusal exits 2 and a hub fault 1, each with the
    `mgpu push` command that retries it (the run is saved either way)."""
    import shlex

    from rich.markup import escape

    from .push import PushFailed, push
    from .render import people_console

    target = recipe.output.push_to_hub
    what = recipe.pushed_artifact()
    words = ["mgpu", "push", str(recipe.output.dir), target.repo_id, "--what", what]
    words += (["--private"] if target.private else []) + (["--revision", target.revision] if target.revision else [])
    again = shlex.join(words)
    try:
        url = push(Path(recipe.output.dir), target.repo_id, what, target.private, target.revision, None, typer.echo)
    except UserError as exc:
        exc.problems.append(
            Problem(
                "output.push_to_hub",
                "training finished and its weights are saved; the push after it was refused",
                f"fix the above, then run `{again}`",
            )
        )
        _fail(exc)
    except PushFailed as exc:
        console = people_console(stderr=True)
        console.print(f"[bold red]push failed:[/] {escape(str(exc))}", soft_wrap=True)
        console.print(f"training finished and its weights are saved; push them with: {again}", markup=False)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(f"pushed: {url}")


def _export_after_training(recipe: Any) -> None:
    """output.export's exports, once training has ended; a failure exits 2 with the command that retries it."""
    import time

    from .export import run_recipe_exports

    t0 = time.monotonic()

    def say(message: str) -> None:
        typer.echo(f"[export {time.monotonic() - t0:5.1f} s] {message}")

    try:
        for path in run_recipe_exports(recipe, say):
            say(f"wrote {path}")
    except UserError as exc:
        exc.problems.append(
            Problem(
                "output.export",
                "training finished and its weights are saved; the export after it failed",
                f"fix the above, then run `mgpu export {recipe.output.dir}` (with --format gguf for gguf)",
            )
        )
        _fail(exc)


_DTYPE_QUANTS = {"float16": "f16", "bfloat16": "bf16", "float32": "f32"}


@app.command(cls=_Command)
def export(
    output_dir: Annotated[
        Path,
        typer.Argument(
            help="output.dir of a finished run: LoRA, or (--format gguf) a full fine-tune.",
            show_default=False,
            metavar="OUTPUT_DIR",
        ),
    ],
    merged: Annotated[  # accepted for scripts written when it was required; there is no other export
        bool,
        _flag("--merged", help="Merge the adapter into the base weights: every export does, so the default."),
    ] = True,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="--format hf: bfloat16 (default) | float16 | float32.")
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="Where to write (default OUTPUT_DIR/merged, or OUTPUT_DIR/gguf): a new or empty folder, or an "
            "earlier export to replace.",
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="hf: a merged HF model (transformers, vLLM); gguf: one .gguf file (llama.cpp, Ollama, LM Studio); "
            "gguf-lora: the adapter alone as a LoRA GGUF, applied over the base's GGUF (llama.cpp --lora, Ollama "
            "ADAPTER).",
        ),
    ] = "hf",
    quant: Annotated[
        str | None,
        typer.Option("--quant", help="--format gguf: q8_0 (default) | f16 | bf16 | f32; gguf-lora: f16 (default)."),
    ] = None,
) -> None:
    """Merge the trained adapter into its base model and save it: a plain HF model, or a GGUF file."""
    import time

    t0 = time.monotonic()

    def say(message: str) -> None:
        typer.echo(f"[{time.monotonic() - t0:5.1f} s] {message}")

    try:
        if fmt not in ("hf", "gguf", "gguf-lora"):
            raise UserError(
                Problem("argument --format", f"expected hf, gguf or gguf-lora, found {fmt!r}"), "invalid arguments"
            )
        if fmt.startswith("gguf") and dtype is not None:
            raise UserError(
                Problem(
                    "argument --dtype",
                    "--dtype sets the weights of --format hf; a GGUF file's are set by --quant",
                    f"drop --dtype, or use --quant {_DTYPE_QUANTS.get(dtype, 'f16')}",
                ),
                "invalid arguments",
            )
        if fmt == "hf" and quant is not None:
            raise UserError(
                Problem("argument --quant", "--quant applies to --format gguf", "add --format gguf, or use --dtype"),
                "invalid arguments",
            )
        if fmt == "gguf":
            from .export import export_gguf

            path = export_gguf(output_dir, output, quant or "q8_0", say=say)
        elif fmt == "gguf-lora":
            from .export import export_gguf_lora

            path = export_gguf_lora(output_dir, output, quant or "f16", say=say)
        else:
            from .export import export_merged

            # checks the arguments and --output before the slow imports
            dest = export_merged(output_dir, output, dtype or "bfloat16", say=say)
    except UserError as exc:
        _fail(exc)
    from .render import size_text

    if fmt == "gguf":
        say(
            f"wrote {path} ({quant or 'q8_0'}, {size_text(path.stat().st_size)}); run it with "
            f"`llama-cli -m {path}` or an Ollama Modelfile `FROM {path}`"
        )
        return
    if fmt == "gguf-lora":
        say(
            f"wrote {path} ({quant or 'f16'}, {size_text(path.stat().st_size)}); apply it over the base model's GGUF "
            f"with `llama-cli -m BASE.gguf --lora {path}` or an Ollama Modelfile `FROM BASE.gguf` + `ADAPTER {path}`"
        )
        return
    size = size_text(sum(f.stat().st_size for f in dest.rglob("*") if f.is_file()))
    say(f"wrote {dest} ({dtype or 'bfloat16'}, {size}); load it with AutoModelForCausalLM.from_pretrained('{dest}')")


@app.command(cls=_Command)
def push(
    output_dir: Annotated[
        Path, typer.Argument(help="output.dir of a finished run.", show_default=False, metavar="OUTPUT_DIR")
    ],
    repo_id: Annotated[
        str,
        typer.Argument(
            help="Hub repo to push to, e.g. your-name/llama-gsm8k-lora (made if missing).",
            show_default=False,
            metavar="REPO_ID",
        ),
    ],
    what: Annotated[
        str,
        typer.Option(
            "--what",
            help="adapter (OUTPUT_DIR/adapter) | merged (after mgpu export) | gguf (after mgpu export --format gguf).",
        ),
    ] = "adapter",
    private: Annotated[
        bool, _flag("--private", help="Make a new repo private (an existing one keeps its setting).")
    ] = False,
    revision: Annotated[
        str | None, typer.Option("--revision", help="Branch to commit to (made if missing); default main.")
    ] = None,
    message: Annotated[str | None, typer.Option("--message", "-m", help="Commit message.")] = None,
) -> None:
    """Upload a run's adapter, merged model or GGUF files, with a model card, to a Hugging Face hub repo."""
    from .push import PushFailed, push

    try:
        url = push(output_dir, repo_id, what, private, revision, message, say=typer.echo)
    except UserError as exc:
        _fail(exc)
    except PushFailed as exc:
        typer.echo(f"error: {exc}; nothing local changed: run the same command again", err=True)
        raise typer.Exit(exc.exit_code) from None
    typer.echo(f"pushed: {url}")


@app.command(cls=_Command)
def generate(
    output_dir: Annotated[
        Path, typer.Argument(help="output.dir of a finished run.", show_default=False, metavar="OUTPUT_DIR")
    ],
    prompts: Annotated[
        list[str],
        typer.Argument(
            help="One or more prompts, each framed as the run's training rows were; - reads one per line from stdin.",
            show_default=False,
            metavar="PROMPT",
        ),
    ],
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per reply.")] = 256,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy; above 0: sampled.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Seed for sampling.")] = 0,
    device: Annotated[str, typer.Option("--device", help="auto (a GPU when there is one) | cpu | cuda.")] = "auto",
    fmt: Annotated[
        str | None,
        typer.Option("--format", help="alpaca | chat | text (default: the run's dataset.format).", show_default=False),
    ] = None,
    input_text: Annotated[str, typer.Option("--input", help="alpaca: the row's input (context).")] = "",
    system: Annotated[
        str | None,
        typer.Option(
            "--system",
            help="chat: a system message before the prompt (default: the run's dataset.system_prompt).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Try a trained run: prompt its model as it was trained and stream the replies (transformers and peft only)."""
    from .generate import GenerationArgs, read_prompts
    from .generate import generate as run_generate

    args = GenerationArgs(max_new_tokens, temperature, top_p, seed, device, fmt, input_text, system)
    try:
        run_generate(output_dir, read_prompts(list(prompts), sys.stdin), args)
    except UserError as exc:
        _fail(exc)


@app.command(cls=_Command)
def report(
    output_dir: Annotated[
        Path, typer.Argument(help="output.dir of a run (finished or not).", show_default=False, metavar="OUTPUT_DIR")
    ],
    png: Annotated[
        Path | None, typer.Option("--png", help="Where to write the plots (default OUTPUT_DIR/report.png).")
    ] = None,
) -> None:
    """Summarise a run: time, tokens, tokens/s per GPU and total, peak memory, eval loss; plot the metrics."""
    from .report import report as make_report

    try:
        make_report(output_dir, png)
    except UserError as exc:
        _fail(exc)


@app.command(cls=_Command)
def validate(
    recipe: RecipeArg,
    overrides: OverridesArg = None,
    as_yaml: Annotated[
        bool,
        _flag(
            "--yaml",
            help="Print only the resolved recipe, as a recipe file: `mgpu validate r.yaml --yaml > full.yaml`.",
        ),
    ] = False,
) -> None:
    """Validate a recipe and print it resolved (base merged, overrides and interpolations applied)."""
    from .distributed import resolve_nodes
    from .recipe import load_recipe
    from .render import print_recipe
    from .sinks import check_sinks_available

    try:
        loaded = load_recipe(recipe, overrides or [])
        check_sinks_available(loaded)
        # the nodes as `mgpu train` would resolve them here (srun's or torchrun's variables): refused alike
        nodes = resolve_nodes(os.environ, {}, loaded.recipe.distributed)
    except UserError as exc:
        _fail(exc)
    dist = loaded.recipe.distributed  # shown as `mgpu train` records them in recipe.resolved.yaml
    dist.nnodes, dist.node_rank, dist.rdzv_endpoint = nodes.nnodes, nodes.node_rank, nodes.rdzv_endpoint
    if as_yaml:
        from .recipe import to_yaml
        from .templates import schema_comment

        sys.stdout.write(f"{schema_comment()}\n# resolved from {loaded.path}\n{to_yaml(loaded.recipe)}")
        return
    print_recipe(loaded)
    if nodes.nnodes > 1 or nodes.under_torchrun:
        typer.echo(f"nodes: {nodes.describe()}" + (" (started by torchrun)" if nodes.under_torchrun else ""))


@app.command(cls=_Command)
def prepare(recipe: RecipeArg, overrides: OverridesArg = None) -> None:
    """Tokenise the dataset once (cached for `mgpu train`) and print statistics and a rendered example."""
    from .recipe import load_recipe

    try:
        loaded = load_recipe(recipe, overrides or [])
        _offline_if_hub_unreachable(loaded.recipe)
        from .data import report

        try:
            rep = report(loaded.recipe)
        except UserError as exc:
            raise loaded.locate(exc) from None
        except KeyboardInterrupt:
            raise Interrupted("stopped while preparing; the cache keeps only complete data: run it again") from None
    except (UserError, TrainingFailed, Interrupted) as exc:
        _fail(exc)
    from .render import print_data_report

    print_data_report(rep)


@app.command(cls=_Command)
def schema(
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
    force: Annotated[bool, _flag("--force", help="Overwrite an existing file that is not a recipe schema.")] = False,
) -> None:
    """Print (or write) the JSON Schema of a recipe, for editors and CI."""
    import json

    from .recipe import recipe_json_schema

    schema = recipe_json_schema()
    text = json.dumps(schema, indent=2) + "\n"
    if output is None:
        sys.stdout.write(text)
        return
    try:
        if output.is_dir():
            found = f"expected a file to write, found the folder {output}"
            hint = f"e.g. --output {output / 'recipe.schema.json'}"
            raise UserError(Problem("argument --output", found, hint), "invalid arguments")
        if output.exists() and not force and not _is_recipe_schema(output, schema["title"]):
            found = f"{output} exists and is not a recipe schema"
            raise UserError(
                Problem("argument --output", found, "pass --force to overwrite it, or choose another path"),
                "invalid arguments",
            )
        try:
            output.write_text(text, encoding="utf-8")
        except OSError as exc:
            found = f"cannot write {output}: {exc.strerror or exc}"
            hint = "choose a path in a folder you can write to"
            raise UserError(Problem("argument --output", found, hint), "invalid arguments") from exc
    except UserError as exc:
        _fail(exc)
    typer.echo(f"wrote {output}")


def _is_recipe_schema(path: Path, title: str) -> bool:
    """Whether `path` holds a JSON Schema of a recipe (an earlier `mgpu schema --output`): replaced without --force."""
    import json

    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(found, dict) and found.get("title") == title and "$schema" in found


@app.command(cls=_Command)
def init(
    where: Annotated[str, typer.Argument(help="Where to write the starter recipe.", metavar="PATH")] = "recipe.yaml",
    force: Annotated[bool, _flag("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter recipe that trains the builtin tiny model on a bundled dataset."""

    from .templates import write_starter

    path = Path(where)  # (kept as text first: a Path drops the trailing slash of `new-folder/`)
    try:
        if path.is_dir() or where.endswith(("/", os.sep)):  # --force cannot help: a folder is never a recipe
            hint = f"give the recipe file to write, e.g. mgpu init {path / 'recipe.yaml'}"
            found = f"expected a recipe file path, found the folder {path}"
            raise UserError(Problem("argument PATH", found, hint), "invalid arguments")
        if path.suffix.lower() not in (".yaml", ".yml"):
            found = f"expected a recipe file ending in .yaml, found {where!r}"
            hint = f"e.g. mgpu init {path.with_name(path.name + '.yaml')}, or mgpu init {path / 'recipe.yaml'}"
            raise UserError(Problem("argument PATH", found, hint), "invalid arguments")
        written, kept = write_starter(path, force=force)
    except UserError as exc:
        _fail(exc)
    typer.echo(
        f"wrote {written}" + (f"\n{kept}" if kept else "") + f"\nnext: mgpu validate {path}  then  mgpu train {path}"
    )


@app.command(cls=_Command)
def doctor(
    json_output: Annotated[bool, _flag("--json", help="Print one JSON document instead of a table.")] = False,
    probe: Annotated[
        bool, _flag("--probe", help="Also start one worker per GPU and time an all-reduce (slower).")
    ] = False,
    output_dir: Annotated[
        Path, typer.Option("--output-dir", help="Folder whose free disk space is checked for checkpoints.")
    ] = Path("outputs"),
    probe_timeout: Annotated[
        float, typer.Option("--probe-timeout", help="Seconds before the probe is declared hung and killed.")
    ] = 120.0,
) -> None:
    """Check that this machine is ready to train on several GPUs; exit 1 when a check fails."""
    import math

    from .doctor import print_report, run_checks

    if not (math.isfinite(probe_timeout) and probe_timeout > 0):
        found = f"expected a positive number of seconds, found {probe_timeout:g}"
        hint = "e.g. --probe-timeout 300 on a slow machine (default 120)"
        _fail(UserError(Problem("argument --probe-timeout", found, hint), "invalid arguments"))
    if probe:  # the checks take a second; the probe starts workers (tens of seconds): say so on stderr
        import contextlib

        from .render import people_console

        err = people_console(stderr=True)
        doing = f"probing: one worker per GPU (2 on CPU) times an all-reduce; up to {probe_timeout:g} s"
        if err.is_terminal:
            waiting: Any = err.status(doing)
        else:
            err.print(doing + " ...")
            waiting = contextlib.nullcontext()
        with waiting:
            report = run_checks(output_dir=output_dir, probe=True, probe_timeout=probe_timeout)
    else:
        report = run_checks(output_dir=output_dir)
    if json_output:
        import json

        sys.stdout.write(json.dumps(report.to_dict(), indent=2) + "\n")
    else:
        print_report(report)
    raise typer.Exit(report.exit_code)


@app.command(cls=_Command)
def suggest(
    model: Annotated[
        str,
        typer.Option(
            "--model",
            help="Size (0.5B, 1B, 1.5B, 3B, 7B, 8B, 13B, 14B, 32B, 70B, 405B), hub id or local folder.",
            show_default=False,
        ),
    ],
    gpus: Annotated[int | None, typer.Option("--gpus", help="GPUs to train on (default: detected, else 1).")] = None,
    gpu_memory: Annotated[
        str | None,
        typer.Option(
            "--gpu-memory", help="Memory per GPU, e.g. 80GB (GB = GiB, 2^30 bytes; default: the smallest detected GPU)."
        ),
    ] = None,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per sample (model.max_seq_length).")] = 2048,
    method: Annotated[
        str | None,
        typer.Option("--method", help="qlora | lora | full (default: lora if 16-bit weights fit, else qlora)."),
    ] = None,
    global_batch: Annotated[int, typer.Option("--global-batch", help="Target samples per optimizer step.")] = 32,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adamw | adamw_8bit | sgd.")] = "adamw_8bit",
    strategy: Annotated[
        str,
        typer.Option(
            "--strategy", help="ddp (replicas) | fsdp (sharded) | auto (fsdp only when a replica does not fit)."
        ),
    ] = "auto",
    dora: Annotated[
        bool, _flag("--dora", help="DoRA adapters (lora.use_dora): sized with their larger activations.")
    ] = False,
    as_json: Annotated[bool, _flag("--json", help="One JSON document on stdout.")] = False,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write a ready recipe here.")] = None,
    force: Annotated[bool, _flag("--force", help="Overwrite an existing --output file.")] = False,
) -> None:
    """Memory forecast and recommended settings (method, micro-batch, accumulation, checkpointing) per GPU."""
    import json

    from .configgen import check_suggest_args, recipe_yaml
    from .configgen import plan as make_plan
    from .paths import output_file_problems, write_text_atomically

    # --output is checked with the other arguments, before anything is planned or printed
    problems = output_file_problems(output, "--output", force) if output is not None else []
    try:
        arch, num_gpus, mem = check_suggest_args(
            model, gpus, gpu_memory, seq_len, method, global_batch, optimizer, strategy
        )
    except UserError as exc:
        problems = exc.problems + problems
    if dora and method == "full":
        problems.append(Problem("argument --dora", "DoRA adapts LoRA; found --method full (no adapters)",
                                "leave out --dora, or choose --method lora or qlora"))  # fmt: skip
    if problems:
        _fail(UserError(problems, "invalid arguments"))
    p = make_plan(
        arch,
        gpu_memory_bytes=mem,
        num_gpus=num_gpus,
        seq_len=seq_len,
        method=method,  # type: ignore[arg-type]
        global_batch=global_batch,
        optimizer=optimizer,
        strategy=strategy,
        dora=dora,
    )
    if as_json:
        sys.stdout.write(json.dumps(p.to_dict(), indent=2) + "\n")
    else:
        from .render import print_plan

        print_plan(p)
    if not p.fits:
        if output is not None:  # the plan above says why; the exit code alone would not say the file is missing
            typer.echo(f"error: nothing fits, so no recipe was written to {output}", err=True)
        raise typer.Exit(2)
    if output is not None:
        from .memory import SIZE_HUB_IDS, find_config

        config = find_config(model)
        name = str(config.parent.resolve()) if config is not None and Path(model).exists() else model
        name = SIZE_HUB_IDS.get(arch.name, name) if arch.name in SIZE_HUB_IDS and name == model else name
        command = "mgpu suggest " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "mgpu suggest"
        try:
            write_text_atomically(output, recipe_yaml(p, name, command, output.name))
        except OSError as exc:
            _fail(UserError(f"cannot write {output}: {exc}"))
        (sys.stderr if as_json else sys.stdout).write(f"wrote {output}\n")


def _flag_meant_as_override(argv: list[str]) -> UserError | None:
    """`mgpu train recipe.yaml --max-steps 5`: a flag that is no option of the command but names a recipe key is
    refused with the KEY=VALUE that sets it (click would only say "No such option")."""
    if not argv or argv[0] not in ("train", "validate", "prepare"):
        return None
    flags = [(i, a) for i, a in enumerate(argv) if a.startswith("--") and len(a) > 2]
    if not flags:
        return None
    import typer.main

    command = typer.main.get_command(app).commands[argv[0]]  # type: ignore[attr-defined]
    known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for i, arg in flags:
        name, has_value, value = arg[2:].partition("=")
        if f"--{name}" in known:
            continue
        from .recipe import keys_named

        keys = keys_named(name.replace("-", "_"))
        if not keys:
            return None  # click names the unknown option
        nxt = argv[i + 1] if i + 1 < len(argv) else ""
        if not has_value:
            value = nxt if nxt and not nxt.startswith("-") and "=" not in nxt and not nxt.endswith(".yaml") else "..."
        return UserError(
            Problem(
                f"option --{name}",
                f"`mgpu {argv[0]}` has no such option; recipe keys are set as KEY=VALUE after the recipe",
                " or ".join(f"{key}={value}" for key in keys),
            ),
            "invalid arguments",
        )
    return None


def main() -> None:
    """Console-script entry point."""
    try:
        misplaced = _flag_meant_as_override(sys.argv[1:])
        if misplaced is not None:
            try:
                _fail(misplaced)
            except typer.Exit as exc:
                sys.exit(exc.exit_code)
        app()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    finally:
        gc.freeze()  # the process ends next: spare Python's exit a scan of every object torch made for cycles


if __name__ == "__main__":
    main()
