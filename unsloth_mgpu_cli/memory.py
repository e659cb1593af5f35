"""Per-GPU memory forecast for LoRA, QLoRA and full fine-tuning with Unsloth under data parallelism.

    from unsloth_mgpu_cli.memory import resolve_architecture, TrainingSetup, estimate
    b = estimate(resolve_architecture("8B"), TrainingSetup(method="qlora", seq_len=2048, micro_batch_size=4))
    print(b.peak_gb)

Under data parallelism (`distributed.strategy: ddp`) each GPU holds a full replica, so the forecast is for
one GPU and does not shrink with more GPUs; the sharded mode (`fsdp`, `TrainingSetup.sharded`) divides the
weights, gradients and optimizer state by the GPUs and adds the layers gathered at a time. It is
built from what Unsloth keeps on the GPU, term by term (see `MemoryBreakdown`), not fitted to
measurements; the constants below say where they come from. Units: bytes internally; "GB" in the user
interface means GiB (2**30 bytes), the unit in which GPU memory is sold ("80GB") and torch reports.

Nothing here imports torch, transformers or unsloth: `mgpu suggest` must start fast on any machine.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from .errors import Problem, UserError

GiB = 1024**3


def gb_text(nbytes: float) -> str:
    """Bytes as GB for messages (GB means 2**30 bytes everywhere in mgpu), one decimal."""
    return f"{nbytes / GiB:.1f} GB"


MiB = 1024**2

Method = Literal["qlora", "lora", "full"]
METHODS: tuple[str, ...] = ("qlora", "lora", "full")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw_8bit", "sgd")
Checkpointing = bool | Literal["unsloth"]

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# --- constants, each with its source --------------------------------------------------------------------
#: CUDA context, cuBLAS/cuDNN handles and kernels: outside the torch allocator, seen by nvidia-smi.
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
#: The caching allocator rounds and splits blocks; reserved exceeds allocated by a few to ~10 % in training.
ALLOCATOR_OVERHEAD = 0.08
#: bitsandbytes NF4 with Unsloth's defaults (blocksize 64, double quantisation): 4 bits per weight, one
#: 8-bit absmax per 64 weights, one fp32 second-level absmax per 256 absmaxes (= per 16,384 weights).
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
#: bitsandbytes 8-bit Adam: two uint8 states per parameter plus one fp32 absmax per 256-element block each.
ADAMW_8BIT_BYTES_PER_PARAM = 2 + 2 * 4 / 256
#: unsloth_zoo.fused_losses.cross_entropy_loss sizes its chunks with `_CE_BYTES_PER_LOGIT = 16` per
#: token x vocabulary element (its eager-chain budget) against min(half the free memory at the first
#: forward, `_CE_TARGET_GB_CAP` = 4 GiB). Llama's forward calls it with torch_compile=True and computes the
#: gradient inside the forward; the compiled kernel keeps the fp32 upcast and fp32 gradient in registers, so
#: a chunk holds the bf16 logits (2) and their bf16 gradient (2): 4 bytes per element. Measured on an H200
#: (docs/suggest.md): 12 bytes, the eager chain's count, over-predicted one-chunk runs by 15-31%.
CE_BUDGET_BYTES_PER_LOGIT = 16
CE_BYTES_PER_LOGIT = 4
#: Backward of a decoder layer also holds fp32 copies of hidden-sized tensors per token: RMSNorm computes in
#: fp32 (the upcast input and its gradient, for both norms) and the residual stream's gradient is accumulated
#: in fp32: about five hidden-sized fp32 tensors. Without them the forecast missed by 0.6 GiB (1B, 16k tokens)
#: in the H200 measurement.
BACKWARD_FP32_HIDDEN_COPIES = 5
CE_TARGET_CAP_BYTES = 4 * GiB
#: DoRA (lora.use_dora) runs PEFT's layer instead of Unsloth's fused LoRA kernels and keeps, per token, about ten
#: more bytes for every output feature of each adapted projection (fp32 LoRA output, the magnitude-scaled copy).
#: Measured on an H200 (session 21, gpu_plan.sh s21): the 1B QLoRA at 16,488 tokens per micro-batch without
#: checkpointing peaked at 73.38 GiB against 16.55 GiB with LoRA: 9.8 bytes per token x output feature x layer.
DORA_BYTES_PER_OUTPUT = 10
#: unsloth_zoo.gradient_checkpointing keeps two GPU staging buffers (double buffering) for offloaded states.
OFFLOAD_GPU_BUFFERS = 2


@dataclass(frozen=True)
class Architecture:
    """The dimensions that decide memory: what a model's config.json says (or a typical model of a size).

    Attributes:
        hidden_size: width of the residual stream.
        num_layers: decoder layers.
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention when fewer than num_heads).
        intermediate_size: MLP width (per expert for MoE models).
        vocab_size: rows of the embedding and of the lm_head.
        tie_word_embeddings: lm_head shares the embedding matrix.
        num_experts: MLP experts per layer (1 for dense models).
        experts_per_token: experts each token is routed to (1 for dense models).
        head_dim: per-head width; hidden_size / num_heads when the config does not say.
        name: what the user asked for, for messages.
        source: where the dimensions came from (a config.json path or "typical <size> table").
    """

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    experts_per_token: int = 1
    head_dim: int | None = None
    name: str = ""
    source: str = ""

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.dim_per_head

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.dim_per_head

    def module_shapes(self) -> dict[str, tuple[int, int, int]]:
        """(in_features, out_features, copies per layer) of each linear projection that LoRA can target."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        return {
            "q_proj": (h, self.q_dim, 1),
            "k_proj": (h, self.kv_dim, 1),
            "v_proj": (h, self.kv_dim, 1),
            "o_proj": (self.q_dim, h, 1),
            "gate_proj": (h, i, e),
            "up_proj": (h, i, e),
            "down_proj": (i, h, e),
        }

    def linear_params(self) -> int:
        """Parameters in the decoder layers' linear projections (what 4-bit quantises), router included."""
        per_layer = sum(a * b * n for a, b, n in self.module_shapes().values())
        if self.num_experts > 1:
            per_layer += self.hidden_size * self.num_experts  # router
        return per_layer * self.num_layers

    def embedding_params(self) -> int:
        """Embedding plus lm_head (once when tied); kept in 16-bit even under 4-bit loading."""
        return self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)

    def norm_params(self) -> int:
        return (2 * self.num_layers + 1) * self.hidden_size

    def num_parameters(self) -> int:
        return self.linear_params() + self.embedding_params() + self.norm_params()


