"""The recipe: a pydantic model per YAML section, the single source of truth for keys, types and rules.

Loading goes: YAML text (safe loader, line numbers kept) -> optional `base:` recipe merged under it ->
command-line `key=value` overrides -> `${...}` interpolation (omegaconf) -> pydantic validation. Every
problem found is reported at once, each with the dotted key and, where known, `file:line`.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import Problem, UserError, read_utf8

BUILTIN_MODELS = ("builtin:tiny-llama",)
AUTO = "auto"
# Names a dataset.columns mapping may rename, per format (the target is the column in the user's data).
FORMAT_COLUMNS = {
    "alpaca": ("instruction", "input", "output"),
    "chat": ("messages", "role", "content"),
    "text": ("text",),
}
DEFAULT_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CHAT_TEMPLATE_NAMES = ("chatml", "llama3", "zephyr")  # data.NAMED_CHAT_TEMPLATES' keys


def _chat_template_name(value: Any) -> Any:
    """A named chat template must be one there is (a Jinja template holds `{`): refused at validation, not at the
    first `mgpu prepare`; the case of a name is forgiven (`ChatML`)."""
    if not isinstance(value, str) or "{" in value:
        return value
    if value.lower() in CHAT_TEMPLATE_NAMES:
        return value.lower()
    close = difflib.get_close_matches(value.lower(), CHAT_TEMPLATE_NAMES, n=1, cutoff=0.5)
    raise ValueError(
        f"unknown template name {value!r}: expected {', '.join(CHAT_TEMPLATE_NAMES)}, or a Jinja template"
        + (f" (did you mean {close[0]!r}?)" if close else "; leave it out to use the tokenizer's own template")
    )


ChatTemplate = Annotated[str | None, AfterValidator(_chat_template_name)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, use_attribute_docstrings=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_for_a_number(cls, value: Any, info: Any) -> Any:
        # pydantic reads true/false as 1/0 for a number field: `lora.r=true` would silently train rank 1.
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and _mentions(annotation, (int, float)) and not _mentions(annotation, (bool, Any)):
            raise ValueError(
                f"expected a number, found the boolean {str(value).lower()} (so are yes/no and on/off in YAML)"
            )
        return value


def _mentions(annotation: Any, types: tuple[Any, ...]) -> bool:
    """Whether a field's type is, or is a union/list holding, one of `types`."""
    import typing

    return annotation in types or any(_mentions(a, types) for a in typing.get_args(annotation))


class ModelSection(_Section):
    """Which model to fine-tune and how to load it."""

    name: str = Field(
        description="Hub id (e.g. meta-llama/Llama-3.1-8B), local folder, or builtin:tiny-llama "
        "(a small random Llama built locally, for demos and tests).",
        min_length=1,
    )
    max_seq_length: int = Field(2048, ge=16, le=1_048_576, description="Longest sequence in tokens.")
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype; auto picks bfloat16 where the GPU supports it, float32 on CPU."
    )
    load_in_4bit: bool = Field(
        False,
        description="Quantise the frozen weights to 4-bit NF4 (QLoRA): bitsandbytes on CUDA under "
        "distributed.strategy ddp; torchao NF4 tensors, sharded with the rest, under fsdp (which also runs on CPU).",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with a hub repository. Off unless you trust the repository."
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) to load.")
    attention: Literal["auto", "flash", "efficient", "cudnn", "math", "pytorch"] = Field(
        "auto",
        description="PyTorch attention kernels (scaled_dot_product_attention, which Unsloth runs when neither "
        "flash-attn nor xformers is installed): auto: on CUDA PyTorch's order without cuDNN (flash, then "
        "memory-efficient, then math), since cuDNN builds a kernel plan on the host for every new batch shape; "
        "flash, efficient, cudnn, math: only that kernel; pytorch: PyTorch's own order (cuDNN first on Hopper).",
    )


class LoraSection(_Section):
    """LoRA adapter settings; `lora: null` for full fine-tuning (without the section, the default LoRA)."""

    r: int = Field(16, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=4096, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TARGET_MODULES),
        min_length=1,
        description="Names of the linear layers that get adapters.",
    )
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    use_dora: bool = Field(
        False,
        description="DoRA (weight-decomposed LoRA): a trained magnitude per output feature on top of LoRA's "
        "direction; slower than LoRA (no fused LoRA kernels).",
    )
    init_from: str | None = Field(
        None,
        description="Start from a trained adapter (its folder, or the output.dir of the run that wrote it) instead of "
        "LoRA's fresh start: a second stage of fine-tuning, with a fresh optimizer and schedule. Its r, alpha, "
        "target_modules, use_rslora and use_dora must be this section's.",
    )
    loraplus_lr_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1024.0,
        description="LoRA+: LoRA's B matrices (and 1-D parameters such as DoRA's magnitudes) learn at this multiple "
        "of training.learning_rate, as PEFT's create_loraplus_optimizer groups them (the paper suggests 16); null: "
        "one rate for all.",
    )

    @field_validator("target_modules", mode="before")
    @classmethod
    def _all_linear(cls, value: Any) -> Any:
        # peft's "all-linear": every linear layer but the output head, the seven projections of these families
        if value == "all-linear" or value == ["all-linear"]:
            return list(DEFAULT_TARGET_MODULES)
        return value


DatasetFormat = Literal["alpaca", "chat", "text"]


class MixSource(_Section):
    """One source of a weighted mix (`dataset.mix`); fields left out take the dataset section's values."""

    path: str = Field(
        min_length=1,
        description="Local .json/.jsonl/.csv/.parquet file or folder (relative to the recipe) or a hub dataset id.",
    )
    weight: float = Field(
        1.0,
        gt=0.0,
        allow_inf_nan=False,
        description="Relative share of the mixed samples: round(N x weight / sum of weights) of the N samples come "
        "from this source (a source smaller than its share is upsampled).",
    )
    format: DatasetFormat | None = Field(
        None, description="alpaca, chat or text for this source; default: dataset.format."
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Column renames for this source (as dataset.columns); default: dataset.columns; {} for none.",
    )
    split: str | None = Field(None, description="Split of a hub dataset or dataset folder; default: dataset.split.")
    chat_template: ChatTemplate = Field(
        None, description="Chat template for a chat source (as dataset.chat_template); default: dataset.chat_template."
    )


@dataclass(frozen=True)
class DataSource:
    """One source of the training data with every setting resolved (`DatasetSection.sources()`)."""

    key: str  # dotted recipe key of the source: `dataset` or `dataset.mix.<i>`
    weight: float
    section: DatasetSection  # a single-path dataset section carrying this source's path, format, columns, ...
    own: frozenset[str] = frozenset()  # fields set on the mix entry itself (errors name them there)

    def key_of(self, name: str) -> str:
        """The dotted key a person edits to change `name` for this source."""
        return f"{self.key}.{name}" if name in self.own else f"dataset.{name}"


