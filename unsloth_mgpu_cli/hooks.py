"""Hook mode: one added line makes an existing Unsloth/TRL script train on N GPUs.

    import unsloth_multigpu
    unsloth_multigpu.enable_multi_gpu(num_gpus=2, batch_size_per_gpu=4, gradient_aggregation="weighted")
    ...  # the unchanged script: FastLanguageModel.from_pretrained, get_peft_model, SFTTrainer, trainer.train()

Run with a plain `python train.py`: the call re-launches the same script as one worker per GPU through
the launcher behind `mgpu train` (`distributed.launch`, PyTorch's elastic agent) and exits with the
workers' status. Under `torchrun` it joins the existing group instead.

Inside a worker the hooks:
- pin the worker to its GPU and join the process group before the script runs (so Unsloth, which
  loads onto the one visible GPU, lands on the worker's own device);
- hide the launcher's RANK/WORLD_SIZE/LOCAL_RANK from accelerate and transformers, so the Hugging Face
  Trainer runs its ordinary single-process loop (no DDP wrapper: DDP would reduce the gradients a
  second time, and the HF trainer's DDP path is the one past wrappers got silently wrong);
- give every trainer a sampler that takes this rank's slice of each global batch;
- all-reduce the trainable gradients with our `GradientSynchronizer` after the last backward of each
  accumulation window, before clipping and the optimizer step (a callback refuses an optimizer step
  that was not preceded by a synchronisation);
- start every rank from rank 0's trainable weights and compare checksums every `verify_every` steps;
- let only rank 0 log and save (trainer logs, checkpoints and `save_pretrained` calls).

`disable_multi_gpu()` undoes every patch. Nothing in Unsloth is modified; the patches touch
transformers' `Trainer.__init__`, two `TrainingArguments` properties and the `save_pretrained` methods,
and only while enabled.
"""

from __future__ import annotations

import functools
import logging
import os
import runpy
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import is_number, is_whole

_WORKER_FLAG = "MGPU_HOOK_WORKER"
# Set by the launching call for its workers: the smallest launched GPU's memory in bytes (get_optimal_config).
LAUNCH_GPU_MEMORY_ENV = "MGPU_LAUNCH_GPU_MEMORY"
# What torchrun/elastic set and accelerate/transformers/Unsloth read to decide "distributed".
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE")


class AggregationMethod(str, Enum):
    """How the ranks' gradients are combined (the recipe's `distributed.aggregation`).

    MEAN: average of the per-rank gradients (each rank's loss is its own token mean).
    SUM: sum of the per-rank gradients.
    WEIGHTED: each rank weighted by its share of the loss tokens: exactly the gradient of one process
        over the whole global batch, whatever the per-rank token counts.
    MEDIAN: coordinate-wise median over ranks (robust to one outlier rank; costs an all-gather).
    """

    MEAN = "mean"
    SUM = "sum"
    WEIGHTED = "weighted"
    MEDIAN = "median"

    @classmethod
    def parse(cls, value: AggregationMethod | str, name: str = "gradient_aggregation") -> AggregationMethod:
        """The method named by `value` (any case, surrounding spaces ignored); `name` is the argument, for errors."""
        try:
            return value if isinstance(value, cls) else cls(str(value).strip().lower())
        except ValueError:
            raise ValueError(f"{name} must be one of {[m.value for m in cls]}, got {value!r}") from None