def _arch(h: int, layers: int, heads: int, kv: int, inter: int, vocab: int, tied: bool, name: str) -> Architecture:
    return Architecture(h, layers, heads, kv, inter, vocab, tied, name=name, source=f"typical {name} ({_NAMES[name]})")


# Real Llama 3.x / Llama 2 / Qwen2.5 dimensions (from their config.json files) for a size given as a string.
_NAMES = {
    "0.5B": "Qwen2.5-0.5B dims",
    "1B": "Llama-3.2-1B dims",
    "1.5B": "Qwen2.5-1.5B dims",
    "3B": "Llama-3.2-3B dims",
    "7B": "Llama-2-7B dims",
    "8B": "Llama-3.1-8B dims",
    "13B": "Llama-2-13B dims",
    "14B": "Qwen2.5-14B dims",
    "32B": "Qwen2.5-32B dims",
    "70B": "Llama-3.1-70B dims",
    "405B": "Llama-3.1-405B dims",
}
SIZE_TABLE: dict[str, Architecture] = {
    "0.5B": _arch(896, 24, 14, 2, 4864, 151936, True, "0.5B"),
    "1B": _arch(2048, 16, 32, 8, 8192, 128256, True, "1B"),
    "1.5B": _arch(1536, 28, 12, 2, 8960, 151936, True, "1.5B"),
    "3B": _arch(3072, 28, 24, 8, 8192, 128256, True, "3B"),
    "7B": _arch(4096, 32, 32, 32, 11008, 32000, False, "7B"),
    "8B": _arch(4096, 32, 32, 8, 14336, 128256, False, "8B"),
    "13B": _arch(5120, 40, 40, 40, 13824, 32000, False, "13B"),
    "14B": _arch(5120, 48, 40, 8, 13824, 152064, False, "14B"),
    "32B": _arch(5120, 64, 40, 8, 27648, 152064, False, "32B"),
    "70B": _arch(8192, 80, 64, 8, 28672, 128256, False, "70B"),
    "405B": _arch(16384, 126, 128, 8, 53248, 128256, False, "405B"),
}
#: Hub ids whose architecture each size stands for (used when `mgpu suggest --output` writes a recipe).
SIZE_HUB_IDS = {
    "0.5B": "unsloth/Qwen2.5-0.5B",
    "1B": "unsloth/Llama-3.2-1B",
    "1.5B": "unsloth/Qwen2.5-1.5B",
    "3B": "unsloth/Llama-3.2-3B",
    "7B": "unsloth/llama-2-7b",
    "8B": "unsloth/Meta-Llama-3.1-8B",
    "13B": "unsloth/llama-2-13b",
    "14B": "unsloth/Qwen2.5-14B",
    "32B": "unsloth/Qwen2.5-32B",
    "70B": "unsloth/Meta-Llama-3.1-70B",
    "405B": "unsloth/Meta-Llama-3.1-405B",
}