class DatasetSection(_Section):
    """Training data."""

    path: str | None = Field(
        None,
        min_length=1,
        description="Local .json/.jsonl/.csv/.parquet file or folder (relative to the recipe) or a hub dataset id; "
        "exclusive with dataset.mix.",
    )
    mix: list[MixSource] | None = Field(
        None,
        min_length=1,
        description="Several sources mixed by weight instead of dataset.path: N samples in all (dataset.max_samples, "
        "or the sum of the sources' rows), round(N x weight / sum of weights) from each, drawn once at prepare "
        "time (seeded by training.seed).",
    )
    format: DatasetFormat = Field(
        "alpaca",
        description="alpaca: instruction/input/output; chat: a messages list; text: raw text (the default of each "
        "dataset.mix source).",
    )
    split: str = Field("train", description="Split to read from a hub dataset or a dataset folder.")
    train_on_responses_only: bool | None = Field(
        None, description="Compute the loss on responses only; default: true for alpaca and chat, false for text."
    )
    max_samples: int | None = Field(
        None,
        ge=1,
        description="Use at most this many training samples (after shuffling; dataset.eval_path is not limited); "
        "with dataset.mix, exactly this many mixed samples (sources are up- or downsampled to it).",
    )
    too_long: Literal["truncate", "drop"] = Field(
        "truncate", description="What to do with samples longer than model.max_seq_length; always reported."
    )
    shuffle: bool = Field(True, description="Shuffle the samples each epoch (seeded by training.seed).")
    eval_path: str | None = Field(
        None,
        description="Evaluation file in the same format as dataset.path (relative to the recipe); "
        "exclusive with dataset.eval_ratio.",
    )
    eval_ratio: float | None = Field(
        None,
        gt=0.0,
        le=0.5,
        description="Hold out this share of the samples for evaluation (chosen by training.seed, never trained on); "
        "exclusive with dataset.eval_path.",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Rename source columns to the format's names, e.g. {instruction: question, output: answer}; "
        "alpaca: instruction/input/output, chat: messages/role/content, text: text.",
    )
    chat_template: ChatTemplate = Field(
        None,
        description="chat format: a named template (chatml, llama3, zephyr) or a Jinja template; default: the "
        "tokenizer's own.",
    )
    system_prompt: str | None = Field(
        None,
        min_length=1,
        description="chat format: a system message put before every conversation that starts without one "
        "(axolotl's default_system_message); `mgpu generate` prompts with it too.",
    )
    batching: Literal["auto", "padded", "balanced", "packed"] = Field(
        "auto",
        description="How a step's samples go to ranks and micro-batches: padded (in order, padded per micro-batch), "
        "balanced (sorted by length, tokens balanced across ranks), packed (balanced, each micro-batch one "
        "sequence without padding, of up to micro_batch_size x model.max_seq_length tokens, so short samples share "
        "a forward; attention never crosses samples). auto: packed where a variable-length "
        "attention kernel attends a packed row in one call (CUDA, compute capability 8.0+, flash-attn or "
        "torch 2.12+), else balanced.",
    )
    pad_to_multiple_of: int = Field(
        8,
        ge=1,
        le=4096,
        description="Pad each padded micro-batch's length up to a multiple of this; 1: to the longest sample. "
        "8 (the default) keeps every width aligned for the GPU kernels: unaligned and aligned widths compile "
        "different torch.compile graphs (a few seconds each); larger values mean fewer distinct shapes. Packed "
        "micro-batches are never padded.",
    )
    num_proc: int | Literal["auto"] = Field(
        "auto", description="Tokenizer processes in the parent; auto: one for small data, up to 8 for large."
    )

    @field_validator("num_proc")
    @classmethod
    def _num_proc(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError(f"expected 1 to 256 processes or 'auto', found {v}")
        return v

    @model_validator(mode="after")
    def _check(self) -> DatasetSection:
        problems: list[tuple[str, str]] = []
        if self.path is None and self.mix is None:
            problems.append(("dataset.path", "required key is missing: give dataset.path, or dataset.mix (weighted)"))
        elif self.path is not None and self.mix is not None:
            problems.append(
                ("dataset.mix", "give either dataset.path (one source) or dataset.mix (several sources), not both")
            )
        problems += _unknown_columns("dataset.columns", self.columns, self.format)
        for i, src in enumerate(self.mix or []):
            fmt = src.format or self.format
            if src.columns is not None:
                problems += _unknown_columns(f"dataset.mix.{i}.columns", src.columns, fmt)
            elif any(k not in FORMAT_COLUMNS[fmt] for k in self.columns):
                problems.append(
                    (
                        f"dataset.mix.{i}.columns",
                        f"this {fmt} source would take dataset.columns ({', '.join(self.columns)}), which are not "
                        f"{fmt} column names; give the source its own columns ({{}} for none)",
                    )
                )
        if problems:
            raise ValueError("\n".join(f"@{k}@ {m}" for k, m in problems))
        return self

    def sources(self) -> list[DataSource]:
        """Every source with its settings resolved: one for dataset.path, one per entry of dataset.mix."""
        if self.mix is None:
            return [DataSource("dataset", 1.0, self)]
        out = []
        for i, src in enumerate(self.mix):
            own = src.model_fields_set & {"format", "columns", "split", "chat_template"}
            section = self.model_copy(
                update={
                    "path": src.path,
                    "mix": None,
                    "format": src.format or self.format,
                    "columns": dict(src.columns if src.columns is not None else self.columns),
                    "split": src.split if src.split is not None else self.split,
                    "chat_template": src.chat_template if src.chat_template is not None else self.chat_template,
                    "max_samples": None,  # applies to the mixed total, not to each source
                    "eval_path": None,
                    "eval_ratio": None,
                }
            )
            out.append(DataSource(f"dataset.mix.{i}", src.weight, section, frozenset(own)))
        return out

    def responses_only(self) -> bool:
        """dataset.train_on_responses_only, defaulting by this section's format."""
        flag = self.train_on_responses_only
        return flag if flag is not None else self.format in ("alpaca", "chat")


def _unknown_columns(key: str, columns: dict[str, str], fmt: str) -> list[tuple[str, str]]:
    valid = FORMAT_COLUMNS[fmt]
    return [
        (f"{key}.{k}", f"unknown column name for format {fmt}; expected one of {', '.join(valid)}")
        for k in columns
        if k not in valid
    ]


class TrainingSection(_Section):
    """The optimisation loop."""

    epochs: int | float = Field(
        1,
        gt=0,
        le=1000,
        description="Passes over the data; a fraction ends within a pass (1.5: one and a half, the steps rounded "
        "up as transformers rounds them); training.max_steps overrides it.",
    )
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps (overrides epochs).")
    micro_batch_size: int | Literal["auto"] = Field(
        2,
        description="Samples per GPU per forward pass (packed batching: a forward holds up to this x "
        "model.max_seq_length tokens); auto lets the config generator choose.",
    )
    gradient_accumulation_steps: int | Literal["auto"] = Field(
        1, description="Micro-batches per GPU accumulated into one optimizer step; auto lets the generator choose."
    )
    learning_rate: float = Field(2.0e-4, gt=0.0, le=1.0, description="Peak learning rate.")
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = Field(
        "adamw_8bit", description="adamw (torch), adamw_8bit (bitsandbytes, also on CPU), sgd."
    )
    weight_decay: float = Field(0.0, ge=0.0, le=1.0, description="Decoupled weight decay.")
    adam_beta1: float | None = Field(
        None, ge=0.0, lt=1.0, description="adamw / adamw_8bit: the first moment's decay; null: 0.9."
    )
    adam_beta2: float | None = Field(
        None, ge=0.0, lt=1.0, description="adamw / adamw_8bit: the second moment's decay; null: 0.999."
    )
    adam_epsilon: float | None = Field(
        None, gt=0.0, le=1.0, description="adamw / adamw_8bit: added to the denominator; null: 1e-8."
    )
    lr_scheduler: Literal[
        "constant", "linear", "cosine", "cosine_with_restarts", "inverse_sqrt", "warmup_stable_decay"
    ] = Field(
        "cosine",
        description="Learning-rate schedule after warmup (transformers' schedules): constant, linear or cosine "
        "to 0, cosine_with_restarts (training.lr_cycles hard restarts), inverse_sqrt (1/sqrt(step) after warmup), "
        "warmup_stable_decay (flat, then a cosine decay over training.decay_ratio of the steps).",
    )
    warmup_steps: int = Field(0, ge=0, description="Linear warmup steps (or training.warmup_ratio).")
    warmup_ratio: float | None = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="Linear warmup over this fraction of the run's optimizer steps, rounded up as transformers "
        "rounds it; instead of training.warmup_steps.",
    )
    min_lr_ratio: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="cosine and warmup_stable_decay: decay to this fraction of training.learning_rate instead of "
        "to 0 (axolotl's cosine_min_lr_ratio).",
    )
    lr_cycles: int = Field(
        1, ge=1, le=1000, description="cosine_with_restarts: cosine cycles, each restarting at the peak rate."
    )
    decay_ratio: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="warmup_stable_decay: the last fraction of the run's steps over which the rate decays "
        "(rounded up); null: 0.1.",
    )
    max_grad_norm: float | None = Field(
        1.0, gt=0.0, description="Clip the synchronised global gradient norm to this; null disables."
    )
    neftune_noise_alpha: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="NEFTune: uniform noise on the input embeddings while training, scaled by this alpha over "
        "sqrt(sample tokens x hidden size) (the paper uses 5 to 15); null: none. Each sample's noise is seeded by "
        "the seed, step and sample, so N GPUs still equal one.",
    )
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for initialisation and data order.")
    max_skipped_steps: int = Field(
        10,
        ge=1,
        description="Stop when this many optimizer steps in a row are skipped for a non-finite loss or "
        "gradient (they are skipped on all ranks together).",
    )
    eval_steps: int = Field(
        0,
        ge=0,
        description="Evaluate every N optimizer steps and at the end (needs an eval split); 0: only at the end.",
    )

    early_stopping_patience: int | None = Field(
        None,
        ge=1,
        description="Stop when the eval loss has not improved (by more than training.early_stopping_threshold) "
        "for this many evaluations in a row; needs training.eval_steps and an eval split. The adapter is the last "
        "step's; the summary names the best evaluation's step.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0.0, description="The least decrease of the eval loss that counts as an improvement."
    )

    @field_validator("micro_batch_size", "gradient_accumulation_steps")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 65536:
            raise ValueError(f"expected an integer from 1 to 65536 or 'auto', found {v}")
        return v


