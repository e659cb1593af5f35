"""The optimal-config generator: settings that fit one GPU's memory and train fastest, with the reasons.

    mgpu suggest --model 8B --gpus 2 --gpu-memory 80GB

Policy, in order (each choice is recorded in `Plan.reasons`):
1. Method, when not given: LoRA on 16-bit weights when they fit, else QLoRA (4-bit). Full fine-tuning is
   never chosen for you: it produces a different artefact (a whole model instead of an adapter).
2. No gradient checkpointing when it fits with a micro-batch of at least `MIN_TOKENS_WITHOUT_CHECKPOINTING`
   tokens (or the whole per-GPU share of the global batch): measured +39% tokens/s on H200
   (docs/suggest.md). Otherwise Unsloth's offloaded checkpointing, which was as fast as `True` there and
   needs less GPU memory.
3. The largest power-of-two micro-batch (up to `MAX_MICRO_BATCH` and the per-GPU share of the global
   batch) whose predicted peak is within `max_memory_fraction` of the GPU.
4. Gradient accumulation to reach the target global batch: global = micro x GPUs x accumulation.
5. Strategy (`auto`): data parallelism (a full replica per GPU, `ddp`) whenever some setting above fits;
   only when no replicated setting fits, the sharded mode (`fsdp`: weights, gradients and optimizer state
   split over the GPUs, see memory.estimate) with LoRA, QLoRA (4-bit NF4 shards) or full fine-tuning, in the
   method order of 1. `median` aggregation is never sharded.

With `ddp` more GPUs never make a model fit; with `fsdp` they do, and the answers say so.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from .errors import Problem, UserError, is_number, is_whole
from .memory import (
    DEFAULT_TARGET_MODULES,
    DORA_BYTES_PER_OUTPUT,
    METHODS,
    OPTIMIZERS,
    Architecture,
    Checkpointing,
    GiB,
    MemoryBreakdown,
    Method,
    TrainingSetup,
    estimate,
    gb_text,
    parse_memory,
    resolve_architecture,
)

DEFAULT_GLOBAL_BATCH = 32
MAX_MICRO_BATCH = 64
DEFAULT_MEMORY_FRACTION = 0.9
#: Assumption, not a measurement: from about 2k tokens per forward the matmuls of a >=1B model fill a
#: data-centre GPU, so a bigger micro-batch gains less than recomputation (about +1/3 compute) costs.
MIN_TOKENS_WITHOUT_CHECKPOINTING = 2048


@dataclass
class Plan:
    """The generator's answer for one model on one kind of GPU.

    Attributes:
        fits: a setting was found whose predicted peak is within the memory budget.
        method: qlora, lora or full.
        micro_batch_size, gradient_accumulation_steps, gradient_checkpointing: the chosen settings.
        global_batch_size: micro x gpus x accumulation (may exceed the target when it does not divide).
        breakdown: the forecast of the chosen setting (or of the smallest one tried when nothing fits).
        reasons: why each choice was made, in order.
        rejected: alternatives that were predicted not to fit (method, checkpointing, micro-batch, GB).
        suggestions: what would fit, when nothing does.
    """

    fits: bool
    architecture: Architecture
    method: Method
    num_gpus: int
    gpu_memory_bytes: int
    memory_fraction: float
    seq_len: int
    optimizer: str
    target_global_batch: int
    strategy: str = "ddp"
    micro_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: Checkpointing = "unsloth"
    breakdown: MemoryBreakdown | None = None
    reasons: list[str] = field(default_factory=list)
    rejected: list[dict[str, Any]] = field(default_factory=list)
    suggestions: list[str] = field(default_factory=list)
    dora: bool = False

    @property
    def load_in_4bit(self) -> bool:
        return self.method == "qlora"

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.num_gpus * self.gradient_accumulation_steps

    @property
    def budget_bytes(self) -> int:
        return int(self.gpu_memory_bytes * self.memory_fraction)

    @property
    def predicted_peak_gb(self) -> float:
        return round(self.breakdown.peak_gb, 2) if self.breakdown else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The `mgpu suggest --json` document (contract keys first)."""
        a = self.architecture
        return {
            "fits": self.fits,
            "method": self.method,
            "load_in_4bit": self.load_in_4bit,
            "micro_batch_size": self.micro_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "gradient_checkpointing": self.gradient_checkpointing,
            "predicted_peak_gb": self.predicted_peak_gb,
            "strategy": self.strategy,
            "global_batch_size": self.global_batch_size,
            "target_global_batch": self.target_global_batch,
            "num_gpus": self.num_gpus,
            "gpu_memory_gb": round(self.gpu_memory_bytes / GiB, 2),
            "memory_budget_gb": round(self.budget_bytes / GiB, 2),
            "max_memory_fraction": self.memory_fraction,
            "seq_len": self.seq_len,
            "optimizer": self.optimizer,
            "dora": self.dora,
            "model": {
                "name": a.name,
                "source": a.source,
                "parameters": a.num_parameters(),
                "hidden_size": a.hidden_size,
                "num_layers": a.num_layers,
                "num_heads": a.num_heads,
                "num_kv_heads": a.num_kv_heads,
                "intermediate_size": a.intermediate_size,
                "vocab_size": a.vocab_size,
                "tie_word_embeddings": a.tie_word_embeddings,
                "num_experts": a.num_experts,
                "experts_per_token": a.experts_per_token,
            },
            "breakdown": self.breakdown.to_dict() if self.breakdown else None,
            "reasons": list(self.reasons),
            "rejected": list(self.rejected),
            "suggestions": list(self.suggestions),
        }