#: The memory-relevant fields of the config.json of the models the shipped recipes train (copied from their hub
#: repositories), so `mgpu suggest --model <that id>` sizes them exactly without the hub; a downloaded copy in the
#: Hugging Face cache is read first. Keys: the repository name, lower case, without the owner.
KNOWN_HUB_CONFIGS: dict[str, dict[str, Any]] = {
    "gemma-2-9b": {"hidden_size": 3584, "num_hidden_layers": 42, "num_attention_heads": 16, "num_key_value_heads": 8,
                   "head_dim": 256, "intermediate_size": 14336, "vocab_size": 256000, "tie_word_embeddings": True},
    "qwen2.5-7b": {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
                   "intermediate_size": 18944, "vocab_size": 152064, "tie_word_embeddings": False},
    "mistral-7b-v0.3": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                        "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32768,
                        "tie_word_embeddings": False},
    "meta-llama-3.1-8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                          "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
                          "tie_word_embeddings": False},
}  # fmt: skip

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*[bB]\s*$")
_SIZE_IN_NAME_RE = re.compile(r"(?<![\d.])(\d+(?:\.\d+)?)[bB](?![A-Za-z0-9])")


MAX_GPU_MEMORY = 4096 * GiB  # 2026's largest accelerators hold 288 GB; more is a unit mistake


def parse_memory(text: str | int | float, where: str = "argument --gpu-memory") -> int:
    """Parse a memory size such as `80GB`, `24 GiB`, `16000MB` or a plain number of GB into bytes.

    GB and GiB both mean 2**30 bytes here: GPU memory is sold as "80GB" but is 80 GiB. A plain number above 2**20
    (int, float or text) is a count of bytes.

    Raises:
        UserError: naming `where` when the text is not a positive size.
    """
    bad = UserError(
        Problem(where, f"expected a memory size like 80GB, 24GiB or 16000MB, found {text!r}"), "invalid arguments"
    )
    if isinstance(text, int | float) and not isinstance(text, bool):
        if not math.isfinite(text):
            raise bad
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*", str(text), flags=re.IGNORECASE)
        if not m:
            raise bad
        value, unit = float(m.group(1)), (m.group(2) or "").upper()
    # A plain number is GB, unless it is above 2**20: no GPU has a million GB, so that is a count of bytes.
    plain = not unit
    unit = unit or ("B" if value > 2**20 else "GB")
    scale = {"B": 1, "K": 1024, "M": MiB, "G": GiB, "T": 1024 * GiB}[unit[0]]
    nbytes = int(value * scale)
    if nbytes > MAX_GPU_MEMORY:  # 16000 meant as MB is 16,000 GB: a plan for that would run out of memory at once
        raise UserError(
            Problem(
                where,
                f"expected one GPU's memory (at most {MAX_GPU_MEMORY // GiB:,} GB), found {text!r} = "
                f"{nbytes / GiB:,.0f} GB",
                f"a plain number means GB: for megabytes write {value:.10g}MB"
                if plain
                else "give one GPU's memory, e.g. 80GB or 141GB",
            ),
            "invalid arguments",
        )
    if nbytes < 256 * MiB:
        raise UserError(
            Problem(
                where,
                f"expected at least 256MB of GPU memory, found {text!r}",
                "units: MB, GB (= GiB), TB; a plain number means GB (bytes above 2**20)",
            ),
            "invalid arguments",
        )
    return nbytes


def architecture_from_config(config: dict[str, Any], name: str = "", source: str = "") -> Architecture:
    """Read the memory-relevant dimensions from a transformers config.json mapping.

    Multimodal configs keep the language model under `text_config`; MoE configs name their experts
    `num_local_experts` (Mixtral) or `num_experts` (Qwen-MoE, OLMoE), with a per-expert
    `moe_intermediate_size` where it differs from the dense `intermediate_size`.

    Raises:
        ValueError: the config is not a mapping, or a dimension is missing or not a positive integer; the
            message names the field (`text_config.` first when it is read from there).
    """
    if not isinstance(config, dict):
        raise ValueError(f"expected a JSON object of model settings, found {type(config).__name__}")
    text = config.get("text_config")
    if text is not None and not isinstance(text, dict):
        raise ValueError(f"text_config: expected an object, found {type(text).__name__}")
    cfg, prefix = (text, "text_config.") if text else (config, "")

    def dim(key: str, required: bool = False) -> int | None:
        """A positive integer field; an optional one may also be absent, null or 0 (unset: the default applies)."""
        value = cfg.get(key)
        if value is None and not required:
            return None
        whole = isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer()
        if not whole or value < (1 if required else 0):
            raise ValueError(f"{prefix}{key}: expected a positive integer, found {json.dumps(value)}")
        return int(value)

    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise ValueError(f"config.json lacks {', '.join(prefix + k for k in missing)}")
    hidden, layers, heads, vocab = (
        dim(k, required=True) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    )
    experts = dim("num_local_experts") or dim("num_experts") or dim("n_routed_experts") or 1  # 0: dense
    inter = dim("moe_intermediate_size") if experts > 1 else None
    inter = inter or dim("intermediate_size") or 4 * hidden
    tied = cfg.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    return Architecture(
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=dim("num_key_value_heads") or heads,
        intermediate_size=inter,
        vocab_size=vocab,
        # transformers' Llama-family configs default to untied; untied is also the larger (safe) guess.
        tie_word_embeddings=bool(tied) if tied is not None else False,
        num_experts=experts,
        experts_per_token=(dim("num_experts_per_tok") or 1) if experts > 1 else 1,
        head_dim=dim("head_dim"),
        name=name,
        source=source,
    )