class DistributedSection(_Section):
    """How many workers, where, and how their gradients are combined."""

    num_gpus: int | Literal["auto"] = Field(
        "auto",
        description="Worker processes per host (node), one per GPU; on device=cpu, CPU worker processes. auto: all "
        "GPUs of the host. The global batch counts the workers of every node.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto: cuda when a GPU is present, else cpu.")
    aggregation: Literal["mean", "sum", "weighted", "median"] = Field(
        "weighted",
        description="How rank gradients combine: weighted (by loss tokens: equals one big batch exactly, as "
        "transformers' Trainer averages tokens across devices), mean (of the ranks' token means), sum, median "
        "(coordinate-wise).",
    )
    strategy: Literal["ddp", "fsdp", "auto"] = Field(
        "ddp",
        description="ddp: every GPU holds a full replica (data parallelism); fsdp: parameters, gradients and "
        "optimizer state are sharded across the GPUs (PyTorch FSDP2), for models whose replica does not fit one "
        "GPU; auto: fsdp only when the memory forecast says a replica does not fit (see docs/sharded.md).",
    )
    verify_every: int = Field(
        50, ge=0, description="Compare checksums of the trainable weights across ranks every N steps; 0 disables."
    )
    balance_speed: bool | Literal["auto"] = Field(
        "auto",
        description="Give a rank whose device runs persistently slower (a GPU held back by its power cap) fewer "
        "tokens, from the measured time of each rank's micro-batches, so that ranks finish their steps together. "
        "Needs aggregation: weighted (the update then does not depend on which rank trains which sample) and "
        "balanced or packed batching. auto: on for GPUs under ddp with those settings.",
    )
    bucket_size_mb: float = Field(25.0, gt=0.0, le=4096.0, description="Gradient all-reduce bucket size (fp32 MB).")
    timeout_seconds: int = Field(
        1800, ge=10, description="A collective waiting longer than this is an error (hang watchdog)."
    )
    nnodes: int = Field(1, ge=1, description="Number of hosts; each runs the same mgpu train command.")
    node_rank: int = Field(0, ge=0, description="This host's index among nnodes.")
    rdzv_endpoint: str | None = Field(
        None, description="HOST:PORT of the rendezvous (node 0) when nnodes > 1; single-node runs use loopback."
    )
    max_restarts: int = Field(0, ge=0, le=100, description="Restart all workers from the last checkpoint on failure.")
    join_timeout_seconds: int = Field(
        600,
        ge=10,
        le=86_400,
        description="nnodes > 1: how long the nodes wait at the rendezvous for each other before they give up "
        "(torchrun's join_timeout).",
    )

    @field_validator("num_gpus")
    @classmethod
    def _num_gpus(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= 1024:
            raise ValueError(f"expected a number of workers from 1 to 1024 or 'auto', found {v}")
        return v

    @field_validator("rdzv_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        from .distributed import check_endpoint  # one rule for the recipe key and --rdzv-endpoint

        problems = check_endpoint(v, "distributed.rdzv_endpoint") if v is not None else []
        if problems:
            raise ValueError(problems[0].message)
        return v


class MemorySection(_Section):
    """Memory limits and the trade-offs the config generator may make."""

    max_memory_fraction: float = Field(
        0.9, gt=0.0, le=1.0, description="Plan to use at most this share of each GPU's memory."
    )
    gradient_checkpointing: bool | Literal["auto", "unsloth"] = Field(
        "auto",
        description="Recompute activations: false (fastest), true, unsloth (offloaded, least memory), "
        "auto (off when it fits).",
    )


_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")


class PushSection(_Section):
    """output.push_to_hub: one artifact of the run to a Hugging Face hub repo when training ends (`mgpu push`)."""

    repo_id: str = Field(
        min_length=1,
        max_length=96,
        description="The hub repo, namespace/name (made if missing), e.g. your-name/llama-gsm8k-lora.",
    )
    what: Literal["auto", "adapter", "merged", "gguf"] = Field(
        "auto",
        description="What to push: adapter, merged (needs hf in output.export; a full fine-tune's model/) or gguf "
        "(needs gguf in output.export). auto: the adapter, or a full fine-tune's model.",
    )
    private: bool = Field(True, description="Make the repo private when it is created (an existing one is kept).")
    revision: str | None = Field(None, min_length=1, description="Branch to commit to (made if missing); null: main.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, v: str) -> str:
        if not _REPO_ID.fullmatch(v):
            raise ValueError(
                f"expected a hub repo id, namespace/name of letters, digits, '.', '_' or '-' "
                f"(e.g. your-name/llama-gsm8k-lora); found {v!r}"
            )
        return v


class OutputSection(_Section):
    """Where results go."""

    dir: str = Field("outputs/run", min_length=1, description="Output folder (relative to the recipe file).")
    save_steps: int = Field(100, ge=0, description="Checkpoint every N optimizer steps; 0: only at the end.")
    save_total_limit: int | None = Field(
        2, ge=1, description="Keep the newest K checkpoints; null: keep every one (as in transformers)."
    )
    keep_best: bool = Field(
        False,
        description="The final adapter/ (model/) holds the weights of the evaluation with the lowest eval loss, "
        "kept in <output.dir>/best as they are found, rather than the last step's (transformers' "
        "load_best_model_at_end); needs training.eval_steps. Checkpoints keep the last step's for resuming.",
    )
    export: list[Literal["hf", "gguf", "gguf-lora"]] = Field(
        default_factory=list,
        description="Exports written on node 0 when training ends, as `mgpu export` writes them: hf (the adapter "
        "merged into the base: <output.dir>/merged, in output.export_dtype), gguf (<output.dir>/gguf/"
        "<name>.<QUANT>.gguf for llama.cpp and Ollama, in output.gguf_quant) and gguf-lora (the adapter alone: "
        "<output.dir>/gguf/<name>.LoRA.F16.gguf, over the base's GGUF). Checked before training starts.",
    )
    export_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="The dtype of output.export's hf export (mgpu export --dtype)."
    )
    gguf_quant: Literal["q8_0", "f16", "bf16", "f32"] = Field(
        "q8_0", description="The weights of output.export's gguf export (mgpu export --format gguf --quant)."
    )
    push_to_hub: PushSection | None = Field(
        None,
        description="Push one artifact to a hub repo on node 0 when training and output.export end, as `mgpu push` "
        "does (token from HF_TOKEN or `hf auth login`, never logged); the repo id and token are checked before "
        "training starts.",
    )


class LoggingSection(_Section):
    """What is logged, and where."""

    steps: int = Field(1, ge=1, description="Write a metrics line every N optimizer steps.")
    progress: bool = Field(
        True,
        description="Show progress on rank 0: a live bar on a terminal, else one line per logged step (with the "
        "elapsed time and an ETA). false: neither; evaluations and saved checkpoints are still printed.",
    )
    report_to: list[Literal["tensorboard", "wandb"]] = Field(
        default_factory=list,
        description="Extra metric sinks, written by rank 0: tensorboard (<output.dir>/tensorboard) and wandb "
        "(offline unless WANDB_MODE says otherwise; needs `pip install wandb`).",
    )
    wandb_project: str = Field("unsloth-mgpu", min_length=1, description="Weights & Biases project name.")


class Recipe(_Section):
    """A complete training recipe."""

    model: ModelSection = Field(description="Which model to fine-tune and how to load it.")
    lora: LoraSection | None = Field(
        default_factory=LoraSection, description="LoRA settings; null for full fine-tuning."
    )
    dataset: DatasetSection = Field(description="Training data.")
    training: TrainingSection = Field(default_factory=TrainingSection, description="The optimisation loop.")
    distributed: DistributedSection = Field(
        default_factory=DistributedSection, description="Workers, devices and gradient aggregation."
    )
    memory: MemorySection = Field(default_factory=MemorySection, description="Memory limits and trade-offs.")
    output: OutputSection = Field(default_factory=OutputSection, description="Where results go.")
    logging: LoggingSection = Field(default_factory=LoggingSection, description="What is logged, and where.")

    def pushed_artifact(self) -> str | None:
        """What output.push_to_hub pushes (its `auto` resolved: the adapter, or a full fine-tune's model), or None."""
        push = self.output.push_to_hub
        if push is None:
            return None
        return push.what if push.what != "auto" else ("adapter" if self.lora is not None else "merged")

    @model_validator(mode="after")
    def _cross_field(self) -> Recipe:
        problems: list[tuple[str, str]] = []
        if self.lora is None and "gguf-lora" in self.output.export:
            problems.append(
                (
                    "output.export",
                    "a full fine-tune has no adapter to write as a LoRA GGUF: drop gguf-lora (gguf writes the model)",
                )
            )
        if self.lora is None and "hf" in self.output.export:
            problems.append(
                (
                    "output.export",
                    "a full fine-tune already writes the HF model (<output.dir>/model); there is no adapter to "
                    "merge: drop hf (gguf is fine)",
                )
            )
        if self.lora is None and self.model.load_in_4bit:
            problems.append(
                (
                    "model.load_in_4bit",
                    "4-bit weights cannot be fully fine-tuned; add a lora section "
                    "(QLoRA) or set model.load_in_4bit: false",
                )
            )
        if self.model.load_in_4bit and self.distributed.device == "cpu" and self.distributed.strategy != "fsdp":
            # bitsandbytes (ddp) needs CUDA; the sharded mode stores torchao NF4 tensors, which also run on CPU
            problems.append(
                (
                    "model.load_in_4bit",
                    f"4-bit loading with distributed.strategy {self.distributed.strategy} needs CUDA "
                    "(bitsandbytes); found device: cpu. Set distributed.strategy: fsdp (4-bit NF4 storage that "
                    "also runs on CPU) or model.load_in_4bit: false",
                )
            )
        t = self.training
        if t.max_steps is not None and t.warmup_steps >= t.max_steps:
            problems.append(
                (
                    "training.warmup_steps",
                    f"expected fewer than training.max_steps ({t.max_steps}), found {t.warmup_steps} (the learning "
                    "rate would never reach training.learning_rate). For a short try run, add "
                    f"training.warmup_steps={max(0, t.max_steps // 10)}",
                )
            )
        if t.warmup_ratio is not None and t.warmup_steps:
            problems.append(
                (
                    "training.warmup_ratio",
                    f"expected one of training.warmup_steps ({t.warmup_steps}) and training.warmup_ratio "
                    f"({t.warmup_ratio}), found both. Keep one, e.g. training.warmup_steps=0",
                )
            )
        for key in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            if getattr(t, key) is not None and t.optimizer == "sgd":
                problems.append(
                    (
                        f"training.{key}",
                        f"applies to training.optimizer adamw or adamw_8bit, found optimizer sgd. Set "
                        f"training.optimizer=adamw or remove training.{key}",
                    )
                )
        for key, given, schedulers in (
            ("min_lr_ratio", t.min_lr_ratio != 0.0, ("cosine", "warmup_stable_decay")),
            ("lr_cycles", t.lr_cycles != 1, ("cosine_with_restarts",)),
            ("decay_ratio", t.decay_ratio is not None, ("warmup_stable_decay",)),
        ):
            if given and t.lr_scheduler not in schedulers:
                problems.append(
                    (
                        f"training.{key}",
                        f"applies to training.lr_scheduler: {' or '.join(schedulers)}, found lr_scheduler "
                        f"{t.lr_scheduler}. Set training.lr_scheduler={schedulers[0]} or remove training.{key}",
                    )
                )
        d = self.distributed
        if d.node_rank >= d.nnodes:
            problems.append(
                ("distributed.node_rank", f"expected 0..{d.nnodes - 1} (nnodes={d.nnodes}), found {d.node_rank}")
            )
        if d.nnodes > 1 and not d.rdzv_endpoint:
            problems.append(("distributed.rdzv_endpoint", "several nodes need HOST:PORT of node 0's rendezvous"))
        if d.balance_speed is True and (d.aggregation != "weighted" or self.dataset.batching == "padded"):
            found = (
                f"distributed.aggregation: {d.aggregation}"
                if d.aggregation != "weighted"
                else "dataset.batching: padded"
            )
            problems.append(
                (
                    "distributed.balance_speed",
                    "moving tokens from a slower rank to a faster one needs distributed.aggregation: weighted (with "
                    "mean or sum the update would change with the split) and balanced or packed batching; found "
                    f"{found}. Set those, or distributed.balance_speed: auto",
                )
            )
        if d.strategy == "fsdp":
            if d.aggregation == "median":
                problems.append(
                    (
                        "distributed.aggregation",
                        "median cannot be combined with distributed.strategy: fsdp (each GPU holds only a shard of "
                        "the gradients, so there is no per-GPU gradient to take a coordinate-wise median of); "
                        "use weighted, mean or sum, or distributed.strategy: ddp",
                    )
                )
            if d.max_restarts:
                problems.append(
                    (
                        "distributed.max_restarts",
                        "restarting from a checkpoint is not supported with distributed.strategy: fsdp yet; "
                        "set distributed.max_restarts: 0",
                    )
                )
        ds = self.dataset
        if ds.format == "text" and ds.mix is None and ds.train_on_responses_only:
            problems.append(
                (
                    "dataset.train_on_responses_only",
                    "format text has no responses: every token of a text sample is trained on, so true would do "
                    "nothing; use format alpaca or chat for prompt/response data, or leave the key out",
                )
            )
        if ds.chat_template is not None and ds.mix is None and ds.format != "chat":
            problems.append(
                (
                    "dataset.chat_template",
                    f"format {ds.format} does not use a chat template (only format chat renders messages with one), so "
                    "it would do nothing; set dataset.format: chat for conversations, or leave the key out",
                )
            )
        if ds.system_prompt is not None and all(src.section.format != "chat" for src in ds.sources()):
            problems.append(
                (
                    "dataset.system_prompt",
                    "applies to conversations (format chat), and this dataset has none, so it would do nothing; set "
                    "dataset.format: chat for conversations, or leave the key out",
                )
            )
        if ds.eval_path is not None and ds.eval_ratio is not None:
            problems.append(("dataset.eval_ratio", "give either dataset.eval_path or dataset.eval_ratio, not both"))
        if t.eval_steps and ds.eval_path is None and ds.eval_ratio is None:
            problems.append(
                (
                    "training.eval_steps",
                    f"evaluation every {t.eval_steps} steps needs an eval split; "
                    "set dataset.eval_path or dataset.eval_ratio (or training.eval_steps: 0)",
                )
            )
        if self.output.keep_best and not t.eval_steps:
            problems.append(
                (
                    "output.keep_best",
                    "needs evaluations during the run, found training.eval_steps: 0 (only the final one); set "
                    "training.eval_steps, e.g. training.eval_steps=50, with dataset.eval_ratio or dataset.eval_path",
                )
            )
        what = self.pushed_artifact()
        if what is not None:
            needs = {"gguf": "gguf", "merged": "hf" if self.lora is not None else None}.get(what)
            if what == "adapter" and self.lora is None:
                problems.append(
                    (
                        "output.push_to_hub.what",
                        "a full fine-tune (lora: null) saves no adapter; its weights (model/) go with what: merged",
                    )
                )
            elif needs and needs not in self.output.export:
                problems.append(
                    (
                        "output.push_to_hub.what",
                        f"{what} is written by output.export's {needs}, found output.export: "
                        f"{list(self.output.export)}; add {needs} to output.export",
                    )
                )
        if t.early_stopping_patience is not None and not t.eval_steps:
            problems.append(
                (
                    "training.early_stopping_patience",
                    "needs evaluations during the run, found training.eval_steps: 0 (only the final one); set "
                    "training.eval_steps, e.g. training.eval_steps=50, with dataset.eval_ratio or dataset.eval_path",
                )
            )
        if problems:
            raise ValueError("\n".join(f"@{k}@ {m}" for k, m in problems))
        return self

    # Derived values ---------------------------------------------------------------------------------
    def global_batch_size(self, num_workers: int) -> int:
        """Samples per optimizer step: micro_batch_size x workers x gradient_accumulation_steps."""
        mb, ga = self.training.micro_batch_size, self.training.gradient_accumulation_steps
        if mb == AUTO or ga == AUTO:
            raise ValueError("resolve auto values first")
        return int(mb) * num_workers * int(ga)

    def train_on_responses_only(self) -> bool:
        return self.dataset.responses_only()


def check_batch_fits(recipe: Recipe, samples: int, num_workers: int, held_out: int = 0) -> None:
    """One optimizer step must find its global batch in the training data (checked in the parent, before
    launching): `samples` less the `held_out` ones that `dataset.eval_ratio` keeps for evaluation."""
    need = recipe.global_batch_size(num_workers)
    if need > samples - held_out:
        has = f"{samples - held_out} to train on ({held_out} of {samples} held out by dataset.eval_ratio)"
        raise UserError(
            Problem(
                "training.micro_batch_size",
                f"one optimizer step needs {need} samples "
                f"(micro_batch_size x {num_workers} workers x gradient_accumulation_steps) but the "
                f"dataset has {has if held_out else samples}",
                "lower the batch settings" + (", lower dataset.eval_ratio" if held_out else "") + " or add data",
            ),
            "invalid recipe",
        )


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


class LoadedRecipe:
    """A validated recipe plus where it came from (for messages and relative paths)."""

    def __init__(
        self,
        recipe: Recipe,
        path: Path | None,
        data: dict[str, Any],
        overrides: list[str] | None = None,
        lines: dict[str, str] | None = None,
    ):
        self.recipe = recipe
        self.path = path
        self.data = data
        self.overrides = list(overrides or [])  # as given on the command line, for commands we suggest
        self.lines = dict(lines or {})  # dotted key -> "file:line" (or "command line"), for later checks' messages

    def where(self, dotted: str) -> str:
        """`dotted` with the file:line that set it (or its closest parent's), as validation errors name keys."""
        return _where(dotted, self.lines)

    def locate(self, exc: UserError) -> UserError:
        """`exc` with each problem that names a bare recipe key (`distributed.device`) given the file:line that set
        it, as validation's problems are: checks after validation (the devices, the data) know only the key."""
        for problem in exc.problems:
            if _BARE_KEY.fullmatch(problem.where) and problem.where.split(".")[0] in Recipe.model_fields:
                problem.where = self.where(problem.where)
        return exc


_BARE_KEY = re.compile(r"[a-z_]+(\.[a-z_0-9]+)+")


def _line_map(text: str, filename: str) -> tuple[dict[str, str], list[Problem]]:
    """Map dotted keys to 'file:line' using the YAML node tree; also each key that a mapping repeats."""
    out: dict[str, str] = {}
    repeated: list[Problem] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return out, repeated

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for k, v in node.value:
                key = f"{prefix}.{k.value}" if prefix else str(k.value)
                if key in seen:  # PyYAML keeps the last silently; a second `training:` would drop the first
                    repeated.append(
                        Problem(
                            f"{filename}:{k.start_mark.line + 1}",
                            f"key '{key}' appears twice in one mapping (first at line {out[key].rsplit(':', 1)[1]})",
                            "merge the two into one (YAML would keep only the last)",
                        )
                    )
                    continue
                seen.add(key)
                out[key] = f"{filename}:{k.start_mark.line + 1}"
                if key == "lora" and isinstance(v, yaml.ScalarNode) and v.value == "" and v.style is None:
                    # `lora:` with every key under it commented out reads as null, which means full fine-tuning
                    repeated.append(
                        Problem(
                            out[key],
                            "lora is empty (nothing under `lora:`: its keys commented out?), which YAML reads as "
                            "null: full fine-tuning of every weight, not LoRA",
                            "give LoRA's keys under it (r: 16, ...), delete the line for the default LoRA, or "
                            "write `lora: null` to fine-tune every weight",
                        )
                    )
                walk(v, key)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                key = f"{prefix}.{i}"
                out[key] = f"{filename}:{v.start_mark.line + 1}"
                walk(v, key)

    walk(root, "")
    return out, repeated


def _read_yaml(path: Path, where: str) -> tuple[dict[str, Any], dict[str, str]]:
    if not path.exists():
        raise UserError(
            Problem(
                where,
                f"recipe file not found: {path}",
                "check the path (relative paths start from the current folder, or from the recipe that names them)",
            )
        )
    if path.is_dir():
        raise UserError(Problem(where, f"expected a YAML file, found a folder: {path}"))
    try:
        text = read_utf8(path, "invalid recipe")
    except OSError as exc:
        raise UserError(Problem(where, f"cannot read {path}: {exc}")) from exc
    try:
        data = yaml.safe_load(text)  # safe loader: no object construction from tags
    except yaml.MarkedYAMLError as exc:
        mark, problem = exc.problem_mark or exc.context_mark, str(exc.problem or exc)
        context = exc.context_mark
        if context is not None and exc.context and (mark is None or context.line != mark.line):
            # an unclosed `[` or quote is found only at the end of the file: name where it was opened
            problem += f" ({exc.context} that starts at line {context.line + 1}, column {context.column + 1})"
            if "<stream end>" in problem or mark is None or mark.line >= len(text.splitlines()):
                mark = context
        loc = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        tag = "could not determine a constructor" in problem
        hint = (
            "a recipe holds plain values: YAML tags such as !!python/... are not allowed (recipes are read with a "
            "safe loader, which builds no objects); remove the tag"
            if tag
            else "check indentation, colons and quotes around this line"
        )
        raise UserError(Problem(loc, f"YAML syntax error: {problem}", hint), "invalid recipe") from exc
    except yaml.YAMLError as exc:
        raise UserError(Problem(str(path), f"YAML error: {exc}"), "invalid recipe") from exc
    if data is None:
        raise UserError(
            Problem(str(path), "the recipe is empty", "run `mgpu init` for a starter recipe"), "invalid recipe"
        )
    if not isinstance(data, dict):
        raise UserError(
            Problem(
                f"{path}:1", f"expected a mapping of sections (model:, dataset:, ...), found {type(data).__name__}"
            ),
            "invalid recipe",
        )
    lines, repeated = _line_map(text, str(path))
    if repeated:
        raise UserError(repeated, "invalid recipe")
    return data, lines


def _merge(base: dict[str, Any], over: dict[str, Any], path: str = "") -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v, f"{path}{k}.")
        elif isinstance(v, dict) and isinstance(out.get(k), list) and v and all(str(i).isdigit() for i in v):
            if not all(_is_index(i, out[k]) for i in v):
                n = len(out[k])
                bad = next(i for i in v if not _is_index(i, out[k]))
                raise UserError(
                    Problem(
                        f"{path}{k}.{bad}",
                        f"{path}{k} has {n} item{'s' if n != 1 else ''}, so an index from 0 to {n - 1}; found {bad}",
                    ),
                    "invalid recipe",
                )
            # `dataset.mix.1.weight=3` on the command line edits one item of a list of sections
            items = list(out[k])
            for i, item in v.items():
                j = int(i)
                items[j] = _merge(items[j], item) if isinstance(item, dict) and isinstance(items[j], dict) else item
            out[k] = items
        else:
            out[k] = v
    return out


def _is_index(key: Any, items: list[Any]) -> bool:
    return isinstance(key, str) and key.isdigit() and int(key) < len(items)


def _load_tree(path: Path, seen: tuple[Path, ...] = ()) -> tuple[dict[str, Any], dict[str, str]]:
    """Read a recipe and, recursively, the `base:` recipes it extends."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise UserError(Problem("base", f"recipes extend each other in a loop: {chain}"), "invalid recipe")
    data, lines = _read_yaml(path, "base" if seen else "recipe")
    base_ref = data.pop("base", None)
    if base_ref is None:
        return data, lines
    if not isinstance(base_ref, str):
        raise UserError(
            Problem(lines.get("base", "base"), f"base: expected a path to a recipe, found {base_ref!r}"),
            "invalid recipe",
        )
    base_path = (path.parent / base_ref).expanduser()
    if not base_path.exists():
        raise UserError(Problem(lines.get("base", "base"), f"base recipe not found: {base_path}"), "invalid recipe")
    base_data, base_lines = _load_tree(base_path, (*seen, path))
    return _merge(_rebase_paths(base_data, base_path.resolve().parent), data), {**base_lines, **lines}


def _rebase_paths(data: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Make the relative local paths of a `base:` recipe absolute against its own folder (where it was written),
    so that a recipe in another folder that extends it finds the same files. Hub ids, builtin models and
    `${...}` interpolations stay as they are."""

    def rebase(value: Any, always: bool = False) -> Any:
        if not isinstance(value, str) or not value or value.startswith(("${", "builtin:", "/", "~")):
            return value
        if always or _looks_like_local_path(value) or (folder / value).exists():
            return str(folder / value)
        return value

    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, key, always in (("model", "name", False), ("dataset", "path", False),
                                 ("dataset", "eval_path", False), ("output", "dir", True),
                                 ("lora", "init_from", True)):  # fmt: skip
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = rebase(out[section][key], always)
    mix = out.get("dataset", {}).get("mix") if isinstance(out.get("dataset"), dict) else None
    if isinstance(mix, list):
        out["dataset"]["mix"] = [
            {**m, "path": rebase(m["path"])} if isinstance(m, dict) and "path" in m else m for m in mix
        ]
    return out


def parse_overrides(overrides: list[str]) -> tuple[dict[str, Any], list[Problem]]:
    """Turn `a.b=value` strings into a nested dict; values are parsed as YAML scalars/lists."""
    out: dict[str, Any] = {}
    problems: list[Problem] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", key):
            problems.append(
                Problem(
                    f"argument {item!r}",
                    "expected KEY=VALUE with a dotted recipe key",
                    "e.g. training.learning_rate=1e-4",
                )
            )
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            nxt = node.get(part)
            if not isinstance(nxt, dict):
                nxt = node[part] = {}
            node = nxt
        node[parts[-1]] = value
    return out, problems


def _resolve_interpolations(data: dict[str, Any], lines: dict[str, str]) -> dict[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        conf = OmegaConf.create(data)
        return OmegaConf.to_container(conf, resolve=True)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        where = lines.get(str(key), str(key) or "recipe")
        msg = str(exc).splitlines()[0]
        raise UserError(
            Problem(
                where if key else "recipe",
                f"interpolation failed for {key or 'a value'}: {msg}",
                "${other.key} must name an existing key; ${oc.env:VAR} reads an environment variable",
            ),
            "invalid recipe",
        ) from exc


def _section_fields(loc: tuple[Any, ...]) -> list[str]:
    """Field names valid at the parent of `loc`, for did-you-mean suggestions."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if isinstance(part, int):
            continue  # an item of a list of sections (dataset.mix.1): its model was found at the list's key
        if model is None:
            return []
        field = model.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = list(getattr(ann, "__args__", (ann,)))
        args += [b for a in args if getattr(a, "__origin__", None) is list for b in a.__args__]  # list[Section]
        candidates = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        model = candidates[0] if candidates else None
    return list(model.model_fields) if model else []


def keys_named(name: str) -> list[str]:
    """The dotted recipe keys whose last part is `name` or what other trainers call it (`max_steps` ->
    training.max_steps; `lr` -> training.learning_rate), for a `--max-steps` flag meant as an override."""
    leaf = _ALIASES.get(name, name)
    return [f"{s}.{leaf}" for s in Recipe.model_fields if leaf in _section_fields((s, leaf))]


def _key_of_another_section(loc: tuple[Any, ...], name: str) -> str | None:
    """`lora.r` for `training.lora_r` (or a top-level `lora_r`): the one section, other than the key's own, that
    has `name`."""
    if len(loc) > 2:
        return None
    owners = [s for s in Recipe.model_fields if s != loc[0] and name in _section_fields((s, name))]
    return f"{owners[0]}.{name}" if len(owners) == 1 else None


def _fmt_found(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_UNION_TAG = re.compile(r"^(int|str|bool|float|none|list\[.*|literal\[.*|function-.*|[A-Z]\w*Section)$")


# Names other trainers (TRL, axolotl, torchtune, peft) use for our keys: the did-you-mean for each.
_ALIASES = {
    "lr": "learning_rate",
    "batch_size": "micro_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "micro_batch": "micro_batch_size",
    "grad_accum": "gradient_accumulation_steps",
    "gradient_accumulation": "gradient_accumulation_steps",
    "steps": "max_steps",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "warmup": "warmup_steps",
    "scheduler": "lr_scheduler",
    "lr_scheduler_type": "lr_scheduler",
    "cosine_min_lr_ratio": "min_lr_ratio",
    "min_lr_rate": "min_lr_ratio",
    "default_system_message": "system_prompt",
    "system_message": "system_prompt",
    "beta1": "adam_beta1",
    "beta2": "adam_beta2",
    "eps": "adam_epsilon",
    "adam_eps": "adam_epsilon",
    "neftune_alpha": "neftune_noise_alpha",
    "noisy_embedding_alpha": "neftune_noise_alpha",
    "optim": "optimizer",
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "peft_use_dora": "use_dora",
    "seq_len": "max_seq_length",
    "sequence_len": "max_seq_length",
    "max_length": "max_seq_length",
    "model_name": "name",
    "base_model": "name",
    "output_dir": "dir",
    "gpus": "num_gpus",
    "world_size": "num_gpus",
}


# Keys of other trainers (axolotl, TRL) whose counterpart here is not a look-alike, or which have none: the hint
# for each (a plain did-you-mean pointed `train_on_inputs` at `training`, `load_in_8bit` at `load_in_4bit`).
_FOREIGN = {
    "train_on_inputs": "use dataset.train_on_responses_only, the opposite (train_on_inputs: false is "
    "train_on_responses_only: true, the default for alpaca and chat)",
    "sample_packing": "use dataset.batching: packed (the default, auto, already packs on GPUs with a "
    "variable-length attention kernel: flash-attn or torch 2.12+; docs/data.md)",
    "pad_to_sequence_len": "use dataset.batching: padded",
    "val_set_size": "use dataset.eval_ratio (a fraction, e.g. 0.05) or dataset.eval_path",
    "test_size": "use dataset.eval_ratio (a fraction, e.g. 0.05) or dataset.eval_path",
    "logging_steps": "use logging.steps",
    "eval_batch_size": "no such key: evaluation uses training.micro_batch_size",
    "per_device_eval_batch_size": "no such key: evaluation uses training.micro_batch_size",
    "micro_batch_size_eval": "no such key: evaluation uses training.micro_batch_size",
    "save_best": "use output.keep_best: true (the final adapter holds the best evaluation's weights)",
    "load_best_model_at_end": "use output.keep_best: true (the final adapter holds the best evaluation's weights)",
    "load_in_8bit": "8-bit loading is not supported: model.load_in_4bit: true (QLoRA), or 16-bit",
    "lora_target_linear": "use lora.target_modules (left out: all seven projections)",
    "lora_target_modules": "use lora.target_modules (left out: all seven projections)",
    "adapter": "use the lora section (lora: null for full fine-tuning)",
    "type": "use dataset.format: alpaca, chat or text",
    "field_messages": "use dataset.columns, e.g. {messages: conversations, role: from, content: value}",
    "message_property_mappings": "use dataset.columns, e.g. {role: from, content: value}",
    "wandb_entity": "set WANDB_ENTITY in the environment (wandb reads it); the recipe has logging.wandb_project",
    "wandb_name": "set WANDB_NAME in the environment (wandb reads it); the recipe has logging.wandb_project",
    "wandb_run_id": "set WANDB_RUN_ID in the environment (wandb reads it); the recipe has logging.wandb_project",
    "push_to_hub": "use output.push_to_hub: {repo_id: your-name/run-1} (or `mgpu push OUTPUT_DIR REPO_ID`)",
    "hub_model_id": "use output.push_to_hub: {repo_id: your-name/run-1} (or `mgpu push OUTPUT_DIR REPO_ID`)",
    "hub_private_repo": "use output.push_to_hub.private (true unless set)",
}


def _problems_from_validation(exc: ValidationError, lines: dict[str, str]) -> list[Problem]:
    """Turn pydantic errors into problems: one per key, with did-you-mean for unknown keys."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    problems: list[Problem] = []
    for err in exc.errors(include_url=False):
        # pydantic adds the branch of a union (`int`, `literal['auto']`) to the location; keep only real keys
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and _UNION_TAG.match(p)))
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "value_error" and "@" in err["msg"]:
            for key, message in re.findall(r"@([^@]+)@ ([^\n]*)", err["msg"]):
                problems.append(Problem(_where(key, lines), message))
        elif err["type"] == "extra_forbidden":
            valid = _section_fields(loc)
            name = str(loc[-1])
            alias = _ALIASES.get(name)
            close: list[str] = [alias] if alias in valid else []
            elsewhere = None
            if not close:  # the same name in another section beats a look-alike in this one
                elsewhere = _key_of_another_section(loc, name) or (
                    _key_of_another_section(loc, alias) if alias else None
                )
            if not close and not elsewhere:
                close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            hint = (
                f"did you mean '{elsewhere}'? (a key of the {elsewhere.split('.')[0]} section)"
                if elsewhere
                else f"did you mean '{close[0]}'?"
                if close
                else (f"valid keys here: {', '.join(valid)}" if valid else None)
            )
            if name in _FOREIGN and not (name == "type" and loc[0] != "dataset"):
                hint = _FOREIGN[name]
            problems.append(Problem(_where(dotted, lines), f"unknown key '{loc[-1]}'", hint))
        elif err["type"] == "missing":
            problems.append(Problem(_where(dotted, lines), "required key is missing", _missing_hint(dotted)))
        elif err["type"] == "model_type" and loc:  # a value where a section of keys belongs (`model: some-name`)
            example = "name: " + str(err["input"]) if dotted == "model" else "KEY: VALUE"
            hint = (
                f"indent its keys under it, e.g. `{dotted}:` then `  {example}` (on the command line "
                f"`{dotted}.{example.replace(': ', '=')}`)"
            )
            if dotted == "dataset" and isinstance(err["input"], list):  # axolotl's `datasets:` list
                hint = "several datasets go under dataset.mix, a list of {path, weight, format, columns} sources"
            problems.append(
                Problem(_where(dotted, lines), f"expected a section of keys, found {_fmt_found(err['input'])}", hint)
            )
        else:
            by_key.setdefault(dotted, []).append(err)
    for dotted, errs in by_key.items():
        expected = []
        for e in errs:
            msg = e["msg"].replace("Value error, ", "").replace("Input should be ", "expected ")
            msg = msg[0].lower() + msg[1:] if msg else msg
            if msg not in expected:
                expected.append(msg)
        found = _fmt_found(errs[0].get("input"))
        text = " or ".join(expected)
        problems.append(
            Problem(
                _where(dotted, lines),
                text if "found" in text else f"{text}; found {found}",
                _value_hint(dotted, errs[0].get("input")),
            )
        )
    return problems