def _powers_of_two(cap: int) -> list[int]:
    out, mb = [], 1
    while mb <= cap:
        out.append(mb)
        mb *= 2
    return out


def _largest_fitting(
    arch: Architecture, base: TrainingSetup, ckpt: Checkpointing, sizes: list[int], budget: int
) -> tuple[int | None, MemoryBreakdown, int | None, MemoryBreakdown | None]:
    """Largest micro-batch in `sizes` that fits (peak grows with the micro-batch, so stop at the first miss).

    Returns:
        (fitting micro-batch or None, its breakdown (or mb=1's), first size that missed, its breakdown).
    """
    best, best_b = None, estimate(arch, replace(base, micro_batch_size=sizes[0], gradient_checkpointing=ckpt))
    for mb in sizes:
        b = estimate(arch, replace(base, micro_batch_size=mb, gradient_checkpointing=ckpt))
        if b.peak > budget:
            return best, best_b, mb, b
        best, best_b = mb, b
    return best, best_b, None, None


def _plan_method(
    arch: Architecture,
    base: TrainingSetup,
    plan: Plan,
    sizes: list[int],
    forced_ckpt: Checkpointing | None,
    fixed_micro: int | None,
) -> bool:
    """Fill `plan` for `base.method`; False when even the smallest setting does not fit."""
    budget = plan.budget_bytes
    if fixed_micro is not None:
        sizes = [fixed_micro]
    per_sample = base.tokens_per_sample or base.seq_len
    modes: list[Checkpointing] = [forced_ckpt] if forced_ckpt is not None else [False, "unsloth"]
    for ckpt in modes:
        mb, b, miss, miss_b = _largest_fitting(arch, base, ckpt, sizes, budget)
        if miss is not None and miss_b is not None:
            plan.rejected.append(
                {
                    "method": base.method,
                    "strategy": "fsdp" if base.sharded else "ddp",
                    "gradient_checkpointing": ckpt,
                    "micro_batch_size": miss,
                    "predicted_peak_gb": round(miss_b.peak_gb, 2),
                    "why": f"{gb_text(miss_b.peak)} > budget {gb_text(budget)}",
                }
            )
        if mb is None:
            continue
        enough = mb * per_sample >= MIN_TOKENS_WITHOUT_CHECKPOINTING or mb == sizes[-1]
        if ckpt is False and forced_ckpt is None and not enough:
            plan.reasons.append(
                f"without checkpointing only micro-batch {mb} ({mb * per_sample:,.0f} tokens) fits; "
                f"checkpointing allows larger micro-batches"
            )
            continue
        plan.micro_batch_size, plan.gradient_checkpointing, plan.breakdown = mb, ckpt, b
        if ckpt is False and forced_ckpt is None:
            plan.reasons.append(
                "no gradient checkpointing: it fits, and it was +39% tokens/s on H200 (docs/suggest.md)"
            )
        elif forced_ckpt is None:
            if not plan.reasons or not plan.reasons[-1].startswith("without checkpointing"):
                plan.reasons.append("no checkpointing does not fit even at micro-batch 1")
            plan.reasons.append(
                "unsloth checkpointing (layer inputs offloaded to CPU RAM): as fast as `true` on "
                "H200 (docs/suggest.md) and it needs less GPU memory"
            )
        else:
            plan.reasons.append(f"gradient checkpointing {ckpt!r} as the recipe sets it")
        capped = "the per-GPU share of the global batch" if mb == sizes[-1] and miss is None else "the memory budget"
        plan.reasons.append(
            f"micro-batch {mb}: the largest power of two within {capped} "
            f"(predicted peak {gb_text(b.peak)} of {gb_text(budget)} = {plan.memory_fraction:.0%} of "
            f"{gb_text(plan.gpu_memory_bytes)})"
        )
        return True
    plan.breakdown = estimate(
        arch,
        replace(
            base,
            micro_batch_size=sizes[0],
            gradient_checkpointing=forced_ckpt if forced_ckpt is not None else "unsloth",
        ),
    )
    return False