def _hf_hub_cache() -> Path:
    from .doctor import hf_cache_dir  # the doctor's reading: HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG

    return hf_cache_dir(os.environ)


def find_config(model: str) -> Path | None:
    """config.json of a local folder, a config.json path, or a hub id already in the Hugging Face cache."""
    p = Path(model).expanduser()
    if p.is_file() and p.name.endswith(".json"):
        return p
    if p.is_dir():
        return p / "config.json" if (p / "config.json").is_file() else None
    if re.fullmatch(r"[\w.\-]+/[\w.\-]+", model):
        snapshots = _hf_hub_cache() / f"models--{model.replace('/', '--')}" / "snapshots"
        found = sorted(snapshots.glob("*/config.json"), key=lambda q: q.stat().st_mtime, reverse=True)
        return found[0] if found else None
    return None


def model_family(model: str) -> str | None:
    """config.json's model_type of `model` (find_config's places), or None where there is no readable one."""
    config = find_config(model)
    try:
        return json.loads(config.read_text()).get("model_type") if config is not None else None
    except (OSError, ValueError, AttributeError):
        return None


#: Stand-in for builtin:tiny-llama (a small random Llama built by the engine); generous on purpose.
BUILTIN_ARCHITECTURES = {
    "builtin:tiny-llama": Architecture(
        256, 4, 8, 8, 1024, 32000, False, name="builtin:tiny-llama", source="builtin tiny model (upper bound)"
    ),
}


def resolve_architecture(model: str, where: str = "argument --model") -> Architecture:
    """Architecture for a size string (`8B`), a builtin model, a local folder / config.json, or a hub id (cached or
    sized by name).

    Raises:
        UserError: naming `where` when the model cannot be understood.
    """
    if model in BUILTIN_ARCHITECTURES:
        return BUILTIN_ARCHITECTURES[model]
    if not model.strip() or re.fullmatch(r"\s*\d+(\.\d+)?\s*", model):
        found = f"a number without its unit, {model!r}" if model.strip() else "an empty value"
        hint = (
            f"did you mean '{model.strip()}B'?" if model.strip() else f"e.g. 8B; known sizes: {', '.join(SIZE_TABLE)}"
        )
        raise UserError(
            Problem(where, f"expected a size such as 8B, a local folder or a hub id; found {found}", hint),
            "invalid arguments",
        )
    m = _SIZE_RE.match(model)
    if m:
        key = _size_key(m.group(1))
        if key not in SIZE_TABLE:
            raise UserError(
                Problem(
                    where,
                    f"unknown model size {model!r}",
                    f"known sizes: {', '.join(SIZE_TABLE)}; or give a local folder or a hub id",
                ),
                "invalid arguments",
            )
        return SIZE_TABLE[key]
    path = Path(model).expanduser()
    config_path = find_config(model)
    if config_path is not None:
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            return architecture_from_config(config, name=model, source=str(config_path))
        except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            hint = "point at a folder holding a transformers config.json, or give a size such as 8B"
            raise UserError(
                Problem(where, f"cannot read the architecture from {config_path}: {exc}", hint), "invalid arguments"
            ) from None
    if path.exists() or model.startswith((".", "/", "~")):
        found = f"no config.json in {path}" if path.exists() else f"no such file or folder: {path}"
        raise UserError(
            Problem(where, found, "point at the folder that holds the model's config.json"), "invalid arguments"
        )
    # A hub id not downloaded yet: one whose config we carry (the shipped recipes' models) ...
    known = KNOWN_HUB_CONFIGS.get(model.split("/")[-1].lower()) if "/" in model else None
    if known is not None:
        source = f"the config.json of {model.split('/')[-1]} built into unsloth-mgpu (not in the local cache)"
        return architecture_from_config(known, name=model, source=source)
    # ... else most names carry their size ("Llama-3.1-8B-Instruct"); use the table.
    sized = _SIZE_IN_NAME_RE.findall(model.split("/")[-1])
    if "/" in model and sized and _size_key(sized[-1]) in SIZE_TABLE:
        base = SIZE_TABLE[_size_key(sized[-1])]
        return Architecture(
            **{
                **asdict(base),
                "name": model,
                "source": f"{base.source}, from the size in the name ({model} is not in the local Hugging Face cache)",
            }
        )
    raise UserError(
        Problem(
            where,
            f"cannot tell the architecture of {model!r}",
            f"give a size ({', '.join(SIZE_TABLE)}), a local folder with config.json, or a hub id "
            "that is in the Hugging Face cache (hf download ID config.json)",
        ),
        "invalid arguments",
    )


