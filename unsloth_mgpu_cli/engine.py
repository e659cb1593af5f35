"""The training engine: `setup` in the parent, `worker_main` per rank, `fit` the loop.

    mgpu train recipes/quickstart.yaml

Parent: validate, detect devices (pynvml, no CUDA init), fill `auto`s, build/locate the model, tokenise the
data once, write `recipe.resolved.yaml`, launch one worker per GPU. Worker: join the process group, load
the model through Unsloth on its own device, start from rank 0's trainable weights (checked), then train
with gradients synchronised by `distributed.GradientSynchronizer`. Rank 0 owns every side effect.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Problem, UserError
from .recipe import AUTO, LoadedRecipe, Recipe, to_yaml


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
        raise UserError(Problem("distributed.device", "cuda was asked for but no GPU is visible",
                                "run `mgpu doctor`, or set distributed.device: cpu"), "invalid recipe")
    return device, gpus


def resolve_workers(recipe: Recipe, device: str, gpus: int) -> int:
    n = recipe.distributed.num_gpus
    if n == AUTO:
        return gpus if device == "cuda" else 1
    if device == "cuda" and n > gpus:
        raise UserError(Problem("distributed.num_gpus", f"{n} workers asked for but only {gpus} GPU(s) are visible",
                                f"set distributed.num_gpus={gpus} (or auto)"), "invalid recipe")
    if device == "cpu" and n > (os.cpu_count() or 1) * 4:
        raise UserError(Problem("distributed.num_gpus", f"{n} CPU workers on {os.cpu_count()} cores would thrash",
                                "use at most a few CPU workers"), "invalid recipe")
    return int(n)


def resolve_auto_values(recipe: Recipe, device: str, num_workers: int) -> tuple[Recipe, list[str]]:
    """Fill `auto` training values with the optimal-config generator (the one behind `mgpu suggest`)."""
    from .configgen import resolve_auto
    from .devices import gpu_memory_bytes

    mem = gpu_memory_bytes() if device == "cuda" else None
    recipe, notes = resolve_auto(recipe, num_workers, mem)
    return recipe, list(notes)


def prepare_output_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to mix runs: a non-empty output folder needs --resume or --overwrite."""
    if out.exists() and not out.is_dir():
        raise UserError(Problem("output.dir", f"expected a folder, found a file: {out}"), "invalid recipe")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise UserError(Problem("output.dir", f"{out} already holds a run",
                                "pass --resume auto to continue it, --overwrite to replace it, or "
                                "choose another output.dir"), "invalid arguments")
    if overwrite and out.exists() and not resume:
        for child in out.iterdir():
            if child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise UserError(Problem("output.dir", f"cannot write to {out}: {exc.strerror or exc}",
                                "choose a writable folder"), "invalid recipe") from exc