def plan(
    arch: Architecture,
    *,
    gpu_memory_bytes: int,
    num_gpus: int = 1,
    seq_len: int = 2048,
    method: Method | None = None,
    global_batch: int = DEFAULT_GLOBAL_BATCH,
    optimizer: str = "adamw_8bit",
    lora_r: int = 16,
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES,
    memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    max_micro_batch: int = MAX_MICRO_BATCH,
    tokens_per_sample: float | None = None,
    gradient_checkpointing: Checkpointing | None = None,
    micro_batch_size: int | None = None,
    strategy: str = "ddp",
    names: Mapping[str, str] | None = None,
    dora: bool = False,
) -> Plan:
    """Choose method, checkpointing, micro-batch and accumulation for `num_gpus` GPUs of one size.

    Args:
        arch: the model.
        gpu_memory_bytes: memory of one GPU (the smallest, when they differ).
        num_gpus: data-parallel replicas.
        seq_len: tokens per sample (worst case).
        method: qlora | lora | full; None lets the generator choose (lora if 16-bit fits, else qlora).
        global_batch: target samples per optimizer step.
        optimizer: adamw | adamw_8bit | sgd.
        lora_r: LoRA rank; target_modules: the adapted projections.
        memory_fraction: plan to use at most this share of each GPU.
        max_micro_batch: upper bound for the micro-batch.
        tokens_per_sample: mean tokens per sample for padding-free batches; None: seq_len.
        gradient_checkpointing: fixed mode (a recipe that sets it); None lets the generator choose.
        micro_batch_size: fixed micro-batch (a recipe that sets it); None lets the generator choose.
        strategy: ddp (replicas), fsdp (sharded) or auto (ddp when a replicated setting fits, else fsdp).
        names: how the suggestions name the settings (`CLI_NAMES`, `mgpu suggest`'s flags, by default).
        dora: DoRA adapters (lora.use_dora): more activation memory per token (memory.DORA_BYTES_PER_OUTPUT).

    Returns:
        A Plan; `fits` is False with `suggestions` when nothing fits.
    """
    if num_gpus < 1 or seq_len < 1 or global_batch < 1:
        raise ValueError("num_gpus, seq_len and global_batch must be positive")
    if strategy not in ("ddp", "fsdp", "auto"):
        raise ValueError(f"unknown strategy {strategy!r}; expected ddp, fsdp or auto")
    result = Plan(
        fits=False,
        architecture=arch,
        method=method or "lora",
        num_gpus=num_gpus,
        gpu_memory_bytes=gpu_memory_bytes,
        memory_fraction=memory_fraction,
        seq_len=seq_len,
        optimizer=optimizer,
        target_global_batch=global_batch,
        dora=dora,
    )
    share = math.ceil(global_batch / num_gpus)
    sizes = [s for s in _powers_of_two(min(max_micro_batch, share))] or [1]
    base = TrainingSetup(
        seq_len=seq_len,
        optimizer=optimizer,
        lora_r=lora_r,
        target_modules=tuple(target_modules),
        num_gpus=num_gpus,
        gpu_memory_bytes=gpu_memory_bytes,
        tokens_per_sample=tokens_per_sample,
        dora=dora,
    )
    methods: list[Method] = [method] if method else ["lora", "qlora"]
    # (method, sharded) in order of preference: replicas first; sharding only when no replica fits (auto).
    candidates: list[tuple[Method, bool]] = []
    if strategy in ("ddp", "auto"):
        candidates += [(m, False) for m in methods]
    if strategy == "fsdp" or (strategy == "auto" and num_gpus > 1):
        candidates += [(m, True) for m in methods]  # 4-bit: torchao NF4 shards (docs/sharded.md)
    for m, sharded in candidates:
        result.method, result.strategy = m, "fsdp" if sharded else "ddp"
        setup = replace(base, method=m, sharded=sharded)
        if _plan_method(arch, setup, result, sizes, gradient_checkpointing, micro_batch_size):
            result.fits = True
            result.reasons[:0] = _why_method_and_strategy(m, sharded, method is None, strategy, num_gpus)
            break
    if dora:
        result.reasons.insert(
            1 if result.fits else 0,
            f"DoRA (lora.use_dora): {DORA_BYTES_PER_OUTPUT} more bytes of activations per token for every output "
            "feature of each adapted projection (measured on H200: 4.4 x LoRA's peak at 16k tokens)",
        )
    if result.fits:
        result.gradient_accumulation_steps = max(1, math.ceil(global_batch / (result.micro_batch_size * num_gpus)))
        g = result.global_batch_size
        note = "" if g == global_batch else f" (the target {global_batch} does not divide evenly; rounded up)"
        result.reasons.append(
            f"gradient accumulation {result.gradient_accumulation_steps}: global batch {g} = "
            f"{result.micro_batch_size} x {num_gpus} GPU(s) x {result.gradient_accumulation_steps}"
            f"{note}"
        )
    else:
        result.strategy = "fsdp" if strategy == "fsdp" else "ddp"
        result.suggestions = _suggestions(
            arch, replace(base, sharded=result.strategy == "fsdp"), result, names or CLI_NAMES
        )
    return result


def _why_method_and_strategy(method: Method, sharded: bool, chosen: bool, strategy: str, num_gpus: int) -> list[str]:
    """The plan's first two reasons: why this method (`chosen`: by the generator, else as requested), and why
    replicas or shards."""
    if not chosen:
        why_method = f"{method} as requested"
    elif method == "lora":
        why_method = "lora on 16-bit weights: they fit (full fine-tuning only on request)"
    else:
        why_method = "qlora (4-bit weights): 16-bit LoRA does not fit even at micro-batch 1"
    if sharded and strategy == "auto":
        why_strategy = (
            f"strategy fsdp: a full replica does not fit one GPU; sharding weights, gradients and optimizer state "
            f"over {num_gpus} GPUs does (only when replicas do not fit: sharding adds an all-gather per layer)"
        )
    elif sharded:
        why_strategy = f"strategy fsdp as requested: sharded over {num_gpus} GPUs"
    else:
        why_strategy = "strategy ddp: a full replica fits every GPU (data parallelism)"
    return [why_method, why_strategy]