# Names other tools give the dataset formats (axolotl's `type:`, TRL's dataset kinds) -> ours
_FORMAT_NAMES = {
    "sharegpt": "chat",
    "conversation": "chat",
    "conversations": "chat",
    "messages": "chat",
    "openai": "chat",
    "chat_template": "chat",
    "instruct": "alpaca",
    "instruction": "alpaca",
    "completion": "text",
    "pretrain": "text",
    "raw": "text",
}


def _value_hint(dotted: str, value: Any) -> str | None:
    """A hint for a value another tool would take: `format: sharegpt` is our `chat`."""
    if dotted.split(".")[-1] == "format" and isinstance(value, str):
        ours = _FORMAT_NAMES.get(value.strip().lower())
        if ours == "chat":
            return (
                "conversations are format chat; for ShareGPT data add "
                "dataset.columns: {messages: conversations, role: from, content: value} (human/gpt roles are read)"
            )
        if ours:
            return f"that is format {ours} here (see docs/data.md)"
    return None


def _where(dotted: str, lines: dict[str, str]) -> str:
    """`dotted (file:line)`: where the key was set; else where a key below it was (its value was built from them:
    `nope.key=1` on the command line makes a section `nope`); else the nearest section above it."""
    below = lines.get(dotted) or next((loc for key, loc in lines.items() if key.startswith(dotted + ".")), None)
    if below:
        return f"{dotted} ({below})"
    parts = dotted.split(".")
    while parts:
        loc = lines.get(".".join(parts))
        if loc:
            return f"{dotted} ({loc})"
        parts.pop()
    return dotted


