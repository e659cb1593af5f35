"""Direct mode: a small data-parallel trainer for your own model and your own data loader.

    import unsloth_multigpu
    unsloth_multigpu.enable_multi_gpu(num_gpus=2)      # re-launches this script: one worker per GPU
    model = ...                                         # built in every worker (e.g. FastLanguageModel)
    trainer = unsloth_multigpu.MultiGPUTrainer(model=model, num_gpus=2,
        optimizer_config={"class": torch.optim.AdamW, "kwargs": {"lr": 2e-4}},
        aggregation_method=unsloth_multigpu.AggregationMethod.WEIGHTED)
    trainer.setup()
    stats = trainer.train_epoch(dataloader)             # {"loss", "steps", "tokens", "time_s", ...}

How the model reaches the workers: it does not travel. `MultiGPUTrainer` runs inside the workers that
`enable_multi_gpu` started (or `torchrun`), and each worker builds its own replica by running the same
script; `setup()` then copies rank 0's trainable weights to every rank and checks they agree. Without
`enable_multi_gpu` it trains in this process (world size 1), so the same script serves 1 and N GPUs.

Every rank iterates the same data loader; each batch it yields is one *global* batch, of which rank r
trains rows [r-th slice] (uneven slices when the rows do not divide evenly). The samples of a step
therefore do not depend on the number of GPUs, and with `WEIGHTED` aggregation N workers compute exactly
the update of one process over the whole batch.
"""

from __future__ import annotations

import math
import numbers
import time
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from .hooks import AggregationMethod

IGNORE_INDEX = -100