#: How suggestions name the settings: `mgpu suggest`'s flags, or the Python API's arguments (ConfigManager).
CLI_NAMES = {"memory": "--gpu-memory", "fraction": "max_memory_fraction", "qlora": "--method qlora",
             "seq_len": "--seq-len {}", "gpus": "--gpus"}  # fmt: skip
PYTHON_NAMES = {"memory": "available_memory", "fraction": "memory_fraction", "qlora": "method='qlora'",
                "seq_len": "seq_len={}", "gpus": "num_gpus"}  # fmt: skip


def _suggestions(arch: Architecture, base: TrainingSetup, result: Plan, names: Mapping[str, str]) -> list[str]:
    """What would fit when nothing does: 4-bit, fewer tokens, a bigger GPU (never merely more GPUs)."""
    out: list[str] = []
    budget, frac = result.budget_bytes, result.memory_fraction
    smallest = replace(base, method=result.method, micro_batch_size=1, gradient_checkpointing="unsloth")
    need = estimate(arch, smallest).peak
    out.append(
        f"{result.method} needs about {gb_text(need)} per GPU at micro-batch 1 with offloaded checkpointing: "
        f"a GPU with at least {gb_text(need / frac)} (at {names['fraction']} {frac:g}), or raise "
        f"{names['memory']}/{names['fraction']} if the GPU really has more free"
    )
    if result.method != "qlora":
        q = estimate(arch, replace(smallest, method="qlora", gpu_memory_bytes=base.gpu_memory_bytes))
        fits = "fits" if q.peak <= budget else "does not fit either"
        out.append(f"4-bit ({names['qlora']}) needs about {gb_text(q.peak)} per GPU: {fits} here")
    static = estimate(arch, replace(smallest, seq_len=1)).peak
    if static > budget:
        out.append(
            f"weights, adapters and optimizer state alone (with CUDA context and allocator overhead) "
            f"take {gb_text(static)} > budget {gb_text(budget)}: shorter sequences cannot help"
        )
    else:
        seq = base.seq_len // 2
        while seq >= 64:
            if estimate(arch, replace(smallest, seq_len=seq)).peak <= budget:
                out.append(f"{names['seq_len'].format(seq)} (or shorter) fits with {result.method} at micro-batch 1")
                break
            seq //= 2
    if base.sharded:
        out.append(f"more GPUs lower per-GPU memory under fsdp: try a larger {names['gpus']}")
    else:
        out.append(
            "more GPUs do not lower per-GPU memory with data parallelism (every GPU holds a full replica); "
            "LoRA, QLoRA or full fine-tuning can be sharded across GPUs instead (distributed.strategy: fsdp)"
        )
    return out


# --------------------------------------------------------------------------------------------------------
# Filling `auto` in a recipe
# --------------------------------------------------------------------------------------------------------


def _architecture_for_recipe(name: str) -> tuple[Architecture | None, str | None]:
    try:
        return resolve_architecture(name, where="model.name"), None
    except UserError as exc:
        return None, exc.problems[0].render()


def _use_smallest_settings(
    t: Any, mem: Any, mb_auto: bool, ck_auto: bool, ga_auto: bool, global_batch: int, num_gpus: int
) -> None:
    """The least-memory values for the `auto` keys: micro-batch 1, offloaded checkpointing, accumulation to the
    target global batch."""
    if mb_auto:
        t.micro_batch_size = 1
    if ck_auto:
        mem.gradient_checkpointing = "unsloth"
    if ga_auto:
        t.gradient_accumulation_steps = max(1, math.ceil(global_batch / (int(t.micro_batch_size) * num_gpus)))


_METHOD_LABEL = {"full": "full fine-tuning", "lora": "LoRA on 16-bit weights", "qlora": "QLoRA on 4-bit weights"}


def _recipe_method(r: Any) -> Method:
    return "full" if r.lora is None else ("qlora" if r.model.load_in_4bit else "lora")


def _plan_recipe(
    r: Any, arch: Architecture, num_gpus: int, gpu_memory_bytes: int, global_batch: int, strategy: str
) -> Plan:
    """`plan` for a recipe: its method, LoRA, optimizer and sequence length, with the values it fixes kept fixed
    (micro-batch, checkpointing) and those it leaves `auto` left to the planner."""
    t, mem, lora = r.training, r.memory, r.lora
    return plan(
        arch,
        gpu_memory_bytes=gpu_memory_bytes,
        num_gpus=num_gpus,
        seq_len=r.model.max_seq_length,
        method=_recipe_method(r),
        global_batch=global_batch,
        optimizer=t.optimizer,
        lora_r=lora.r if lora else 16,
        target_modules=tuple(lora.target_modules) if lora else DEFAULT_TARGET_MODULES,
        memory_fraction=mem.max_memory_fraction,
        gradient_checkpointing=None if mem.gradient_checkpointing == "auto" else mem.gradient_checkpointing,
        micro_batch_size=None if t.micro_batch_size == "auto" else int(t.micro_batch_size),
        strategy=strategy,
        dora=bool(lora and lora.use_dora),
    )


