"""Model sources: `builtin:tiny-llama` (built locally, no hub) and locating local/hub models.

The tiny Llama has random weights and a byte-level BPE tokenizer trained on the bundled quick-start
data, so demos and tests run offline. It is built once in the parent process (transformers and
tokenizers only, no Unsloth, no CUDA) and cached.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

TINY_LLAMA = "builtin:tiny-llama"
_TINY_VERSION = "v1"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """Root of unsloth-mgpu's caches (`UNSLOTH_MGPU_CACHE` in `env`, default os.environ; else ~/.cache/unsloth-mgpu)."""
    env = os.environ if env is None else env
    return Path(env.get("UNSLOTH_MGPU_CACHE") or Path.home() / ".cache" / "unsloth-mgpu").expanduser()


def _tokenizer_corpus() -> list[str]:
    from .templates import generate_quickstart_rows

    text = []
    for row in generate_quickstart_rows(2048, seed=1):
        text.append(
            f"### Instruction:\n{row['instruction']}\n\n### Input:\n{row['input']}\n\n### Response:\n{row['output']}"
        )
    text.append(
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    )
    text.append(" ".join(str(i) for i in range(1000)))
    return text


def quiet_library_noise() -> None:
    """Call before importing Unsloth or transformers' savers, to hide warnings that ask nothing of the user:
    torchao, which they import, registers enums that torch 2.14 warns about once per process
    (`torch.utils._pytree`); bitsandbytes on a CPU-only machine asks for the optional `kernels` package, used
    only by 4-bit matmuls on CPU, which mgpu never runs."""
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def hide_hf_bars_off_terminal() -> None:
    """In a log or a pipe, transformers' bars ("Loading weights", "Writing model shards") would land as
    \r-joined frames: turn them off there (import after Unsloth, which wants to patch transformers first)."""
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def build_tiny_llama(
    dest: Path,
    hidden: int = 128,
    layers: int = 2,
    vocab: int = 1024,
    seed: int = 0,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    corpus: list[str] | None = None,
    dtype: str = "float32",
    device: str = "cpu",
    vocab_rows: int | None = None,
) -> Path:
    """Create a random Llama and a byte-level BPE tokenizer in `dest` (safetensors).

    The defaults give the builtin tiny model; the benchmarks use the same function with real sizes, initialising
    the weights on `device` (a GPU draws an 8B model's random weights in seconds, a CPU takes minutes).
    `vocab_rows`: embedding and head rows when more than the tokenizer learns from the corpus (a real model's
    vocabulary size, for the cost of its head; the extra rows are never a token).
    """
    quiet_library_noise()
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus or _tokenizer_corpus(), trainer=trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
        model_max_length=2048,
    )
    fast.chat_template = CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=max(len(fast), vocab_rows or 0),
        hidden_size=hidden,
        intermediate_size=intermediate or hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=bos,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # build in the target dtype: an fp32 8B would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to("cpu")
    dest.mkdir(parents=True, exist_ok=True)
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Writing model shards 1/1": not worth a bar
    try:
        model.save_pretrained(dest, safe_serialization=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    fast.save_pretrained(dest)
    return dest


def ensure_builtin_model(name: str) -> Path:
    """Return the folder of a builtin model, building it atomically on first use."""
    if name != TINY_LLAMA:
        raise ValueError(f"unknown builtin model {name}")
    dest = cache_dir() / "models" / f"tiny-llama-{_TINY_VERSION}"
    if (dest / "config.json").exists() and (dest / "tokenizer.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-llama-", dir=dest.parent))
    try:
        try:
            build_tiny_llama(tmp)
        except Exception as exc:
            if not _is_write_error(exc):
                raise
            raise cache_write_failed(f"the builtin model {name}", dest.parent, exc) from None
        try:
            tmp.rename(dest)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(tmp, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


def cache_write_failed(what: str, folder: Path, exc: BaseException) -> Exception:
    """The UserError for `what` that could not be written into mgpu's cache at `folder` (a full disk, a file size
    limit): names UNSLOTH_MGPU_CACHE, the error and the room left."""
    from .errors import Problem, UserError

    root = cache_dir()
    where = f"UNSLOTH_MGPU_CACHE ({root})" if os.environ.get("UNSLOTH_MGPU_CACHE") else f"cache folder {root}"
    room = ""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is not None:
        room = f" ({shutil.disk_usage(existing).free / 2**20:,.1f} MB free there)"
    reason = getattr(exc, "strerror", None) or str(exc)
    return UserError(
        Problem(
            where,
            f"cannot write {what} to {folder}: {reason}{room}; nothing was left half-written",
            "free disk space there, or set UNSLOTH_MGPU_CACHE to a folder on a disk with room",
        ),
        "cannot write the cache",
    )


def _is_write_error(exc: BaseException) -> bool:
    """An OSError, or safetensors' error for one (`I/O error: File too large (os error 27)`)."""
    return isinstance(exc, OSError) or (type(exc).__name__ == "SafetensorError" and "I/O error" in str(exc))


def resolve_model_path(name: str) -> str:
    """A loadable model reference: the builtin's folder, a local folder, or the hub id unchanged."""
    if name.startswith("builtin:"):
        return str(ensure_builtin_model(name))
    return name
