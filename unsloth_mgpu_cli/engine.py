"""The training engine's parent side: `train`, then `_worker_main` per rank (trainer.py: `Trainer.setup`, `fit`).

    mgpu train recipes/quickstart.yaml

Parent: validate, detect devices (pynvml, no CUDA init), fill `auto`s, build/locate the model, tokenise the
data once, write `recipe.resolved.yaml`, launch one worker per GPU. Worker: join the process group, load
the model through Unsloth on its own device, start from rank 0's trainable weights (checked), then train
with gradients synchronised by `distributed.GradientSynchronizer`. Rank 0 owns every side effect.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import os
import shlex
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InterruptedBeforeStart, NodesNeverMet, Problem, TrainingFailed, UserError
from .recipe import AUTO, DEFAULT_TARGET_MODULES, LoadedRecipe, Recipe, check_batch_fits, to_yaml


@dataclass
class RunPlan:
    """Everything a worker needs, decided in the parent (picklable)."""

    recipe: Recipe
    model_path: str
    data_dir: str
    num_workers: int
    device_type: str
    output_dir: str
    resume_from: str | None = None
    identity: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    eval_data_dir: str | None = None  # a separate eval cache (dataset.eval_path); eval_ratio splits data_dir
    stop_file: str | None = None  # the parent creates it on Ctrl-C/SIGTERM: stop at the next step boundary
    # wall-clock marks (time.time()) of the parent's start-up, for the time-to-first-step breakdown
    timeline: dict[str, float] = field(default_factory=dict)
    prepared_output_dir: bool = False  # this node's parent made output.dir ready (node 0; global rank 0 under torchrun)
    # tokenising beside the workers' start (datagate.py): the folder of the child's result and the child's pid
    data_gate: str | None = None
    data_gate_pid: int | None = None


# Written by the parent when it is asked to stop; rank 0 looks for it at every step boundary.
STOP_FILE = ".stop-requested"


# ------------------------------------------------------------------------------------------------------
# Parent side
# ------------------------------------------------------------------------------------------------------


def detect_device(recipe: Recipe) -> tuple[str, int]:
    """(device type, GPUs available) without initialising CUDA in this process."""
    from .devices import count_gpus

    gpus = count_gpus()
    device = recipe.distributed.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    if device == "cuda" and gpus == 0:
        raise UserError(
            Problem(
                "distributed.device",
                "cuda was asked for but no GPU is visible",
                "run `mgpu doctor`, or set distributed.device: cpu",
            ),
            "invalid recipe",
        )
    if device == "cpu" and recipe.model.load_in_4bit and recipe.distributed.strategy != "fsdp":
        # the recipe check sees only an explicit `device: cpu`; `auto` on a host without GPUs lands here
        raise UserError(
            Problem(
                "model.load_in_4bit",
                f"4-bit loading with distributed.strategy {recipe.distributed.strategy} needs CUDA (bitsandbytes); "
                "no GPU is visible, so distributed.device auto means cpu",
                "set distributed.strategy: fsdp (4-bit NF4 storage that also runs on CPU) or model.load_in_4bit: false",
            ),
            "invalid recipe",
        )
    if device == "cpu" and recipe.model.attention in ("efficient", "cudnn"):
        raise UserError(
            Problem(
                "model.attention",
                f"the {recipe.model.attention} attention kernel runs only on CUDA, and this run is on cpu",
                "set model.attention: auto (or flash or math, which also run on CPU)",
            ),
            "invalid recipe",
        )
    return device, gpus


def resolve_workers(recipe: Recipe, device: str, gpus: int) -> int:
    """Workers on this host: `distributed.num_gpus`, or every GPU (1 CPU worker) for auto; refuses more than exist."""
    n = recipe.distributed.num_gpus
    if n == AUTO:
        return gpus if device == "cuda" else 1
    if device == "cuda" and n > gpus:
        raise UserError(
            Problem(
                "distributed.num_gpus",
                f"{n} workers asked for but only {gpus} GPU(s) are visible",
                f"set distributed.num_gpus={gpus} (or auto)",
            ),
            "invalid recipe",
        )
    if device == "cpu" and n > (os.cpu_count() or 1) * 4:
        raise UserError(
            Problem(
                "distributed.num_gpus",
                f"{n} CPU workers on {os.cpu_count()} cores would thrash",
                "use at most a few CPU workers",
            ),
            "invalid recipe",
        )
    return int(n)


def resolve_auto_values(recipe: Recipe, device: str, num_workers: int) -> tuple[Recipe, list[str]]:
    """Fill `auto` training values with the optimal-config generator (the one behind `mgpu suggest`)."""
    from .configgen import resolve_auto
    from .devices import gpu_memory_bytes

    mem = gpu_memory_bytes() if device == "cuda" else None
    recipe, notes = resolve_auto(recipe, num_workers, mem)
    return recipe, list(notes)


def check_output_dir(
    out: Path, overwrite: bool, resume: bool, inputs: list[Path] | None = None, nothing_to_resume: bool = False
) -> None:
    """Everything about output.dir that can be refused before training, without changing anything on disk.

    A non-empty folder needs --resume or --overwrite, and the refusal says what the folder holds. `--resume auto`
    that found no checkpoint (`nothing_to_resume`) starts from step 0: in an empty folder, or over a run that
    stopped before its first checkpoint (a job requeued with the same command), not over a finished run or files
    that are not a run's. --overwrite
    deletes only what a run wrote (checkpoint.survey_output_dir), so it is refused for a folder that holds anything
    else, that is or contains the current directory, or that contains one of the run's `inputs` (the recipe, the
    data, a local model). The folder (or, when it does not exist yet, its nearest existing parent) must accept a
    new file: checked by writing, since permissions lie for root.
    """
    from .checkpoint import describe_entries, holds_run, survey_output_dir

    if out.exists() and not out.is_dir():
        raise UserError(Problem("output.dir", f"expected a folder, found a file: {out}"), "invalid recipe")
    if out.is_dir() and resume and nothing_to_resume:
        _check_fresh_start(out)
    if out.is_dir() and not resume:
        ours, others = survey_output_dir(out)
        if overwrite:
            problems = _overwrite_problems(out, others, inputs or [])
            if problems:
                raise UserError(problems, "refusing to overwrite")
        elif ours or others:
            run = holds_run(out)
            if run and not others:
                found, hint = (
                    f"{out} already holds a run ({describe_entries(ours)})",
                    "pass --resume auto to continue it, --overwrite to replace it, or choose another output.dir",
                )
            elif run:
                found, hint = (
                    f"{out} already holds a run, and other files: {describe_entries(others)}",
                    "pass --resume auto to continue the run, or choose another output.dir (--overwrite deletes "
                    "only a run's files, so it refuses a folder that holds others)",
                )
            elif others:
                found, hint = (
                    f"{out} holds no run but other files: {describe_entries(others)}",
                    f"choose a new or empty folder for output.dir, e.g. output.dir={out / 'run'}",
                )
            else:
                found, hint = (
                    f"{out} holds files of an earlier mgpu run or export: {describe_entries(ours)}",
                    "pass --overwrite to delete them, or choose another output.dir",
                )
            raise UserError(Problem("output.dir", found, hint), "invalid arguments")
    parent = next((a for a in (out, *out.parents) if a.exists()), Path("/"))
    try:
        if not parent.is_dir():
            raise NotADirectoryError(f"{parent} is a file")
        with tempfile.TemporaryDirectory(prefix=".mgpu-write-test-", dir=parent) as probe:
            (Path(probe) / "probe").write_text("ok")
    except OSError as exc:
        raise UserError(
            Problem("output.dir", f"cannot write to {out}: {exc.strerror or exc}", "choose a writable folder"),
            "invalid recipe",
        ) from exc


_OUTPUT_LOCK: Any = None  # the open lock file of this process's run (released when the process ends)


def _lock_output_dir(out: Path) -> None:
    """Hold an exclusive lock for `out` until this process ends (even if it is killed), or refuse the run.

    The lock file lives in mgpu's cache (`locks/`, named after the folder's absolute path), not in output.dir: a
    refused run must leave output.dir as it was. Where locks cannot be taken (no fcntl, an unusable cache folder:
    refused later with its own message) the run goes on without one.

    Raises:
        UserError: another `mgpu train` on this host holds the lock (named by its pid).
    """
    global _OUTPUT_LOCK
    try:
        import fcntl
    except ImportError:  # Windows
        return
    if _OUTPUT_LOCK is not None:  # an earlier run of this process (one runs at a time): its lock goes
        _OUTPUT_LOCK.close()
        _OUTPUT_LOCK = None
    path = _lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = path.open("a+")
    except OSError:
        return
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise UserError(
            Problem(
                "output.dir",
                f"{out} is in use by another mgpu train on this host ({holder})",
                "wait for it to end, or choose another output.dir",
            ),
            "invalid arguments",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}, started {time.strftime('%H:%M:%S')}")
    handle.flush()
    _OUTPUT_LOCK = handle


def _lock_path(out: Path) -> Path:
    """The lock file of `out` in mgpu's cache (see _lock_output_dir)."""
    import hashlib

    from .models import cache_dir

    key = hashlib.sha1(str(out.expanduser().absolute()).encode()).hexdigest()[:20]
    return cache_dir() / "locks" / f"{key}.lock"