def _overrides_under_values(data: dict[str, Any], over: dict[str, Any]) -> list[Problem]:
    """Overrides that set a key under a value (`model.name.x=1` where model.name is a string): the value is no
    section, and merging would replace it with one, blamed on the file's line."""
    problems = []
    for key in _flatten_leaf_keys(over):
        parts, node = key.split("."), data
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                break  # a key the recipe does not set: validation names unknown ones
            if node is not None and not isinstance(node, (dict, list)):
                prefix = ".".join(parts[: i + 1])
                problems.append(
                    Problem(
                        f"{key} (command line)",
                        f"{prefix} is a value ({_fmt_found(node)}), not a section: it has no key '{parts[i + 1]}'",
                        f"set the value itself: {prefix}=VALUE",
                    )
                )
                break
    return problems


def _missing_hint(dotted: str) -> str | None:
    return {
        "model": "add a model section with at least `name:`",
        "model.name": "e.g. builtin:tiny-llama, a hub id, or a local folder",
        "dataset": "add a dataset section with at least `path:` (or `mix:`)",
        "dataset.path": "a local .json/.jsonl/.csv/.parquet file or a hub dataset id",
    }.get(dotted)


def why_not_a_hub_id(path: str) -> str | None:
    """Why `path` cannot be a hub id (`name` or `org/name`), so must be a local file or folder; None when it could
    be one."""
    if path.endswith(("/", os.sep)):
        return "it ends with '/'"
    if path.startswith((".", "/", "~")):
        return f"it starts with {path[0]!r}"
    if path.count("/") > 1:
        return "it has more than one '/'"
    suffix = Path(path).suffix.lower()
    if suffix in (".json", ".jsonl", ".csv", ".parquet", ".txt", ".tsv"):
        return f"it ends with the file extension {suffix}"
    return None