@dataclass
class MultiGPUConfig:
    """What `enable_multi_gpu` was asked for; returned by it and by `get_config()`.

    Attributes:
        num_gpus: worker processes (one per GPU; CPU processes when there is no GPU).
        batch_size_per_gpu: overrides every trainer's `per_device_train_batch_size` when set.
        gradient_accumulation_steps: overrides every trainer's `gradient_accumulation_steps` when set.
        gradient_aggregation: mean | sum | weighted | median.
        verify_every: compare the ranks' trainable weights every N optimizer steps (0: only at start and end).
        device: auto | cuda | cpu.
        main_process_saves: only rank 0 runs `save_pretrained` (model, PEFT adapter, tokenizer).
        load_in_4bit, gradient_checkpointing, max_seq_length, predicted_peak_gb: advice from
            `ConfigManager.get_optimal_config`, kept here for the script's own `from_pretrained` /
            `get_peft_model` call; hook mode does not override what the script passes there.
    """

    num_gpus: int | None = None
    batch_size_per_gpu: int | None = None
    gradient_accumulation_steps: int | None = None
    gradient_aggregation: str = "weighted"
    verify_every: int = 50
    device: str = "auto"
    main_process_saves: bool = True
    load_in_4bit: bool | None = None
    gradient_checkpointing: Any = None
    max_seq_length: int | None = None
    predicted_peak_gb: float | None = None
    timeout_seconds: int = 1800

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _State:
    config: MultiGPUConfig | None = None
    info: Any = None  # distributed.DistInfo once this process is a worker
    patches: list[tuple[Any, str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


_STATE = _State()


# ------------------------------------------------------------------------------------------------------
# Public functions
# ------------------------------------------------------------------------------------------------------


def enable_multi_gpu(
    num_gpus: int | None = None,
    batch_size_per_gpu: int | None = None,
    gradient_aggregation: AggregationMethod | str = "weighted",
    gradient_accumulation_steps: int | None = None,
    *,
    verify_every: int = 50,
    device: str = "auto",
    main_process_saves: bool = True,
    load_in_4bit: bool | None = None,
    gradient_checkpointing: Any = None,
    max_seq_length: int | None = None,
    predicted_peak_gb: float | None = None,
    timeout_seconds: int = 1800,
) -> MultiGPUConfig:
    """Make the calling script train data-parallel on `num_gpus` GPUs. Call it near the top of the script.

    In a plain `python train.py` this call does not return: it starts one worker per GPU, each running
    the whole script again with the same `sys.argv`, and exits with their status (0 when all succeed,
    1 when a worker fails, 130 on Ctrl-C). In a worker (ours, or one started by `torchrun`) it installs
    the training hooks and returns the configuration. Call it before `import unsloth` to spare the
    launching process Unsloth's import (and, on GPUs, a CUDA context).

    Args:
        num_gpus: workers; None: every visible GPU (1 CPU worker without a GPU). With no GPU,
            `num_gpus=N` starts N CPU workers over gloo (for testing).
        batch_size_per_gpu: per-worker micro-batch; overrides `per_device_train_batch_size` when set.
        gradient_aggregation: weighted (default), mean, sum or median (see `AggregationMethod`). `weighted`
            makes N workers exactly equal one process over the same global batch (as transformers' Trainer
            does under DDP); `mean` equals it only when every rank sees the same number of loss tokens.
        gradient_accumulation_steps: overrides the trainer's value when set.
        verify_every: cross-rank weight check every N optimizer steps (0: only at start and end).
        device: auto | cuda | cpu.
        main_process_saves: only rank 0 writes files through `save_pretrained`.
        load_in_4bit, gradient_checkpointing, max_seq_length, predicted_peak_gb: accepted so that
            `enable_multi_gpu(**ConfigManager().get_optimal_config(...))` works; returned for the script.
        timeout_seconds: collective timeout.

    Returns:
        The `MultiGPUConfig` in force (in workers).

    Raises:
        ValueError: a bad argument (unknown aggregation, num_gpus < 1, more GPUs than visible).
        RuntimeError: called from an interactive session (there is no script to re-launch).
    """
    config = _checked(
        MultiGPUConfig(
            num_gpus=num_gpus,
            batch_size_per_gpu=batch_size_per_gpu,
            gradient_accumulation_steps=gradient_accumulation_steps,
            gradient_aggregation=gradient_aggregation,  # type: ignore[arg-type]  # parsed by _checked
            verify_every=verify_every,
            device=device,
            main_process_saves=main_process_saves,
            load_in_4bit=load_in_4bit,
            gradient_checkpointing=gradient_checkpointing,
            max_seq_length=max_seq_length,
            predicted_peak_gb=predicted_peak_gb,
            timeout_seconds=timeout_seconds,
        )
    )
    if os.environ.get(_WORKER_FLAG) == "1" and _STATE.info is not None:
        # one of our workers: the group exists already (see _run_script)
        if num_gpus is not None and num_gpus != _STATE.info.world_size:
            raise ValueError(
                f"num_gpus={num_gpus} in this worker but enable_multi_gpu launched {_STATE.info.world_size} "
                "worker(s): the script computes a different count in the workers, which see one GPU each. Pass the "
                "same count everywhere, or leave num_gpus out of get_optimal_config/enable_multi_gpu (both "
                "use the launched count in a worker)"
            )
        _install(config)
        return config
    from .distributed import external_launch

    if external_launch() is not None:
        _join_external_launch(config)  # torchrun / SLURM-style launcher: do not re-launch
        _install(config)
        return config
    _relaunch(config)  # does not return
    raise AssertionError("unreachable")


def _checked(c: MultiGPUConfig) -> MultiGPUConfig:
    """`c` (enable_multi_gpu's arguments as given) with the aggregation and device normalised, or a ValueError that
    names the first bad argument."""
    aggregation = AggregationMethod.parse(c.gradient_aggregation).value
    for name, value in (
        ("num_gpus", c.num_gpus),
        ("batch_size_per_gpu", c.batch_size_per_gpu),
        ("gradient_accumulation_steps", c.gradient_accumulation_steps),
    ):
        if value is not None and not (is_whole(value) and value >= 1):
            hint = ""
            if isinstance(value, str) and value.strip().isdigit():  # e.g. read from os.environ
                hint = f": pass a number, {name}=int(...)"
            elif name == "num_gpus":
                hint = ": or leave it out for every visible GPU"
            raise ValueError(f"{name} must be a positive integer, got {value!r}{hint}")
    if not (is_whole(c.verify_every) and c.verify_every >= 0):
        raise ValueError(f"verify_every must be a whole number of steps, 0 or more, got {c.verify_every!r}")
    if not (is_number(c.timeout_seconds) and c.timeout_seconds > 0):
        raise ValueError(f"timeout_seconds must be a positive number of seconds, got {c.timeout_seconds!r}")
    device = c.device.strip().lower() if isinstance(c.device, str) else c.device
    if device not in ("auto", "cuda", "cpu"):
        raise ValueError(f"device must be auto, cuda or cpu, got {c.device!r}")
    for name, value in (("main_process_saves", c.main_process_saves), ("load_in_4bit", c.load_in_4bit)):
        if not (isinstance(value, bool) or (value is None and name == "load_in_4bit")):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    ckpt = c.gradient_checkpointing
    if not (ckpt is None or isinstance(ckpt, bool) or ckpt == "unsloth"):
        raise ValueError(
            f"gradient_checkpointing must be True, False or 'unsloth' (Unsloth's use_gradient_checkpointing), "
            f"got {ckpt!r}"
        )
    if c.max_seq_length is not None and not (is_whole(c.max_seq_length) and c.max_seq_length >= 1):
        raise ValueError(f"max_seq_length must be a positive integer, got {c.max_seq_length!r}")
    if c.predicted_peak_gb is not None and not (is_number(c.predicted_peak_gb) and c.predicted_peak_gb >= 0):
        raise ValueError(f"predicted_peak_gb must be a number of GB, got {c.predicted_peak_gb!r}")
    return replace(
        c,
        gradient_aggregation=aggregation,
        verify_every=int(c.verify_every),
        device=device,
    )


def disable_multi_gpu() -> None:
    """Undo every patch installed by `enable_multi_gpu` (the process group, if any, stays up)."""
    for owner, name, original in reversed(_STATE.patches):
        if isinstance(owner, _FilterRemover):
            owner.remove()
        else:
            setattr(owner, name, original)
    _STATE.patches.clear()
    _STATE.config = None


def launched_world_size() -> int | None:
    """Workers in this launch (all nodes): ours once re-launched, or torchrun's `WORLD_SIZE`; None outside one.

    A hook-mode worker sees one GPU (its own), so counting GPUs there says 1: sizing code such as
    `ConfigManager.get_optimal_config` asks this first.
    """
    if _STATE.info is not None:
        return int(_STATE.info.world_size)
    from .distributed import external_launch

    launched = external_launch()
    return launched.world_size if launched is not None else None


def get_config() -> MultiGPUConfig | None:
    """The configuration in force in this worker, or None when hook mode is off."""
    return _STATE.config


def is_main_process() -> bool:
    """True on rank 0 and outside hook mode: guard your own side effects (files, prints) with it."""
    return _STATE.info is None or _STATE.info.rank == 0


def dist_info() -> Any:
    """This worker's `distributed.DistInfo` (rank, world size, device), or None outside a worker."""
    return _STATE.info


def worker_report() -> dict[str, Any]:
    """This rank's view of the last hooked training run (for monitoring and tests).

    Returns:
        rank, world_size, aggregation, optimizer_steps (synchronised steps), consistency_checks;
        step_tokens (non-padding tokens of each optimizer step, all ranks), tokens, train_seconds,
        tokens_per_second and steady_tokens_per_second (without the first quarter of the steps);
        sample_indices: the dataset indices this rank's sampler handed out, in order (the data loader may
        have prefetched a batch beyond the last step).
    """
    info = _STATE.info
    out: dict[str, Any] = {"rank": info.rank if info else 0, "world_size": info.world_size if info else 1}
    rep = dict(_STATE.report)
    ends, toks = rep.pop("step_end_s", []), rep.get("step_tokens", [])
    start = rep.pop("train_start_s", None)
    out.update(rep)
    out["tokens"] = int(sum(toks))
    if ends and start is not None:
        out["train_seconds"] = ends[-1] - start
        out["tokens_per_second"] = sum(toks) / max(ends[-1] - start, 1e-9)
        # Steady state: leave out the first quarter of the steps (compilation, warm-up), at least one.
        skip = max(1, len(ends) // 4)
        if len(ends) > skip:
            out["steady_tokens_per_second"] = sum(toks[skip:]) / max(ends[-1] - ends[skip - 1], 1e-9)
    return out


# ------------------------------------------------------------------------------------------------------
# Launching (the plain `python train.py` process)
# ------------------------------------------------------------------------------------------------------


def _relaunch(config: MultiGPUConfig) -> None:
    from .devices import count_gpus
    from .distributed import LaunchSpec, launch
    from .errors import TrainingFailed, UserError

    main = sys.modules.get("__main__")
    script = getattr(main, "__file__", None)
    if not script or not Path(script).is_file():
        raise RuntimeError(
            "enable_multi_gpu re-launches the running script once per GPU, so it needs one: run "
            "`python your_script.py` (or torchrun); notebooks and `python -c` are not supported"
        )
    gpus = count_gpus()  # NVML: this process never touches CUDA
    device = config.device if config.device != "auto" else ("cuda" if gpus > 0 else "cpu")
    if device == "cuda" and gpus == 0:
        raise ValueError("device='cuda' was asked for but no GPU is visible (run `mgpu doctor`)")
    n = config.num_gpus or (gpus if device == "cuda" else 1)
    if device == "cuda" and n > gpus:
        raise ValueError(f"num_gpus={n} but only {gpus} GPU(s) are visible")
    if device == "cpu" and config.device == "auto":  # a GPU node whose driver is broken would train here, slowly
        print(
            f"[unsloth-mgpu] no GPU is visible (NVML): {n} CPU worker process(es) over gloo, slowly; pass "
            "device='cuda' to refuse instead, and run `mgpu doctor` to see why",
            file=sys.stderr,
            flush=True,
        )
    from .hub import work_offline_if_unreachable

    # The workers run the script again, its model and data loads included: where the hub's name does not resolve
    # they load from the HF cache at once rather than after the hub client's retries (75 s per tokenizer).
    work_offline_if_unreachable(None)
    log_dir = Path(os.environ.get("MGPU_LOG_DIR") or tempfile.mkdtemp(prefix="mgpu-hook-"))
    spec = LaunchSpec(nproc_per_node=n, device_type=device, log_dir=log_dir)
    if device == "cuda":
        _share_launch_gpu_memory(n)
    # Spawned children re-import the parent's __main__ from its file before calling the entry point
    # (multiprocessing's spawn preparation). An ordinary training script has no `if __name__` guard, so
    # that import would run the whole training in every child; hide the file while launching.
    saved = main.__dict__.pop("__file__")
    print(f"[unsloth-mgpu] launching {n} worker(s) on {device}; worker logs: {log_dir}", file=sys.stderr, flush=True)
    code = 0
    try:
        launch(_script_worker, (str(Path(script).resolve()), list(sys.argv[1:]), config.timeout_seconds), spec)
    except TrainingFailed as exc:
        print(f"[unsloth-mgpu] training failed: {exc}", file=sys.stderr)
        if exc.details:
            print(exc.details, file=sys.stderr)
        code = 1
    except UserError as exc:  # the workers found settings that differ between them (RanksDisagree)
        print(f"[unsloth-mgpu] error: {exc}", file=sys.stderr)
        code = exc.exit_code
    except KeyboardInterrupt:
        code = 130
    finally:
        main.__file__ = saved
    sys.stdout.flush()
    sys.exit(code)


def _script_worker(script: str, argv: list[str], timeout_seconds: int = 1800) -> int:
    """Entry point of every hook-mode worker: join the group, then run the user's script as __main__."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_run_script)(script, argv, timeout_seconds)


def _share_launch_gpu_memory(n: int, nvml: Any = None) -> None:
    """Tell the workers the memory of the smallest of the `n` GPUs they run on (LAUNCH_GPU_MEMORY_ENV, bytes): a
    worker sees only its own GPU, and `ConfigManager.get_optimal_config` must size every rank for the smallest."""
    from .devices import GIB, DeviceManager

    readable = [d for d in DeviceManager(nvml=nvml).snapshot(with_links=False).devices[:n] if d.error is None]
    if readable:
        os.environ[LAUNCH_GPU_MEMORY_ENV] = str(int(min(d.memory_total_gb for d in readable) * GIB))


def _run_script(script: str, argv: list[str], timeout_seconds: int = 1800) -> int:
    from . import distributed as D

    os.environ[_WORKER_FLAG] = "1"
    # Before the script imports anything: each worker sees only its own GPU (as cuda:0). The collective
    # timeout is the launching call's `timeout_seconds` (the script's own call comes later, in the group).
    _STATE.info = D.setup_worker(timeout_seconds)
    _prepare_worker_env(_STATE.info)
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).parent))
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        if exc.code not in (None, 0):
            raise
    finally:
        disable_multi_gpu()
        D.teardown()
    return 0


def _join_external_launch(config: MultiGPUConfig) -> None:
    """Under torchrun: pin the device and join the group ourselves, before the script touches CUDA."""
    from . import distributed as D
    from .devices import count_gpus

    if _STATE.info is not None:
        return
    launched = D.external_launch()
    assert launched is not None
    if config.num_gpus is not None and config.num_gpus not in (launched.world_size, launched.local_world_size):
        raise ValueError(
            f"num_gpus={config.num_gpus} but the launcher started WORLD_SIZE={launched.world_size} worker(s): "
            "under torchrun leave num_gpus out or pass the launched count (with ConfigManager: "
            "get_optimal_config(num_gpus=<that count>))"
        )
    device = config.device if config.device != "auto" else ("cuda" if count_gpus() > 0 else "cpu")
    torch = sys.modules.get("torch")
    if device == "cuda" and torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            "under torchrun, call enable_multi_gpu() before importing unsloth (or anything that "
            "initialises CUDA): each worker must be pinned to its GPU first"
        )
    os.environ["MGPU_DEVICE_TYPE"] = device
    _STATE.info = D.setup_worker(config.timeout_seconds)
    _prepare_worker_env(_STATE.info)
    import atexit

    atexit.register(D.teardown)


def _prepare_worker_env(info: Any) -> None:
    # accelerate picks DDP/MULTI_CPU from LOCAL_RANK/WORLD_SIZE; with them gone the HF Trainer runs its
    # single-process loop and we own the reduction (process group and our DistInfo stay).
    for name in _LAUNCHER_VARS:
        os.environ.pop(name, None)
    # Per-rank compile cache: ranks writing one unsloth_compiled_cache/ race (unsloth #3031).
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(Path.cwd() / "unsloth_compiled_cache" / f"rank{info.rank}"))
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")


# ------------------------------------------------------------------------------------------------------
# The patches (workers only)
# ------------------------------------------------------------------------------------------------------


class _FilterRemover:
    def __init__(self, logger: logging.Logger, flt: logging.Filter):
        self.logger, self.flt = logger, flt

    def remove(self) -> None:
        self.logger.removeFilter(self.flt)


def _patch(owner: Any, name: str, replacement: Any) -> None:
    _STATE.patches.append((owner, name, owner.__dict__[name]))
    setattr(owner, name, replacement)


class _NotDDPWarningFilter(logging.Filter):
    """transformers warns that a process group exists without DDP: in hook mode that is the design."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "parallel_mode != ParallelMode.DISTRIBUTED" not in record.getMessage()


def _install(config: MultiGPUConfig) -> None:
    import importlib.util

    if "unsloth" not in sys.modules and importlib.util.find_spec("unsloth") is not None:
        # Unsloth patches transformers/TRL/peft at import and warns when they were imported first; the
        # script imports it anyway, so pay that cost here rather than lose its optimisations.
        from .models import quiet_library_noise

        quiet_library_noise()
        import unsloth  # noqa: F401
    import transformers

    disable_multi_gpu()
    args_logger = logging.getLogger("transformers.training_args")
    flt = _NotDDPWarningFilter()
    args_logger.addFilter(flt)
    _STATE.patches.append((_FilterRemover(args_logger, flt), "active", None))
    _STATE.config = config
    _STATE.report = {
        "aggregation": config.gradient_aggregation,
        "optimizer_steps": 0,
        "consistency_checks": 0,
        "sample_indices": [],
        "step_tokens": [],
        "step_end_s": [],
    }
    info = _STATE.info

    original_init = transformers.Trainer.__dict__["__init__"]

    @functools.wraps(original_init)
    def trainer_init(self: Any, *args: Any, **kwargs: Any) -> None:
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if targs is not None:
            if config.batch_size_per_gpu is not None:
                targs.per_device_train_batch_size = config.batch_size_per_gpu
            if config.gradient_accumulation_steps is not None:
                targs.gradient_accumulation_steps = config.gradient_accumulation_steps
        original_init(self, *args, **kwargs)
        _attach(self, config, info)

    _patch(transformers.Trainer, "__init__", trainer_init)
    args_cls = transformers.TrainingArguments
    for prop in ("should_save", "should_log"):
        original = args_cls.__dict__[prop]
        _patch(args_cls, prop, property(lambda self, _o=original: info.rank == 0 and _o.fget(self)))
    if config.main_process_saves and info.rank != 0 and "_save_rng_state" in transformers.Trainer.__dict__:
        # the trainer saves its RNG state from every rank without asking should_save, and with the world size it
        # sees here (1) under one name: the ranks would write rank 0's checkpoint file at once
        _patch(transformers.Trainer, "_save_rng_state", _skip_on_this_rank(transformers.Trainer._save_rng_state))
    if config.main_process_saves and info.rank != 0:
        targets = [transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]
        try:
            import peft

            targets.append(peft.PeftModel)
        except ImportError:
            pass
        for cls in targets:
            if "save_pretrained" in cls.__dict__:
                _patch(cls, "save_pretrained", _skip_on_this_rank(cls.__dict__["save_pretrained"]))


def _skip_on_this_rank(fn: Any) -> Any:
    @functools.wraps(fn)
    def skipped(*args: Any, **kwargs: Any) -> None:
        return None  # rank 0 writes the same files; concurrent writers could tear them

    return skipped


class _Run:
    """Per-trainer hook state: the synchroniser and the current accumulation window."""

    def __init__(self, config: MultiGPUConfig, info: Any):
        self.config, self.info = config, info
        self.sync: Any = None
        self.params: list[Any] = []
        self.window_loss = 0.0
        self.window_counted = 0
        self.window_tokens = 0
        self.synced = False

    def start(self, trainer: Any) -> None:
        from . import distributed as D

        _check_same_settings(trainer, self.config, self.info)
        self.params = [p for p in trainer.model.parameters() if p.requires_grad]
        # Identical starting weights: rank 0's, broadcast, then checked rather than assumed.
        D.broadcast_parameters(self.params, self.info)
        D.check_consistency(self.params, self.info, step=0)
        _STATE.report["consistency_checks"] += 1
        self.sync = D.GradientSynchronizer(self.params, self.info, self.config.gradient_aggregation)
        _STATE.report["train_start_s"] = time.perf_counter()

    def synchronize(self, num_items: Any) -> float:
        """Combine the gradients of this window across ranks; returns the window's global loss."""
        import torch

        from . import distributed as D

        local_items = float(num_items) if num_items is not None else float(self.window_counted)
        loss = float(self.window_loss)
        # One small collective: what the weighting and the logged loss need, and the step's tokens.
        tot_weighted, tot_items, tot_loss, tot_tokens = D.all_reduce_sum(
            [loss * local_items, local_items, loss, float(self.window_tokens)], self.info
        )
        _STATE.report["step_tokens"].append(int(tot_tokens))
        _STATE.report["step_end_s"].append(time.perf_counter())
        if self.config.gradient_aggregation == "weighted" and tot_items > 0:
            # Local grads are d(sum of token losses)/local_items; rescale to /global_items, then SUM.
            grads = [p.grad for p in self.params if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, local_items / tot_items)
        self.sync.synchronize()
        self.synced = True
        self.window_loss, self.window_counted, self.window_tokens = 0.0, 0, 0
        _STATE.report["optimizer_steps"] += 1
        if self.config.gradient_aggregation == "weighted" and tot_items > 0:
            return tot_weighted / tot_items
        # the mean over ranks for mean, median and sum alike: the loss one process over the global batch logs
        # (sum scales the gradient, not the loss; direct mode reports it the same way)
        return tot_loss / self.info.world_size


def _check_same_settings(trainer: Any, config: MultiGPUConfig, info: Any) -> None:
    """Before the first step, on every rank: the dataset can be sharded, and every rank trains with the same batch,
    accumulation, aggregation and dataset size. A script that sizes its batch from its own GPU (which is all a
    worker sees) would otherwise train different batches per rank, and the sampler's shards would overlap.

    Raises:
        NotImplementedError: an iterable dataset (no length) with more than one rank.
        RuntimeError: the ranks differ (the same error on every rank: the values are gathered first).
    """
    from . import distributed as D

    dataset = trainer.train_dataset
    if info.world_size > 1 and dataset is not None and not hasattr(dataset, "__len__"):
        raise NotImplementedError(
            f"hook mode shards map-style datasets (with __len__), and this trainer's dataset is iterable "
            f"({type(dataset).__name__}): every rank would train the same samples. Pass a map-style dataset "
            "(datasets.Dataset, not .to_iterable_dataset() or streaming=True), or shard it yourself per rank "
            "(see unsloth_multigpu.dist_info())"
        )
    args = trainer.args
    mine = {
        "per_device_train_batch_size": args.per_device_train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "gradient_aggregation": config.gradient_aggregation,
        "max_steps": args.max_steps,
        "train_dataset_rows": len(dataset) if hasattr(dataset, "__len__") else None,  # one rank: iterable is fine
    }
    D.check_ranks_agree(
        mine,
        info,
        "the training settings",
        "Every rank must run the same settings: a script that sizes them from the GPU it sees (each worker sees "
        "only its own) gets different values on GPUs of different sizes; pass fixed values, or "
        "ConfigManager().get_optimal_config(..., available_memory=<the smallest GPU's memory>)",
    )


def _attach(trainer: Any, config: MultiGPUConfig, info: Any) -> None:
    """Give one trainer instance the sharded sampler, the gradient sync and rank-0-only logging."""
    from transformers import TrainerCallback

    from . import distributed as D

    run = _Run(config, info)
    trainer._mgpu_run = run
    step_fn = trainer.training_step
    sampler_fn = trainer._get_train_sampler

    def training_step(model: Any, inputs: Any, num_items_in_batch: Any = None, *args: Any, **kwargs: Any) -> Any:
        if run.sync is None:  # the callback normally does this at train begin
            run.start(trainer)
        loss = step_fn(model, inputs, num_items_in_batch, *args, **kwargs)
        run.window_loss += float(loss)
        run.window_tokens += _count_input_tokens(inputs)
        if num_items_in_batch is None:
            run.window_counted += _count_loss_tokens(inputs)
        if trainer.accelerator.gradient_state.sync_gradients:
            local_window = run.window_loss
            global_window = run.synchronize(num_items_in_batch)
            # The trainer logs the sum of what this returns over the window: make that the global loss.
            loss = loss + (global_window - local_window)
        return loss

    def get_train_sampler(*args: Any, **kwargs: Any) -> Any:
        base = sampler_fn(*args, **kwargs)
        if info.world_size == 1 and base is None:
            return None
        if base is None:
            raise NotImplementedError(
                "hook mode shards map-style datasets (with __len__); this trainer's dataset "
                "is iterable: shard it yourself per rank (see unsloth_multigpu.dist_info())"
            )
        return GlobalBatchShardSampler(
            base,
            info.rank,
            info.world_size,
            trainer.args.per_device_train_batch_size,
            seed=trainer.args.data_seed if trainer.args.data_seed is not None else trainer.args.seed,
        )

    class _SyncCallback(TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run.start(trainer)

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not run.synced:
                raise RuntimeError(
                    "unsloth-mgpu: the optimizer is about to step on gradients that were not "
                    "synchronised across ranks; this trainer's loop no longer sets "
                    "accelerator.gradient_state.sync_gradients as expected"
                )

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            run.synced = False

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            every = config.verify_every
            if every and state.global_step % every == 0:
                D.check_consistency(run.params, info, state.global_step)
                _STATE.report["consistency_checks"] += 1

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            D.check_consistency(run.params, info, state.global_step)
            _STATE.report["consistency_checks"] += 1

    trainer.training_step = training_step
    trainer._get_train_sampler = get_train_sampler
    trainer.is_world_process_zero = lambda: info.rank == 0
    trainer.is_local_process_zero = lambda: info.local_rank == 0
    trainer.add_callback(_SyncCallback())


def _count_input_tokens(inputs: Any) -> int:
    """Non-padding tokens of one micro-batch (padding-free batches have no mask and no padding)."""
    mask = inputs.get("attention_mask") if hasattr(inputs, "get") else None
    if mask is not None and getattr(mask, "dim", lambda: 0)() == 2:
        return int(mask.sum())
    ids = inputs.get("input_ids") if hasattr(inputs, "get") else None
    return int(ids.numel()) if ids is not None else 0


def _count_loss_tokens(inputs: Any) -> int:
    labels = inputs.get("shift_labels") if hasattr(inputs, "get") else None
    if labels is None:
        labels = inputs["labels"][..., 1:] if hasattr(inputs, "get") and inputs.get("labels") is not None else None
    return int((labels != -100).sum()) if labels is not None else 0


class GlobalBatchShardSampler:
    """This rank's slice of every global batch drawn from `base` (a DistributedSampler-like split).

    The order of `base` is drawn once per epoch under a fixed seed (seed + epoch), so every rank sees the
    same order whatever the global RNG did before. Consecutive blocks of `batch_size x world` indices
    are global micro-batches; rank r takes positions [r*batch_size, (r+1)*batch_size) of each. The last,
    partial block is split as evenly as possible (uneven shards; `weighted` aggregation keeps the result
    exact), or dropped when it has fewer samples than ranks (every rank must run the same number of
    micro-steps). With world size 1 this is `base` in the seeded order.
    """

    def __init__(self, base: Any, rank: int, world_size: int, batch_size: int, seed: int = 0):
        self.base, self.rank, self.world, self.batch_size, self.seed = base, rank, world_size, batch_size, seed
        self.epoch = 0
        self._explicit_epoch = False

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._explicit_epoch = int(epoch), True
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    def _shard(self, order: list[int]) -> list[int]:
        block = self.batch_size * self.world
        full = len(order) // block
        mine: list[int] = []
        for b in range(full):
            start = b * block + self.rank * self.batch_size
            mine.extend(order[start : start + self.batch_size])
        tail = order[full * block :]
        if len(tail) >= self.world:
            base, extra = divmod(len(tail), self.world)
            start = self.rank * base + min(self.rank, extra)
            mine.extend(tail[start : start + base + (1 if self.rank < extra else 0)])
        return mine

    def __len__(self) -> int:
        return len(self._shard(list(range(len(self.base)))))

    def __iter__(self):
        import torch

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            order = [int(i) for i in self.base]
        if not self._explicit_epoch:
            self.epoch += 1
        mine = self._shard(order)
        log = _STATE.report.setdefault("sample_indices", [])
        for i in mine:
            log.append(i)
            yield i