def live_run(out: Path) -> str | None:
    """Who trains into `out` on this host right now (`pid N, started HH:MM:SS`), or None."""
    try:
        import fcntl

        handle = _lock_path(Path(out)).open("r")
    except (ImportError, OSError):  # no fcntl, or no lock file: no run here ever took one
        return None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return handle.read().strip() or "another process"
        fcntl.flock(handle, fcntl.LOCK_UN)
    return None


def _check_fresh_start(out: Path) -> None:
    """`--resume auto` found no checkpoint in `out`: starting from step 0 must not replace a finished run or write
    among files that are not a run's."""
    from .checkpoint import describe_entries, survey_output_dir

    ours, others = survey_output_dir(out)
    finished = [p for p in ours if p.name in ("summary.json", "adapter", "model")]
    if others:
        found = f"--resume auto found no checkpoint in {out}, which holds files that are not a run's: " + (
            describe_entries(others)
        )
        hint = f"choose a new or empty folder for output.dir, e.g. output.dir={out / 'run'}"
    elif finished:
        found = (
            f"--resume auto found no checkpoint in {out}, which holds a finished run ({describe_entries(finished)}): "
            "starting again from step 0 would replace it"
        )
        hint = (
            "pass --overwrite to replace it or choose another output.dir; a run resumes from the checkpoints that "
            "output.save_steps writes"
        )
    else:
        return
    raise UserError(Problem("output.dir", found, hint), "invalid arguments")


def run_inputs(recipe_path: Path | None, recipe: Recipe) -> list[Path]:
    """What --overwrite must not delete: the recipe, the data, a local model. A run's own recipe.resolved.yaml,
    re-run, is not among them: it is read before --overwrite deletes it, and written again."""
    out = Path(recipe.output.dir)
    rerun = recipe_path is not None and Path(recipe_path).resolve() == (out / "recipe.resolved.yaml").resolve()
    inputs = [None if rerun else recipe_path, recipe.model.name, recipe.dataset.eval_path]
    inputs += [src.section.path for src in recipe.dataset.sources()]
    return [Path(p) for p in inputs if p]