def _size_key(number: str) -> str:
    value = float(number)
    return f"{int(value)}B" if value == int(value) else f"{value:g}B"


# --------------------------------------------------------------------------------------------------------
# The forecast
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrainingSetup:
    """What is trained, how, and on which GPU: everything the forecast depends on besides the architecture.

    Attributes:
        method: qlora (4-bit frozen base + LoRA), lora (16-bit frozen base + LoRA) or full.
        seq_len: tokens per sample (the worst case: every sample at model.max_seq_length).
        micro_batch_size: samples per GPU per forward pass.
        gradient_checkpointing: False (keep all activations), True (keep layer inputs, recompute),
            "unsloth" (layer inputs offloaded to CPU RAM, recompute).
        optimizer: adamw, adamw_8bit or sgd.
        lora_r: LoRA rank.
        target_modules: projections that get adapters.
        num_gpus: data-parallel replicas; more than one adds the gradient all-reduce buffer.
        gpu_memory_bytes: memory of one GPU (sizes Unsloth's cross-entropy chunks); None: assume plenty.
        tokens_per_sample: mean tokens per sample when batches are padding-free; None: seq_len.
        sgd_momentum: SGD keeps a momentum buffer.
        bucket_mb: all-reduce bucket size for full fine-tuning (distributed.bucket_size_mb).
        sharded: FSDP2 (distributed.strategy fsdp): weights, trainable parameters, gradients and optimizer
            state are split over num_gpus; the layers being computed are gathered in full (see `estimate`).
        dora: DoRA adapters (a magnitude per output feature, and PEFT's unfused layer's activations).
    """

    method: Method = "lora"
    seq_len: int = 2048
    micro_batch_size: int = 1
    gradient_checkpointing: Checkpointing = "unsloth"
    optimizer: str = "adamw_8bit"
    lora_r: int = 16
    target_modules: tuple[str, ...] = DEFAULT_TARGET_MODULES
    num_gpus: int = 1
    gpu_memory_bytes: int | None = None
    tokens_per_sample: float | None = None
    sgd_momentum: bool = False
    bucket_mb: float = 25.0
    sharded: bool = False
    dora: bool = False

    @property
    def tokens(self) -> int:
        """Tokens in one micro-batch."""
        per = self.tokens_per_sample if self.tokens_per_sample is not None else self.seq_len
        return max(1, math.ceil(self.micro_batch_size * min(per, self.seq_len)))