def _refuse_replicas_that_cannot_fit(
    r: Any, arch: Architecture, num_gpus: int, gpu_memory_bytes: int, global_batch: int
) -> None:
    """`distributed.strategy: ddp` asked for explicitly, but no replicated setting fits the memory budget while a
    sharded one does: refuse before launching (a replica would run out of memory, or exceed the share of the GPU
    the recipe allows) and say what does fit.

    Raises:
        UserError: naming `distributed.strategy`, the forecast, the budget and the fsdp forecast.
    """
    replica = _plan_recipe(r, arch, num_gpus, gpu_memory_bytes, global_batch, "ddp")
    if replica.fits:
        return
    sharded = _plan_recipe(r, arch, num_gpus, gpu_memory_bytes, global_batch, "fsdp")
    if not sharded.fits:
        return  # nothing fits either way: resolve_auto trains with the least memory and says so
    tried = [x for x in replica.rejected if x["strategy"] == "ddp"]
    need = max((x["predicted_peak_gb"] for x in tried), default=replica.predicted_peak_gb)
    mb, fraction = r.training.micro_batch_size, r.memory.max_memory_fraction
    at = f" at micro-batch {mb}" if mb != "auto" else " even at micro-batch 1"
    raise UserError(
        Problem(
            "distributed.strategy",
            f"ddp keeps a full replica on every GPU ({_METHOD_LABEL[_recipe_method(r)]}): predicted {need:.1f} GB "
            f"per GPU{at}, over the budget of {replica.budget_bytes / GiB:.1f} GB (memory.max_memory_fraction "
            f"{fraction:g} of {gpu_memory_bytes / GiB:.0f} GB)",
            f"set distributed.strategy: fsdp (sharded over {num_gpus} GPUs: predicted "
            f"{sharded.predicted_peak_gb:.1f} GB per GPU at micro-batch {sharded.micro_batch_size}) or auto; or "
            "raise memory.max_memory_fraction if more of each GPU is free",
        ),
        "invalid recipe",
    )


def _cpu_values(t: Any, mem: Any, mb_auto: bool, ga_auto: bool, ck_auto: bool) -> list[str]:
    """Fill the `auto` batch and checkpointing keys for CPU workers; the note saying so (none if nothing was auto)."""
    # CPU training is for demos and tests: small batches keep each step short, and there is no GPU memory
    # to save, so recomputation would only cost time.
    if mb_auto:
        t.micro_batch_size = 2
    if ga_auto:
        t.gradient_accumulation_steps = 1
    if ck_auto:
        mem.gradient_checkpointing = False
    filled = [
        text
        for auto, text in (
            (mb_auto, "micro_batch_size 2"),
            (ga_auto, "gradient_accumulation_steps 1"),
            (ck_auto, "gradient_checkpointing false"),
        )
        if auto
    ]
    return [f"no GPU: conservative CPU values ({', '.join(filled)}) where the recipe said auto"] if filled else []


