"""4-bit storage that FSDP2 can shard: QLoRA under `distributed.strategy: fsdp` (docs/sharded.md).

bitsandbytes keeps a 4-bit weight as a packed uint8 `Params4bit` whose `quant_state` (block absmaxes, shape)
lives beside the tensor, not in it: FSDP2's per-parameter `DTensor` sharding would split the bytes but not the
state. torchao's `NF4Tensor` is a tensor subclass that carries its codes and scalers inside and implements
FSDP2's `fsdp_pre_all_gather` / `fsdp_post_all_gather` (torchtune shards QLoRA this way): each rank stores a
dim-0 shard of the 4-bit codes and block scalers, and a layer's forward all-gathers those bytes, not 16-bit
weights. So under fsdp the model is loaded in 16-bit (into host memory), LoRA is applied, and every frozen
`nn.Linear` weight inside the decoder layers (the LoRA base layers and any untargeted projection: what
bitsandbytes would quantise) becomes an `NF4Tensor` parameter before `fully_shard`. Embeddings, norms and
lm_head stay 16-bit, as with bitsandbytes.

The matmul goes through torchao's `F.linear` override (`LinearNF4`: dequantise, then a 16-bit matmul; the
weight gets no gradient), i.e. PEFT's LoRA forward. Unsloth's fused LoRA kernels are put back to PEFT's
forward: they read `base_layer.weight` themselves and would feed an `NF4Tensor` to `torch.matmul`, which
torchao maps to `linear_nf4(a, b)` (a transposed product).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: QLoRA's NF4 layout (the paper's and torchtune's): 64 weights per block (one int8 scaler each), and one
#: scale per 256 scalers (double quantisation).
BLOCK_SIZE = 64
SCALER_BLOCK_SIZE = 256
#: A weight is split into at most this many shards of whole scaler blocks: a weight with fewer than
#: MAX_SHARDS x 256 blocks gets smaller scaler blocks (the layout depends on the shape only, never on the
#: number of workers, so a checkpoint resumes on any worker count with the same 4-bit weights).
MAX_SHARDS = 8


@dataclass(frozen=True)
class QuantizedWeights:
    """What `quantize_frozen_linears` did: how many weights, and their bytes before and after."""

    count: int
    bytes_before: int
    bytes_after: int


def scaler_block_size(numel: int) -> int:
    """Scaler block for a weight of `numel` elements: 256 blocks, halved until there are MAX_SHARDS of them."""
    n_blocks = numel // BLOCK_SIZE
    size = SCALER_BLOCK_SIZE
    while size > 1 and (n_blocks % size or n_blocks // size < MAX_SHARDS):
        size //= 2
    return size


def frozen_decoder_linears(model: Any) -> list[tuple[str, Any]]:
    """(name, module) of every `nn.Linear` in the decoder layers whose weight is frozen (LoRA base layers)."""
    import torch

    from .distributed import decoder_layers

    found = []
    for i, layer in enumerate(decoder_layers(model)):
        for name, module in layer.named_modules():
            if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad:
                found.append((f"layers.{i}.{name}", module))
    return found


def quantize_frozen_linears(model: Any, device: Any) -> QuantizedWeights:
    """Replace each frozen decoder-layer linear weight by a torchao `NF4Tensor` parameter, in place.

    Weights stay where they are (host memory under fsdp); on CUDA each one is quantised on `device` and the
    4-bit result copied back, so the GPU never holds more than one 16-bit weight. Deterministic: every rank
    computes the same codes from the same checkpoint.

    Raises:
        ValueError: a weight whose size is not a multiple of the 64-weight block.
    """
    import torch
    from torchao.quantization import to_nf4

    count = before = after = 0
    for name, module in frozen_decoder_linears(model):
        w = module.weight.detach()
        if w.dim() != 2 or w.numel() % BLOCK_SIZE:
            raise ValueError(
                f"model.load_in_4bit with distributed.strategy fsdp: {name}.weight {tuple(w.shape)} is not a "
                f"2-D weight of a multiple of {BLOCK_SIZE} elements; it cannot be stored in NF4 blocks"
            )
        home = w.device
        src = w.to(device) if device.type == "cuda" else w
        q = to_nf4(src.contiguous(), BLOCK_SIZE, scaler_block_size(w.numel()))
        if q.device != home:
            q = q.to(home)
        module.weight = torch.nn.Parameter(q, requires_grad=False)
        count += 1
        before += w.numel() * w.element_size()
        after += nf4_bytes(q)
        del w, src
    return QuantizedWeights(count, before, after)


def nf4_bytes(t: Any) -> int:
    """Bytes of the 4-bit codes and scalers an `NF4Tensor` stores (on this rank, for a shard)."""
    return sum(
        x.numel() * x.element_size()
        for x in (t.quantized_data, t.quantized_scalers, t.quantization_factor, t.scaler_mean, t.nf4)
    )


def nf4_storage(model: Any) -> tuple[int, int]:
    """(bytes this rank stores, bytes of the whole model) of the model's NF4 weights, sharded or not."""
    from torch.distributed.tensor import DTensor
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    local = full = 0
    for p in model.parameters():
        t = p.to_local() if isinstance(p, DTensor) else p
        if not isinstance(t, NF4Tensor):
            continue
        meta = t.scaler_mean.nbytes + t.nf4.nbytes  # one scalar and the 16-entry table, on every rank
        rows = nf4_bytes(t) - meta  # codes and scalers: proportional to the rows this rank holds
        local += rows + meta
        full += rows * p.size(0) // t.size(0) + meta
    return local, full