def _check_init_adapter(lora: LoraSection, base_dir: Path, lines: dict[str, str]) -> list[Problem]:
    """`lora.init_from`: an adapter folder (or a run's, holding adapter/) whose settings are this section's; the
    path is made absolute."""
    where = _where("lora.init_from", lines)
    folder = (base_dir / str(lora.init_from)).expanduser().resolve()
    if (folder / "adapter" / "adapter_config.json").is_file():
        folder = folder / "adapter"  # a run's output.dir
    hint = "give an adapter folder (adapter_config.json and adapter_model.safetensors), e.g. an earlier run's adapter/"
    if not (folder / "adapter_config.json").is_file():
        return [Problem(where, f"no adapter in {folder} (expected adapter_config.json)", hint)]
    if not (folder / "adapter_model.safetensors").is_file():
        return [Problem(where, f"no adapter weights in {folder} (expected adapter_model.safetensors)", hint)]
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        return [Problem(where, f"unreadable {folder / 'adapter_config.json'}: {exc}", hint)]
    ours = {
        "r": lora.r,
        "alpha": lora.alpha,
        "target_modules": sorted(lora.target_modules),
        "use_rslora": lora.use_rslora,
        "use_dora": lora.use_dora,
    }
    theirs = {
        "r": config.get("r"),
        "alpha": config.get("lora_alpha"),
        "target_modules": sorted(config.get("target_modules") or []),
        "use_rslora": bool(config.get("use_rslora", False)),
        "use_dora": bool(config.get("use_dora", False)),
    }
    differ = [k for k in ours if ours[k] != theirs[k]]
    if differ:
        return [
            Problem(
                where,
                f"the adapter in {folder} was trained with "
                + ", ".join(f"{k} {theirs[k]}" for k in differ)
                + "; this recipe gives "
                + ", ".join(f"lora.{k} {ours[k]}" for k in differ),
                "set " + " ".join(f"lora.{k}={_cli_value(theirs[k])}" for k in differ) + " to continue from it",
            )
        ]
    lora.init_from = str(folder)
    return []