@dataclass
class MemoryBreakdown:
    """The forecast for one GPU, one term per component, in bytes.

    The peak is `static + activations_kept + max(loss_chunk, layer_backward)`: the loss is computed
    after the last layer's forward, and its chunk buffers are gone before the layers' backward starts,
    so only the larger of the two transients counts. `allocator_overhead` and `cuda_context` are added
    to get what the GPU must hold (nvidia-smi); `allocated` is what torch.cuda.max_memory_allocated sees.
    """

    weights: int
    trainable_params: int
    gradients: int
    allreduce_buffer: int
    optimizer_states: int
    activations_kept: int
    layer_backward: int
    loss_chunk: int
    cuda_context: int
    gathered: int = 0
    host_offload: int = 0
    method: str = "lora"
    num_trainable: int = 0
    num_params: int = 0
    loss_chunks: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def static(self) -> int:
        return (
            self.weights
            + self.trainable_params
            + self.gradients
            + self.allreduce_buffer
            + self.optimizer_states
            + self.gathered
        )

    @property
    def peak_phase(self) -> str:
        return "loss" if self.loss_chunk >= self.layer_backward else "backward"

    @property
    def allocated(self) -> int:
        """Peak bytes in live tensors (torch.cuda.max_memory_allocated)."""
        return self.static + self.activations_kept + max(self.loss_chunk, self.layer_backward)

    @property
    def allocator_overhead(self) -> int:
        return int(self.allocated * ALLOCATOR_OVERHEAD)

    @property
    def reserved(self) -> int:
        """Peak bytes the caching allocator holds (torch.cuda.max_memory_reserved)."""
        return self.allocated + self.allocator_overhead

    @property
    def peak(self) -> int:
        """Peak GPU memory of the process (nvidia-smi): reserved plus the CUDA context."""
        return self.reserved + self.cuda_context

    @property
    def peak_gb(self) -> float:
        return self.peak / GiB

    def rows(self) -> list[tuple[str, int, str]]:
        """(component, bytes, what it is) in display order; the two transients say which one counts."""
        counts = self.peak_phase
        return [
            (
                "weights",
                self.weights,
                {
                    "qlora": "4-bit NF4 linears + 16-bit embeddings, lm_head, norms",
                    "lora": "frozen 16-bit base model",
                    "full": "16-bit, trained in place",
                }.get(self.method, ""),
            ),
            ("trainable parameters", self.trainable_params, f"{self.num_trainable:,} parameters"),
            ("gradients", self.gradients, "one per trainable parameter"),
            ("all-reduce buffer", self.allreduce_buffer, "full fine-tune on >1 GPU: fp32 buckets; 0 for LoRA (views)"),
            ("optimizer states", self.optimizer_states, "AdamW moments / 8-bit states / SGD momentum"),
            ("gathered (fsdp)", self.gathered, "unsharded root + 2 layers (current, prefetched); 0 under ddp"),
            ("activations kept", self.activations_kept, "saved for backward across all layers"),
            (
                "layer backward" + (" (peak)" if counts == "backward" else ""),
                self.layer_backward,
                "one layer recomputed + its gradient workspace",
            ),
            (
                "loss chunk" + (" (peak)" if counts == "loss" else ""),
                self.loss_chunk,
                f"fused cross-entropy, {self.loss_chunks} chunk(s)",
            ),
            ("allocator overhead", self.allocator_overhead, f"{ALLOCATOR_OVERHEAD:.0%} of allocated"),
            ("CUDA context", self.cuda_context, "driver, kernels, library handles"),
        ]

    def to_dict(self) -> dict[str, Any]:
        gb = {
            name: round(b / GiB, 3)
            for name, b in (
                ("weights", self.weights),
                ("trainable_params", self.trainable_params),
                ("gradients", self.gradients),
                ("allreduce_buffer", self.allreduce_buffer),
                ("optimizer_states", self.optimizer_states),
                ("gathered", self.gathered),
                ("activations_kept", self.activations_kept),
                ("layer_backward", self.layer_backward),
                ("loss_chunk", self.loss_chunk),
                ("allocator_overhead", self.allocator_overhead),
                ("cuda_context", self.cuda_context),
                ("host_offload", self.host_offload),
            )
        }
        return {
            "components_gb": gb,
            "peak_phase": self.peak_phase,
            "allocated_gb": round(self.allocated / GiB, 3),
            "reserved_gb": round(self.reserved / GiB, 3),
            "peak_gb": round(self.peak_gb, 3),
            "num_trainable": self.num_trainable,
            "num_params": self.num_params,
            "loss_chunks": self.loss_chunks,
            "notes": list(self.notes),
        }


def activation_bytes_per_token_layer(arch: Architecture, method: Method, dtype_bytes: int = 2) -> int:
    """Bytes one token leaves saved for backward in one decoder layer (16-bit activations).

    With LoRA, Unsloth's fused kernels save: the layer input and the post-attention residual (the two
    RMSNorm inputs, 2h), the normed inputs of the QKV and MLP LoRA kernels (2h), attention's q, k, v and
    output (SDPA/flash save O(tokens), never a seq x seq matrix: 2q + 2kv; the output doubles as the
    o_proj input), and the MLP's gate and up outputs (2I; SwiGLU is recomputed in backward): with
    q = h, 6h + 2kv + 2I. Full
    fine-tuning runs the stock MLP, which also keeps silu(gate) and the product fed to down_proj (+2I).
    MoE layers run each token through `experts_per_token` experts.
    """
    h, kv = arch.hidden_size, arch.kv_dim
    inter = arch.intermediate_size * arch.experts_per_token
    mlp = 4 * inter if method == "full" else 2 * inter
    return dtype_bytes * (4 * h + 2 * arch.q_dim + 2 * kv + mlp)