def resolve_auto(
    recipe: Any, num_gpus: int, gpu_memory_bytes: int | None, global_batch: int = DEFAULT_GLOBAL_BATCH
) -> tuple[Any, list[str]]:
    """Fill training.micro_batch_size, training.gradient_accumulation_steps and memory.gradient_checkpointing.

    `distributed.num_gpus` is the launcher's to fill. Values the recipe sets are kept and planned around.

    Args:
        recipe: a validated `Recipe` (not modified; a copy is returned).
        num_gpus: workers that will train.
        gpu_memory_bytes: memory of one GPU (the smallest); None on CPU.
        global_batch: target samples per optimizer step when accumulation is auto.

    Returns:
        (the recipe with no `auto` left in those three keys, notes saying what was chosen and why).
    """
    r = recipe.model_copy(deep=True)
    t, mem, d = r.training, r.memory, r.distributed
    mb_auto, ga_auto, ck_auto = (
        t.micro_batch_size == "auto",
        t.gradient_accumulation_steps == "auto",
        (mem.gradient_checkpointing == "auto"),
    )
    notes: list[str] = []
    st_auto = d.strategy == "auto"
    # Sharding is never chosen for median aggregation (no per-rank gradient to take a median of) or one worker
    # (nothing to shard over).
    can_shard = d.aggregation != "median" and num_gpus > 1
    if st_auto and (gpu_memory_bytes is None or not can_shard):
        d.strategy = "ddp"
        why = "no GPU" if gpu_memory_bytes is None else "median aggregation or one worker cannot be sharded"
        notes.append(f"strategy ddp ({why})")
        st_auto = False
    # read once: the refusal below and the planning further down both forecast from it
    arch, why_not = _architecture_for_recipe(r.model.name) if gpu_memory_bytes is not None else (None, None)
    if recipe.distributed.strategy == "ddp" and arch is not None and gpu_memory_bytes is not None and can_shard:
        _refuse_replicas_that_cannot_fit(r, arch, num_gpus, gpu_memory_bytes, global_batch)
    if not (mb_auto or ga_auto or ck_auto or st_auto):
        return r, notes
    if gpu_memory_bytes is None:
        notes += _cpu_values(t, mem, mb_auto, ga_auto, ck_auto)
        return r, notes

    if arch is None:
        # Unknown architecture (a hub id not downloaded yet): be safe rather than fast.
        if st_auto:
            d.strategy = "ddp"
            notes.append("strategy ddp: architecture unknown, no forecast to decide sharding on")
        _use_smallest_settings(t, mem, mb_auto, ck_auto, ga_auto, global_batch, num_gpus)
        notes.append(
            f"architecture unknown ({why_not}); chose safe values: micro_batch_size "
            f"{t.micro_batch_size}, gradient_checkpointing {mem.gradient_checkpointing}"
        )
        return r, notes
    p = _plan_recipe(r, arch, num_gpus, gpu_memory_bytes, global_batch, d.strategy)
    if st_auto:
        # Nothing fits either way: sharding needs less memory per GPU, so it is the better bet.
        d.strategy = p.strategy if p.fits else "fsdp"
    if not p.fits:
        # Train anyway with the least memory we can offer, and say plainly that it may not fit.
        _use_smallest_settings(t, mem, mb_auto, ck_auto, ga_auto, global_batch, num_gpus)
        notes.append(
            f"predicted not to fit: {p.predicted_peak_gb:.1f} GB per GPU > budget "
            f"{p.budget_bytes / GiB:.1f} GB; using the smallest settings. " + "; ".join(p.suggestions)
        )
        return r, notes
    if mb_auto:
        t.micro_batch_size = p.micro_batch_size
    if ck_auto:
        mem.gradient_checkpointing = p.gradient_checkpointing
    if ga_auto:
        t.gradient_accumulation_steps = max(1, math.ceil(global_batch / (int(t.micro_batch_size) * num_gpus)))
    notes.extend(p.reasons)
    notes.append(f"predicted peak {p.predicted_peak_gb:.1f} GB per GPU ({arch.source})")
    return r, notes


# --------------------------------------------------------------------------------------------------------
# Seed-compatible Python API
# --------------------------------------------------------------------------------------------------------


def detect_gpu_memory(env: Any = None, nvml: Any = None) -> tuple[int, int | None]:
    """(number of visible NVIDIA GPUs, memory of the smallest in bytes): `devices.detect_gpu_memory`."""
    from .devices import detect_gpu_memory as detect

    return detect(env, nvml)


class ConfigManager:
    """Optimal configurations for the Python API, shaped for `enable_multi_gpu(**config)`."""

    def __init__(self) -> None:
        self.last_plan: Plan | None = None

    def get_optimal_config(
        self,
        model_size: str = "7B",
        available_memory: str | int | float | None = None,
        num_gpus: int | None = None,
        seq_len: int = 2048,
        method: Method | None = None,
        global_batch: int = DEFAULT_GLOBAL_BATCH,
        optimizer: str = "adamw_8bit",
        memory_fraction: float = DEFAULT_MEMORY_FRACTION,
    ) -> dict[str, Any]:
        """Settings for `model_size` (a size like "7B", a hub id or a folder) on GPUs of `available_memory`.

        Args:
            model_size: what `mgpu suggest --model` accepts.
            available_memory: memory per GPU ("32GB", "24 GiB", 24 = GB, a number above 2**20 = bytes); None:
                the smallest visible GPU's, via NVML.
            num_gpus: GPUs to use; None: in a launched worker (hook mode, torchrun) the number of workers, else
                the detected count (1 when none is detected).
            seq_len, method, global_batch, optimizer, memory_fraction: as for `plan`.

        Returns:
            num_gpus, batch_size_per_gpu, gradient_accumulation_steps, gradient_aggregation, load_in_4bit,
            gradient_checkpointing, max_seq_length and predicted_peak_gb. The full Plan is in `last_plan`.

        Raises:
            UserError: bad arguments, no GPU memory given or detected, or nothing fits (with suggestions).
        """
        problems = _argument_problems(
            {"gpus": "num_gpus", "seq_len": "seq_len", "method": "method", "global_batch": "global_batch",
             "optimizer": "optimizer", "memory_fraction": "memory_fraction"},
            num_gpus, seq_len, method, global_batch, optimizer, memory_fraction,
        )  # fmt: skip
        from .hooks import LAUNCH_GPU_MEMORY_ENV, launched_world_size

        if available_memory is None and launched_world_size() is not None and os.environ.get(LAUNCH_GPU_MEMORY_ENV):
            # a hook-mode worker sees only its own GPU: size every rank for the smallest the launch runs on
            available_memory = int(os.environ[LAUNCH_GPU_MEMORY_ENV])
        detected, detected_mem = detect_gpu_memory() if available_memory is None or num_gpus is None else (0, None)
        mem, more = _memory_per_gpu(available_memory, detected_mem, "available_memory", 'available_memory="80GB"')
        problems += more
        try:
            arch = resolve_architecture(str(model_size), where="model_size")
        except UserError as exc:
            problems = exc.problems + problems
        if problems:
            raise UserError(problems, "invalid arguments")
        assert mem is not None
        # in a hook-mode worker the GPU count is 1 (its own GPU): the launch's worker count sizes the batch
        gpus = num_gpus if num_gpus is not None else (launched_world_size() or max(detected, 1))
        p = plan(
            arch,
            gpu_memory_bytes=mem,
            num_gpus=gpus,
            seq_len=seq_len,
            method=method,
            global_batch=global_batch,
            optimizer=optimizer,
            memory_fraction=memory_fraction,
            names=PYTHON_NAMES,
        )
        self.last_plan = p
        if not p.fits:
            raise UserError(
                _does_not_fit_in_hook_mode(arch, str(model_size), mem, gpus, p, seq_len, memory_fraction),
                "does not fit",
            )
        planned = p.micro_batch_size * p.gradient_accumulation_steps * gpus
        if planned != global_batch:  # the returned dict alone would not show it
            import warnings

            warnings.warn(
                f"get_optimal_config: global batch {planned} samples per step ({p.micro_batch_size} per GPU x "
                f"{p.gradient_accumulation_steps} accumulation x {gpus} GPUs), not global_batch={global_batch}, "
                f"which does not split evenly into micro-batches on {gpus} GPUs: rounded up",
                stacklevel=2,
            )
        return {
            "num_gpus": gpus,
            "batch_size_per_gpu": p.micro_batch_size,
            "gradient_accumulation_steps": p.gradient_accumulation_steps,
            # Exactly one big batch whatever the ranks' token counts (mean is exact only when they are equal).
            "gradient_aggregation": "weighted",
            "load_in_4bit": p.load_in_4bit,
            "gradient_checkpointing": p.gradient_checkpointing,
            "max_seq_length": seq_len,
            "predicted_peak_gb": p.predicted_peak_gb,
        }