def _cli_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def _looks_like_local_path(value: str) -> bool:
    return why_not_a_hub_id(value) is not None


def _paths_only(data: dict[str, Any], bad: set[str]) -> Any:
    """The path keys of a recipe that failed validation, for `_check_paths`: each one that is a string and has no
    problem of its own (an absent one is skipped: its missing key is reported already)."""
    from types import SimpleNamespace

    def section(name: str) -> dict[str, Any]:
        value = data.get(name)
        return value if isinstance(value, dict) else {}

    def text(key: str, value: Any) -> str | None:
        return value if isinstance(value, str) and value and key not in bad else None

    model, ds, out = section("model"), section("dataset"), section("output")
    mix = ds.get("mix") if isinstance(ds.get("mix"), list) else []
    return SimpleNamespace(
        model=SimpleNamespace(name=text("model.name", model.get("name"))),
        dataset=SimpleNamespace(
            path=text("dataset.path", ds.get("path")),
            eval_path=text("dataset.eval_path", ds.get("eval_path")),
            mix=[
                SimpleNamespace(path=text(f"dataset.mix.{i}.path", m.get("path") if isinstance(m, dict) else None))
                for i, m in enumerate(mix)
            ],  # fmt: skip
        ),
        output=SimpleNamespace(dir=text("output.dir", out.get("dir", OutputSection.model_fields["dir"].default))),
    )


