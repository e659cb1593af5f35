"""One rank's training: `Trainer.setup` (model, data plan, gradient synchroniser, optimizer, resume), then
`Trainer.fit`, the loop. Each worker process builds one (`engine._worker_main`); rank 0 owns every side effect.

A step is queued in pieces the loop interleaves (`_launch`: micro-batches; `_exchange`: the step's one small
collective; `_update`: all-reduce, clipping, optimizer), and settled on the host (`_settle`) when its outcome
arrives: redone after an out-of-memory error, skipped on every rank after a non-finite value, else counted,
logged, evaluated, checked and saved as its number asks.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .data import PACKED_LENGTHS_KEY
from .recipe import Recipe

if TYPE_CHECKING:
    from .engine import RunPlan


class Trainer:
    """One rank's view of a run: model, optimizer, scheduler, data plan and the loop."""

    def __init__(self, plan: RunPlan, info: Any, stop: Any = None):
        self.plan = plan
        self.stop = stop
        self.recipe = plan.recipe
        self.info = info
        self.out = Path(plan.output_dir)
        self.step = 0
        self.split = 1  # pieces each micro-batch is cut into after an out-of-memory error (1: uncut)
        self.sharded = plan.recipe.distributed.strategy == "fsdp"  # FSDP2: parameters are DTensor shards
        self.neftune: Any = None  # NoisyEmbeddings when training.neftune_noise_alpha is set

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
        """Everything before the first step: the model (rank 0's trainable weights on every rank, checked), the
        data plan, the gradient synchroniser, optimizer and scheduler, and the checkpoint to resume from."""
        from .faults import maybe_inject

        self._load_model()
        maybe_inject("after_setup", self)
        self._plan_data()
        self._build_optimizer()
        self._resume()

    def _load_model(self) -> None:
        """Unsloth's model (LoRA on top), the same starting weights on every rank, then (fsdp) the shards."""
        import torch

        from . import distributed as D

        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        # Per-rank compile cache: ranks writing one unsloth_compiled_cache/ race (unsloth #3031).
        os.environ.setdefault(
            "UNSLOTH_COMPILE_LOCATION",
            str(Path(self.plan.output_dir) / ".cache" / f"unsloth_compiled_rank{self.info.rank}"),
        )
        r = self.recipe
        torch.manual_seed(r.training.seed)
        from .models import hide_hf_bars_off_terminal, quiet_library_noise

        quiet_library_noise()
        from unsloth import FastLanguageModel  # heavy: 7-30 s

        hide_hf_bars_off_terminal()

        self.attention = select_attention(r.model.attention, self.info.device_type)
        note = avoid_broken_block_compile(self.plan.model_path, self.info.device_type)
        if note and self.info.is_main:
            from .render import console

            console.print(f"note: {note}", soft_wrap=True)
        if r.dataset.batching == "packed" and self.info.device_type == "cuda" and self.info.is_main:
            self._warn_packed_route()

        self.plan.timeline["imported"] = time.time()
        if self.plan.data_gate:  # the data is being tokenised beside this start: it must be ready before the model
            from .engine import wait_for_data

            wait_for_data(self.plan, self.stop, self.info)
        self.dtype = self._dtype()
        kwargs = model_load_kwargs(r, self.plan.model_path, self.dtype, self.info.device_type, self.sharded)
        model, tokenizer = FastLanguageModel.from_pretrained(**kwargs)
        checkpointing = r.memory.gradient_checkpointing
        if r.lora is not None:
            model = FastLanguageModel.get_peft_model(
                model,
                r=r.lora.r,
                lora_alpha=r.lora.alpha,
                lora_dropout=r.lora.dropout,
                target_modules=list(r.lora.target_modules),
                bias="none",
                use_rslora=r.lora.use_rslora,
                use_dora=r.lora.use_dora,
                use_gradient_checkpointing=checkpointing,
                random_state=r.training.seed,
            )
            if r.lora.init_from:
                load_adapter_weights(model, r.lora.init_from)
        elif checkpointing:
            model.gradient_checkpointing_enable()
        # Identical starting weights: rank 0's, broadcast, then checked rather than assumed.
        trainable = [p for p in model.parameters() if p.requires_grad]
        D.broadcast_parameters(trainable, self.info)
        D.check_consistency(trainable, self.info, step=0)
        # From here on each rank draws its own random numbers (dropout masks): with one seed for all, rank 1 would
        # repeat rank 0's masks, where one process over the same batch draws new ones for every row (torchtune
        # seeds seed + rank alike). Rank 0 keeps the recipe's seed, so a one-worker run is unchanged.
        torch.manual_seed(r.training.seed + self.info.rank)
        if self.sharded and r.model.load_in_4bit:
            # QLoRA under fsdp: 16-bit weights loaded on the host become NF4 tensors that FSDP2 shards (torchao;
            # bitsandbytes' 4-bit state is not shardable per parameter). See quantization.py.
            self.quantized = self._quantize(model)
        if self.sharded:
            # FSDP2 replaces each parameter by a DTensor shard: collect the trainable ones after wrapping.
            D.shard_model(model, self.info, r.distributed.aggregation)
            if r.model.load_in_4bit:
                self._report_4bit_shards(model)
        self.model, self.tokenizer = model, tokenizer
        if r.training.neftune_noise_alpha is not None:
            from .neftune import NoisyEmbeddings

            self.neftune = NoisyEmbeddings(r.training.neftune_noise_alpha, r.training.seed).attach(model)
        self.plan.timeline["model_ready"] = time.time()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        from .optim import lr_scales

        scales = lr_scales([n for n, _ in named], [p for _, p in named], r)
        # LoRA+: the fast group's parameters after the others, so that each group is one run of the flat buckets
        # (8-bit AdamW updates a run of one group in one kernel; alternating A and B would be a kernel per tensor)
        order = sorted(range(len(named)), key=lambda i: scales[i] != 1.0)
        self.param_names = [named[i][0] for i in order]
        self.params = [named[i][1] for i in order]
        self.lr_scales = [scales[i] for i in order]

    def _plan_data(self) -> None:
        """The tokenised data (and eval split), and the plan of every step's micro-batches per rank."""
        from .data import StepPlanner, SubsetData, TokenizedData, split_eval_indices

        r = self.recipe
        self.data = TokenizedData(Path(self.plan.data_dir))
        self.eval_data = None
        if self.plan.eval_data_dir:
            self.eval_data = TokenizedData(Path(self.plan.eval_data_dir))
        elif r.dataset.eval_ratio:
            train_idx, eval_idx = split_eval_indices(len(self.data), r.dataset.eval_ratio, r.training.seed)
            self.data, self.eval_data = SubsetData(self.data, train_idx), SubsetData(self.data, eval_idx)
        self.lengths = self.data.lengths()
        self.planner = StepPlanner(
            len(self.data),
            self.data.loss_counts,
            int(r.training.micro_batch_size),
            int(r.training.gradient_accumulation_steps),
            self.plan.num_workers,
            r.training.seed,
            r.dataset.shuffle,
            lengths=self.lengths,
            batching=r.dataset.batching,
            pad_to=r.dataset.pad_to_multiple_of,
            row_tokens=int(r.training.micro_batch_size) * r.model.max_seq_length,  # packed rows' bound
        )
        self.packed = r.dataset.batching == "packed"
        self.pad_to = r.dataset.pad_to_multiple_of
        self.speed = SpeedBalance(self.plan.num_workers, balances_speed(r, self.info.device_type))
        # the last counted step: (its number, padded tokens per rank, whether a rank compiled in it), for the
        # device times that arrive with the next step's collective
        self.speed_last: tuple[int, list[int], bool] | None = None
        self.total_steps = self.planner.total_steps(r.training.epochs, r.training.max_steps)

    def _build_optimizer(self) -> None:
        """The gradient synchroniser (flat buckets, or FSDP2's reduce-scatter), optimizer and scheduler."""
        from . import distributed as D
        from .optim import build_optimizer, build_scheduler

        r = self.recipe
        if self.sharded:
            self.sync = D.ShardedGradients(self.params, self.info, r.distributed.aggregation)
        else:
            # Gradients become views of flat per-bucket buffers (one all-reduce per bucket); with 8-bit AdamW the
            # weights too, so that it updates a bucket in one kernel instead of one per LoRA tensor.
            self.sync = D.GradientSynchronizer(
                self.params,
                self.info,
                r.distributed.aggregation,
                r.distributed.bucket_size_mb,
                grad_views=True,
                param_views=r.training.optimizer == "adamw_8bit",
            )
        self.optimizer = build_optimizer(self.params, r, self.info.device_type, self.lr_scales)
        if hasattr(self.optimizer, "use_flat") and not self.sharded:
            self.optimizer.use_flat(self.sync.flat_buckets())
        self.scheduler = build_scheduler(self.optimizer, r, self.total_steps)

    def _resume(self) -> None:
        """The run's totals, and the state of the checkpoint to resume from: the one chosen at launch, or after an
        elastic restart the newest one (multinode, #9)."""
        from .checkpoint import load_checkpoint, resume_point, truncate_metrics

        # Totals over the whole run, carried through checkpoints so a resumed run reports the whole run.
        self.run_state: dict[str, Any] = {
            "tokens": 0,
            "elapsed_s": 0.0,
            "skipped_steps": 0,
            "best_eval_loss": None,
            "best_eval_step": None,
            "evals_without_improvement": 0,  # since the best (early stopping's count)
            "stopped_early": False,
            "last_metrics": None,
        }
        start = resume_point(self.out, self.plan.resume_from, self.info)
        if start is not None:
            state = load_checkpoint(start, self)
            self.step = int(state["step"])
            self.run_state.update(state.get("run_state", {}))
            self.run_state["stopped_early"] = False  # trained on (the patience was raised or removed)
            if self.info.restart_count > 0 and self.info.is_main:
                truncate_metrics(self.out, self.step)  # rows after the checkpoint are logged again

    def _quantize(self, model: Any) -> Any:
        from . import quantization as Q

        done = Q.quantize_frozen_linears(model, self.info.device)
        if done.count == 0:
            raise RuntimeError("model.load_in_4bit: found no frozen linear weight in the decoder layers to quantise")
        Q.check_shardable(model, self.info.world_size)
        Q.use_peft_lora_forward(model)
        return done

    def _warn_packed_route(self) -> None:
        """Packed rows on a GPU where Unsloth attends them one sample at a time: say so once (rank 0), with the
        cost measured on an H200 and the ways out (`dataset.batching: auto` never picks packed there)."""
        from .render import console
        from .varlen import unsloth_packed_route

        route = unsloth_packed_route()
        if route in ("per sample", "dense mask"):
            how = "one SDPA call per sample" if route == "per sample" else "one SDPA call with a tokens x tokens mask"
            console.print(
                f"[yellow]warning[/]: dataset.batching: packed, but Unsloth attends each packed row with {how} here "
                "(no flash-attn, no loadable xformers, no torch varlen_attn with enable_gqa): on an H200 such steps "
                "ran 2.5x slower than with a variable-length kernel. Use dataset.batching: auto or balanced, or "
                "install flash-attn or torch 2.12+ (docs/data.md).",
                soft_wrap=True,
            )

    def _report_4bit_shards(self, model: Any) -> None:
        """Rank 0 prints the NF4 bytes every rank stores (the evidence that 4-bit storage is sharded)."""
        from . import distributed as D
        from . import quantization as Q
        from .render import console, size_text

        local, full = Q.nf4_storage(model)
        per_rank = [row[0] for row in D.all_gather_floats([float(local)], self.info)]
        if self.info.is_main:
            console.print(
                f"[bold]4-bit[/]: {self.quantized.count} NF4 weights, {size_text(full)} "
                f"(from {size_text(self.quantized.bytes_before)}); stored per rank: "
                + ", ".join(size_text(b) for b in per_rank),
                soft_wrap=True,
            )

    # -- the loop --------------------------------------------------------------------------------------
    def fit(self) -> dict[str, Any]:
        """Train from `self.step` to `total_steps` (or a stop request); returns the session's summary.

        Look-ahead: step k+1's micro-batches are queued before the host reads step k's outcome (loss, finite
        flags, out of memory, stop requests), so the device never idles between steps while the host reads,
        decides and prepares. Step k's optimizer update is queued with a device-side undo for the case the host
        learns later (a non-finite value or an out-of-memory error on some rank); step k+1's work is dropped when
        step k must be redone or is the last before a stop. Steps that save, evaluate, check the replicas or end
        the run are settled at once. See `_looks_ahead` for when it is on.
        """
        from . import distributed as D

        self.model.train()
        s = FitSession(self, ahead=self._looks_ahead())
        try:
            self._run_steps(s)
            return self._finish(s)
        except Exception as exc:
            if D.is_collective_timeout(exc):
                raise D.CollectiveTimeout(
                    D.describe_timeout(self.info, self.recipe.distributed.timeout_seconds, self.step + 1)
                ) from exc
            raise
        finally:
            s.close()

    def _run_steps(self, s: FitSession) -> None:
        """Queue, exchange and settle steps until the last one or a stop; queued steps are settled one late."""
        inflight: Launch | None = None  # a step queued on the device that the host has not settled
        while self.step < self.total_steps:
            t_begin = time.perf_counter()
            index = self.step + (inflight is not None)  # steps done before the one queued now
            at_once = not s.ahead or self._settles_at_once(index, s.session_start)
            launch = self._launch(index, keep_rng=inflight is not None)
            t_queued = time.perf_counter()
            waited = 0.0
            earlier, inflight = inflight, None
            if earlier is None:
                s.write_row()  # the previous step's, while this step's micro-batches run on the device
            else:
                outcome = self._settle(s, earlier, dropped=launch)
                waited = earlier.waited
                if outcome == "redo":
                    continue
                if outcome == "stop":
                    return
            # The step's one small collective: see `_exchange`. A step settled at once sends its own device time
            # (the host waits for its micro-batches here anyway); a queued step's (`earlier`, settled just now)
            # goes with the next.
            t_exchange = time.perf_counter()
            self._exchange(launch, earlier, own_time=at_once)
            if at_once:
                waited += time.perf_counter() - t_exchange  # the host waited for this step's micro-batches
                outcome = self._settle(s, launch, dropped=None)
                waited += launch.waited
                if outcome == "redo":
                    continue
                if outcome == "stop":
                    return
            else:
                self._update(launch, masked=True)
                inflight = launch
            if self.step > s.session_start + 1:  # the first step compiles: left out of the averages
                t_end = time.perf_counter()
                queued, update = t_queued - t_begin, launch.update_s
                s.phases.add(queued, waited, update, t_end - t_begin - queued - waited - update)

    def _settle(self, s: FitSession, step: Launch, dropped: Launch | None) -> str:
        """The host's side of a step (queued one step earlier, or settled at once): read its outcome; redo it, skip
        it or count it; then write, evaluate, check and save what its number asks for. Returns "next", "redo" or
        "stop". `dropped`: the next step, already queued, whose work is dropped if this one is redone or is the last
        before a stop."""
        from . import distributed as D

        r = self.recipe
        out = self._read_outcome(s, step)
        if out.oom_ranks > 0:  # every rank saw the sum: all redo this step with smaller pieces together
            if dropped is not None:
                self._drop(dropped)
            if step.updated:
                self.optimizer.undo_step_count()  # the device already undid the update
            self._after_oom(int(out.oom_ranks), s.progress)
            return "redo"
        lr = self.scheduler.get_last_lr()[0]
        self._apply_or_skip(s, step, out.bad_ranks, out.bad_which)
        done_at = self._done_at(s, step, out.t_read)
        self.step += 1
        self._count(s, step, out, done_at)
        last = self.step == self.total_steps
        verify = r.distributed.verify_every
        # Under fsdp each rank holds different shards by design: there is no replica to compare.
        if verify and not self.sharded and (self.step % verify == 0 or last):
            D.check_consistency(self.params, self.info, self.step, names=self.param_names)
        evaluated, eval_s = None, 0.0
        if self.eval_data is not None and (last or (r.training.eval_steps and self.step % r.training.eval_steps == 0)):
            t_eval = time.perf_counter()
            evaluated = self.evaluate()
            eval_s = time.perf_counter() - t_eval  # after this step's end (done_at): the next window skips it
            s.eval_total += eval_s
            s.last_eval_loss = evaluated[0]
        if evaluated is not None and self._no_longer_improving(s, evaluated[0]) and not last:
            # every rank has the same eval loss (all-reduced), so all end here together, as at the last step
            self.total_steps, last = self.step, True
            s.run_state["stopped_early"] = True
            if self.info.is_main:
                rs, t = s.run_state, r.training
                n = rs["evals_without_improvement"]
                why = (
                    f"by more than training.early_stopping_threshold ({t.early_stopping_threshold:g})"
                    if t.early_stopping_threshold
                    else "on the best one"
                )
                s.progress.log(
                    f"early stop at step {self.step}: {n} evaluations in a row did not lower the eval loss {why} "
                    f"(training.early_stopping_patience={t.early_stopping_patience}); best {rs['best_eval_loss']:.4f} "
                    f"at step {rs['best_eval_step']}"
                )
        if self.step % r.logging.steps == 0 or last or evaluated is not None:
            self._log_step(s, step, out, lr, done_at, evaluated)
            s.t_window, s.tokens_window = done_at + eval_s, 0  # tokens/s measures training, not evaluation
        if evaluated is not None:  # after the step's own line, which the log shows first
            s.progress.eval(self.step, *evaluated)
        s.run_state["elapsed_s"] = s.elapsed_before + done_at - s.t_start
        return self._save_or_stop(s, out.stop_ranks > 0 and not last, last, evaluated is not None, dropped)

    def _read_outcome(self, s: FitSession, step: Launch) -> StepOutcome:
        """Wait for the step's collective to reach the host; file the previous step's device times it carries
        (speed balance, the pending metrics row) and write that row."""
        t_wait = time.perf_counter()
        rows = step.stats.host().tolist()
        out = StepOutcome.from_rows(rows, t_read=time.perf_counter())
        step.waited = out.t_read - t_wait
        if self.speed_last is not None and self.speed_last[0] == out.earlier_step and not self.speed_last[2]:
            self.speed.observe(self.speed_last[1], out.earlier_times)
        if s.pending is not None and s.pending.row["step"] == out.earlier_step:  # the previous step's device time
            s.pending.row["compute_s"] = [round(t, 5) for t in out.earlier_times]
        s.write_row()
        return out

    def _apply_or_skip(self, s: FitSession, step: Launch, bad_ranks: float, which: list[int] | None = None) -> None:
        """Apply the step's update (already queued when it looked ahead), or skip it on every rank when some rank
        saw a non-finite loss or gradient; too many skips in a row stop the run."""
        if bad_ranks == 0:
            s.bad_since = 0
            if not step.updated:
                self._update(step, masked=False)
            self.scheduler.step()
            return
        if step.updated:
            self.optimizer.undo_step_count()  # the device already undid the update
        else:
            self.sync.zero_grad()
        s.run_state["skipped_steps"] += 1
        s.bad_since = s.bad_since or self.step + 1
        if self.info.is_main:
            s.progress.log(
                f"step {self.step + 1}: non-finite loss or gradient on {int(bad_ranks)} rank(s)"
                + (f" ({', '.join(f'rank {r}' for r in which)})" if which else "")
                + "; step skipped on all ranks"
            )
        limit = self.recipe.training.max_skipped_steps
        if self.step + 2 - s.bad_since >= limit:
            raise NonFiniteLossError(
                f"{self.step + 2 - s.bad_since} optimizer steps in a row had a non-finite loss or gradient, "
                f"starting at step {s.bad_since} (training.max_skipped_steps={limit}); stopped, the weights those "
                f"of step {s.bad_since - 1} (saved only where a checkpoint fell). Hint: lower training.learning_rate, "
                "set training.max_grad_norm, use "
                "model.dtype bfloat16 instead of float16, or inspect the samples of that step"
            )

    def _done_at(self, s: FitSession, step: Launch, t_read: float) -> float:
        """When the step's work was done, on the host clock.

        On a GPU: the previous step's end plus the device time from there to this step's end (CUDA events); a
        queued step is settled after the next one is queued, so the host clock would count it late by a varying
        amount. The session's first step: when the host saw its end. On CPU, where work runs as it is queued:
        when its update was queued (or its outcome read)."""
        if step.done is None:
            step.done = _end_event(self.info.device_type)
        if step.done is None:
            return step.updated_at if step.updated else t_read
        step.done.synchronize()
        if s.last_done is None:
            done_at = time.perf_counter()
        else:
            done_at = s.last_done[1] + s.last_done[0].elapsed_time(step.done) / 1e3
        s.last_done = (step.done, done_at)
        return done_at

    def _count(self, s: FitSession, step: Launch, out: StepOutcome, done_at: float) -> None:
        """A settled step's tokens, loss, device times and (for the session's first) time to the first step."""
        if not any(out.compiles) and not any(math.isnan(t) for t in out.own_times):
            self.speed.observe(step.batches.compute_tokens, out.own_times)
        self.speed_last = (self.step, step.batches.compute_tokens, any(out.compiles))
        step_tokens = int(sum(step.batches.rank_tokens))
        s.tokens_window += step_tokens
        s.tokens_session += step_tokens
        s.run_state["tokens"] += step_tokens
        s.progress.advance(self.step)  # the bar (and its ETA) moves every step; its numbers every logged one
        s.last_loss = out.loss / max(1.0, out.loss_tokens) if out.bad_ranks == 0 else float("nan")
        if s.first_step_s is None:
            s.first_step_s, s.first_step_tokens = done_at - s.t_start, step_tokens
            self.plan.timeline["first_step"] = time.time() - (time.perf_counter() - done_at)

    def _log_step(
        self,
        s: FitSession,
        step: Launch,
        out: StepOutcome,
        lr: float,
        done_at: float,
        evaluated: tuple[float, float] | None,
    ) -> None:
        """The step's metrics row (written once its device values reach the host) and the progress bar's numbers."""
        rs, own = s.run_state, [round(t, 5) for t in out.own_times]
        row = {
            "step": self.step,
            "epoch": step.batches.epoch,
            "loss": s.last_loss,
            "learning_rate": lr,
            "grad_norm": step.grad_norm if out.bad_ranks == 0 else float("nan"),
            "tokens": int(sum(step.batches.rank_tokens)),
            "run_tokens": rs["tokens"],  # every step's so far (resumes included): rows are every N steps
            "loss_tokens": int(out.loss_tokens),
            "compute_tokens": int(sum(step.batches.compute_tokens)),
            "tokens_per_second": s.tokens_window / max(done_at - s.t_window, 1e-9),
            "elapsed_s": s.elapsed_before + done_at - s.t_start,
            "peak_memory_gb": [round(m, 3) for m in out.peaks],
            "longest_row": out.longest,
            "micro_batches": len(step.batches.per_rank[0]),  # forward passes per rank (packed: rows that fit)
            # each rank's device time for its micro-batches; a queued step's arrives with the next step
            "compute_s": None if any(math.isnan(c) for c in own) else own,
            "compiles": out.compiles,
            "reserved_gb": [round(m, 3) for m in out.reserved],
            "skipped_steps": rs["skipped_steps"],
        }
        if self.speed.enabled:  # the ranks' relative speeds this step's split used (null: tokens alone)
            row["rank_speeds"] = list(step.batches.speeds) if step.batches.speeds else None
            row["rank_compute_tokens"] = step.batches.compute_tokens
        if evaluated is not None:
            row["eval_loss"], row["eval_perplexity"] = evaluated
        s.pending = PendingRow(row)
        s.progress.update(self.step, s.last_loss, lr, row["tokens_per_second"], out.peaks)

    def _no_longer_improving(self, s: FitSession, eval_loss: float) -> bool:
        """Track the best evaluation (its loss and step, in the run's totals that checkpoints carry); True when
        `training.early_stopping_patience` evaluations in a row have not improved on it by more than the
        threshold."""
        rs, t = s.run_state, self.recipe.training
        best = rs["best_eval_loss"]
        if best is None or eval_loss < best - t.early_stopping_threshold:
            rs["evals_without_improvement"] = 0
        else:
            rs["evals_without_improvement"] += 1
        if best is None or eval_loss < best:
            rs["best_eval_loss"], rs["best_eval_step"] = eval_loss, self.step
            if self.recipe.output.keep_best:  # every rank: under fsdp the save gathers the shards
                self.save_final(BEST_DIR, marker={"step": self.step, "eval_loss": eval_loss})
        patience = t.early_stopping_patience
        return patience is not None and rs["evals_without_improvement"] >= patience

    def _save_or_stop(
        self, s: FitSession, interrupted: bool, last: bool, evaluated: bool, dropped: Launch | None
    ) -> str:
        """Checkpoint when the step's number (or a stop request) asks for it; "stop" after a stop request's
        checkpoint, else "next". Rows of steps that save or evaluate are written at once (resume and the logs
        stay in step)."""
        from .checkpoint import save_checkpoint
        from .faults import maybe_inject

        s.interrupted = interrupted
        if interrupted and dropped is not None:
            self._drop(dropped)
        save_every = self.recipe.output.save_steps
        saving = interrupted or (save_every and self.step % save_every == 0) or last
        if saving or evaluated:
            s.write_row()
        if saving:
            t_save = time.perf_counter()
            path = save_checkpoint(self)
            s.saved_step = self.step
            if path is not None and not interrupted:  # rank 0's; a stop says so below
                s.progress.note(f"checkpoint {path.name} saved in {time.perf_counter() - t_save:.1f} s")
        if interrupted:
            if self.info.is_main:
                s.progress.log(f"stop requested: checkpoint of step {self.step} saved; exiting")
            return "stop"
        maybe_inject("step_end", self)
        s.collector.after_step(self.step)
        if s.profiler is not None:
            s.profiler.after_step(self.step)
        return "next"

    def _finish(self, s: FitSession) -> dict[str, Any]:
        """After the last step (or a stop): the last row, checkpoint and final weights; the session's summary
        (rank 0 writes summary.json unless stopped)."""
        from . import distributed as D
        from .checkpoint import save_checkpoint

        info, rs = self.info, s.run_state
        s.write_row()
        if s.saved_step != self.step:  # e.g. resumed from the final checkpoint: nothing ran, nothing to save
            save_checkpoint(self)
        elapsed = time.perf_counter() - s.t_start
        mems = D.all_gather_floats([_peak_memory_gb(info), _peak_reserved_gb(info)], info)
        if not s.interrupted:
            self.save_final()
        summary = {
            "steps": self.step,
            "elapsed_s": elapsed,
            "tokens": s.tokens_session,
            "tokens_per_second": s.tokens_session / max(elapsed - s.eval_total, 1e-9),  # training time only
            # after the first step (its compilation and warm-up weigh heavily on short runs); None: one step
            "steady_tokens_per_second": (
                (s.tokens_session - s.first_step_tokens) / max(elapsed - s.first_step_s - s.eval_total, 1e-9)
                if s.first_step_s is not None and self.step - s.session_start > 1
                else None
            ),
            "eval_s": s.eval_total,
            "final_loss": s.last_loss if math.isfinite(s.last_loss) else None,  # strict JSON: no NaN
            "first_step_s": s.first_step_s,
            "startup_s": startup_breakdown(self.plan.timeline),
            "step_phases_s": s.phases.means(),
            "attention_kernels": [name for name, on in self.attention.items() if on],
            "look_ahead": s.ahead,  # steps queued before the previous one was settled (`_looks_ahead`)
            "rank_speeds": list(speeds) if (speeds := self.speed.speeds()) else None,  # None: split by tokens
            # 8-bit AdamW: trainable tensors updated by one kernel per flat run at the last step, of all
            "optimizer_flat": {
                **getattr(self.optimizer, "last_flat", {"tensors": 0, "kernels": 0}),
                "of": len(self.params),
            },
            "peak_memory_gb": [m[0] for m in mems],
            # what the caching allocator held at most (nvidia-smi shows this plus the CUDA context); None on CPU
            "peak_reserved_gb": [round(m[1], 3) for m in mems] if info.device_type == "cuda" else None,
            "skipped_steps": rs["skipped_steps"],
            "world_size": info.world_size,
            "device_type": info.device_type,  # "cuda" or "cpu": what `mgpu report` calls the workers
            "output_dir": str(self.out),
            "run_tokens": rs["tokens"],
            "run_elapsed_s": rs["elapsed_s"],
            "best_eval_loss": rs["best_eval_loss"],
            "best_eval_step": rs["best_eval_step"],
            "stopped_early": rs["stopped_early"],  # training.early_stopping_patience ended the run before its last step
            # the step whose weights adapter/ (model/) holds: the best evaluation's with output.keep_best
            "final_weights_step": self._final_weights_step(),
            "final_eval_loss": s.last_eval_loss,  # None: no evaluation in this session
            "resumed_from_step": int(self.plan.resume_from.rsplit("-", 1)[-1]) if self.plan.resume_from else None,
        }
        if s.interrupted:
            summary.update(interrupted=True, checkpoint=str(self.out / "checkpoints" / f"step-{self.step}"))
        elif info.is_main and not (self.step == s.session_start and (self.out / "summary.json").exists()):
            # (a resume with nothing left to train keeps the finished run's summary)
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary

    # -- one step, in the pieces the loop interleaves ---------------------------------------------------
    def _looks_ahead(self) -> bool:
        """Queue each step before the host settles the previous one (see `fit`). It needs an optimizer that can
        undo an update on the device: LoRA with the 8-bit AdamW. The undo copies the weights and optimizer state
        it updates, about 6 bytes per trainable parameter each step (12 for tensors under bitsandbytes'
        `min_8bit_size`, whose state is 32-bit): small for LoRA, a copy of the model for full fine-tuning. Torch's
        AdamW and SGD, full fine-tuning and fsdp settle each step first. `MGPU_LOOKAHEAD=0` turns it off, to
        compare or to rule it out."""
        return (
            not self.sharded
            and self.recipe.lora is not None
            and hasattr(self.optimizer, "undo_step_count")
            and not getattr(self.optimizer, "is_paged", False)
            and os.environ.get("MGPU_LOOKAHEAD", "1") != "0"
        )

    def _settles_at_once(self, index: int, session_start: int) -> bool:
        """Step `index + 1` is settled before the next one is queued: it saves, evaluates, checks the replicas
        or ends the run (all need its final state and nothing queued behind it), or it is the session's first
        (it compiles: the time to the first step stays what it says)."""
        n, r = index + 1, self.recipe

        def every(k: int | None) -> bool:
            return bool(k) and n % int(k) == 0

        return (
            index == session_start
            or n == self.total_steps
            or every(r.output.save_steps)
            or (self.eval_data is not None and every(r.training.eval_steps))
            or (not self.sharded and every(r.distributed.verify_every))
        )

    def _launch(self, index: int, keep_rng: bool) -> Launch:
        """Queue step `index + 1`'s micro-batches (forward and backward) on this rank's device. `keep_rng`: note
        the random-number state first, in case the step is dropped and run again."""
        batches = self.planner.batches(index, self.speed.speeds())
        mine = batches.per_rank[self.info.rank]
        denom = self.sync.local_loss_denominator(batches.loss_tokens[self.info.rank], batches.global_loss_tokens)
        rng = _rng_states(self.info.device_type) if keep_rng else None
        self.launching = index + 1  # the step in progress, for fault injection
        clock = DeviceClock(self.info.device_type)
        clock.start()
        compiled_before = _graphs_compiled()
        loss_sum, oom = self._accumulate(mine, denom, index)
        clock.stop()
        return Launch(index, batches, mine, loss_sum, oom, clock, _graphs_compiled() - compiled_before, rng)

    def _exchange(self, step: Launch, earlier: Launch | None, own_time: bool) -> None:
        """Queue the step's one small collective, and its copy to the host (read in `_settle`).

        Each rank sends: its loss and loss tokens; whether it saw a non-finite value (checked on the device: no
        per-parameter sync), ran out of memory or was asked to stop (so that every rank redoes, skips or stops
        at the same step); its peak and reserved memory, longest row and compiles for the metrics line; and
        device times of its micro-batches: `earlier`'s, and with `own_time` this step's (waits for them). The
        sum of the flags stays on the device as `step.skip`, for an update queued before the host reads it.
        Host values travel in one pinned copy (a plain torch.tensor(..., device=cuda) would wait for the GPU).
        """
        import torch

        from . import distributed as D

        info = self.info
        bad = ~torch.isfinite(step.loss_sum) | ~self.sync.grads_finite()
        stop_flag = 1.0 if self.stop is not None and self.stop.requested(info.is_main) else 0.0
        host = [
            float(step.batches.loss_tokens[info.rank]),
            stop_flag,
            float(step.oom),
            _peak_memory_gb(info),
            float(self._longest_row(step.mine)),
            float(step.compiled),
            _reserved_memory_gb(info),
            float(earlier.index + 1) if earlier is not None else 0.0,
            earlier.clock.seconds() if earlier is not None else math.nan,
            step.clock.seconds() if own_time else math.nan,
        ]
        loss = torch.where(bad, torch.zeros_like(step.loss_sum), step.loss_sum)
        stats = torch.cat(
            [
                torch.stack([loss, bad.to(torch.float64)]),
                _to_device(torch.tensor(host, dtype=torch.float64), info.device),
            ]
        )
        gathered = D.all_gather_tensor(stats, info)
        step.skip = (gathered[:, 1].sum() + gathered[:, 4].sum()) > 0
        step.stats = HostCopy(gathered)

    def _update(self, step: Launch, masked: bool) -> None:
        """Queue the gradient all-reduce, clipping and optimizer update. `masked`: the device undoes the update
        where `step.skip` is set (the host settles the step later); otherwise the host has already seen it is
        good. The scheduler steps when the host settles the step."""
        from .faults import maybe_inject

        t0 = time.perf_counter()
        self.launching = step.index + 1
        self.sync.synchronize()
        norm = self.sync.clip_grad_norm(self.recipe.training.max_grad_norm)
        maybe_inject("before_optimizer_step", self)
        if masked:
            self.optimizer.step(skip=step.skip)
        else:
            self.optimizer.step()
        self.sync.zero_grad()
        step.done = _end_event(self.info.device_type)
        step.grad_norm = HostCopy(norm)
        step.updated, step.updated_at = True, time.perf_counter()
        step.update_s = step.updated_at - t0

    def _drop(self, step: Launch) -> None:
        """Forget a queued step that is to run again: its gradients and the random numbers it drew."""
        import torch

        self.sync.zero_grad()
        cpu, cuda = step.rng
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)

    def evaluate(self) -> tuple[float, float]:
        """(eval loss, perplexity): token-weighted mean over the whole eval split, samples sharded over ranks."""
        import torch

        from . import distributed as D
        from .faults import maybe_inject

        data, info = self.eval_data, self.info
        maybe_inject("evaluate", self)
        mine = list(range(info.rank, len(data), info.world_size))
        mb_size = int(self.recipe.training.micro_batch_size)
        sums = torch.zeros(2, dtype=torch.float64, device=info.device)
        rounds = range(0, len(mine), mb_size)
        if self.sharded:
            # Every forward all-gathers the layers: all ranks run the same number of them (ranks out of samples
            # repeat their first micro-batch, weighted 0).
            rounds = range(0, -(-len(data) // info.world_size), mb_size)
        self.model.eval()
        try:
            with torch.no_grad():
                for j in rounds:
                    mb = mine[j : j + mb_size]
                    weight = 1.0 if mb else 0.0
                    mb = mb or mine[:mb_size] or [0]
                    n_mb = int(sum(int(data.loss_counts[i]) for i in mb))
                    batch = {k: v.to(info.device) for k, v in data.collate(mb, pad_to=self.pad_to).items()}
                    if n_mb == 0:
                        if not self.sharded:
                            continue  # the model's mean over zero tokens is NaN
                        batch["labels"], weight = _one_target(batch), 0.0
                    loss = self.model(**batch, use_cache=False).loss.detach().to(torch.float64)
                    sums[0] += loss * n_mb * weight
                    sums[1] += n_mb * weight
        finally:
            self.model.train()
        loss_sum, tokens = D.all_reduce_tensor(sums, info).tolist()
        loss = loss_sum / max(tokens, 1.0)
        return loss, math.exp(min(loss, 700.0))

    def _longest_row(self, micro_batches: list[list[int]]) -> int:
        """Tokens in the longest row this rank ran this step (the padded width, or a packed row's length): a new
        width is a new shape for the GPU kernels, which the metrics line shows next to the step's time."""
        rows = self.lengths if self.packed else self.planner.padded_lengths
        return max((int(rows[mb].sum() if self.packed else rows[mb].max()) for mb in micro_batches if mb), default=0)

    # -- out-of-memory recovery (issue #10) -------------------------------------------------------------
    def _accumulate(self, micro_batches: list[list[int]], denom: int, index: int) -> tuple[Any, bool]:
        """Forward/backward of this rank's micro-batches for step `index + 1`, each cut into `self.split` pieces.

        Each piece's token-mean loss is scaled by (its loss tokens / denom), so the accumulated gradient
        is the same sum of per-token losses however a micro-batch is cut. Returns (loss sum, out of memory).
        """
        import torch

        from .faults import maybe_inject

        device = self.info.device
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        try:
            for mb in micro_batches:
                for piece in _pieces(mb, self.split):
                    batch = {
                        k: v if k == PACKED_LENGTHS_KEY else _to_device(v, device)  # lengths: read on the host
                        for k, v in self.data.collate(piece, self.packed, self.pad_to).items()
                    }
                    n = int(sum(int(self.data.loss_counts[i]) for i in piece))
                    if n == 0 and self.sharded:
                        # FSDP2 reduce-scatters in backward: every rank must run it, even for a piece without
                        # loss tokens. One fake target keeps the model's token-mean loss finite; scaled by 0 below.
                        batch["labels"] = _one_target(batch)
                    maybe_inject("forward", self, samples=len(piece), tokens=int(batch["input_ids"].numel()))
                    with self._noise(index, piece):
                        # no KV cache in training: with one, transformers ignores packed position_ids (leaks)
                        loss = self.model(**batch, use_cache=False).loss
                    maybe_inject("loss", self, loss=loss)
                    if n > 0:
                        (loss * (n / denom)).backward()
                        loss_sum += loss.detach().to(torch.float64) * n
                    elif self.sharded:
                        (loss * 0.0).backward()
        except torch.OutOfMemoryError:
            return loss_sum, True  # the frames holding the activations are gone once we are out of here
        return loss_sum, False

    def _noise(self, index: int, piece: list[int]) -> Any:
        """NEFTune's noise for the forward of `piece` at step `index + 1` (training.neftune_noise_alpha), or none."""
        if self.neftune is None:
            return contextlib.nullcontext()
        from .neftune import packed_layout, padded_layout

        layout = packed_layout if self.packed else padded_layout
        return self.neftune.batch(index, layout(piece, self.lengths))

    def _after_oom(self, oom_ranks: int, progress: Any) -> None:
        """Drop this step's partial gradients, free the cache, and halve the pieces; stop at 1 sample."""
        import torch

        self.sync.zero_grad()
        if self.info.device_type == "cuda":
            torch.cuda.empty_cache()
        mb = int(self.recipe.training.micro_batch_size)
        piece = -(-mb // self.split)
        ga = int(self.recipe.training.gradient_accumulation_steps)
        if piece <= 1:
            from .checkpoint import save_checkpoint

            if self.step > 0:
                save_checkpoint(self)
            where = f"; checkpoint saved at step {self.step} (resume with --resume auto)" if self.step > 0 else ""
            raise OutOfMemoryStop(
                f"out of memory at step {self.step + 1} on {oom_ranks} rank(s) even with micro-batches of 1 "
                f"sample{where}. Hint: lower model.max_seq_length, set memory.gradient_checkpointing: unsloth, "
                f"or use model.load_in_4bit: true (QLoRA)"
            )
        self.split *= 2
        piece = -(-mb // self.split)
        if self.info.is_main:
            progress.log(
                f"step {self.step + 1}: out of memory on {oom_ranks} rank(s) with micro-batches of "
                f"{-(-mb // (self.split // 2))} samples; retrying the step in pieces of {piece} "
                f"(same gradients). To avoid it: training.micro_batch_size={piece} "
                f"training.gradient_accumulation_steps={ga * (-(-mb // piece))}"
            )

    def save_final(self, folder: str | None = None, marker: dict[str, Any] | None = None) -> None:
        """Rank 0 writes adapter/ (LoRA) or model/ (full), or `folder` (the best evaluation's weights, with `marker`
        as BEST_MARKER); the others wait. With output.keep_best, adapter/ (model/) is a copy of best/."""
        from . import distributed as D
        from .checkpoint import CheckpointWriteError, atomic_dir, list_checkpoints, write_failure

        best = self.out / BEST_DIR
        # rank 0 decides for all (a node that saw best/ late would gather shards alone, below)
        if (
            folder is None
            and self.recipe.output.keep_best
            and D.broadcast_object((best / BEST_MARKER).is_file() if self.info.is_main else None, self.info)
        ):
            if self.info.is_main:
                name = "model" if self.recipe.lora is None else "adapter"
                with atomic_dir(self.out / name) as tmp:
                    shutil.copytree(best, tmp, dirs_exist_ok=True)
                    (tmp / BEST_MARKER).unlink()
            D.barrier(self.info)
            return
        state = None
        if self.sharded:
            # Gather the shards into full CPU tensors on every rank (a collective), so rank 0 writes the same
            # adapter/ or model/ as in ddp mode. LoRA gathers only the adapter weights.
            state = self.full_state_dict()
        if self.info.is_main:
            name = folder or ("model" if self.recipe.lora is None else "adapter")
            kwargs: dict[str, Any] = {"safe_serialization": True}
            lora = self.recipe.lora
            if lora is not None and not {"embed_tokens", "lm_head"} & set(lora.target_modules):
                # peft's "auto" asks the hub for the base model's config.json to see whether the vocabulary grew
                # (offline: a warning; without DNS, the hub client's retries). Nothing here resizes embeddings.
                kwargs["save_embedding_layers"] = False
            trained_with = _training_chat_template(self.recipe)
            if trained_with is not None:  # inference must render conversations as training did
                self.tokenizer.chat_template = trained_with
            try:
                with atomic_dir(self.out / name) as tmp:
                    if state is None:
                        self.model.save_pretrained(str(tmp), **kwargs)
                    else:
                        self.model.save_pretrained(str(tmp), state_dict=state, **kwargs)
                    self.tokenizer.save_pretrained(str(tmp))
                    if marker is not None:
                        (tmp / BEST_MARKER).write_text(json.dumps(marker))
            except Exception as exc:  # disk full: as for checkpoints
                reason = write_failure(exc, self.out)
                if reason is None:
                    raise
                kept = list_checkpoints(self.out)
                usable = (
                    f"the checkpoint {kept[-1].name} holds the trained weights: once there is room, "
                    "`mgpu train RECIPE --resume auto` writes the final files"
                    if kept
                    else "no checkpoint exists (output.save_steps: 0)"
                )
                raise CheckpointWriteError(
                    f"could not write {name}/ ({reason}); nothing half-written was kept; {usable}"
                ) from exc
        D.barrier(self.info)

    def _final_weights_step(self) -> int:
        marker = self.out / BEST_DIR / BEST_MARKER
        if self.recipe.output.keep_best and marker.is_file():
            return int(json.loads(marker.read_text())["step"])
        return self.step

    def full_state_dict(self) -> dict[str, Any]:
        """Full (unsharded) CPU tensors: the trainable ones for LoRA, the whole model for full fine-tuning."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        from . import distributed as D

        if self.recipe.lora is not None:
            return D.gather_full_tensors(list(zip(self.param_names, self.params, strict=True)))
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return get_model_state_dict(self.model, options=options)


BEST_DIR = "best"  # output.keep_best: the best evaluation's weights, as they are found
BEST_MARKER = ".mgpu-best.json"  # in BEST_DIR: the step and eval loss of those weights


def load_adapter_weights(model: Any, folder: str) -> None:
    """lora.init_from: a trained adapter's tensors into the model's LoRA parameters (PEFT's own name mapping)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .errors import Problem, UserError

    weights = load_file(str(Path(folder) / "adapter_model.safetensors"))
    hint = "start from an adapter trained on this model.name's model, with this lora section"
    try:
        result = set_peft_model_state_dict(model, weights)
    except RuntimeError as exc:  # a size mismatch: an adapter of another model
        found = str(exc).strip().splitlines()
        detail = next((x.strip() for x in found if "size mismatch" in x), found[0] if found else "")
        raise UserError(
            Problem("lora.init_from", f"the adapter in {folder} does not fit this model: {detail}", hint),
            "invalid recipe",
        ) from None
    missing = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or missing:
        what = ", ".join((result.unexpected_keys or missing)[:3])
        raise UserError(
            Problem(
                "lora.init_from",
                f"the adapter in {folder} does not fit this model: "
                + ("tensors the model lacks: " if result.unexpected_keys else "LoRA tensors it lacks: ")
                + what,
                hint,
            ),
            "invalid recipe",
        )


def _one_target(batch: dict[str, Any]) -> Any:
    """Labels with one real target (the second token of the first row) so the token-mean loss is finite."""
    labels = batch["labels"].clone()
    labels[0, 1] = batch["input_ids"][0, 1]
    return labels


def _to_device(t: Any, device: Any) -> Any:
    """Host-to-GPU copy from pinned memory, so it does not block the CPU; a no-op on CPU."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t


class NonFiniteLossError(RuntimeError):
    """Too many optimizer steps in a row were skipped for non-finite losses or gradients."""


class OutOfMemoryStop(RuntimeError):
    """Out of memory even after splitting micro-batches down to one sample."""


def _pieces(micro_batch: list[int], split: int) -> list[list[int]]:
    """Cut a micro-batch into at most `split` consecutive pieces of (nearly) equal size."""
    size = -(-len(micro_batch) // split)
    return [micro_batch[i : i + size] for i in range(0, len(micro_batch), size)]


# model.attention's kernels -> torch.backends.cuda's switch for each (these switches also govern the CPU kernels)
_SDP_SWITCHES = {
    "flash": ("enable_flash_sdp", "flash_sdp_enabled"),
    "efficient": ("enable_mem_efficient_sdp", "mem_efficient_sdp_enabled"),
    "cudnn": ("enable_cudnn_sdp", "cudnn_sdp_enabled"),
    "math": ("enable_math_sdp", "math_sdp_enabled"),
}
ATTENTION_KERNELS = tuple(_SDP_SWITCHES)


#: Model families whose decoder layers Unsloth's one-region block compile (unsloth/models/_block_compile.py) cannot
#: train on CUDA: Gemma 2's first backward fails in torch inductor (InductorError: AssertionError in
#: decompose_triton_kernel_wrapper_functional), with QLoRA or 16-bit LoRA, balanced or padded batches, and in
#: Unsloth's own route (TRL SFTTrainer) alike (Unsloth 2026.10.9, torch 2.11, 1 x H200, session 27).
BLOCK_COMPILE_FAILS = ("gemma2",)


def avoid_broken_block_compile(model_path: str, device_type: str, env: Any = None) -> str | None:
    """Turn Unsloth's block compile off (UNSLOTH_BLOCK_COMPILE=0 in `env`, default this process's environment) for
    a CUDA run of a family in BLOCK_COMPILE_FAILS, unless the user set UNSLOTH_BLOCK_COMPILE or
    UNSLOTH_COMPILE_DISABLE. Returns the note to show, or None. Read by Unsloth when the model loads."""
    from .memory import model_family

    env = os.environ if env is None else env
    if device_type != "cuda" or "UNSLOTH_BLOCK_COMPILE" in env or "UNSLOTH_COMPILE_DISABLE" in env:
        return None
    family = model_family(model_path)
    if family not in BLOCK_COMPILE_FAILS:
        return None
    env["UNSLOTH_BLOCK_COMPILE"] = "0"
    return (
        f"Unsloth's per-layer torch.compile is off for this {family} model: its backward fails to compile on CUDA "
        "(Unsloth 2026.10, torch 2.11; Unsloth's own SFTTrainer route too). Set UNSLOTH_BLOCK_COMPILE=1 to try it."
    )


def select_attention(choice: str, device_type: str) -> dict[str, bool]:
    """Enable PyTorch's attention kernels (`model.attention`) for this process; returns which are on.

    `auto` turns cuDNN's off on CUDA: cuDNN plans a kernel graph on the host for each new (rows, width) shape,
    about 0.1 s, and variable-length batches bring new shapes for many steps (issue #11: a third of the 1B's
    steps on H200s). Flash attention has no per-shape set-up. Elsewhere `auto` leaves PyTorch's choice alone.
    """
    import torch

    b = torch.backends.cuda
    if choice in _SDP_SWITCHES:
        for name, (enable, _) in _SDP_SWITCHES.items():
            getattr(b, enable)(name == choice)
    elif choice == "auto" and device_type == "cuda":
        b.enable_cudnn_sdp(False)
    return {name: bool(getattr(b, enabled)()) for name, (_, enabled) in _SDP_SWITCHES.items()}


def model_load_kwargs(
    recipe: Recipe, model_path: str, dtype: Any, device_type: str, sharded: bool = False
) -> dict[str, Any]:
    """Arguments of `FastLanguageModel.from_pretrained`; remote code runs only when the recipe asks for it.

    Sharded (fsdp) on CUDA: loaded into host memory; `fully_shard` then moves each layer's shard to the GPU,
    so a model larger than one GPU never needs a full replica there. With `load_in_4bit` the weights load in
    16-bit and are quantised to NF4 afterwards (quantization.py), since bitsandbytes' 4-bit storage is not
    shardable.
    """
    kwargs: dict[str, Any] = dict(
        model_name=model_path,
        max_seq_length=recipe.model.max_seq_length,
        dtype=dtype,
        # under fsdp 4-bit weights are quantised after loading (quantization.py): load 16-bit
        load_in_4bit=recipe.model.load_in_4bit and not sharded,
        full_finetuning=recipe.lora is None,
        trust_remote_code=recipe.model.trust_remote_code is True,
    )
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    if device_type == "cuda":
        kwargs["device_map"] = {"": "cpu"} if sharded else {"": 0}
    return kwargs


def startup_breakdown(timeline: dict[str, float]) -> dict[str, float]:
    """Seconds per start-up phase (rank 0's clock marks): where the time to the first optimizer step goes."""
    # tokenised beside the workers' start (datagate.py): the import covered the data up to `data_wait`
    beside = "data_seen" in timeline
    phases = [
        ("prepare", "start", "launched"),  # parent: checks, model path; tokenise or read the cache unless beside
        ("launch", "launched", "worker_start"),  # the elastic agent starts the worker processes
        ("import", "worker_start", "imported"),  # process group + `import unsloth`
        ("data_wait", "imported", "data_seen"),  # beside: waiting for the data after the import
        ("load", "data_seen" if beside else "imported", "model_ready"),  # from_pretrained, LoRA, broadcast + check
        ("setup", "model_ready", "fit_start"),  # data plan, optimizer, resume
        ("first_step", "fit_start", "first_step"),  # includes torch.compile of the model's blocks
    ]
    out = {name: round(timeline[b] - timeline[a], 2) for name, a, b in phases if a in timeline and b in timeline}
    if beside and "launched" in timeline and "data_ready" in timeline:
        out["data_beside"] = round(timeline["data_ready"] - timeline["launched"], 2)  # tokenising, while importing
    if "start" in timeline and "first_step" in timeline:
        out["total"] = round(timeline["first_step"] - timeline["start"], 2)
    return out


def _graphs_compiled() -> int:
    """Frames torch.compile has compiled in this process so far (a new input shape or guard failure in a
    compiled region compiles again: the metrics line counts them per rank and step, next to its time)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    return int(dynamo.counters["frames"]["total"]) if dynamo is not None else 0


class GarbageCollection:
    """Python's garbage collector on the training loop's terms, as torchtitan does it: the objects alive when
    training starts (model, data, libraries: millions) are frozen out of every later scan, automatic
    collections are off, and the young generations are collected every `every` steps, at the same step on every
    rank, so no rank stalls alone in a long collection while the others wait for it at the step's collective.
    `stop` restores the collector as it was (the Python API may train again in the same process)."""

    def __init__(self, every: int = 50):
        self.every = every
        self.was_enabled = True

    def start(self) -> None:
        self.was_enabled = gc.isenabled()
        gc.collect()
        gc.freeze()
        gc.disable()

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            gc.collect(1)

    def stop(self) -> None:
        gc.unfreeze()
        if self.was_enabled:
            gc.enable()


def balances_speed(recipe: Any, device_type: str) -> bool:
    """`distributed.balance_speed` resolved: auto is on for GPUs under ddp with weighted aggregation and balanced or
    packed batching (what moving tokens between ranks needs, and where a device can lag the others)."""
    d = recipe.distributed
    if d.balance_speed != "auto":
        return bool(d.balance_speed)
    return (
        device_type == "cuda"
        and d.strategy != "fsdp"
        and d.aggregation == "weighted"
        and recipe.dataset.batching != "padded"
    )


class SpeedBalance:
    """Each rank's speed on its device, for the planner to give a persistently slower device fewer tokens.

    GPUs of one model run at different speeds under their power cap: in docs/BENCHMARKS.md (session 8) one H200
    of a pair ran the 8B's micro-batches 10-40% slower than the other for a whole run, and the slowest rank sets
    the step time. The speeds come from the device time of each rank's micro-batches (`DeviceClock`, gathered
    with every step's collective) divided into its padded tokens: a moving average (`ALPHA`), used after `WARMUP`
    steps, ignored while no rank is more than `BAND` away from the mean (short swings of a few percent come and
    go faster than the average could follow, and chasing them costs more than it saves), clamped to `LIMITS`
    (bounds how much larger a faster rank's micro-batches get) and rounded. Every rank computes the same speeds
    from the same gathered numbers, so their plans agree. Steps that compiled are left out."""

    ALPHA, WARMUP, BAND, LIMITS, DIGITS = 0.5, 2, 0.05, (0.8, 1.25), 2

    def __init__(self, world: int, enabled: bool):
        self.enabled = enabled and world > 1
        self.rate: list[float] | None = None  # seconds per padded token, per rank (moving average)
        self.seen = 0

    def observe(self, compute_tokens: list[int], seconds: list[float]) -> None:
        """One step's padded tokens and device seconds per rank."""
        if not self.enabled or not all(t > 0 for t in compute_tokens) or not all(x > 0 for x in seconds):
            return  # NaN (no time measured) fails `x > 0` too
        now = [x / t for x, t in zip(seconds, compute_tokens, strict=True)]
        a = self.ALPHA
        self.rate = (
            now if self.rate is None else [(1 - a) * old + a * new for old, new in zip(self.rate, now, strict=True)]
        )
        self.seen += 1

    def speeds(self) -> tuple[float, ...] | None:
        """Relative speeds (mean about 1) for `StepPlanner.batches`, or None: split by tokens alone."""
        if not self.enabled or self.rate is None or self.seen < self.WARMUP:
            return None
        inverse = [1.0 / r for r in self.rate]
        mean = sum(inverse) / len(inverse)
        rel = [v / mean for v in inverse]
        if max(abs(v - 1.0) for v in rel) < self.BAND:
            return None
        lo, hi = self.LIMITS
        return tuple(round(min(max(v, lo), hi), self.DIGITS) for v in rel)


class DeviceClock:
    """Seconds one rank's micro-batches of a step take on its device: CUDA events around them on a GPU (`stop`
    waits for the last one, a host sync the step's collective would make anyway), the host clock on CPU. The
    ranks' values side by side show how evenly a step's work was split (the slowest rank sets the step time)."""

    def __init__(self, device_type: str):
        self.cuda = device_type == "cuda"
        self.t0 = self.t1 = 0.0
        if self.cuda:
            import torch

            self.begin, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self) -> None:
        if self.cuda:
            self.begin.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self) -> None:
        if self.cuda:
            self.end.record()
        else:
            self.t1 = time.perf_counter()

    def seconds(self) -> float:
        """The time between `start` and `stop` (on a GPU: waits for the work queued before `stop`)."""
        if not self.cuda:
            return self.t1 - self.t0
        self.end.synchronize()
        return self.begin.elapsed_time(self.end) / 1e3


class HostCopy:
    """A device scalar copied into host memory without waiting for the device; `value()` waits for the copy only."""

    def __init__(self, value: Any):
        import torch

        self.event = None
        if isinstance(value, torch.Tensor) and value.device.type == "cuda":
            self.buf = torch.empty(value.shape, dtype=value.dtype, pin_memory=True)
            self.buf.copy_(value.detach(), non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.buf = value

    def host(self) -> Any:
        """The value in host memory (waits for the copy only)."""
        if self.event is not None:
            self.event.synchronize()
        return self.buf

    def value(self) -> float:
        return float(self.host())


class FitSession:
    """One `Trainer.fit` call: what the loop carries from step to step (clocks, counters, the metrics row still
    waiting for its device values) and where it writes (progress bar, metrics.jsonl and sinks on rank 0).

    The metrics row of a step is written while the next step's micro-batches run: reading the gradient norm right
    away would make the host wait for the all-reduce and the optimizer. A queued step's row waits one step more,
    for the ranks' device times, which travel with the next step's collective. Rows of steps that save a
    checkpoint, evaluate or end the run are written at once. The progress bar shows each step as soon as it is
    settled."""

    def __init__(self, trainer: Trainer, ahead: bool):
        from .profiling import StepProfiler
        from .progress import ProgressDisplay
        from .sinks import MetricSinks

        r, info, main = trainer.recipe, trainer.info, trainer.info.is_main
        self.profiler = StepProfiler.from_env(info.rank)  # MGPU_PROFILE: off unless set
        self.progress = ProgressDisplay(
            main and r.logging.progress, trainer.total_steps, trainer.step, info.world_size, main=main
        )
        self.metrics = (trainer.out / "metrics.jsonl").open("a", encoding="utf-8") if main else None
        self.sinks = MetricSinks(r, trainer.out, start_step=trainer.step) if main else None
        self.run_state = trainer.run_state  # totals over the whole run (resumes included), checkpointed
        self.elapsed_before = float(self.run_state["elapsed_s"])  # time spent before a resume
        self.t_start = self.t_window = time.perf_counter()
        trainer.plan.timeline["fit_start"] = time.time()
        self.session_start = trainer.step
        self.saved_step = trainer.step if trainer.plan.resume_from else -1
        self.ahead = ahead  # steps are queued before the previous one is settled (`Trainer._looks_ahead`)
        self.eval_total = 0.0  # seconds spent evaluating this session: not training, left out of tokens/s
        self.last_eval_loss: float | None = None  # the latest evaluation's loss (the summary's)
        self.tokens_window = self.tokens_session = 0
        self.first_step_s: float | None = None
        self.first_step_tokens = 0  # the first step of this session (compilation, warm-up): left out of the rate
        self.bad_since = 0  # first step of the current run of skipped (non-finite) steps; 0: none
        self.last_loss = float("nan")
        self.interrupted = False
        self.last_done: tuple[Any, float] | None = None  # the last settled step's end: CUDA event, host clock
        self.pending: PendingRow | None = None
        self.phases = StepPhases()
        self.collector = GarbageCollection()
        self.collector.start()

    def write_row(self) -> None:
        """Write the pending metrics row, if any (waits for its device values)."""
        if self.pending is None:
            return
        row = self.pending.finish()
        self.pending = None
        self.run_state["last_metrics"] = row
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()
        if self.sinks is not None:
            self.sinks.write(row)

    def close(self) -> None:
        self.collector.stop()
        self.progress.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.sinks is not None:
            self.sinks.close()


@dataclass
class StepOutcome:
    """A step's row of the collective from every rank (`Trainer._exchange`), summed or listed per rank."""

    loss: float  # sum over ranks of the loss summed over loss tokens
    bad_ranks: float  # ranks that saw a non-finite loss or gradient
    loss_tokens: float
    stop_ranks: float  # ranks asked to stop
    oom_ranks: float  # ranks out of memory
    peaks: list[float]
    longest: list[int]
    compiles: list[int]
    reserved: list[float]
    earlier_step: int  # the step whose device times this collective also carries (0: none)
    earlier_times: list[float]
    own_times: list[float]  # this step's device times (NaN when they travel with the next step)
    t_read: float  # host clock when the row reached the host
    bad_which: list[int] = field(default_factory=list)  # the ranks counted in bad_ranks

    @classmethod
    def from_rows(cls, rows: list[list[float]], t_read: float) -> StepOutcome:
        def col(k: int) -> list[float]:
            return [row[k] for row in rows]

        return cls(
            *(sum(col(k)) for k in range(5)),
            peaks=col(5),
            longest=[int(v) for v in col(6)],
            compiles=[int(v) for v in col(7)],
            reserved=col(8),
            earlier_step=int(rows[0][9]),
            earlier_times=col(10),
            own_times=col(11),
            t_read=t_read,
            bad_which=[r for r, v in enumerate(col(1)) if v],
        )


@dataclass
class Launch:
    """One optimizer step whose micro-batches are queued on the device, and what the host knows of it."""

    index: int  # steps done before it: it is step index + 1
    batches: Any
    mine: list[list[int]]
    loss_sum: Any
    oom: bool
    clock: DeviceClock
    compiled: int
    rng: tuple[Any, Any] | None  # random-number states before its micro-batches (CPU, CUDA), to run it again
    stats: HostCopy | None = None  # every rank's row of the step's collective, on its way to the host
    skip: Any = None  # device flag: some rank saw a non-finite value or ran out of memory
    grad_norm: Any = None
    updated: bool = False  # its update is queued (masked: undone on the device if `skip`)
    updated_at: float = 0.0
    update_s: float = 0.0
    waited: float = 0.0  # host seconds spent waiting for its outcome
    done: Any = None  # CUDA event after its last work (update, or the decision to skip it)


def _end_event(device_type: str) -> Any:
    """A timing CUDA event recorded after the work queued so far (None on CPU)."""
    if device_type != "cuda":
        return None
    import torch

    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _rng_states(device_type: str) -> tuple[Any, Any]:
    import torch

    return torch.get_rng_state(), torch.cuda.get_rng_state() if device_type == "cuda" else None


class PendingRow:
    """A step's metrics row whose device values are still on their way to the host."""

    def __init__(self, row: dict[str, Any]):
        self.row = row

    def finish(self) -> dict[str, Any]:
        return {k: v.value() if isinstance(v, HostCopy) else v for k, v in self.row.items()}


class StepPhases:
    """Where a step's wall time goes on this rank's host clock (seconds per step, averaged):

    - `forward_backward`: planning, collating and running the micro-batches (on a GPU: queueing their kernels,
      plus any wait forced inside the model);
    - `wait`: the per-step collective and its host sync: the GPU finishing the queued work, and the slowest rank;
    - `update`: gradient all-reduce, clipping, optimizer and scheduler step (queueing);
    - `other`: consistency check, metrics, evaluation, checkpoints.
    """

    NAMES = ("forward_backward", "wait", "update", "other")

    def __init__(self) -> None:
        self.totals = [0.0] * len(self.NAMES)
        self.steps = 0

    def add(self, *seconds: float) -> None:
        """One loop iteration's time in each phase, in `NAMES` order."""
        for i, t in enumerate(seconds):
            self.totals[i] += t
        self.steps += 1

    def means(self) -> dict[str, float]:
        n = max(1, self.steps)
        return {name: round(t / n, 5) for name, t in zip(self.NAMES, self.totals, strict=True)} | {"steps": self.steps}


def _reserved_memory_gb(info: Any) -> float:
    """Device memory the caching allocator holds (0 on CPU): growth within a step means it asked the driver."""
    if info.device_type == "cuda":
        import torch

        return torch.cuda.memory_reserved() / 2**30
    return 0.0


def _peak_reserved_gb(info: Any) -> float:
    """The most device memory the caching allocator held since start-up (0 on CPU)."""
    if info.device_type == "cuda":
        import torch

        return torch.cuda.max_memory_reserved() / 2**30
    return 0.0


def _peak_memory_gb(info: Any) -> float:
    if info.device_type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**30
    # CPU workers: the process's peak resident memory so far (the current one would make the summary's "peak"
    # disagree with the largest value in metrics.jsonl)
    import resource

    if sys.platform == "darwin":  # ru_maxrss in bytes there, in KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _training_chat_template(recipe: Any) -> str | None:
    """The chat template the conversations were rendered with, when the recipe chose one (`dataset.chat_template`,
    named or Jinja): saved with the adapter, so that `apply_chat_template` at inference renders as training did
    (the tokenizer's own template was saved before). The first chat source's, in a mix."""
    from .data import encoding_of

    for source in recipe.dataset.sources():
        if source.section.format == "chat" and source.section.chat_template:
            return encoding_of(recipe, source.section).chat_template  # a name resolved to its Jinja
    return None