class MultiGPUTrainer:
    """Data-parallel training of `model` with gradients combined by `distributed.GradientSynchronizer`.

    Args:
        model: a torch module returning an object with `.loss` when called with `labels` (Hugging Face
            causal LMs, Unsloth/PEFT models). Only parameters with `requires_grad` are trained.
        num_gpus: expected world size; None: whatever this process was launched with (1 without a launch).
        optimizer_config: {"class": optimizer class or torch.optim name, "kwargs": {...}}; default AdamW; the
            learning rate is 2e-4 unless kwargs give `lr`.
        aggregation_method: WEIGHTED (default), MEAN, SUM or MEDIAN (`AggregationMethod` or its string).
        max_grad_norm: clip the synchronised gradient to this norm (None: no clipping).
        verify_every: compare the ranks' trainable weights every N steps (0: only in setup and at epoch end).
        max_skipped_steps: a step whose loss or gradient is not finite on some rank is skipped on every rank;
            this many skipped in a row stop training with an error (as the recipe's `training.max_skipped_steps`).
    """

    def __init__(
        self,
        model: Any,
        num_gpus: int | None = None,
        optimizer_config: dict[str, Any] | None = None,
        aggregation_method: AggregationMethod | str = AggregationMethod.WEIGHTED,
        max_grad_norm: float | None = 1.0,
        verify_every: int = 50,
        max_skipped_steps: int = 10,
    ):
        from .errors import is_number, is_whole

        if not (callable(model) and hasattr(model, "parameters")):
            raise ValueError(f"model must be a torch.nn.Module (e.g. Unsloth's PEFT model), got {type(model).__name__}")
        if num_gpus is not None and not (is_whole(num_gpus) and num_gpus >= 1):
            raise ValueError(f"num_gpus must be a positive integer or None (the launched workers), got {num_gpus!r}")
        if max_grad_norm is not None and not (is_number(max_grad_norm) and max_grad_norm > 0):
            raise ValueError(f"max_grad_norm must be a positive number, or None for no clipping; got {max_grad_norm!r}")
        if not (is_whole(verify_every) and verify_every >= 0):
            raise ValueError(f"verify_every must be a whole number of steps, 0 or more, got {verify_every!r}")
        if not (is_whole(max_skipped_steps) and max_skipped_steps >= 1):
            raise ValueError(f"max_skipped_steps must be a positive whole number, got {max_skipped_steps!r}")
        self.model = model
        self.num_gpus = num_gpus
        self.optimizer_config = _checked_optimizer_config(optimizer_config)
        self.aggregation = AggregationMethod.parse(aggregation_method, "aggregation_method").value
        self.max_grad_norm = max_grad_norm
        self.verify_every = int(verify_every)
        self.max_skipped_steps = int(max_skipped_steps)
        self.skipped_in_a_row = 0  # across epochs, as the engine counts them
        self.info: Any = None
        self.optimizer: Any = None
        self.params: list[Any] = []
        self.sync: Any = None
        self.global_step = 0

    @property
    def rank(self) -> int:
        return self.info.rank if self.info is not None else 0

    @property
    def world_size(self) -> int:
        return self.info.world_size if self.info is not None else 1

    @property
    def is_main_process(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Place the model on this worker's device, start from rank 0's weights, build the optimizer.

        Raises:
            RuntimeError: `num_gpus` > 1 but this process is not a worker (call `enable_multi_gpu` first).
            ValueError: `num_gpus` differs from the launched world size, or a bad optimizer config.
        """
        import torch

        from . import distributed as D
        from .hooks import dist_info

        if self.optimizer is not None:
            warnings.warn(
                "MultiGPUTrainer.setup() called again: the optimizer is built anew, and its state (AdamW's moments) "
                "is lost; call setup() once, before the first train_epoch()",
                stacklevel=2,
            )
        info = dist_info()
        if info is None:
            if self.num_gpus not in (None, 1):
                raise RuntimeError(
                    f"MultiGPUTrainer(num_gpus={self.num_gpus}) trains inside the workers that "
                    f"enable_multi_gpu(num_gpus={self.num_gpus}) starts: call enable_multi_gpu at the "
                    "top of this script (it re-launches the script once per GPU)"
                )
            info = D.DistInfo(device_type="cuda" if torch.cuda.is_available() else "cpu")
        elif self.num_gpus is not None and self.num_gpus != info.world_size:
            raise ValueError(
                f"num_gpus={self.num_gpus} but {info.world_size} worker(s) were launched: pass "
                f"num_gpus={info.world_size} (or leave it out: the launched count) to MultiGPUTrainer"
            )
        self.info = info
        first = next(iter(self.model.parameters()), None)
        if first is not None and first.device.type != info.device_type:
            self.model.to(info.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters (requires_grad=False everywhere)")
        D.broadcast_parameters(self.params, info)
        D.check_consistency(self.params, info, step=0)
        self.optimizer = _build_optimizer(self.params, self.optimizer_config)
        self.sync = D.GradientSynchronizer(self.params, info, self.aggregation)

    def _shard(self, rows: int) -> slice:
        base, extra = divmod(rows, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def train_epoch(self, dataloader: Iterable[dict[str, Any]]) -> dict[str, Any]:
        """One pass over `dataloader`; every batch it yields is one global batch (one optimizer step).

        Batches are mappings (a dict, or a tokenizer's or collator's BatchEncoding) with integer `input_ids` and
        optionally `attention_mask` and `labels` (default: the input ids, padding masked with -100).

        Returns:
            loss (token-weighted mean over the epoch's trained steps and all ranks; NaN when there were none),
            last_loss, steps (optimizer steps taken), skipped_steps (batches with a non-finite loss or gradient
            on some rank, or no loss token on any: no update on any rank), samples, tokens (non-padding, all
            ranks), time_s, tokens_per_second, world_size, aggregation.

        Raises:
            TypeError: `dataloader` is one batch, a batch is not a mapping with `input_ids`, its ids are not
                integers, or the model returns no `.loss`.
            ValueError: a token id lies outside the model's embedding (e.g. -100 in `input_ids`).
            RuntimeError: `setup()` was not called, the ranks iterate different batches, or
                `max_skipped_steps` steps in a row had a non-finite loss or gradient.
        """
        import torch

        from . import distributed as D

        if self.optimizer is None:
            raise RuntimeError("call setup() before train_epoch()")
        if isinstance(dataloader, Mapping):  # iterating it would yield its keys, each "a str batch"
            raise TypeError(
                f"train_epoch takes an iterable of batches (a DataLoader, or a list of batch dicts), got one batch "
                f"(a {type(dataloader).__name__} with keys {sorted(dataloader)}): pass train_epoch([batch])"
            )
        info = self.info
        self.model.train()
        t0 = time.perf_counter()
        steps = samples = skipped = 0
        loss_tok_sum = loss_tokens = tokens = 0.0
        last_loss = float("nan")
        batches, end = iter(dataloader), object()
        while True:
            batch = next(batches, end)
            if batch is end:
                # one more collective: the others must have run out too (else they wait for this rank)
                gathered = D.all_gather_floats([0.0, 0.0, 0.0, 0.0, 1.0, 0.0], info)
                self._check_same_batches(gathered, steps + skipped)
                break
            ids, rows, global_items, local = self._my_part(batch)
            local_items = int((local["labels"][:, 1:] != IGNORE_INDEX).sum())
            mask = local.get("attention_mask")
            local_tokens = int(mask.sum()) if mask is not None else int(local["input_ids"].numel())
            loss_value = 0.0
            if local_items > 0:
                loss = self._loss(self.model(**local))
                scale = local_items / max(1, global_items) if self.aggregation == "weighted" else 1.0
                (loss * scale).backward()
                loss_value = float(loss.detach())
            # One small collective per step: losses and counts, plus a fingerprint of the global batch that
            # catches ranks iterating different data (a shuffled loader seeded differently per rank) and a flag
            # for a rank whose loader has ended. The rows are weighted by position: the same rows in another
            # order are other samples for each rank's slice.
            row_sums = ids.to(torch.float64).sum(dim=1)
            fingerprint = float((row_sums * torch.arange(1, rows + 1, dtype=torch.float64)).sum()) + rows * 1e-3
            finite = math.isfinite(loss_value)
            gathered = D.all_gather_floats(
                [
                    loss_value * local_items if finite else 0.0,
                    local_items,
                    local_tokens,
                    fingerprint,
                    float(finite),
                    1.0,
                ],
                info,
            )
            self._check_same_batches(gathered, steps + skipped)
            if global_items == 0:  # nothing to learn from on any rank (every label masked): no update, as a skip
                self.optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            self.sync.synchronize()
            # After the reduction every rank holds the same gradient, so every rank decides alike.
            if not all(g[4] for g in gathered) or not bool(self.sync.grads_finite()):
                self._skip_step(sum(1 for g in gathered if not g[4]))
                skipped += 1
                continue
            self.skipped_in_a_row = 0
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.global_step += 1
            steps += 1
            samples += rows
            step_loss_tok = sum(g[0] for g in gathered)
            step_items = sum(g[1] for g in gathered)
            loss_tok_sum += step_loss_tok
            loss_tokens += step_items
            tokens += sum(g[2] for g in gathered)
            last_loss = step_loss_tok / max(1.0, step_items)
            if self.verify_every and self.global_step % self.verify_every == 0:
                D.check_consistency(self.params, info, self.global_step)
        D.check_consistency(self.params, info, self.global_step)
        if steps == 0 and skipped and info.is_main:
            warnings.warn(
                f"train_epoch: none of the epoch's {skipped} batch(es) trained (each had no loss token on any rank, "
                "or a non-finite loss or gradient): the weights did not change. Check the labels: -100 marks "
                "positions to ignore",
                stacklevel=2,
            )
        elapsed = time.perf_counter() - t0
        return {
            "loss": loss_tok_sum / loss_tokens if loss_tokens else float("nan"),
            "last_loss": last_loss,
            "steps": steps,
            "skipped_steps": skipped,
            "samples": samples,
            "tokens": int(tokens),
            "time_s": elapsed,
            "tokens_per_second": tokens / max(elapsed, 1e-9),
            "world_size": self.world_size,
            "aggregation": self.aggregation,
        }

    def _my_part(self, batch: Any) -> tuple[Any, int, int, dict[str, Any]]:
        """(the global batch's input ids, its rows, its loss tokens, this rank's rows on its device) of one batch
        from the data loader; labels default to the input ids with padding masked."""
        # any mapping: a tokenizer's or a transformers collator's BatchEncoding is a UserDict, not a dict
        if not (isinstance(batch, Mapping) and "input_ids" in batch):
            found = type(batch).__name__ + (f" with keys {sorted(batch)}" if isinstance(batch, Mapping) else "")
            raise TypeError(
                f"train_epoch takes batches as dicts with 'input_ids' (and optionally 'attention_mask', "
                f"'labels'), got a {found}: e.g. a DataLoader over a list of such dicts, or a collate_fn "
                "that returns one (a TensorDataset yields tuples)"
            )
        import torch

        ids = batch["input_ids"]
        for key in ("input_ids", "attention_mask", "labels"):
            value = batch.get(key)
            if value is None and key != "input_ids":
                continue
            if not (isinstance(value, torch.Tensor) and value.dim() == 2 and value.shape == ids.shape):
                found = (
                    f"a tensor of shape {list(value.shape)}"
                    if isinstance(value, torch.Tensor)
                    else f"a {type(value).__name__}"
                )
                want = "[rows, length]" if key == "input_ids" else f"input_ids' shape {list(ids.shape)}"
                raise TypeError(
                    f"train_epoch: batch[{key!r}] must be a 2-D tensor of {want}, got {found}: collate the rows "
                    "into padded tensors (e.g. DataLoader(..., collate_fn=transformers.DataCollatorForLanguageModeling("
                    "tokenizer, mlm=False)), or torch.stack of equal-length rows)"
                )
        for key in ("input_ids", "labels"):
            value = batch.get(key)
            if value is not None and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
                raise TypeError(
                    f"train_epoch: batch[{key!r}] must hold token ids (an integer tensor), got {value.dtype}: "
                    "tokenise the text and keep the ids as integers (torch.long)"
                )
        self._check_token_ids(ids)
        mask = batch.get("attention_mask")
        labels = batch.get("labels")
        if labels is None:
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX) if mask is not None else ids
        rows = int(ids.shape[0])  # fewer rows than ranks (a DataLoader's last batch): some ranks get none
        # Loss tokens after the causal shift: the global count is known to every rank without a collective.
        global_items = int((labels[:, 1:] != IGNORE_INDEX).sum())
        part = self._shard(rows)
        local = {"input_ids": ids[part], "labels": labels[part]}
        if mask is not None:
            local["attention_mask"] = mask[part]
        return ids, rows, global_items, {k: v.to(self.info.device, non_blocking=True) for k, v in local.items()}

    def _check_token_ids(self, ids: Any) -> None:
        """Token ids inside the model's embedding (else an IndexError deep inside torch, or a CUDA assert)."""
        embeddings = getattr(self.model, "get_input_embeddings", lambda: None)()
        rows = getattr(embeddings, "num_embeddings", None)
        if ids.numel() == 0:
            return
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or (rows is not None and high >= rows):
            bad = low if low < 0 else high
            raise ValueError(
                f"train_epoch: batch['input_ids'] holds the token id {bad}, outside the model's embedding "
                f"(ids 0 to {rows - 1 if rows is not None else 'vocab size - 1'}): tokenise with this model's "
                "tokenizer, and put -100 (ignored positions) in labels, never in input_ids"
            )

    @staticmethod
    def _loss(output: Any) -> Any:
        """The loss the model computed from the labels (`output.loss`)."""
        loss = getattr(output, "loss", None)
        if loss is None:
            raise TypeError(
                f"the model's forward returned a {type(output).__name__} without a loss: MultiGPUTrainer needs a "
                "model that computes its loss from `labels` and returns it as `.loss` (a transformers "
                "...ForCausalLM, or a PeftModel around one)"
            )
        return loss

    @staticmethod
    def _check_same_batches(gathered: list[list[float]], done: int) -> None:
        """Every rank got a batch, and the same one (or every rank's loader ended): the collective's columns 3
        (fingerprint) and 5 (1.0: a batch, 0.0: the loader ended)."""
        have = [g[5] for g in gathered]
        if len(set(have)) != 1:
            ended = [r for r, h in enumerate(have) if not h]
            raise RuntimeError(
                f"ranks iterate different numbers of batches: the data loader of rank(s) {ended} ended after {done} "
                f"batch(es), the others' had more. Give every rank the same data loader (each rank takes its own "
                "slice of every batch): not a DistributedSampler, nor data split per rank"
            )
        if have[0] and len({g[3] for g in gathered}) != 1:
            raise RuntimeError(
                "ranks iterate different batches: give every rank the same data loader order "
                "(same seed, or shuffle=False); each rank takes its own slice of every batch"
            )

    def _skip_step(self, bad_loss_ranks: int) -> None:
        """No update on any rank for a batch with a non-finite loss or gradient (the engine's rule)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.skipped_in_a_row += 1
        what = f"a non-finite loss on {bad_loss_ranks} rank(s)" if bad_loss_ranks else "a non-finite gradient"
        if self.skipped_in_a_row >= self.max_skipped_steps:
            raise RuntimeError(
                f"{self.skipped_in_a_row} batches in a row had a non-finite loss or gradient (the last: {what}; "
                f"max_skipped_steps={self.max_skipped_steps}); the weights are those of step {self.global_step}. "
                "Hint: lower the learning rate, set max_grad_norm, use bfloat16 instead of float16, or inspect "
                "those batches"
            )
        if self.is_main_process:
            warnings.warn(
                f"batch after step {self.global_step}: {what}; skipped on all ranks (no update)", stacklevel=3
            )

    def save(self, path: str) -> None:
        """Rank 0 writes `model.save_pretrained(path)`; every rank waits for it."""
        from . import distributed as D

        if self.is_main_process:
            self.model.save_pretrained(path)
        D.barrier(self.info)


def _checked_optimizer_config(config: Any) -> dict[str, Any]:
    """`optimizer_config` with its class resolved, refused when the trainer is built (not later, in setup)."""
    import torch

    if config is None:
        return {}
    if not isinstance(config, dict):
        raise ValueError(
            f"optimizer_config must be a dict like {{'class': torch.optim.AdamW, 'kwargs': {{'lr': 2e-4}}}}, "
            f"got {type(config).__name__}"
        )
    unknown = set(config) - {"class", "kwargs"}
    if unknown:
        hint = " (optimizer arguments go inside 'kwargs')" if unknown & {"lr", "weight_decay", "betas", "eps"} else ""
        raise ValueError(f"optimizer_config takes 'class' and 'kwargs', not {sorted(unknown)}{hint}")
    cls = config.get("class", torch.optim.AdamW)
    names = {
        n.lower(): n
        for n in dir(torch.optim)
        if isinstance(getattr(torch.optim, n), type)
        and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
        and n not in ("Optimizer", "LBFGS")
    }
    accepted = f"a torch.optim optimizer class, or a name: {', '.join(sorted(names))} or adamw_8bit"
    if isinstance(cls, str) and cls.lower() == "adamw_8bit":  # the recipes' 8-bit AdamW (bitsandbytes' state)
        from .optim import adamw_8bit_class

        cls = adamw_8bit_class()
    elif isinstance(cls, str):
        if cls.lower() not in names:
            raise ValueError(f"optimizer_config['class']={cls!r} is not one this trainer can use; expected {accepted}")
        cls = getattr(torch.optim, names[cls.lower()])
    elif not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"optimizer_config['class'] must be {accepted}; got {cls!r}")
    if issubclass(cls, torch.optim.LBFGS):
        raise ValueError("optimizer_config['class']: LBFGS needs a closure that re-evaluates the loss, which "
                         f"train_epoch does not give; expected {accepted}")  # fmt: skip
    kwargs = config.get("kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ValueError(f"optimizer_config['kwargs'] must be a dict of the optimizer's arguments, got {kwargs!r}")
    _check_optimizer_kwargs(cls, kwargs)
    return {"class": cls, "kwargs": dict(kwargs)}


def _check_optimizer_kwargs(cls: type, kwargs: dict[str, Any]) -> None:
    """Refuse keyword arguments the optimizer does not take, now rather than in setup()."""
    import inspect

    params = inspect.signature(cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return  # it takes any keyword: nothing to check
    known = [n for n in params if n not in ("self", "params")]
    unknown = sorted(set(kwargs) - set(known))
    if unknown:
        import difflib

        aliases = {"learning_rate": "lr", "epsilon": "eps", "adam_epsilon": "eps", "beta1": "betas", "beta2": "betas"}
        close = [aliases[k] if aliases.get(k) in known else next(iter(difflib.get_close_matches(k, known, n=1,
                 cutoff=0.5)), None) for k in unknown]  # fmt: skip
        close = list(dict.fromkeys(c for c in close if c))
        hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
        raise ValueError(
            f"optimizer_config['kwargs'] has {unknown}, which {cls.__name__} does not take{hint}; it takes "
            f"{', '.join(known)}"
        )
    for name in ("lr", "weight_decay", "eps", "momentum"):  # else a TypeError inside torch at setup()
        value = kwargs.get(name)
        number = isinstance(value, numbers.Real) or type(value).__name__ == "Tensor"  # torch takes a tensor lr
        if value is not None and (isinstance(value, bool) or not number):
            raise ValueError(
                f"optimizer_config['kwargs']['{name}'] must be a number, got {value!r}"
                + (f": write {name}={float(value)!r}" if isinstance(value, str) and _is_float(value) else "")
            )


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _build_optimizer(params: list[Any], config: dict[str, Any]) -> Any:
    import torch

    cls = config.get("class", torch.optim.AdamW)
    kwargs = {"lr": 2e-4, **config.get("kwargs", {})}  # the documented learning rate unless kwargs set one
    return cls(params, **kwargs)
