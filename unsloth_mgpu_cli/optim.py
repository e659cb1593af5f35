"""Optimizers and schedulers of `mgpu train` (recipe `training.optimizer`, `training.lr_scheduler`)."""

from __future__ import annotations

import functools
import math
from typing import Any

from .recipe import Recipe


def build_optimizer(params: list[Any], recipe: Recipe, device_type: str, scales: list[float] | None = None) -> Any:
    """The recipe's `training.optimizer` over `params`: SGD, AdamW (fused on CUDA) or bitsandbytes' 8-bit AdamW.

    `scales` (from `lr_scales`): each parameter's multiple of training.learning_rate; one parameter group per
    value, in order of first appearance, each holding its `lr_scale` (a resume restores the rates from it)."""
    import torch

    t = recipe.training
    groups: Any = params
    if scales is not None and set(scales) != {1.0}:
        by_scale: dict[float, list[Any]] = {}
        for p, scale in zip(params, scales, strict=True):
            by_scale.setdefault(scale, []).append(p)
        groups = [{"params": ps, "lr": t.learning_rate * k, "lr_scale": k} for k, ps in by_scale.items()]
    if t.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=t.learning_rate, weight_decay=t.weight_decay)
    adam = adam_settings(t)
    if t.optimizer == "adamw_8bit":  # bitsandbytes' kernels on CUDA, its torch implementation on CPU
        return adamw_8bit_class()(groups, lr=t.learning_rate, weight_decay=t.weight_decay, **adam)
    return torch.optim.AdamW(
        groups, lr=t.learning_rate, weight_decay=t.weight_decay, **adam, fused=device_type == "cuda"
    )


def adam_settings(training: Any) -> dict[str, Any]:
    """AdamW's betas and eps from `training.adam_beta1/adam_beta2/adam_epsilon` (null: torch's 0.9, 0.999, 1e-8)."""
    t = training
    return {
        "betas": (0.9 if t.adam_beta1 is None else t.adam_beta1, 0.999 if t.adam_beta2 is None else t.adam_beta2),
        "eps": 1e-8 if t.adam_epsilon is None else t.adam_epsilon,
    }


def lr_scales(names: list[str], params: list[Any], recipe: Recipe) -> list[float]:
    """Each trainable parameter's multiple of training.learning_rate: 1, except under LoRA+
    (`lora.loraplus_lr_ratio`) for LoRA's B matrices and 1-D parameters (DoRA's magnitudes, biases), which PEFT's
    `create_loraplus_optimizer` puts in its fast group too."""
    ratio = recipe.lora.loraplus_lr_ratio if recipe.lora is not None else None
    if not ratio:
        return [1.0] * len(params)
    return [float(ratio) if "lora_B" in n or p.ndim == 1 else 1.0 for n, p in zip(names, params, strict=True)]


def warmup_steps(recipe: Recipe, total_steps: int) -> int:
    """`training.warmup_steps`, or `warmup_ratio` of the run's steps rounded up (transformers' get_warmup_steps)."""
    t = recipe.training
    return t.warmup_steps if t.warmup_ratio is None else math.ceil(t.warmup_ratio * total_steps)


def build_scheduler(optimizer: Any, recipe: Recipe, total_steps: int) -> Any:
    """transformers' schedule for `training.lr_scheduler` with its warmup, over `total_steps` optimizer steps."""
    from transformers import get_scheduler

    t = recipe.training
    total, warmup = max(1, total_steps), warmup_steps(recipe, total_steps)
    name, extra = t.lr_scheduler, {}
    if name == "constant":
        name = "constant_with_warmup"
    elif name == "cosine" and t.min_lr_ratio:
        name, extra = "cosine_with_min_lr", {"min_lr_rate": t.min_lr_ratio}
    elif name == "cosine_with_restarts":
        extra = {"num_cycles": t.lr_cycles}
    elif name == "warmup_stable_decay":
        # the decay takes the last steps, never the warmup's: what is left between them is flat
        decay = min(math.ceil((t.decay_ratio or 0.1) * total), max(0, total - warmup))
        extra = {"num_decay_steps": decay, "min_lr_ratio": t.min_lr_ratio}
    return get_scheduler(
        name, optimizer, num_warmup_steps=warmup, num_training_steps=total, scheduler_specific_kwargs=extra or None
    )


@functools.cache
def adamw_8bit_class() -> Any:
    """bitsandbytes' `AdamW8bit` with fewer kernel launches and no sync per parameter (see `optim_8bit`)."""
    from .optim_8bit import AdamW8bit

    return AdamW8bit