def _overwrite_problems(out: Path, others: list[Path], inputs: list[Path]) -> list[Problem]:
    """Why --overwrite may not empty `out`: each thing it would lose (nothing when only a run's files are there)."""
    from .checkpoint import describe_entries

    problems = []
    here, cwd = out.resolve(), Path.cwd().resolve()
    if cwd.is_relative_to(here):
        what = "the current directory" if cwd == here else f"an ancestor of the current directory ({cwd})"
        problems.append(Problem("output.dir", f"{out} is {what}; --overwrite would empty it"))
    inside = [p for p in inputs if p.exists() and p.resolve().is_relative_to(here)]
    if inside:
        names = ", ".join(str(p.resolve().relative_to(here)) for p in inside)
        problems.append(Problem("output.dir", f"{out} contains inputs of this run: {names}"))
    if others:
        problems.append(
            Problem(
                "output.dir",
                f"{out} holds files that no run wrote: {describe_entries(others)}",
                "--overwrite deletes only what mgpu writes there (recipe.resolved.yaml, metrics.jsonl, adapter/, "
                "checkpoints/, logs/, ...: see docs/checkpoints.md)",
            )
        )
    if problems:  # one fix for all of them, said once
        last, own = problems[-1], f"give the run a folder of its own, e.g. output.dir={out / 'run'}"
        last.hint = f"{last.hint}; {own}" if last.hint else own
    return problems