def train(loaded: LoadedRecipe, overwrite: bool = False, resume: str | None = None,
          nnodes: int | None = None, node_rank: int | None = None, rdzv_endpoint: str | None = None) -> dict[str, Any]:
    """Run `mgpu train`: returns rank 0's summary. Raises UserError / TrainingFailed / Interrupted."""
    from . import data as data_mod
    from .distributed import LaunchSpec, launch
    from .models import resolve_model_path
    from .render import console

    recipe = loaded.recipe.model_copy(deep=True)
    dist_cfg = recipe.distributed
    if nnodes is not None:
        dist_cfg.nnodes = nnodes
    if node_rank is not None:
        dist_cfg.node_rank = node_rank
    if rdzv_endpoint is not None:
        dist_cfg.rdzv_endpoint = rdzv_endpoint
    device, gpus = detect_device(recipe)
    num_local = resolve_workers(recipe, device, gpus)
    num_workers = num_local * dist_cfg.nnodes
    recipe, notes = resolve_auto_values(recipe, device, num_workers)
    dist_cfg = recipe.distributed
    dist_cfg.num_gpus = num_local
    dist_cfg.device = device  # type: ignore[assignment]
    out = Path(recipe.output.dir)
    is_main_node = dist_cfg.node_rank == 0
    resume_from = None
    if is_main_node:
        from .checkpoint import find_resume_checkpoint

        resume_from = find_resume_checkpoint(out, resume) if resume else None
        prepare_output_dir(out, overwrite, resume is not None)
    model_path = resolve_model_path(recipe.model.name)
    data_dir, summary, hit = data_mod.prepare(recipe, model_path)
    if is_main_node:
        console.print(f"[bold]data[/]: {summary.describe(recipe.model.max_seq_length)}"
                      + (" [dim](cached)[/]" if hit else "") + f"; batching {recipe.dataset.batching}")
        for note in notes:
            console.print(f"[dim]auto: {note}[/]")
        (out / "recipe.resolved.yaml").write_text(
            "# Every value of this run, `auto`s filled in (written by mgpu train).\n" + to_yaml(recipe))
        console.print(f"[bold]launching[/] {num_local} worker(s) on {device}"
                      + (f" x {dist_cfg.nnodes} nodes" if dist_cfg.nnodes > 1 else "")
                      + f"; global batch {recipe.global_batch_size(num_workers)} samples/step")
    from .checkpoint import check_resume_compatible, run_identity

    identity = run_identity(recipe, Path(data_dir).name, recipe.global_batch_size(num_workers))
    if resume_from is not None:
        check_resume_compatible(resume_from, identity)
        console.print(f"[bold]resuming[/] from {resume_from}")
    elif resume and is_main_node:
        console.print("[dim]--resume auto: no checkpoint yet, starting from step 0[/]")
    plan = RunPlan(recipe=recipe, model_path=model_path, data_dir=str(data_dir), num_workers=num_workers,
                   device_type=device, output_dir=str(out), resume_from=str(resume_from) if resume_from else None,
                   identity=identity, notes=notes)
    spec = LaunchSpec(nproc_per_node=num_local, device_type=device, nnodes=dist_cfg.nnodes,
                      node_rank=dist_cfg.node_rank, rdzv_endpoint=dist_cfg.rdzv_endpoint,
                      max_restarts=dist_cfg.max_restarts, log_dir=out / "logs")
    results = launch(worker_entry, (plan,), spec)
    return results.get(0) or next(iter(results.values()), {}) or {}


# ------------------------------------------------------------------------------------------------------
# Worker side
# ------------------------------------------------------------------------------------------------------


def worker_entry(plan: RunPlan) -> dict[str, Any]:
    """Entry point of every worker process (spawned by the elastic launcher)."""
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(_worker_main)(plan)


def _worker_main(plan: RunPlan) -> dict[str, Any]:
    from . import distributed as D

    info = D.setup_worker(plan.recipe.distributed.timeout_seconds)
    try:
        trainer = Trainer(plan, info)
        trainer.setup()
        return trainer.fit()
    finally:
        D.teardown()


