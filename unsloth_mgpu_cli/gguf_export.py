"""`mgpu export OUTPUT_DIR --format gguf`: the run's model as one GGUF file for llama.cpp, Ollama and LM Studio.

    mgpu export outputs/quickstart --format gguf --quant q8_0

The adapter is merged into its base in float32 (a full fine-tune's `model/` is read as it is) and written with
the `gguf` package, llama.cpp's own Python writer, the way llama.cpp's `convert_hf_to_gguf.py` writes these
architectures: the same tensor names, q/k rows permuted for its rope (Llama, Mistral), norms kept in float32,
the same hyperparameter keys, the tokenizer as a GPT-2-style BPE vocabulary with its merges, special tokens and
chat template, and the pre-tokenizer named as that converter names it (`gguf_pretok.py`). tests/test_gguf.py
holds the file to that converter's output, tensor by tensor and key by key.

Covered: Llama (1-3.x, SmolLM), Mistral, Qwen2/2.5 and Gemma 2 models, with a byte-level BPE tokenizer
(tokenizer.json: Llama 3, Qwen2) or a SentencePiece one (Llama 2, Mistral v0.1-0.3, Gemma 2). A SentencePiece
tokenizer goes in as the converter's `_set_vocab_sentencepiece` writes it, from its `tokenizer.model` (the piece
scores llama.cpp merges by): transformers 5 saves such a tokenizer as tokenizer.json alone, so the exports take
the model from the run's adapter folder or the base's (export.sentencepiece_source) and put it back beside
tokenizer.json (`complete_sentencepiece_files`). Other architectures and rope types are refused before the
weights load, with the route that does cover them: the merged HF export and llama.cpp's converter.
Quantisation: q8_0, f16, bf16, f32 (what the converter writes itself); smaller k-quants come from llama.cpp's
`llama-quantize`, which takes this file. Beside it goes an Ollama `Modelfile` for the file last written
(`ollama_modelfile`).

`mgpu export OUTPUT_DIR --format gguf-lora` writes the adapter alone (`write_lora_gguf`), as llama.cpp's
`convert_lora_to_gguf.py` does, for `llama-cli --lora` or Ollama's ADAPTER over the base's own GGUF.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .data import work_progress
from .errors import Problem, UserError

QUANTS = ("q8_0", "f16", "bf16", "f32")
PROGRESS_TENSORS = 100  # a progress bar (tensors/s, ETA) from this many tensors on: a 1B Llama has 146, an 8B 291
# HF architecture -> (llama.cpp architecture, whether q/k rows are permuted for llama.cpp's rope)
ARCHITECTURES = {
    "LlamaForCausalLM": ("llama", True),
    "MistralForCausalLM": ("llama", True),
    "Qwen2ForCausalLM": ("qwen2", False),
    "Gemma2ForCausalLM": ("gemma2", False),
}
SENTENCEPIECE_MODEL = "tokenizer.model"
# llama.cpp's token types of a SentencePiece vocabulary (the converter's SentencePieceTokenTypes)
SPM_NORMAL, SPM_UNKNOWN, SPM_CONTROL, SPM_USER_DEFINED, SPM_UNUSED, SPM_BYTE = 1, 2, 3, 4, 5, 6
# rope types llama.cpp's converter writes for these architectures ("default": nothing beyond rope_theta)
ROPE_TYPES = ("default", "linear", "yarn", "llama3")
CONVERTER_ROUTE = (
    "export the merged HF model (`mgpu export OUTPUT_DIR --format hf --dtype float16`) and convert it with "
    "llama.cpp's convert_hf_to_gguf.py"
)


@dataclass
class GgufPlan:
    """What the conversion needs to know before any weight loads (every refusal is made here)."""

    arch: str  # llama.cpp's name: "llama", "qwen2"
    permute: bool  # q/k rows reordered for llama.cpp's rope
    hparams: dict[str, Any]  # the model's config, as a dict
    rope: dict[str, Any]  # rope_parameters, with rope_theta and rope_type filled in as the converter does
    pre: str  # tokenizer.ggml.pre
    vocab: str = "gpt2"  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SentencePiece)


def gguf_file_name(run: Path, quant: str) -> str:
    return f"{Path(run).resolve().name or 'model'}.{quant.upper()}.gguf"


def ollama_modelfile(gguf_name: str, eos_token: str | None, dataset: dict[str, Any]) -> str:
    """An Ollama Modelfile for `gguf_name` (beside it): `ollama create NAME -f Modelfile`. `dataset`: the run's
    dataset section, as recipe.resolved.yaml holds it.

    An alpaca run was trained on our alpaca prompt, which no chat template of the tokenizer gives: the Modelfile
    then holds that prompt as its TEMPLATE (Ollama's `.Prompt` is the instruction). Chat runs leave TEMPLATE out, so
    that Ollama takes the chat template the GGUF carries (the one the run trained with). The stop is the EOS token
    that ends every trained response."""
    from .data import ALPACA_PROMPT

    formats = {dataset.get("format")} | {m.get("format") or dataset.get("format") for m in dataset.get("mix") or []}
    lines = [
        "# Ollama: `ollama create <name> -f Modelfile` in this folder (written by `mgpu export --format gguf`)",
        f"FROM ./{gguf_name}",
    ]
    if formats == {"alpaca"}:
        prompt = ALPACA_PROMPT.format(input_clause="", instruction="{{ .Prompt }}", input_block="")
        lines.append(f'TEMPLATE """{prompt}{{{{ .Response }}}}"""')
    else:
        lines.append("# no TEMPLATE: Ollama uses the chat template stored in the GGUF")
    if eos_token:
        lines.append(f"PARAMETER stop {json.dumps(eos_token, ensure_ascii=False)}")
    return "\n".join(lines) + "\n"


def rope_parameters(hparams: dict[str, Any]) -> dict[str, Any]:
    """The rope settings of a config dict, as llama.cpp's converter reads them (transformers 5's rope_parameters,
    or an older config's rope_scaling and rope_theta)."""
    rope = dict(hparams.get("rope_parameters") or hparams.get("rope_scaling") or {})
    rope = dict(rope.get("full_attention", rope))
    if "rope_theta" not in rope and hparams.get("rope_theta") is not None:
        rope["rope_theta"] = hparams["rope_theta"]
    if "rope_type" not in rope and rope.get("type") is not None:
        rope["rope_type"] = rope["type"]
    if "original_max_position_embeddings" not in rope and hparams.get("original_max_position_embeddings"):
        rope["original_max_position_embeddings"] = hparams["original_max_position_embeddings"]
    return rope


def head_dim(hparams: dict[str, Any]) -> int:
    return hparams.get("head_dim") or hparams["hidden_size"] // hparams["num_attention_heads"]


def llama3_rope_factors(rope: dict[str, Any], dim: int) -> Any:
    """Per-frequency divisors of Llama 3.1's rope (written as the `rope_freqs` tensor), computed as llama.cpp's
    converter computes them (in float32 torch, for the same bits): 1 for short wavelengths, `factor` for long
    ones, a smooth blend between."""
    import torch

    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_context = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_context / low, old_context / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


def check_model(hparams: dict[str, Any], where: str) -> tuple[str, bool, dict[str, Any]]:
    """(llama.cpp's architecture, whether q/k rows are permuted, the rope settings) of a config dict, or a
    UserError naming what GGUF export does not write and the route that does. `where` names the config file."""
    archs = hparams.get("architectures") or []
    arch_name = archs[0] if archs else hparams.get("model_type", "?")
    if arch_name not in ARCHITECTURES:
        raise UserError(
            Problem(
                where, f"GGUF export covers {', '.join(ARCHITECTURES)}; this model is {arch_name}", CONVERTER_ROUTE
            ),
            "cannot export",
        )
    arch, permute = ARCHITECTURES[arch_name]
    rope = rope_parameters(hparams)
    rope_type = rope.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise UserError(
            Problem(
                where,
                f"rope type {rope_type!r} is not one GGUF export writes ({', '.join(ROPE_TYPES)})",
                CONVERTER_ROUTE,
            ),
            "cannot export",
        )
    return arch, permute, rope


def plan_conversion(hparams: dict[str, Any], tokenizer: Any, tokenizer_dir: Path, where: str) -> GgufPlan:
    """Check that the model and its tokenizer (saved in `tokenizer_dir`, completed by complete_sentencepiece_files)
    convert: a UserError naming what does not, and the route that does."""
    arch, permute, rope = check_model(hparams, where)
    if (tokenizer_dir / SENTENCEPIECE_MODEL).is_file():
        check_sentencepiece_model(tokenizer_dir / SENTENCEPIECE_MODEL, tokenizer)
        return GgufPlan(arch, permute, hparams, rope, "default", "llama")
    if is_sentencepiece_json(tokenizer_dir) or arch == "gemma2":  # Gemma 2: the converter reads tokenizer.model only
        raise UserError(
            Problem(
                where,
                f"a SentencePiece tokenizer without its {SENTENCEPIECE_MODEL} (the piece scores llama.cpp "
                "tokenises by): it is in neither the run's folder nor the base model's",
                f"put the base model's {SENTENCEPIECE_MODEL} in the base's folder, or in the run's adapter folder "
                "(model/ for a full fine-tune)",
            ),
            "cannot export",
        )
    return GgufPlan(arch, permute, hparams, rope, pre_tokenizer(tokenizer, tokenizer_dir))


def is_sentencepiece_json(tokenizer_dir: Path) -> bool:
    """Whether the tokenizer.json in `tokenizer_dir` is a SentencePiece BPE tokenizer as transformers converts one
    (BPE with byte fallback, a decoder sequence): what llama.cpp's converter reads as a "llama" vocabulary."""
    source = tokenizer_dir / "tokenizer.json"
    if not source.is_file():
        return False
    spec = json.loads(source.read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback")) and decoder.get("type") == "Sequence"


def complete_sentencepiece_files(folder: Path, tokenizer: Any, find_source: Callable[[], Path | None]) -> bool:
    """After `tokenizer.save_pretrained(folder)`: give a SentencePiece tokenizer back the files transformers 5 no
    longer writes and llama.cpp's converter reads, `tokenizer.model` (copied from what `find_source` finds) and
    tokenizer_config.json's `added_tokens_decoder` (which of its tokens are special). Returns whether
    `tokenizer.model` was written.

    Nothing is done (and nothing looked for) for other tokenizers or when `folder` has a `tokenizer.model` already;
    nothing either when `find_source` finds none."""
    import shutil

    if (folder / SENTENCEPIECE_MODEL).is_file() or not is_sentencepiece_json(folder):
        return False
    source = find_source()
    if source is None:
        return False
    shutil.copyfile(source, folder / SENTENCEPIECE_MODEL)
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    config["added_tokens_decoder"] = {
        str(i): {
            "content": t.content,
            "lstrip": t.lstrip,
            "normalized": t.normalized,
            "rstrip": t.rstrip,
            "single_word": t.single_word,
            "special": t.special,
        }
        for i, t in sorted(tokenizer.added_tokens_decoder.items())
    }
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return True


def check_sentencepiece_model(path: Path, tokenizer: Any) -> None:
    """A UserError unless the SentencePiece model at `path` has the tokenizer's pieces at the same ids (a base's
    tokenizer.model next to a run whose tokenizer is another's would give llama.cpp the wrong vocabulary)."""
    from sentencepiece import SentencePieceProcessor

    try:
        sp = SentencePieceProcessor(model_file=str(path))
    except (OSError, RuntimeError) as exc:
        raise UserError(
            Problem(str(path), f"cannot read this SentencePiece model: {str(exc).splitlines()[0]}"), "cannot export"
        ) from exc
    pieces = tokenizer.convert_ids_to_tokens(list(range(sp.vocab_size())))
    for i, piece in enumerate(pieces):
        if sp.IdToPiece(i) != piece:
            raise UserError(
                Problem(
                    str(path),
                    f"this SentencePiece model is not the run's tokenizer: id {i} is {sp.IdToPiece(i)!r} in it and "
                    f"{piece!r} in the tokenizer",
                    f"use the {SENTENCEPIECE_MODEL} of the base model the run trained",
                ),
                "cannot export",
            )


def sentencepiece_vocab(tokenizer_dir: Path, vocab_size: int) -> tuple[list[bytes], list[float], list[int]]:
    """Tokens, scores and token types as the converter's _create_vocab_sentencepiece gives them: the SentencePiece
    model's pieces, scores and kinds; then added_tokens.json's tokens (user-defined) and tokenizer_config.json's
    added_tokens_decoder (control when special or looking special, else user-defined), scored -1000; ids with no
    token `[PADn]`, unused."""
    from sentencepiece import SentencePieceProcessor

    sp = SentencePieceProcessor(model_file=str(tokenizer_dir / SENTENCEPIECE_MODEL))
    tokens = [f"[PAD{i}]".encode() for i in range(vocab_size)]
    scores = [-10000.0] * vocab_size
    types = [SPM_UNUSED] * vocab_size
    for i in range(min(sp.vocab_size(), vocab_size)):
        kind = SPM_NORMAL
        if sp.IsUnknown(i):
            kind = SPM_UNKNOWN
        elif sp.IsControl(i):
            kind = SPM_CONTROL
        elif sp.IsUnused(i):
            kind = SPM_UNUSED
        elif sp.IsByte(i):
            kind = SPM_BYTE
        tokens[i], scores[i], types[i] = sp.IdToPiece(i).encode(), sp.GetScore(i), kind
    added_file = tokenizer_dir / "added_tokens.json"
    if added_file.is_file():
        for token, i in json.loads(added_file.read_text(encoding="utf-8")).items():
            if i < vocab_size:
                tokens[i], scores[i], types[i] = token.encode(), -1000.0, SPM_USER_DEFINED
    config_file = tokenizer_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    for key, data in (config.get("added_tokens_decoder") or {}).items():
        i, token = int(key), data["content"]
        if i >= vocab_size:
            continue
        if data.get("special") or _looks_special(token):
            types[i] = SPM_CONTROL
        else:
            token = token.replace("\u2581", " ")  # the converter's pre-normalised user-defined spaces
            types[i] = SPM_USER_DEFINED
        tokens[i], scores[i] = token.encode(), -1000.0
    return tokens, scores, types


def pre_tokenizer(tokenizer: Any, tokenizer_dir: Path) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer: looked up as its converter looks it up (the sha256 of
    the ids of CHKTXT), else a plain GPT-2 byte-level pre-tokenizer ("gpt-2"); a UserError for anything else."""
    from .gguf_pretok import CHKTXT, PRE_TOKENIZERS

    source = tokenizer_dir / "tokenizer.json"
    if not source.is_file():
        raise UserError(
            Problem(
                str(tokenizer_dir),
                "GGUF export writes byte-level BPE and SentencePiece tokenizers; found no tokenizer.json",
                CONVERTER_ROUTE,
            ),
            "cannot export",
        )
    spec = json.loads(source.read_text(encoding="utf-8"))
    model, decoder = spec.get("model") or {}, spec.get("decoder") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback") or decoder.get("type") != "ByteLevel":
        kind = f"a {model.get('type', '?')} tokenizer" + (" with byte fallback" if model.get("byte_fallback") else "")
        raise UserError(
            Problem(
                str(source),
                f"GGUF export writes byte-level BPE and SentencePiece tokenizers; found {kind}",
                CONVERTER_ROUTE,
            ),
            "cannot export",
        )
    digest = hashlib.sha256(str(tokenizer.encode(CHKTXT, verbose=False)).encode()).hexdigest()
    if digest in PRE_TOKENIZERS:
        return PRE_TOKENIZERS[digest]
    by_regex = _pre_tokenizer_by_regex(spec.get("pre_tokenizer") or {})
    if by_regex:
        return by_regex
    raise UserError(
        Problem(
            str(source),
            f"llama.cpp does not know this tokenizer's pre-tokenizer (check hash {digest[:16]}...)",
            "a newer llama.cpp may: " + CONVERTER_ROUTE,
        ),
        "cannot export",
    )


# The splitting regexes of llama.cpp's pre-tokenizers that a tokenizer.json spells out (llama-vocab.cpp): a
# tokenizer not in the hash table (one trained or rebuilt here) that splits by one of them is named after it.
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_SPLIT_REGEXES = {_WORDS + r"\p{N}{1,3}" + _REST: "llama-bpe", _WORDS + r"\p{N}" + _REST: "qwen2"}


def _pre_tokenizer_by_regex(pre: dict[str, Any]) -> str | None:
    """ "gpt-2" for GPT-2's byte-level pre-tokenizer (its built-in regex), "llama-bpe"/"qwen2" for a Split by Llama
    3's/Qwen2's regex then byte-level; None for anything else."""
    if pre.get("type") == "ByteLevel":
        return "gpt-2" if pre.get("use_regex", True) and not pre.get("add_prefix_space", False) else None
    steps = pre.get("pretokenizers") or []
    if pre.get("type") != "Sequence" or len(steps) != 2:
        return None
    split, byte_level = steps
    if split.get("type") != "Split" or split.get("behavior") != "Isolated" or split.get("invert"):
        return None
    if byte_level.get("type") != "ByteLevel" or byte_level.get("use_regex") or byte_level.get("add_prefix_space"):
        return None
    return _SPLIT_REGEXES.get((split.get("pattern") or {}).get("Regex", ""))


def permute_qk(weights: Any, n_head: int, n_head_kv: int | None = None) -> Any:
    """Reorder q/k rows from HF's rotate-half rope layout to llama.cpp's interleaved one (the converter's
    LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (
        weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and token types as the converter's get_vocab_base gives them: added tokens are CONTROL when special
    (or when they look special, `<|...|>`), else USER_DEFINED; ids with no token are `[PADn]`, UNUSED."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<\uff5c") and token.endswith("\uff5c>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def write_gguf(
    state: dict[str, Any],
    tokenizer_dir: Path,
    tokenizer: Any,
    plan: GgufPlan,
    path: Path,
    quant: str,
    name: str,
    say: Callable[[str], None] | None = None,
    shown: str | None = None,
) -> dict[str, int]:
    """Write `state` (HF parameter names -> float32 tensors) and the tokenizer saved in `tokenizer_dir` to `path`
    (`shown`: the name to say it is writing, where `path` is a temporary name).

    Returns how many tensors went out in each GGML type (e.g. {"Q8_0": 14, "F32": 5})."""
    import gguf
    import torch

    say = say or (lambda message: None)
    hp = plan.hparams
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
    }[quant]
    names = _tensor_names(plan)
    n_head, n_head_kv = hp["num_attention_heads"], hp.get("num_key_value_heads")

    tensors: list[tuple[str, Any]] = []
    rope_freqs = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
    if plan.rope.get("rope_type") == "llama3":
        factors = llama3_rope_factors(plan.rope, head_dim(hp))
        tensors.append((rope_freqs, factors))
    for key, value in state.items():
        if key.endswith((".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")):
            continue
        if key == "lm_head.weight" and (hp.get("tie_word_embeddings") or plan.arch == "gemma2"):
            continue  # llama.cpp reads a tied output from token_embd (Gemma 2's always: the converter drops lm_head)
        new = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise UserError(Problem(key, f"no GGUF name for this {plan.arch} tensor", CONVERTER_ROUTE), "cannot export")
        data = value.detach().to(torch.float32)
        if plan.arch == "gemma2" and key.endswith("norm.weight"):
            data = data + 1  # Gemma's RMSNorm scales by 1 + weight; llama.cpp's by the weight
        if plan.permute and key.endswith(("q_proj.weight", "q_proj.bias")):
            data = permute_qk(data, n_head, n_head)
        elif plan.permute and key.endswith(("k_proj.weight", "k_proj.bias")):
            data = permute_qk(data, n_head, n_head_kv)
        tensors.append((new, data))

    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    counts, total = _add_tensors(writer, tensors, quant, say, skip_count=(rope_freqs,))

    # general.*, as the converter's metadata writes them for a model with no model card
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_size_label(gguf.size_label(total, 0, 0, 0))
    if plan.arch == "gemma2":
        _add_gemma2_hyperparameters(writer, hp, file_type)
    else:
        _add_hyperparameters(writer, plan, file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    _add_tokenizer(writer, plan, tokenizer, tokenizer_dir)

    _write_file(writer, path, counts, say, shown)
    return counts


def _tensor_names(plan: GgufPlan) -> Any:
    """The converter's HF -> GGUF tensor name map for the plan's architecture and depth."""
    import gguf

    arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == plan.arch)
    return gguf.get_tensor_name_map(arch, plan.hparams["num_hidden_layers"])


def _write_file(writer: Any, path: Path, counts: dict[str, int], say: Callable[[str], None], shown: str | None) -> None:
    """Write what `writer` holds to `path` (header, key-values, tensors); `shown` names it where `path` is a
    temporary name."""
    say(f"writing {shown or path.name}: {', '.join(f'{n} {k}' for k, n in counts.items())} tensors")
    writer.write_header_to_file(path=path)
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file(progress=False)
    writer.close()


def _add_tensors(
    writer: Any, tensors: list[tuple[str, Any]], quant: str, say: Callable[[str], None], skip_count: tuple = ()
) -> tuple[dict[str, int], int]:
    """Quantise and add `tensors` (GGUF name, float32 tensor) as the converter's prepare_tensors does: norms, 1-D
    tensors and anything but a weight or a LoRA half stay float32; a row that is not a multiple of the block size
    falls back to float16. Returns (tensors per GGML type, parameters outside `skip_count`)."""
    import gguf
    import numpy as np

    wanted = {
        "f32": gguf.GGMLQuantizationType.F32,
        "f16": gguf.GGMLQuantizationType.F16,
        "bf16": gguf.GGMLQuantizationType.BF16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }[quant]
    counts: dict[str, int] = {}
    total = 0
    say(f"converting {len(tensors)} tensors to {quant}")
    with work_progress(len(tensors), "converting", unit="tensors", minimum=PROGRESS_TENSORS) as advance:
        for new, data in tensors:
            array = data.numpy()
            qtype = wanted
            if array.ndim <= 1 or new.endswith("_norm.weight") or not new.endswith((".weight", ".lora_a", ".lora_b")):
                qtype = gguf.GGMLQuantizationType.F32  # norms, biases and rope factors stay float32 for llama.cpp
            try:
                out = gguf.quants.quantize(array, qtype)
            except gguf.QuantError:  # a row not a multiple of the block size: float16, the converter's fallback
                qtype = gguf.GGMLQuantizationType.F16
                out = gguf.quants.quantize(array, qtype)
            writer.add_tensor(new, out, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
            if new not in skip_count:
                total += int(np.prod(array.shape))
            advance(1)
    return counts, total


def _add_hyperparameters(writer: Any, plan: GgufPlan, file_type: Any) -> None:
    """The model's hyperparameters as the converter's TextModel.set_gguf_parameters writes them (Llama and
    Mistral add LlamaModel's two keys)."""
    import gguf

    hp = plan.hparams
    n_head, n_head_kv = hp["num_attention_heads"], hp.get("num_key_value_heads")
    writer.add_block_count(hp["num_hidden_layers"])
    if hp.get("max_position_embeddings") is not None:
        writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(n_head)
    if n_head_kv is not None:
        writer.add_head_count_kv(n_head_kv)
    rope_type, factor = plan.rope.get("rope_type"), plan.rope.get("factor")
    if rope_type == "linear" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(plan.rope["original_max_position_embeddings"])
        for key, add in (
            ("extrapolation_factor", writer.add_rope_scaling_yarn_ext_factor),
            ("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
            ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
            ("beta_slow", writer.add_rope_scaling_yarn_beta_slow),
        ):
            if plan.rope.get(key) is not None:
                add(plan.rope[key])
    if plan.rope.get("rope_theta") is not None:
        writer.add_rope_freq_base(plan.rope["rope_theta"])
    if hp.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    if hp.get("head_dim") is not None:
        writer.add_key_length(hp["head_dim"])
        writer.add_value_length(hp["head_dim"])
    writer.add_file_type(file_type)
    if plan.arch == "llama":  # LlamaModel.set_gguf_parameters adds these two
        writer.add_vocab_size(hp["vocab_size"])
        writer.add_rope_dimension_count(head_dim(hp))


def _add_gemma2_hyperparameters(writer: Any, hp: dict[str, Any], file_type: Any) -> None:
    """Gemma 2's hyperparameters as the converter's Gemma2Model.set_gguf_parameters writes them (its own list: no
    rope keys, the two soft-caps and the sliding window)."""
    writer.add_context_length(hp["max_position_embeddings"])
    writer.add_embedding_length(hp["hidden_size"])
    writer.add_block_count(hp["num_hidden_layers"])
    writer.add_feed_forward_length(hp["intermediate_size"])
    writer.add_head_count(hp["num_attention_heads"])
    writer.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    writer.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    writer.add_key_length(hp["head_dim"])
    writer.add_value_length(hp["head_dim"])
    writer.add_file_type(file_type)
    writer.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(hp["final_logit_softcapping"])
    writer.add_sliding_window(hp["sliding_window"])


def _add_tokenizer(writer: Any, plan: GgufPlan, tokenizer: Any, tokenizer_dir: Path) -> None:
    """The tokenizer as the converter's set_vocab writes it: _set_vocab_gpt2 for a byte-level BPE tokenizer,
    _set_vocab_sentencepiece for a SentencePiece one; LlamaModel.set_vocab first reads add_prefix_space and
    ends with its CodeLlama and SmolLM rules, Gemma2Model's ends with add_space_prefix false."""
    import gguf

    hp = plan.hparams
    config_file = tokenizer_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    if plan.arch == "llama" and tokenizer_config.get("add_prefix_space") is not None:
        writer.add_add_space_prefix(tokenizer_config["add_prefix_space"])
    logging.getLogger("gguf").setLevel(logging.ERROR)  # its notes on the tokenizer's post-processor are not ours
    if plan.vocab == "llama":
        tokens, scores, types = sentencepiece_vocab(tokenizer_dir, hp["vocab_size"])
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        gguf.SpecialVocab(tokenizer_dir, n_vocab=len(tokens)).add_to_gguf(writer, quiet=True)
    else:
        tokens, types = vocab(tokenizer, hp["vocab_size"])
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(plan.pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(tokenizer_dir, load_merges=True).add_to_gguf(writer, quiet=True)
    if plan.arch == "llama" and hp["vocab_size"] == 32016:  # the converter's CodeLlama infill tokens
        infill = gguf.SpecialVocab(
            tokenizer_dir, load_merges=False, special_token_types=["prefix", "suffix", "middle", "eot"]
        )
        for kind, i in (("prefix", 32007), ("suffix", 32008), ("middle", 32009), ("eot", 32010)):
            infill._set_special_token(kind, i)
        infill.add_to_gguf(writer, quiet=True)
    if plan.arch == "llama" and hp["vocab_size"] == 49152:  # the converter's rule for SmolLM-sized vocabularies
        writer.add_add_bos_token(False)
    if plan.arch == "gemma2":
        writer.add_add_space_prefix(False)


def lora_file_name(run: Path, quant: str) -> str:
    return f"{Path(run).resolve().name or 'model'}.LoRA.{quant.upper()}.gguf"


def lora_gguf_refusal(config: dict[str, Any]) -> tuple[str, str] | None:
    """(the adapter_config.json key, why) for what a LoRA GGUF cannot hold, or None: DoRA's magnitudes, per-module
    ranks or alphas, whole trained modules (modules_to_save), LoRA on the embeddings or the head. The merged GGUF
    export (--format gguf) carries all of them."""
    if config.get("use_dora"):
        return "use_dora", "a DoRA adapter: its magnitude vectors have no place in a LoRA GGUF"
    for key in ("rank_pattern", "alpha_pattern"):
        if config.get(key):
            return key, "per-module ranks or alphas (rank_pattern, alpha_pattern): a LoRA GGUF holds one alpha"
    if config.get("modules_to_save"):
        modules = ", ".join(config["modules_to_save"])
        return "modules_to_save", f"whole trained modules ({modules}): a LoRA GGUF holds LoRA pairs only"
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else targets
    heads = [t for t in targets if t.rsplit(".", 1)[-1] in ("embed_tokens", "lm_head")]
    if heads:
        why = f"LoRA on {', '.join(heads)}: llama.cpp's LoRA GGUF export covers the decoder layers' projections"
        return "target_modules", why
    return None


LORA_GGUF_ROUTE = "export the merged model instead: `mgpu export OUTPUT_DIR --format gguf`"


def check_lora_adapter(adapter_dir: Path) -> tuple[dict[str, Any], float]:
    """The adapter's config and the alpha llama.cpp must be given, or a UserError (lora_gguf_refusal).

    llama.cpp scales every pair by alpha / rank (the rank read from the tensors): an rsLoRA adapter (alpha /
    sqrt(rank)) gets alpha x sqrt(rank), so that the product is its own scale."""
    config_file = adapter_dir / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    refusal = lora_gguf_refusal(config)
    if refusal is not None:
        raise UserError(Problem(str(config_file), refusal[1], LORA_GGUF_ROUTE), "cannot export")
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        alpha *= math.sqrt(float(config["r"]))
    return config, alpha


def write_lora_gguf(
    adapter_dir: Path,
    plan: GgufPlan,
    path: Path,
    quant: str,
    name: str,
    say: Callable[[str], None] | None = None,
    shown: str | None = None,
) -> dict[str, int]:
    """Write the PEFT adapter in `adapter_dir` as a LoRA GGUF for the base `plan` describes (llama.cpp's `--lora`,
    Ollama's ADAPTER), as llama.cpp's convert_lora_to_gguf.py writes it: each pair as `<tensor>.lora_a` /
    `.lora_b` under the base's tensor names, B's rows in llama.cpp's q/k order, general.* from the adapter's model
    card, `adapter.lora.alpha`. `name`: general.name where the model card gives none."""
    import gguf
    import torch
    from safetensors.torch import load_file

    say = say or (lambda message: None)
    _, alpha = check_lora_adapter(adapter_dir)
    hp = plan.hparams
    n_head, n_head_kv = hp["num_attention_heads"], hp.get("num_key_value_heads")
    names = _tensor_names(plan)
    pairs: dict[str, dict[str, Any]] = {}
    for key, value in load_file(str(adapter_dir / "adapter_model.safetensors")).items():
        half = "a" if ".lora_A.weight" in key else "b" if ".lora_B.weight" in key else None
        if half is None:
            raise UserError(
                Problem(key, "not a LoRA tensor (lora_A or lora_B)", "export the merged model: --format gguf"),
                "cannot export",
            )
        base = key.replace("base_model.model.", "").replace(f".lora_{half.upper()}.weight", ".weight")
        pairs.setdefault(base, {})[half] = value.detach().to(torch.float32)
    tensors: list[tuple[str, Any]] = []
    for base, halves in pairs.items():
        new = names.get_name(base, try_suffixes=(".weight", ".bias"))
        if new is None or set(halves) != {"a", "b"}:
            what = f"no GGUF name for this {plan.arch} tensor" if new is None else "half a LoRA pair"
            raise UserError(Problem(base, what, CONVERTER_ROUTE), "cannot export")
        b = halves["b"]
        if plan.permute and base.endswith("q_proj.weight"):
            b = permute_qk(b, n_head, n_head)  # W = B A: its rows reorder with B's
        elif plan.permute and base.endswith("k_proj.weight"):
            b = permute_qk(b, n_head, n_head_kv)
        tensors += [(new + ".lora_a", halves["a"]), (new + ".lora_b", b)]

    writer = gguf.GGUFWriter(path=None, arch=plan.arch)
    counts, _ = _add_tensors(writer, tensors, quant, say)
    # general.*, as the converter's prepare_metadata writes them from the adapter's model card (PEFT's README.md)
    total = writer.get_total_parameter_count()
    metadata = gguf.Metadata.load(None, adapter_dir, None, total[0])
    metadata.name = metadata.name or name
    if metadata.size_label is None and total[0] > 0:
        metadata.size_label = gguf.size_label(*total)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    metadata.set_gguf_meta_model(writer)
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_file(writer, path, counts, say, shown)
    return counts