def lora_params(arch: Architecture, r: int, target_modules: tuple[str, ...] | list[str]) -> int:
    """LoRA A (r x in) and B (out x r) for every targeted projection of every layer (and expert)."""
    shapes = arch.module_shapes()
    per_layer = sum(r * (shapes[m][0] + shapes[m][1]) * shapes[m][2] for m in target_modules if m in shapes)
    return per_layer * arch.num_layers


def dora_outputs(arch: Architecture, target_modules: tuple[str, ...] | list[str], per_token: bool = True) -> int:
    """Output features of the adapted projections of one layer: DoRA's magnitudes (every expert's copy), or what
    one token runs through (`per_token`: the experts it is routed to)."""
    shapes = arch.module_shapes()
    return sum(
        out * (min(n, arch.experts_per_token) if per_token else n)
        for m, (_, out, n) in shapes.items()
        if m in target_modules
    )


def _optimizer_bytes_per_param(optimizer: str, param_bytes: int, sgd_momentum: bool) -> float:
    if optimizer == "adamw":
        return 2 * param_bytes  # torch AdamW: exp_avg and exp_avg_sq in the parameter's dtype
    if optimizer == "adamw_8bit":
        return ADAMW_8BIT_BYTES_PER_PARAM
    if optimizer == "sgd":
        return param_bytes if sgd_momentum else 0
    raise ValueError(f"unknown optimizer {optimizer!r}; expected adamw, adamw_8bit or sgd")