class Trainer:
    """One rank's view of a run: model, optimizer, scheduler, data plan and the loop."""

    def __init__(self, plan: RunPlan, info: Any):
        self.plan = plan
        self.recipe = plan.recipe
        self.info = info
        self.out = Path(plan.output_dir)
        self.step = 0
        self.metrics_file = None

    # -- setup -----------------------------------------------------------------------------------------
    def _dtype(self) -> Any:
        import torch

        d = self.recipe.model.dtype
        if d == "auto":
            if self.info.device_type == "cpu":
                return torch.float32
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return getattr(torch, d)

    def setup(self) -> None:
        import torch

        from . import distributed as D
        from .data import StepPlanner, TokenizedData
        from .faults import maybe_inject

        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        # Per-rank compile cache: ranks writing one unsloth_compiled_cache/ race (unsloth #3031).
        os.environ.setdefault("UNSLOTH_COMPILE_LOCATION",
                              str(Path(self.plan.output_dir) / ".cache" / f"unsloth_compiled_rank{self.info.rank}"))
        r = self.recipe
        torch.manual_seed(r.training.seed)
        from unsloth import FastLanguageModel  # heavy: 7-30 s

        self.dtype = self._dtype()
        kwargs: dict[str, Any] = dict(
            model_name=self.plan.model_path, max_seq_length=r.model.max_seq_length, dtype=self.dtype,
            load_in_4bit=r.model.load_in_4bit, full_finetuning=r.lora is None,
            trust_remote_code=r.model.trust_remote_code,
        )
        if r.model.revision:
            kwargs["revision"] = r.model.revision
        if self.info.device_type == "cuda":
            kwargs["device_map"] = {"": 0}
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
        gc = r.memory.gradient_checkpointing
        if r.lora is not None:
            model = FastLanguageModel.get_peft_model(
                model, r=r.lora.r, lora_alpha=r.lora.alpha, lora_dropout=r.lora.dropout,
                target_modules=list(r.lora.target_modules), bias="none", use_rslora=r.lora.use_rslora,
                use_gradient_checkpointing=gc, random_state=r.training.seed,
            )
        elif gc:
            model.gradient_checkpointing_enable()
        self.model, self.tokenizer = model, tokenizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in model.named_parameters() if p.requires_grad]
        # Identical starting weights: rank 0's, broadcast, then checked rather than assumed.
        D.broadcast_parameters(self.params, self.info)
        D.check_consistency(self.params, self.info, step=0)
        maybe_inject("after_setup", self)

        self.data = TokenizedData(Path(self.plan.data_dir))
        self.lengths = self.data.lengths()
        self.planner = StepPlanner(len(self.data), self.data.loss_counts, int(r.training.micro_batch_size),
                                   int(r.training.gradient_accumulation_steps), self.plan.num_workers,
                                   r.training.seed, r.dataset.shuffle, lengths=self.lengths,
                                   batching=r.dataset.batching)
        self.packed = r.dataset.batching == "packed"
        self.total_steps = self.planner.total_steps(r.training.epochs, r.training.max_steps)
        self.optimizer = build_optimizer(self.params, r, self.info.device_type)
        self.scheduler = build_scheduler(self.optimizer, r, self.total_steps)
        self.sync = D.GradientSynchronizer(self.params, self.info, r.distributed.aggregation,
                                           r.distributed.bucket_size_mb)
        self.history: list[dict[str, Any]] = []
        if self.plan.resume_from:
            from .checkpoint import load_checkpoint

            self.step = load_checkpoint(Path(self.plan.resume_from), self)

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        import torch

        from . import distributed as D
        from .checkpoint import save_checkpoint
        from .faults import maybe_inject
        from .progress import ProgressDisplay

        r, info = self.recipe, self.info
        self.model.train()
        device = info.device
        progress = ProgressDisplay(info.is_main and r.logging.progress, self.total_steps, self.step)
        metrics = (self.out / "metrics.jsonl").open("a", encoding="utf-8") if info.is_main else None
        t_start = time.perf_counter()
        t_window = t_start
        tokens_window = 0
        tokens_total = 0
        first_step_s = None
        skipped = 0
        last_loss = float("nan")
        try:
            while self.step < self.total_steps:
                batches = self.planner.batches(self.step)
                mine = batches.per_rank[info.rank]
                denom = self.sync.local_loss_denominator(batches.loss_tokens[info.rank], batches.global_loss_tokens)
                loss_sum = torch.zeros((), dtype=torch.float64, device=device)
                for mb in mine:
                    batch = {k: v.to(device, non_blocking=True) for k, v in self.data.collate(mb, self.packed).items()}
                    n_mb = int(sum(int(self.data.loss_counts[i]) for i in mb))
                    # no KV cache in training: with one, transformers ignores packed position_ids (leaks)
                    out = self.model(**batch, use_cache=False)
                    loss = out.loss
                    maybe_inject("loss", self, loss=loss)
                    if n_mb > 0:
                        (loss * (n_mb / denom)).backward()
                        loss_sum += loss.detach().to(torch.float64) * n_mb
                # One small collective and one host sync per step: loss, loss tokens, and whether any rank saw
                # a non-finite value (checked on the device: no per-parameter sync).
                bad = ~torch.isfinite(loss_sum) | ~_grads_finite(self.params)
                stats = torch.stack([torch.where(bad, torch.zeros_like(loss_sum), loss_sum),
                                     torch.tensor(float(batches.loss_tokens[info.rank]), dtype=torch.float64,
                                                  device=device), bad.to(torch.float64)])
                tot_loss, tot_tokens, bad_ranks = D.all_reduce_tensor(stats, info).tolist()
                lr = self.scheduler.get_last_lr()[0]
                if bad_ranks > 0:
                    # A non-finite loss/gradient on any rank: every rank skips this step together.
                    self.optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    grad_norm = float("nan")
                    if info.is_main:
                        progress.log(f"step {self.step + 1}: non-finite loss or gradient on {int(bad_ranks)} "
                                     "rank(s); step skipped on all ranks")
                else:
                    self.sync.synchronize()
                    grad_norm = _clip(self.params, r.training.max_grad_norm)
                    maybe_inject("before_optimizer_step", self)
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                self.step += 1
                step_tokens = int(sum(batches.rank_tokens))
                tokens_window += step_tokens
                tokens_total += step_tokens
                last_loss = tot_loss / max(1.0, tot_tokens) if bad_ranks == 0 else float("nan")
                if first_step_s is None:
                    first_step_s = time.perf_counter() - t_start
                verify = r.distributed.verify_every
                if verify and (self.step % verify == 0 or self.step == self.total_steps):
                    D.check_consistency(self.params, info, self.step)
                if self.step % r.logging.steps == 0 or self.step == self.total_steps:
                    now = time.perf_counter()
                    tps = tokens_window / max(now - t_window, 1e-9)
                    mems = D.all_gather_floats([_peak_memory_gb(info)], info)
                    row = {"step": self.step, "epoch": batches.epoch, "loss": last_loss, "learning_rate": lr,
                           "grad_norm": float(grad_norm), "tokens": step_tokens, "loss_tokens": int(tot_tokens),
                           "compute_tokens": int(sum(batches.compute_tokens)),
                           "tokens_per_second": tps, "elapsed_s": now - t_start,
                           "peak_memory_gb": [round(m[0], 3) for m in mems], "skipped_steps": skipped}
                    self.history.append(row)
                    if metrics is not None:
                        metrics.write(json.dumps(row) + "\n")
                        metrics.flush()
                    progress.update(self.step, last_loss, lr, tps, [m[0] for m in mems])
                    t_window, tokens_window = now, 0
                if r.output.save_steps and self.step % r.output.save_steps == 0 and self.step < self.total_steps:
                    save_checkpoint(self)
                maybe_inject("step_end", self)
            elapsed = time.perf_counter() - t_start
            mems = D.all_gather_floats([_peak_memory_gb(info)], info)
            self.save_final()
            summary = {"steps": self.step, "elapsed_s": elapsed, "tokens": tokens_total,
                       "tokens_per_second": tokens_total / max(elapsed, 1e-9), "final_loss": last_loss,
                       "first_step_s": first_step_s, "peak_memory_gb": [m[0] for m in mems],
                       "skipped_steps": skipped, "world_size": info.world_size,
                       "output_dir": str(self.out)}
            if info.is_main:
                (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
            return summary
        finally:
            progress.close()
            if metrics is not None:
                metrics.close()

    def save_final(self) -> None:
        """Rank 0 writes adapter/ (LoRA) or model/ (full); the others wait."""
        from . import distributed as D
        from .checkpoint import atomic_dir

        if self.info.is_main:
            name = "model" if self.recipe.lora is None else "adapter"
            with atomic_dir(self.out / name) as tmp:
                self.model.save_pretrained(str(tmp), safe_serialization=True)
                self.tokenizer.save_pretrained(str(tmp))
        D.barrier(self.info)


def _grads_finite(params: list[Any]) -> Any:
    """A 0-d bool tensor on the device: every gradient is finite (no host sync)."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.ones((), dtype=torch.bool, device=params[0].device)
    norms = torch._foreach_norm(grads)  # one fused pass; inf/nan in any element makes its norm non-finite
    return torch.isfinite(torch.stack(norms)).all()


def _clip(params: list[Any], max_norm: float | None) -> Any:
    """Global gradient norm as a device tensor (grads are synchronised, so every rank computes the same);
    clips to `max_norm` when set."""
    import torch

    grads = [p for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    if max_norm is None:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in grads])))
    return torch.nn.utils.clip_grad_norm_(grads, max_norm)


def _peak_memory_gb(info: Any) -> float:
    if info.device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    import psutil

    return psutil.Process().memory_info().rss / 2**30


def build_optimizer(params: list[Any], recipe: Recipe, device_type: str) -> Any:
    import torch

    t = recipe.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "adamw_8bit" and device_type == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # adamw, and adamw_8bit on CPU (bitsandbytes' 8-bit optimizers need CUDA)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay,
                             fused=device_type == "cuda")


def build_scheduler(optimizer: Any, recipe: Recipe, total_steps: int) -> Any:
    from transformers import get_scheduler

    t = recipe.training
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max(1, total_steps))


def effective_tokens_per_second(summary: dict[str, Any]) -> float:
    return float(summary.get("tokens_per_second", math.nan))