def _does_not_fit_in_hook_mode(
    arch: Architecture, model_size: str, mem: int, gpus: int, p: Plan, seq_len: int, memory_fraction: float
) -> Problem:
    """Why a model does not fit as one replica per GPU, in the Python API's terms, and whether `mgpu train`
    could shard it (hook mode and MultiGPUTrainer keep a whole replica on every GPU)."""
    first = p.suggestions[0] if p.suggestions else "a GPU with more memory"
    sharded = plan(arch, gpu_memory_bytes=mem, num_gpus=gpus, seq_len=seq_len, strategy="fsdp",
                   memory_fraction=memory_fraction) if gpus > 1 else None  # fmt: skip
    shard = (
        f"; sharded over the {gpus} GPUs it fits ({sharded.method}, about {sharded.predicted_peak_gb:.1f} GB per "
        f"GPU): train it with `mgpu train` and distributed.strategy: fsdp (`mgpu suggest --model {model_size} "
        f"--gpus {gpus} --gpu-memory {mem / GiB:g}GB --output recipe.yaml` writes the recipe)"
        if sharded is not None and sharded.fits
        else ""
    )
    return Problem(
        "model_size",
        f"{model_size} does not fit in {mem / GiB:.3g} GB per GPU with a whole replica on every GPU (hook mode "
        "and MultiGPUTrainer keep one per GPU; more GPUs do not lower it)",
        first + shard,
    )


# --------------------------------------------------------------------------------------------------------
# A recipe from a plan (`mgpu suggest --output`)
# --------------------------------------------------------------------------------------------------------

#: A hub dataset id so the written recipe validates as is; replace it with your data.
PLACEHOLDER_DATASET = "yahma/alpaca-cleaned"


def recipe_yaml(p: Plan, model_name: str, command: str, filename: str = "recipe.yaml") -> str:
    """A complete, commented recipe for `p` that `mgpu validate` accepts."""
    import yaml

    def scalar(v: Any) -> str:
        return yaml.safe_dump(v).split("\n...")[0].strip()

    a = p.architecture
    ckpt = p.gradient_checkpointing
    lora = (
        "lora:                           # `lora: null` for full fine-tuning (without this section: default LoRA)\n"
        "  r: 16\n  alpha: 16\n  dropout: 0.0\n"
        "  target_modules: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]\n"
        + ("  use_dora: true                # DoRA: sized with its larger activations\n" if p.dora else "")
        if p.method != "full"
        else "lora: null                      # full fine-tuning\n"
    )
    from .templates import schema_comment

    return f"""\
{schema_comment()}
# {p.method} of {model_name} ({a.num_parameters() / 1e9:.2f}B parameters; {a.source}).
# Sized for {p.num_gpus} GPU(s) with {p.gpu_memory_bytes / GiB:.0f} GB each: \
predicted peak {p.predicted_peak_gb:.1f} GB per GPU
# at max_seq_length {p.seq_len} (every sample at full length). Written by: {command}
# dataset.path is a placeholder hub dataset so the recipe validates: change it to your data.
#   mgpu validate {filename}   then   mgpu train {filename}

model:
  name: {scalar(model_name)}
  max_seq_length: {p.seq_len}
  dtype: auto
  load_in_4bit: {scalar(p.load_in_4bit)}

{lora}
dataset:
  path: {PLACEHOLDER_DATASET}     # placeholder: your .json/.jsonl/.csv/.parquet file or hub dataset id
  format: alpaca                  # alpaca | chat | text

training:
  epochs: 1
  micro_batch_size: {p.micro_batch_size}             # per GPU
  gradient_accumulation_steps: {p.gradient_accumulation_steps}  # global batch = {p.micro_batch_size} x \
{p.num_gpus} GPU(s) x {p.gradient_accumulation_steps} = {p.global_batch_size}
  learning_rate: 2.0e-4
  optimizer: {p.optimizer}
  lr_scheduler: cosine
  warmup_steps: 10

distributed:
  num_gpus: {p.num_gpus}
  strategy: {p.strategy}{"                 # sharded: a replica does not fit one GPU" if p.strategy == "fsdp" else ""}
  aggregation: weighted             # exactly one big batch, whatever each GPU's token count

memory:
  max_memory_fraction: {p.memory_fraction:g}
  gradient_checkpointing: {scalar(ckpt)}   # false | true | unsloth | auto

output:
  dir: outputs/{_slug(model_name)}-{p.method}
  save_steps: 100
"""