def check_free_space(out: Path, recipe: Recipe, model_path: str, total_steps: int | None = None) -> str | None:
    """Refuse a disk that cannot hold the adapter and the kept checkpoints; returns a warning when it is tight.

    The estimate counts the trainable weights (fp32) for the adapter and, per checkpoint, the weights and two
    AdamW moments, for `save_total_limit + 1` checkpoints (one more exists while a new one is written); with no
    limit, for every checkpoint of the run's `total_steps`.
    """
    from .memory import architecture_from_config, find_config, lora_params
    from .render import size_text

    config = find_config(model_path)
    if config is None:
        return None
    try:
        arch = architecture_from_config(json.loads(config.read_text()), model_path)
    except Exception:  # an unusual config: the estimate is a courtesy, never a reason to refuse
        return None
    trainable = (
        lora_params(arch, recipe.lora.r, recipe.lora.target_modules)
        if recipe.lora is not None
        else arch.num_parameters()
    )
    o = recipe.output
    if not o.save_steps:
        keep = 1
    elif o.save_total_limit is not None:
        keep = o.save_total_limit + 1
    else:  # every checkpoint stays
        keep = -(-(total_steps or o.save_steps) // o.save_steps) + 1
    need = trainable * 4 + keep * trainable * 12
    parent = next((a for a in (out, *out.parents) if a.exists()), Path("/"))
    free = shutil.disk_usage(parent).free
    if free < need:
        raise UserError(
            Problem(
                "output.dir",
                f"{parent} has {size_text(free)} free; this run writes about {size_text(need)} (adapter + {keep} "
                "checkpoint(s))",
                "free some space, choose another output.dir, or lower output.save_total_limit",
            ),
            "not enough disk space",
        )
    if free < 2 * need:
        return f"output.dir has {size_text(free)} free, close to the {size_text(need)} this run writes"
    return None


def make_output_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Create output.dir; with --overwrite (and no --resume) delete what an earlier run wrote there, and nothing else.

    Runs after every check passed (check_output_dir refused a folder holding other files).
    """
    from .checkpoint import remove_entries, survey_output_dir

    if overwrite and out.is_dir() and not resume:
        remove_entries(survey_output_dir(out)[0])
    out.mkdir(parents=True, exist_ok=True)


# Families whose decoder layers name their linear layers as Llama's do; embed_tokens and lm_head are trainable
# through PEFT too (continued pre-training).
_LLAMA_NAMED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
_LLAMA_NAMED_MODULES = (*DEFAULT_TARGET_MODULES, "embed_tokens", "lm_head")


def check_target_modules(recipe: Recipe, model_path: str) -> None:
    """Refuse LoRA targets the model does not have, before anything loads: a typo such as `q_prj` would otherwise
    fail in every worker after the model loaded. Checked for the Llama-named families (config.json's
    model_type); PEFT matches a dotted name such as `self_attn.q_proj` by its last part."""
    from .memory import model_family

    # no readable config: loading the model will say what is wrong with it
    family = model_family(model_path) if recipe.lora is not None else None
    if family not in _LLAMA_NAMED_FAMILIES:
        return
    problems = []
    for name in recipe.lora.target_modules:
        if name.rsplit(".", 1)[-1] not in _LLAMA_NAMED_MODULES:
            close = difflib.get_close_matches(name, _LLAMA_NAMED_MODULES, n=1)
            problems.append(
                Problem(
                    "lora.target_modules",
                    f"a {family} model has no layer named {name!r}; its layers: {', '.join(_LLAMA_NAMED_MODULES)}",
                    f"did you mean '{close[0]}'?"
                    if close
                    else "leave lora.target_modules out for all seven projections",
                )
            )
    if problems:
        raise UserError(problems, "invalid recipe")


def train(
    loaded: LoadedRecipe,
    overwrite: bool = False,
    resume: str | None = None,
    nnodes: int | None = None,
    node_rank: int | None = None,
    rdzv_endpoint: str | None = None,
) -> dict[str, Any]:
    """Run `mgpu train`: returns rank 0's summary. Raises UserError / TrainingFailed / Interrupted.

    Every check that can refuse the run (recipe, devices, ports, output folder, disk space, checkpoint, data)
    happens before anything is written, so a refused run leaves output.dir as it was (what tokenising beside the
    workers' start finds: the folder is put back as it was).
    """
    from . import data as data_mod

    try:
        return _train(loaded, overwrite, resume, nnodes, node_rank, rdzv_endpoint)
    finally:
        data_mod.forget_preloaded_rows()  # read for a fork that has its own copy, or for a run that did not start


def _train(
    loaded: LoadedRecipe,
    overwrite: bool,
    resume: str | None,
    nnodes: int | None,
    node_rank: int | None,
    rdzv_endpoint: str | None,
) -> dict[str, Any]:
    from rich.markup import escape

    from . import data as data_mod
    from .checkpoint import check_resume_compatible, find_resume_checkpoint, run_identity, verify_safe_to_load
    from .distributed import check_rendezvous_host, check_rendezvous_port
    from .models import resolve_model_path
    from .render import console
    from .sinks import check_sinks_available

    timeline = {"start": time.time()}
    check_sinks_available(loaded)
    recipe, nodes, notes = _place_workers(loaded.recipe.model_copy(deep=True), nnodes, node_rank, rdzv_endpoint)
    dist_cfg = recipe.distributed
    num_workers = dist_cfg.num_gpus * dist_cfg.nnodes
    out = Path(recipe.output.dir)
    is_main_node = nodes.rank == 0 if nodes.under_torchrun else dist_cfg.node_rank == 0
    if dist_cfg.nnodes > 1 and dist_cfg.rdzv_endpoint and not nodes.under_torchrun:
        # named as the user gave it: a flag, or the recipe key (whose file:line cli adds)
        where = "argument --rdzv-endpoint" if rdzv_endpoint else None
        if is_main_node:
            elsewhere = check_rendezvous_port(dist_cfg.rdzv_endpoint, where)  # its host name too
            if elsewhere:
                console.print(f"[yellow]warning:[/] {escape(elsewhere)}", soft_wrap=True)
        else:
            check_rendezvous_host(dist_cfg.rdzv_endpoint, where)
    # Every node looks (read-only; output.dir is shared): the workers check that they all agree.
    resume_notes: list[str] = []
    resume_from = find_resume_checkpoint(out, resume, resume_notes) if resume else None
    if resume_from is not None and resume != "auto":  # auto chose a checkpoint that passed this check
        verify_safe_to_load(resume_from)
    if is_main_node:
        _lock_output_dir(out)  # before its checks: two runs must not both pass them and then write there
        nothing = resume is not None and resume_from is None
        check_output_dir(out, overwrite, resume is not None, run_inputs(loaded.path, recipe), nothing_to_resume=nothing)
    data_mod.check_cache_dir()  # before the builtin model is built there
    model_path = resolve_model_path(recipe.model.name)
    check_target_modules(recipe, model_path)
    data_dir = data_mod.cache_path(recipe, model_path)
    eval_dir = data_mod.eval_cache_path(recipe, model_path)
    # On a cache miss on one node, tokenising runs beside the workers' start (datagate.py) once the rows are read and
    # look fine; otherwise here, first (so that bad rows are refused before any worker starts, as before).
    beside = (
        not nodes.under_torchrun
        and dist_cfg.nnodes == 1
        and not all(data_mod.is_cached(d) for d in (data_dir, eval_dir) if d is not None)
        and threading.active_count() == 1  # the child is forked: only from a process without other threads
        and data_mod.preload_rows(recipe)
    )
    prepare_data = functools.partial(
        _prepare_data, recipe, model_path, data_dir, eval_dir, num_workers, out if is_main_node else None, notes
    )
    show_data = None
    if not beside:
        show_data = prepare_data()
        timeline["data_ready"] = time.time()
    identity = run_identity(recipe, data_dir.name, recipe.global_batch_size(num_workers))
    if resume_from is not None:
        # before anything in output.dir changes: a refused resume leaves the run as it was
        check_resume_compatible(resume_from, identity, to_yaml(recipe))
        if _finished_already(resume_from, recipe, out):
            return {}
    if is_main_node:
        before = _OutputSnapshot.take(out)
        changed = _start_output_dir(out, recipe, overwrite, resume, resume_from)
        if show_data is not None:
            show_data()
        _print_launch(recipe, nodes, resume, resume_from, resume_notes, changed)
    elif not nodes.under_torchrun:  # the other nodes' consoles say which node they are and what they start
        console.print(f"[bold]nodes[/]: {nodes.describe()}")
        console.print(
            f"[bold]launching[/] {dist_cfg.num_gpus} worker(s) on {dist_cfg.device} (node {dist_cfg.node_rank})"
        )
    plan = RunPlan(
        recipe=recipe,
        model_path=model_path,
        data_dir=str(data_dir),
        num_workers=num_workers,
        device_type=dist_cfg.device,
        output_dir=str(out),
        resume_from=str(resume_from) if resume_from else None,
        identity=identity,
        notes=notes,
        eval_data_dir=str(eval_dir) if eval_dir is not None else None,
        stop_file=str(out / STOP_FILE),
        timeline=timeline,
        prepared_output_dir=is_main_node,
    )
    gate = None
    if beside:
        from .datagate import DataGate

        gate = DataGate.start(lambda: prepare_data()())  # prepare, check, print the data lines
        data_mod.forget_preloaded_rows()  # the child has its own copy
        plan.data_gate, plan.data_gate_pid = str(gate.folder), gate.pid
    plan.timeline["launched"] = time.time()
    try:
        results = _run_workers(plan, nodes)
    except InterruptedBeforeStart:
        if is_main_node:
            before.restore()  # no step ran: the same command runs again without --overwrite
        raise
    except (UserError, TrainingFailed) as exc:
        # the data's refusal or failure, beside the workers' start (they were ended for it): it is the cause
        found = gate.outcome() if gate is not None else None
        if is_main_node and (found is not None or isinstance(exc, (UserError, NodesNeverMet))):
            # before any step (bad input, also what only the workers could see: the nodes' recipes differ; the
            # data's preparation failed; the nodes never met): the folder goes back to what it was and the
            # command runs again without --overwrite
            before.restore()
        raise (found or exc) from None
    finally:
        if gate is not None:
            gate.close()
    result = results.get(0) or next(iter(results.values()), {}) or {}
    if result.get("interrupted"):
        raise _interrupted(
            result, loaded, {"--nnodes": nnodes, "--node-rank": node_rank, "--rdzv-endpoint": rdzv_endpoint}
        )
    if nodes.under_torchrun and nodes.rank != 0:
        return {}  # torchrun's processes share a terminal: global rank 0 prints the run's summary
    if not nodes.under_torchrun and 0 not in results:
        # another node holds global rank 0: its console shows the run's summary (and it writes summary.json)
        console.print(
            f"[bold]done[/]: node {dist_cfg.node_rank}'s workers finished; the node of global rank 0 prints the run "
            f"summary and writes {out / 'summary.json'}"
        )
        return {}
    return result


def _run_workers(plan: RunPlan, nodes: Any) -> dict[int, Any]:
    """Start this node's workers on `plan` (under torchrun: become one) and wait for them; their results by rank."""
    from .distributed import LaunchSpec, launch, run_in_place
    from .render import console

    dist_cfg, out = plan.recipe.distributed, Path(plan.output_dir)
    spec = LaunchSpec(
        nproc_per_node=dist_cfg.num_gpus,
        device_type=dist_cfg.device,
        nnodes=dist_cfg.nnodes,
        node_rank=dist_cfg.node_rank,
        rdzv_endpoint=dist_cfg.rdzv_endpoint,
        max_restarts=dist_cfg.max_restarts,
        join_timeout_s=dist_cfg.join_timeout_seconds,
        log_dir=out / "logs",
        # every node: SIGTERM reaches all of them at once (scancel, preemption), and a node whose agent took it
        # would kill its workers, so that the others could not finish the step and checkpoint either
        stop_file=out / STOP_FILE,
    )
    if nodes.under_torchrun:
        results = run_in_place(worker_entry, (plan,), nodes, dist_cfg.device)
    else:
        if dist_cfg.nnodes > 1:
            console.print(
                f"[dim]waiting for all {dist_cfg.nnodes} nodes at {dist_cfg.rdzv_endpoint} "
                f"(up to {spec.join_timeout_s} s)[/]"
            )
        results = launch(worker_entry, (plan,), spec)
    return results


def _prepare_data(
    recipe: Recipe,
    model_path: str,
    data_dir: Path,
    eval_dir: Path | None,
    num_workers: int,
    out: Path | None,
    notes: list[str],
) -> Callable[[], None]:
    """Tokenise the data (or read its cache) and run the checks that need its counts: the global batch against the
    samples, and (`out`: node 0) the disk space the run's checkpoints need. Returns what prints the data lines.

    Raises:
        UserError: bad data, no sample left, a global batch larger than the data, a disk too small.
    """
    from . import data as data_mod

    _, summary, hit = data_mod.prepare(recipe, model_path, data_dir)
    check_batch_fits(recipe, summary.samples, num_workers, data_mod.eval_hold_out(recipe, summary.samples))
    # as data.StepPlanner.total_steps counts them (a last partial global batch is not a step)
    steps = recipe.training.max_steps or data_mod.epoch_steps(
        recipe.training.epochs, summary.samples // recipe.global_batch_size(num_workers)
    )
    disk_note = check_free_space(out, recipe, model_path, steps) if out is not None else None
    eval_prepared = data_mod.prepare_eval(recipe, model_path, eval_dir)
    return functools.partial(_print_data, recipe, summary, hit, eval_prepared, notes, disk_note)


def _place_workers(
    recipe: Recipe, nnodes: int | None, node_rank: int | None, rdzv_endpoint: str | None
) -> tuple[Recipe, Any, list[str]]:
    """The nodes (flags > recipe > torchrun / SLURM environment; see distributed.resolve_nodes, multinode #9), the
    device and this node's workers, then every `auto` filled for that many workers. Returns the recipe with
    `distributed` resolved (num_gpus: this node's workers), the nodes, and the notes on what `auto` chose."""
    from .devices import min_compute_capability
    from .distributed import resolve_nodes
    from .trainer import balances_speed
    from .varlen import resolve_batching

    nodes = resolve_nodes(
        os.environ, {"nnodes": nnodes, "node_rank": node_rank, "rdzv_endpoint": rdzv_endpoint}, recipe.distributed
    )
    d = recipe.distributed
    d.nnodes, d.node_rank, d.rdzv_endpoint = nodes.nnodes, nodes.node_rank, nodes.rdzv_endpoint
    device, gpus = detect_device(recipe)
    num_local = nodes.local_world_size if nodes.under_torchrun else resolve_workers(recipe, device, gpus)
    recipe, notes = resolve_auto_values(recipe, device, num_local * d.nnodes)
    batching = resolve_batching(recipe, device, min_compute_capability() if device == "cuda" else None)
    notes += [batching] if batching else []
    d = recipe.distributed
    d.num_gpus = num_local
    d.device = device  # type: ignore[assignment]
    d.balance_speed = balances_speed(recipe, device)
    return recipe, nodes, notes


@dataclass
class _OutputSnapshot:
    """What output.dir held before this run started writing there, to go back to when it is refused at start."""

    out: Path
    existed: bool
    entries: set[Path]
    resolved: str | None

    @classmethod
    def take(cls, out: Path) -> _OutputSnapshot:
        resolved = out / "recipe.resolved.yaml"
        return cls(
            out,
            out.is_dir(),
            set(out.iterdir()) | set((out / "logs").glob("*")) if out.is_dir() else set(),
            resolved.read_text(errors="replace") if resolved.is_file() else None,
        )

    def restore(self) -> None:
        """Remove what the run added at the top of output.dir and in logs/; put recipe.resolved.yaml back."""
        if not self.out.is_dir():
            return
        logs = self.out / "logs"
        for path in [*(logs.glob("*") if logs.is_dir() else []), *self.out.iterdir()]:
            if path not in self.entries and path.exists():
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        # (after --overwrite the earlier run is gone: its recipe would describe nothing)
        if self.resolved is not None and any(p.exists() for p in self.entries if p.name != "recipe.resolved.yaml"):
            (self.out / "recipe.resolved.yaml").write_text(self.resolved)
        if not self.existed:
            with contextlib.suppress(OSError):
                self.out.rmdir()


def _start_output_dir(
    out: Path, recipe: Recipe, overwrite: bool, resume: str | None, resume_from: Path | None
) -> list[str]:
    """Rank 0's node, once every check has passed: output.dir made (or emptied), stale files of an interrupted
    run removed, metrics rows after the resumed checkpoint dropped, and `recipe.resolved.yaml` written.

    Returns the settings a resume changed (`training.learning_rate: 0.003 -> 0.0001`), which the new
    recipe.resolved.yaml records in its header, with the earlier resumes' records, as it replaces the old one."""
    from .checkpoint import changed_settings, clean_stale, read_state, truncate_metrics

    make_output_dir(out, overwrite, resume is not None)
    clean_stale(out)
    header = ["# Every value of this run, `auto`s filled in (written by mgpu train)."]
    changed: list[str] = []
    text = to_yaml(recipe)
    if resume is not None:
        # rows logged after the checkpoint will be logged again: no duplicate steps in metrics.jsonl
        start = int(read_state(resume_from)["step"]) if resume_from else 0
        truncate_metrics(out, start)
        if resume_from is not None:
            old = out / "recipe.resolved.yaml"
            earlier = old.read_text(errors="replace") if old.is_file() else ""
            header += [line for line in earlier.splitlines() if line.startswith("# Resumed at step")]
            # compared with the recipe the checkpoint was trained with: its own run's (another folder's, when a run
            # is continued into a new one); nothing to compare with when that is gone
            source = resume_from.parent.parent / "recipe.resolved.yaml"
            trained_with = source.read_text(errors="replace") if source.is_file() else ""
            changed = changed_settings(trained_with, text)
            if changed:
                header.append(f"# Resumed at step {start} with: {'; '.join(changed)}")
    (out / "recipe.resolved.yaml").write_text("\n".join(header) + "\n" + text)
    return changed


def _print_data(
    recipe: Recipe, summary: Any, hit: bool, eval_prepared: tuple[Any, Any] | None, notes: list[str], disk: str | None
) -> None:
    """The data line (samples, tokens, cache), the mix's sources, the eval data, what `auto` chose, and a warning
    when the disk is tight."""
    from .render import console

    console.print(
        f"[bold]data[/]: {summary.describe(recipe.model.max_seq_length)}"
        + (" [dim](cached)[/]" if hit else "")
        + f"; batching {recipe.dataset.batching}"
    )
    for source in summary.mix:
        console.print(f"  [dim]mix[/] {source.describe()}", soft_wrap=True)
    if eval_prepared is not None:
        console.print(f"[bold]eval data[/]: {eval_prepared[1].samples} samples from {recipe.dataset.eval_path}")
    elif recipe.dataset.eval_ratio:
        console.print(f"[bold]eval data[/]: {recipe.dataset.eval_ratio:.0%} of the samples held out")
    for note in notes:
        console.print(f"[dim]auto: {note}[/]")
    if disk:
        console.print(f"[yellow]warning:[/] {disk}")


def _print_launch(
    recipe: Recipe,
    nodes: Any,
    resume: str | None,
    resume_from: Path | None,
    notes: list[str],
    changed: list[str] | None = None,
) -> None:
    """What is started where (nodes, workers, device, global batch), and from which checkpoint."""
    from .render import console

    d = recipe.distributed
    if d.nnodes > 1 or nodes.under_torchrun:
        console.print(
            f"[bold]nodes[/]: {nodes.describe()}" + (" [dim](started by torchrun)[/]" if nodes.under_torchrun else "")
        )
    console.print(
        f"[bold]launching[/] {d.num_gpus} worker(s) on {d.device}"
        + (f" x {d.nnodes} nodes" if d.nnodes > 1 else "")
        + f"; global batch {recipe.global_batch_size(d.num_gpus * d.nnodes)} samples/step"
    )
    for note in notes:
        console.print(f"[yellow]warning:[/] {note}", soft_wrap=True)
    if resume_from is not None:
        console.print(f"[bold]resuming[/] from {resume_from}")
        if changed:  # allowed (see docs/checkpoints.md), but the steps before the checkpoint used the old values
            console.print(
                "note: settings changed since the checkpoint (recorded in recipe.resolved.yaml): " + "; ".join(changed),
                soft_wrap=True,
                markup=False,
                style="yellow",
            )
    elif resume:
        console.print("[dim]--resume auto: no checkpoint yet, starting from step 0[/]")


def _interrupted(result: dict[str, Any], loaded: LoadedRecipe, node_flags: dict[str, Any]) -> Exception:
    """The error for a run stopped by a request (Ctrl-C, SIGTERM): where it stopped, and the command that goes on
    from there (the same one, overrides and node flags included, with --resume auto)."""
    from .errors import Interrupted

    where = (
        f"stopped after step {result.get('steps')}; checkpoint saved in {result.get('checkpoint')}"
        if result.get("checkpoint")
        else "stopped before the first step of this session"
        + ("" if result.get("steps") is None else f" (at step {result['steps']})")
        + ": nothing new to save"
    )
    return Interrupted(f"{where}. Continue with: {continue_command(loaded, node_flags)}")


def continue_command(loaded: LoadedRecipe, node_flags: dict[str, Any]) -> str:
    """The command that goes on from the newest checkpoint: this one (overrides and node flags included) with
    --resume auto."""
    again = ["mgpu", "train", str(loaded.path or "RECIPE"), *loaded.overrides]
    for flag, value in node_flags.items():
        again += [flag, str(value)] if value is not None else []
    return shlex.join([*again, "--resume", "auto"])


def resume_hint(loaded: LoadedRecipe, node_flags: dict[str, Any]) -> str | None:
    """For a run that failed: where it can go on from (its newest complete checkpoint) and the command, or None."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(Path(loaded.recipe.output.dir))
    if not found:
        return None
    return f"the newest checkpoint is {found[-1]}; continue with: {continue_command(loaded, node_flags)}"


def _final_files_written(out: Path) -> bool:
    """The run in `out` wrote its summary and final weights (not only its last checkpoint)."""
    return (out / "summary.json").is_file() and any((out / name).is_dir() for name in ("adapter", "model"))


def _finished_already(ckpt: Path, recipe: Recipe, out: Path) -> bool:
    """A resume at or past `training.max_steps`: True (after saying so) when the run is complete and nothing is to
    be done; a UserError when the checkpoint lies beyond max_steps. Nothing in output.dir changes either way."""
    from .checkpoint import read_state
    from .render import console

    state = read_state(ckpt)
    step, max_steps = int(state["step"]), recipe.training.max_steps
    run = state.get("run_state") or {}
    patience = recipe.training.early_stopping_patience
    if run.get("stopped_early") and patience is not None and run.get("evals_without_improvement", 0) >= patience:
        if not _final_files_written(out):
            return False  # stopped between the last checkpoint and the final save: the workers save it
        console.print(
            f"[bold]nothing to do[/]: the run in {out} stopped early at step {step} "
            f"({run['evals_without_improvement']} evaluations in a row without a lower eval loss); raise "
            "training.early_stopping_patience or remove it to train further"
        )
        return True
    if max_steps is None or step < max_steps:
        return False
    if step > max_steps:
        raise UserError(
            Problem(
                "training.max_steps",
                f"{max_steps} is below the step of the checkpoint to resume ({ckpt.name})",
                f"raise training.max_steps above {step} to train further, or start anew with --overwrite",
            ),
            "nothing to resume",
        )
    if not _final_files_written(out):
        return False  # stopped between the last checkpoint and the final save: the workers save it
    console.print(
        f"[bold]nothing to do[/]: the run in {out} finished at step {step} (training.max_steps={max_steps}); "
        "raise training.max_steps to train further"
    )
    return True


# ------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------


def worker_entry(plan: RunPlan) -> dict[str, Any]:
    """Entry point of every worker process (spawned by the elastic launcher)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_worker_main)(plan)


def _worker_main(plan: RunPlan) -> dict[str, Any]:
    from . import distributed as D

    plan.timeline["worker_start"] = time.time()
    # First, so a Ctrl-C during the slow imports is remembered rather than killing the worker mid-way.
    stop = D.StopSignal(plan.stop_file)
    # A launcher killed outright (SIGKILL, OOM killer) sends no stop. torch's spawn asks the kernel for a SIGINT
    # then, which can come twice and so escalate to an abort without a checkpoint; ask for PARENT_DIED instead, a
    # stop request like Ctrl-C's (finish the step, checkpoint, exit) that never escalates.
    # (The launcher's pid, not "parent is pid 1": in a container the launcher may itself be pid 1.)
    parent = int(os.environ.get(D.LAUNCHER_PID) or os.getppid())
    if stop.installed:
        D.die_with_parent(D.PARENT_DIED)
        if os.getppid() != parent:  # the launcher died before the line above
            os.kill(os.getpid(), D.PARENT_DIED)
    if plan.data_gate:  # tokenising beside this start: a refusal made already ends this worker now
        from .datagate import register

        register(Path(plan.data_gate), int(os.environ.get("RANK", "0")))
    timeout = plan.recipe.distributed.timeout_seconds
    # Loading the model takes minutes on some ranks and seconds on others: setup waits at least
    # SETUP_TIMEOUT_S; the training loop then uses the recipe's (possibly short) hang watchdog.
    info = D.setup_worker(max(timeout, D.SETUP_TIMEOUT_S))
    try:
        # Under torchrun every rank ran the parent's preparation; rank 0's (output.dir) must finish first.
        D.barrier(info)
        if plan.recipe.distributed.nnodes > 1:  # each node resolved its own recipe: they must be one run
            D.check_ranks_agree(
                _node_independent_settings(plan),
                info,
                "the nodes' recipes",
                "Run the same recipe with the same overrides and --resume on every node (only --node-rank differs).",
                by_node=True,
            )
            _check_output_dir_shared(plan, info)
        from .trainer import Trainer

        # A stop asked for while the worker started or the model loaded: no step of this session to finish or save,
        # so none is run (one asked for before the slow model load skips it too)
        if _stop_agreed(stop, info):
            return {"interrupted": True, "steps": None, "checkpoint": None}
        trainer = Trainer(plan, info, stop)
        try:
            trainer.setup()
        except StoppedBeforeData:
            return {"interrupted": True, "steps": None, "checkpoint": None}
        D.set_collective_timeout(timeout)
        if _stop_agreed(stop, info):
            return {"interrupted": True, "steps": trainer.step, "checkpoint": None}
        return trainer.fit()
    finally:
        stop.done = True
        D.teardown()
        if stop.parent_died or os.getppid() != parent:
            # Orphaned: the launcher's multiprocessing wrapper would wait forever for the dead parent to read our
            # result. The checkpoint is written; leave now.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(1 if sys.exc_info()[0] is not None else 0)


class StoppedBeforeData(Exception):
    """A stop was asked for while the workers waited for the data tokenised beside their start: no model loaded."""


def wait_for_data(plan: RunPlan, stop: Any, info: Any) -> None:
    """Wait (after `import unsloth`, before the model loads) for the data tokenised beside this start; record when it
    was ready and how long this worker waited for it. Every rank leaves together (one small collective).

    Raises:
        StoppedBeforeData: a stop (Ctrl-C, SIGTERM) came first, on any rank.
        UserError, TrainingFailed: the data was refused, or its preparation failed (datagate.wait_for_data).
    """
    from . import distributed as D
    from .datagate import wait_for_data as wait

    assert plan.data_gate is not None and plan.data_gate_pid is not None
    ready = wait(Path(plan.data_gate), plan.data_gate_pid, lambda: stop.requested(info.is_main))
    if any(f[0] for f in D.all_gather_floats([float(ready is None)], info)):
        raise StoppedBeforeData
    plan.timeline["data_ready"] = float(ready)  # type: ignore[arg-type]
    plan.timeline["data_seen"] = time.time()


def _stop_agreed(stop: Any, info: Any) -> bool:
    """Whether any rank was asked to stop (every rank gets the same answer: one small collective)."""
    from . import distributed as D

    return any(f[0] for f in D.all_gather_floats([float(stop.requested(info.is_main))], info))


def _check_output_dir_shared(plan: RunPlan, info: Any, wait_s: float = 10.0) -> None:
    """Several nodes: output.dir must be one folder that every node reaches (checkpoints, resume, the summary are
    written by global rank 0, which may sit on any node). The node that prepared it leaves a marker there; every
    node looks for it in its own output.dir, for up to `wait_s` (a network filesystem may show it late).

    Raises:
        UserError: a node does not see the marker (a local folder, or another output.dir), on every rank."""
    import uuid

    from . import distributed as D

    out = Path(plan.output_dir)
    token = D.broadcast_object(uuid.uuid4().hex[:16] if info.rank == 0 else None, info)
    marker = out / f".mgpu-shared-{token}"
    ranks = D.all_gather_object((plan.prepared_output_dir, plan.recipe.distributed.node_rank, str(out)), info)
    writer = next((r for r, (prepared, _, _) in enumerate(ranks) if prepared), 0)
    if info.rank == writer:
        marker.write_text("written by mgpu train to check that every node sees this folder; removed at once\n")
    D.barrier(info)
    seen = True
    if info.local_rank == 0:
        deadline = time.monotonic() + wait_s
        while not (seen := marker.exists()) and time.monotonic() < deadline:
            time.sleep(0.5)
    seen_by = D.all_gather_object(seen, info)
    D.barrier(info)
    if info.rank == writer:
        marker.unlink(missing_ok=True)
    blind = sorted({ranks[r][1:] for r, ok in enumerate(seen_by) if not ok})
    if blind:
        _, node0, path0 = ranks[writer]
        found = "; ".join(f"node {node} does not see it at {path}" for node, path in blind)
        raise UserError(
            Problem(
                "output.dir",
                f"expected one folder that every node reaches; node {node0} prepared {path0}, and {found}",
                "put output.dir on a filesystem shared by all nodes (NFS, Lustre, ...), mounted so that the "
                "recipe names it on each node (global rank 0, which writes checkpoints, may run on any node)",
            ),
            "invalid arguments",
        )


def _node_independent_settings(plan: RunPlan) -> dict[str, Any]:
    """The resolved recipe as every node must have it: without what names this node (node_rank, the endpoint as
    it reaches it), per-node display (logging) and host paths (their file names and the data's contents stay)."""
    r = plan.recipe.model_dump(mode="json")
    for key in ("node_rank", "rdzv_endpoint"):
        r["distributed"].pop(key, None)
    r.pop("logging", None)
    r["output"].pop("dir", None)
    r["model"]["name"] = Path(str(r["model"]["name"])).name
    for section in [r["dataset"], *(r["dataset"].get("mix") or [])]:
        for key in ("path", "eval_path"):
            if section.get(key):
                section[key] = Path(str(section[key])).name
    # the recipe's keys at the top, so that a difference is named as the recipe names it (training.max_steps)
    return {
        **r,
        "tokenised data": plan.identity.get("data"),
        "global batch": plan.identity.get("global_batch"),
        # --resume on one node only: it would start from a checkpoint, the others from step 0 (the checkpoint's
        # name: output.dir may be mounted at another path on each host)
        "--resume (checkpoint)": Path(plan.resume_from).name if plan.resume_from else None,
    }