def loss_chunk_bytes(tokens: int, arch: Architecture, free_bytes: int | None) -> tuple[int, int]:
    """Transient bytes of Unsloth's fused, chunked cross-entropy and the number of chunks.

    Mirrors unsloth_zoo's `get_chunk_size`: the budget is min(half the free memory at the first forward,
    4 GiB); one chunk when everything fits, else a multiple of four chunks. The gradient of the final
    hidden states (computed in the forward, 16-bit) is added.
    """
    total = tokens * arch.vocab_size * CE_BUDGET_BYTES_PER_LOGIT
    # No free memory left means the setting does not fit anyway; size the chunks as on a GPU where it would.
    target = CE_TARGET_CAP_BYTES if not free_bytes or free_bytes <= 0 else min(free_bytes // 2, CE_TARGET_CAP_BYTES)
    target = max(target, MiB)
    exact = total / target
    chunks = 1 if exact <= 1 else min(math.ceil(exact / 4) * 4, tokens)
    per_chunk_tokens = math.ceil(tokens / chunks)
    return per_chunk_tokens * arch.vocab_size * CE_BYTES_PER_LOGIT + tokens * arch.hidden_size * 2, chunks


def estimate(arch: Architecture, setup: TrainingSetup) -> MemoryBreakdown:
    """Forecast the peak memory of one GPU (one data-parallel replica) for one training step.

    Args:
        arch: the model's dimensions.
        setup: method, sequence length, micro-batch, checkpointing, optimizer, GPUs.

    Returns:
        A breakdown whose `peak` is what the GPU must hold, `allocated` what torch reports.
    """
    if setup.method not in METHODS:
        raise ValueError(f"unknown method {setup.method!r}")
    notes: list[str] = []
    n_linear, n_embed, n_norm = arch.linear_params(), arch.embedding_params(), arch.norm_params()
    n_all = n_linear + n_embed + n_norm
    if setup.method == "qlora":
        weights = int(n_linear * NF4_BYTES_PER_PARAM) + 2 * (n_embed + n_norm)
    else:
        weights = 2 * n_all

    if setup.method == "full":
        # bf16 parameters train in place: weights are the trainable parameters, gradients 16-bit too; the
        # all-reduce goes through fp32 buckets rather than one flattened copy of every gradient.
        n_train = n_all
        trainable, grads = 0, 2 * n_train
        optim = int(n_train * _optimizer_bytes_per_param(setup.optimizer, 2, setup.sgd_momentum))
        reduce_buf = int(2 * setup.bucket_mb * MiB) if setup.num_gpus > 1 else 0
    else:
        # PEFT creates adapters in fp32 (autocast_adapter_dtype=True, which Unsloth keeps).
        n_train = lora_params(arch, setup.lora_r, setup.target_modules)
        if setup.dora:
            n_train += dora_outputs(arch, setup.target_modules, per_token=False) * arch.num_layers
        trainable, grads = 4 * n_train, 4 * n_train
        optim = int(n_train * _optimizer_bytes_per_param(setup.optimizer, 4, setup.sgd_momentum))
        reduce_buf = 0  # fp32 gradients are views into the all-reduce buckets (GradientSynchronizer)

    tokens = setup.tokens
    per_layer = tokens * activation_bytes_per_token_layer(arch, setup.method)
    if setup.dora and setup.method != "full":
        per_layer += tokens * DORA_BYTES_PER_OUTPUT * dora_outputs(arch, setup.target_modules)
    hidden_state = tokens * arch.hidden_size * 2
    inter = arch.intermediate_size * arch.experts_per_token
    # Backward of one layer: the gradients of its widest tensors (gate/up outputs) and of its input/output.
    workspace = tokens * 2 * (2 * inter + 2 * arch.hidden_size) + tokens * 4 * BACKWARD_FP32_HIDDEN_COPIES * (
        arch.hidden_size
    )
    host = 0
    ckpt = setup.gradient_checkpointing
    if ckpt is False:
        kept, layer_bwd = arch.num_layers * per_layer, workspace
    elif ckpt is True:
        kept, layer_bwd = arch.num_layers * hidden_state, per_layer + workspace
    elif ckpt == "unsloth":
        kept, layer_bwd = OFFLOAD_GPU_BUFFERS * hidden_state, per_layer + workspace
        host = arch.num_layers * hidden_state
        notes.append(f"{host / GiB:.2f} GiB of layer inputs offloaded to pinned CPU memory")
    else:
        raise ValueError(f"unknown gradient_checkpointing {ckpt!r}")

    gathered = 0
    if setup.sharded and setup.num_gpus > 1:
        weights, trainable, grads, optim, reduce_buf, gathered = _shard(arch, setup, weights, trainable, grads, optim)
        notes.append(
            f"sharded over {setup.num_gpus} GPUs (fsdp): weights, gradients and optimizer state / "
            f"{setup.num_gpus}, plus {gathered / GiB:.2f} GiB gathered at a time"
        )
    gpu = setup.gpu_memory_bytes
    free_at_loss = None if gpu is None else gpu - CUDA_CONTEXT_BYTES - weights - trainable - optim - kept - gathered
    loss, chunks = loss_chunk_bytes(tokens, arch, free_at_loss)
    return MemoryBreakdown(
        weights=weights,
        trainable_params=trainable,
        gradients=grads,
        allreduce_buffer=reduce_buf,
        optimizer_states=optim,
        activations_kept=kept,
        layer_backward=layer_bwd,
        loss_chunk=loss,
        cuda_context=CUDA_CONTEXT_BYTES,
        gathered=gathered,
        host_offload=host,
        method=setup.method,
        num_trainable=n_train,
        num_params=n_all,
        loss_chunks=chunks,
        notes=notes,
    )


def _shard(
    arch: Architecture, setup: TrainingSetup, weights: int, trainable: int, grads: int, optim: int
) -> tuple[int, int, int, int, int, int]:
    """Per-GPU (weights, trainable, gradients, optimizer, reduce buffer, gathered) under FSDP2.

    `fully_shard` per decoder layer, then the root (engine: distributed.shard_model). Each GPU keeps 1/N of
    every parameter, gradient and optimizer state (the AdamW states follow the sharded parameters). At a time
    it also holds in full: the root unit's parameters (embeddings, final norm, lm_head), which FSDP2 keeps
    gathered from the root's forward to its backward, and two decoder layers (the one computing and the one
    prefetched), with, in backward, their unsharded gradients waiting for the reduce-scatter (16-bit for full
    fine-tuning, fp32 adapters for LoRA). Nothing is all-reduced: no bucket buffer. QLoRA gathers 4-bit layers
    and adds one dequantised 16-bit weight (the largest projection) per matmul.
    """
    n = setup.num_gpus
    layers = max(1, arch.num_layers)
    per_layer_params = (arch.linear_params() + arch.norm_params()) / layers
    root_bytes = 2 * arch.embedding_params()
    dequantised = 0
    if setup.method == "qlora":
        # NF4 shards (torchao, engine: quantization.py; about the size of bitsandbytes' NF4): the all-gather moves
        # 4-bit bytes, and each matmul dequantises one whole weight to 16-bit for its duration (the largest one).
        layer_weight_bytes = arch.linear_params() / layers * NF4_BYTES_PER_PARAM + 2 * arch.norm_params() / layers
        dequantised = 2 * arch.hidden_size * arch.intermediate_size
    else:
        layer_weight_bytes = 2 * per_layer_params
    if setup.method == "full":
        layer_grad_bytes = 2 * per_layer_params
    else:
        layer_grad_bytes = 4 * lora_params(arch, setup.lora_r, setup.target_modules) / max(1, arch.num_layers)
    gathered = int(root_bytes + 2 * (layer_weight_bytes + layer_grad_bytes) + dequantised)
    return (
        math.ceil(weights / n),
        math.ceil(trainable / n),
        math.ceil(grads / n),
        math.ceil(optim / n),
        0,
        gathered,
    )
