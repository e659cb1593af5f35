"""Optimizers and schedulers of `mgpu train` (recipe `training.optimizer`, `training.lr_scheduler`)."""

from __future__ import annotations

import functools
from typing import Any

from .recipe import Recipe


def build_optimizer(params: list[Any], recipe: Recipe, device_type: str) -> Any:
    import torch

    t = recipe.training
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    if t.optimizer == "adamw_8bit" and device_type == "cuda":
        return adamw_8bit_class()(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    # adamw, and adamw_8bit on CPU (bitsandbytes' 8-bit optimizers need CUDA)
    return torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay, fused=device_type == "cuda")


def build_scheduler(optimizer: Any, recipe: Recipe, total_steps: int) -> Any:
    from transformers import get_scheduler

    t = recipe.training
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[t.lr_scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=t.warmup_steps, num_training_steps=max(1, total_steps))


@functools.cache
def adamw_8bit_class() -> Any:
    """bitsandbytes' `AdamW8bit` with the same kernels and state, minus a device synchronisation per parameter.

    `Optimizer8bit.step` (bitsandbytes 0.50) calls `torch.cuda.synchronize()` after every parameter's update, which
    paged (unified-memory) states need and nothing else does: kernels on one stream already run in order. With
    LoRA on all seven projections of a 16-layer model that is 224 synchronisations per optimizer step, each
    draining the GPU's queue so that the host cannot run ahead into the next step. Paged optimizers keep the
    original step.
    """
    import bitsandbytes as bnb
    import torch

    base = bnb.optim.AdamW8bit

    class AdamW8bit(base):  # type: ignore[misc, valid-type]
        @torch.no_grad()
        def step(self, closure: Any = None) -> Any:
            needed = ("initialized", "check_overrides", "to_gpu", "init_state", "update_step")
            if getattr(self, "is_paged", False) or not all(hasattr(self, a) for a in needed):
                return super().step(closure)
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not self.initialized:
                self.check_overrides()
                self.to_gpu()
                self.initialized = True
            for gindex, group in enumerate(self.param_groups):
                for pindex, p in enumerate(group["params"]):
                    if p.grad is None:
                        continue
                    if len(self.state[p]) == 0:
                        self.init_state(group, p, gindex, pindex)
                    self.update_step(group, p, gindex, pindex)
            return loss

    return AdamW8bit