def check_shardable(model: Any, world_size: int) -> None:
    """Every NF4 weight must split into `world_size` row shards of whole scaler blocks (FSDP2 cannot pad NF4).

    Raises:
        ValueError: naming the first weight that does not split, and the worker counts that would.
    """
    from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor

    for name, module in frozen_decoder_linears(model):
        w = module.weight
        if not isinstance(w, NF4Tensor):
            continue
        scaler_blocks = w.n_blocks // w.scaler_block_size
        if w.size(0) % world_size or scaler_blocks % world_size:
            ok = [n for n in range(1, MAX_SHARDS + 1) if w.size(0) % n == 0 and scaler_blocks % n == 0]
            raise ValueError(
                f"model.load_in_4bit with distributed.strategy fsdp: {name}.weight {tuple(w.shape)} "
                f"({scaler_blocks} scaler blocks of 4-bit data) cannot be split evenly over {world_size} workers; "
                f"distributed.num_gpus that split it: {ok}"
            )


def use_peft_lora_forward(model: Any) -> None:
    """Put PEFT's LoRA forward back where Unsloth installed its fused LoRA kernels (a no-op where it did not).

    The fused kernels (installed by `get_peft_model` for 16-bit bases on CUDA) take `base_layer.weight` and
    multiply it with `torch.matmul`; an `NF4Tensor` there is mis-multiplied (torchao maps aten.mm to
    `linear_nf4`). PEFT's forward calls the base layer, i.e. `F.linear`, which torchao handles correctly.

    Raises:
        RuntimeError: this Unsloth lacks the switch (`unsloth.models.llama._decline_fused_lora_for_fsdp`),
            or fused kernels remain (e.g. UNSLOTH_FORCE_FUSED_LORA=1).
    """
    try:
        from unsloth.models.llama import _decline_fused_lora_for_fsdp, _fused_lora_modules
    except ImportError as exc:  # pragma: no cover - depends on the Unsloth release
        raise RuntimeError(
            "model.load_in_4bit with distributed.strategy fsdp needs Unsloth's switch back to PEFT's LoRA "
            "forward (unsloth.models.llama._decline_fused_lora_for_fsdp), which this Unsloth lacks"
        ) from exc
    _decline_fused_lora_for_fsdp(model, reason="4-bit weights are NF4 tensors sharded by FSDP2 (mgpu)")
    left = _fused_lora_modules(model)
    if left:
        raise RuntimeError(
            f"{len(left)} modules keep Unsloth's fused LoRA kernels, which cannot read NF4 weights; "
            "unset UNSLOTH_FORCE_FUSED_LORA"
        )