def _check_paths(recipe: Recipe, base_dir: Path, lines: dict[str, str]) -> list[Problem]:
    """Resolve relative paths against the recipe folder and check that local inputs exist."""
    problems: list[Problem] = []
    name = recipe.model.name
    if name is None:
        pass  # a recipe that failed validation without a usable model.name (see _paths_only)
    elif name.startswith("builtin:"):
        if name not in BUILTIN_MODELS:
            close = difflib.get_close_matches(name, BUILTIN_MODELS, n=1)
            problems.append(
                Problem(
                    _where("model.name", lines),
                    f"unknown builtin model {name!r}",
                    f"did you mean '{close[0]}'?" if close else f"available: {', '.join(BUILTIN_MODELS)}",
                )
            )
    elif _looks_like_local_path(name) or (base_dir / name).exists():
        p = (base_dir / name).expanduser().resolve()
        if not p.exists():
            problems.append(
                Problem(
                    _where("model.name", lines),
                    f"model folder not found: {p}",
                    "give a local folder with config.json, a hub id, or builtin:tiny-llama",
                )
            )
        elif not (p / "config.json").exists():
            problems.append(
                Problem(
                    _where("model.name", lines),
                    f"not a model folder (no config.json): {p}",
                    "point at the folder that holds config.json and the weights",
                )
            )
        else:
            recipe.model.name = str(p)
    ds = recipe.dataset
    inputs: list[tuple[str, BaseModel, str, str]] = [
        ("dataset.path", ds, "path", "dataset file"),
        ("dataset.eval_path", ds, "eval_path", "eval file"),
    ]
    inputs += [(f"dataset.mix.{i}.path", src, "path", "dataset file") for i, src in enumerate(ds.mix or [])]
    for key, owner, attr, what in inputs:
        value = getattr(owner, attr)
        if value is None or not (_looks_like_local_path(value) or (base_dir / value).exists()):
            continue  # a hub dataset id: resolved when the data is loaded
        p = (base_dir / value).expanduser().resolve()
        if p.exists():
            setattr(owner, attr, str(p))
        else:
            where = _where(key, lines)
            hint = (
                "relative paths on the command line are resolved against the current folder"
                if where.endswith("(command line)")
                else "relative paths are resolved against the recipe's folder"
            )
            problems.append(Problem(where, f"{what} not found: {p}", hint))
    lora = getattr(recipe, "lora", None)  # absent from `_paths_only`'s stand-in
    if lora is not None and lora.init_from:
        problems += _check_init_adapter(lora, base_dir, lines)
    if recipe.output.dir is None:
        return problems
    out = (base_dir / recipe.output.dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        problems.append(
            Problem(
                _where("output.dir", lines),
                f"expected a folder, found a file: {out}",
                "choose another output.dir or remove the file",
            )
        )
    else:
        parent = next((a for a in out.parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            problems.append(
                Problem(
                    _where("output.dir", lines),
                    f"cannot create {out}: {parent} is a file",
                    "choose an output.dir whose parents are folders",
                )
            )
    recipe.output.dir = str(out)
    return problems


def load_recipe(
    path: str | Path | None,
    overrides: list[str] | None = None,
    data: dict[str, Any] | None = None,
    check_paths: bool = True,
) -> LoadedRecipe:
    """Load, merge, override, interpolate and validate a recipe.

    Args:
        path: the YAML file (or None when `data` is given).
        overrides: `dotted.key=value` strings applied before validation.
        data: an already-parsed recipe mapping instead of a file (tests build recipes this way).
        check_paths: resolve relative paths and check that local files exist.

    Returns:
        The validated recipe with absolute paths.

    Raises:
        UserError: every problem found, each with its dotted key and file:line.
    """
    lines: dict[str, str] = {}
    rpath = Path(path) if path is not None else None
    if data is None:
        assert rpath is not None
        data, lines = _load_tree(rpath)
    else:
        data = dict(data)
    over, problems = parse_overrides(list(overrides or []))
    if problems:
        raise UserError(problems, "invalid arguments")
    # Typed in a shell, a relative path means the shell's folder (`output.dir=outputs/run` from the repository
    # root is ./outputs/run), as paths written in a recipe mean the recipe's folder.
    over = _rebase_paths(over, Path.cwd())
    problems = _overrides_under_values(data, over)
    if problems:
        raise UserError(problems, "invalid arguments")
    for key in _flatten_leaf_keys(over):
        # an override replaces the file's value whole: a list's items no longer come from the file either
        lines = {k: v for k, v in lines.items() if not k.startswith(key + ".")}
        lines[key] = "command line"
    data = _merge(data, over)
    data = _resolve_interpolations(data, lines)
    base_dir = rpath.resolve().parent if rpath is not None else Path.cwd()
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as exc:
        problems = _problems_from_validation(exc, lines)
        if check_paths:  # every problem at once: the paths too, as far as they can be read
            problems += _check_paths(_paths_only(data, {p.where.split(" ")[0] for p in problems}), base_dir, lines)
        raise UserError(problems, "invalid recipe") from None
    if check_paths:
        problems = _check_paths(recipe, base_dir, lines)
        if problems:
            raise UserError(problems, "invalid recipe")
    return LoadedRecipe(recipe, rpath, data, overrides, lines)


def _flatten_leaf_keys(d: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of `d`'s values that are not mappings (what an override sets; its sections it only names)."""
    keys = []
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        keys += _flatten_leaf_keys(v, key) if isinstance(v, dict) and v else [key]
    return keys


def recipe_json_schema() -> dict[str, Any]:
    """The JSON Schema of a recipe (what `mgpu schema` prints and `schemas/recipe.schema.json` holds)."""
    schema = Recipe.model_json_schema()
    # pydantic leaves a section's description out next to its $ref; editors show it, so put it back
    for name, field in Recipe.model_fields.items():
        prop = schema["properties"][name]
        if "description" not in prop and field.description:
            prop["description"] = field.description
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "unsloth-mgpu recipe"
    schema.setdefault("properties", {})["base"] = {
        "type": "string",
        "description": "Path of a recipe this one extends (relative to this file); its keys are overridden here.",
    }
    return schema


class _RecipeDumper(yaml.SafeDumper):
    """Block mappings (one key per line, as recipes are written); lists of plain values on one line."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, (dict, list)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_RecipeDumper.add_representer(list, _represent_list)


def to_yaml(recipe: Recipe, width: int = 100) -> str:
    """Serialise a recipe as YAML in section order (lines wrap at about `width` columns where YAML can)."""
    data = recipe.model_dump(mode="json")
    return yaml.dump(data, Dumper=_RecipeDumper, sort_keys=False, default_flow_style=False, width=width)