def _slug(name: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name.rstrip("/").split("/")[-1]).strip("-").lower() or "model"


def _memory_per_gpu(given: Any, detected: int | None, where: str, example: str) -> tuple[int | None, list[Problem]]:
    """The memory per GPU in bytes: what was given (parsed), else the smallest visible GPU's; or the problem."""
    if given is not None:
        try:
            return parse_memory(given, where=where), []
        except UserError as exc:
            return None, exc.problems
    if detected is None:
        return None, [
            Problem(
                where, "no NVIDIA GPU detected (NVML), so the memory per GPU is unknown", f"pass it, e.g. {example}"
            )
        ]
    return detected, []


def _argument_problems(
    names: dict[str, str],
    gpus: Any,
    seq_len: Any,
    method: Any,
    global_batch: Any,
    optimizer: Any,
    memory_fraction: Any = None,
) -> list[Problem]:
    """What is wrong with the planning arguments shared by `mgpu suggest` and `ConfigManager`, each problem under
    `names[argument]` (a flag or a keyword); `gpus`, `method` and `memory_fraction` may be None (not given)."""
    problems: list[Problem] = []
    if gpus is not None and not (is_whole(gpus) and 1 <= gpus <= 1024):
        problems.append(Problem(names["gpus"], f"expected a number of GPUs from 1 to 1024, found {gpus!r}"))
    if not (is_whole(seq_len) and 16 <= seq_len <= 1_048_576):
        problems.append(Problem(names["seq_len"], f"expected 16 to 1048576 tokens, found {seq_len!r}"))
    if method is not None and method not in METHODS:
        problems.append(Problem(names["method"], f"expected qlora, lora or full, found {method!r}"))
    if not (is_whole(global_batch) and global_batch >= 1):
        problems.append(Problem(names["global_batch"], f"expected at least 1 sample, found {global_batch!r}"))
    if optimizer not in OPTIMIZERS:
        problems.append(Problem(names["optimizer"], f"expected adamw, adamw_8bit or sgd, found {optimizer!r}"))
    if memory_fraction is not None and not (is_number(memory_fraction) and 0 < memory_fraction <= 1):
        problems.append(
            Problem(
                names["memory_fraction"],
                f"expected a share of the GPU above 0 and at most 1, found {memory_fraction!r}",
            )
        )
    return problems


def check_suggest_args(
    model: str,
    gpus: int | None,
    gpu_memory: str | None,
    seq_len: int,
    method: str | None,
    global_batch: int,
    optimizer: str,
    strategy: str = "auto",
) -> tuple[Architecture, int, int]:
    """Check `mgpu suggest` arguments all at once; detect GPUs when their count or memory is not given.

    Returns:
        (architecture, number of GPUs, memory per GPU in bytes).

    Raises:
        UserError: every bad argument, each naming its flag.
    """
    problems: list[Problem] = []
    arch = None
    try:
        arch = resolve_architecture(model)
    except UserError as exc:
        problems += exc.problems
    flags = {"gpus": "--gpus", "seq_len": "--seq-len", "method": "--method", "global_batch": "--global-batch",
             "optimizer": "--optimizer"}  # fmt: skip
    problems += _argument_problems(
        {k: f"argument {v}" for k, v in flags.items()}, gpus, seq_len, method, global_batch, optimizer
    )
    if strategy not in ("ddp", "fsdp", "auto"):
        problems.append(Problem("argument --strategy", f"expected ddp, fsdp or auto, found {strategy!r}"))
    detected, detected_mem = (0, None) if gpu_memory is not None and gpus is not None else detect_gpu_memory()
    mem, more = _memory_per_gpu(gpu_memory, detected_mem, "argument --gpu-memory", "--gpu-memory 80GB (and --gpus N)")
    problems += more
    if problems:
        raise UserError(problems, "invalid arguments")
    assert arch is not None and mem is not None
    return arch, gpus if gpus is not None else max(detected, 1), mem
