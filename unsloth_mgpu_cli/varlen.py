"""Does a packed row's attention run in one variable-length kernel call here? (`dataset.batching: auto`)

A packed micro-batch is one row holding its samples back to back. Unsloth attends such a row with a
variable-length kernel when it has one: flash-attn's `flash_attn_varlen_func`, or torch's `varlen_attn`
from torch 2.12 on (the first release whose `varlen_attn` takes `enable_gqa`, which Unsloth requires). Without
one it makes one SDPA call per sample. Measured on one H200 with the 1B (docs/data.md, session 24): per sample,
packed steps were 2.5 times slower than balanced ones. With torch's kernel they were 1.18 times faster, since a
packed row carries no padding, and took a quarter less memory.

So `auto` packs where the kernel is there and balances otherwise. This module reads the installed packages and
NVML's compute capability. It neither imports Unsloth nor initialises CUDA. `unsloth_packed_route` asks Unsloth
itself, in a worker that has imported it.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Callable
from typing import Any

#: model.attention values that leave PyTorch's flash kernel on (varlen runs only on it)
FLASH_ON = ("auto", "flash", "pytorch")


def torch_varlen_takes_gqa() -> bool:
    """torch's `varlen_attn` exists and takes `enable_gqa` and `window_size` (torch 2.12+), as Unsloth requires."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:  # torch < 2.9: no module
        return False
    params = inspect.signature(varlen_attn).parameters
    return "enable_gqa" in params and "window_size" in params


def varlen_kernel(
    device: str,
    capability: str | None,
    attention: str,
    dtype: str,
    *,
    has_module: Callable[[str], bool] = lambda name: importlib.util.find_spec(name) is not None,
    torch_varlen: Callable[[], bool] = torch_varlen_takes_gqa,
) -> tuple[str | None, str]:
    """(the kernel that would attend a packed row in one call, why) or (None, why there is none).

    Args:
        device: "cuda" or "cpu" (distributed.device resolved).
        capability: the smallest visible GPU's compute capability ("9.0"), None when NVML cannot say.
        attention: model.attention; dtype: model.dtype.
        has_module, torch_varlen: what is installed; tests pass their own for a machine that is not this one.
    """
    if device != "cuda":
        return None, "on CPU Unsloth attends a packed row one sample at a time"
    if capability is None:
        return None, "NVML did not report the GPUs' compute capability"
    major = int(capability.split(".")[0])
    if major < 8:
        return None, f"compute capability {capability} has no variable-length flash kernel (it needs 8.0 or newer)"
    if attention not in FLASH_ON:
        return None, f"model.attention: {attention} turns off the flash kernel that variable-length attention runs on"
    if dtype == "float32":
        return None, "model.dtype: float32 (the variable-length kernels take 16-bit inputs)"
    if has_module("flash_attn"):
        return "flash-attn's flash_attn_varlen_func", "flash-attn is installed"
    import torch

    version = torch.__version__.split("+")[0]
    if torch_varlen():
        return "torch's varlen_attn", f"torch {version} has varlen_attn with enable_gqa"
    return (
        None,
        f"neither flash-attn nor torch's varlen_attn with enable_gqa (torch 2.12+; this is {version}) is installed",
    )


def resolve_batching(recipe: Any, device: str, capability: str | None) -> str | None:
    """Fill `dataset.batching: auto` in place: packed where a variable-length kernel attends a packed row, else
    balanced. Returns the note on what auto chose (None when the recipe set the mode itself)."""
    if recipe.dataset.batching != "auto":
        return None
    kernel, why = varlen_kernel(device, capability, recipe.model.attention, recipe.model.dtype)
    if kernel is not None:
        recipe.dataset.batching = "packed"
        return f"dataset.batching packed: one call of {kernel} attends each packed row ({why})"
    recipe.dataset.batching = "balanced"
    return f"dataset.batching balanced: no variable-length attention kernel for packed rows ({why})"


def unsloth_packed_route() -> str | None:
    """In a worker that imported Unsloth: how it attends a packed row on CUDA. "flash_varlen", "xformers" or
    "torch varlen" run one kernel call; "per sample" is one SDPA call per sample, "dense mask" one with a mask of
    tokens x tokens. None: this Unsloth does not say
    (its private dispatch module moved, or FastLanguageModel is not imported yet); nothing is then claimed."""
    dispatch = sys.modules.get("unsloth.utils.attention_dispatch")  # loaded with FastLanguageModel; importing it
    if dispatch is None:  # on its own would be circular
        return None
    try:
        backend = dispatch.select_attention_backend(True)
        if backend != dispatch.SDPA:
            return str(backend)
        if not getattr(dispatch, "_SDPA_PACKED_SEGMENTS", True):
            return "dense mask"  # UNSLOTH_SDPA_PACKED_SEGMENTS=0: one SDPA call with a tokens x tokens mask
        if getattr(dispatch, "_TORCH_VARLEN_ATTN", None) is not None:
            return "torch varlen"
        return "per sample"
    except Exception:
        return None
