"""Small models with SentencePiece tokenizers trained here, as Llama 2's and Gemma's are built (the hub is out of
reach): a Llama 2-style Llama and a Gemma 2, each in a base folder as the hub holds one. Used by test_gguf.py
(GGUF export) and test_families.py (training), and by benchmarks/families_gpu.py on the GPU machine: it needs
nothing of the test suite."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch

GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_train_alpaca.json"

# SentencePiece models: a Llama 2-style Llama (<unk> <s> </s>, a space prefix) and a Gemma 2 (<pad> <eos> <bos>
# <unk>, then <mask> and the turn markers as user-defined pieces, no space prefix), both BPE with byte fallback and
# digits split, as Llama 2's and Gemma's tokenizers are built
SPM_KINDS = {
    "llama2": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True),
    "gemma2": dict(
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        add_dummy_prefix=False,
        user_defined_symbols=["<mask>", "<start_of_turn>", "<end_of_turn>"],
    ),
}
# tokenizer_config.json as Llama 2's and Gemma's (a BOS first, no EOS)
SPM_TOKENIZERS = {
    "llama2": dict(tokenizer_class="LlamaTokenizer", bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    "gemma2": dict(
        tokenizer_class="GemmaTokenizer", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>"
    ),
}
for _config in SPM_TOKENIZERS.values():
    _config.update(add_bos_token=True, add_eos_token=False)
SPM_PROMPT = (
    "<start_of_turn>user\n### Instruction:\nAdd the two numbers.\n\n### Input:\n49 + 97\n\n### Response:\n"
    "  two  spaces, é and 漢<end_of_turn>"
)


def sentencepiece_model(kind: str, corpus: Path = GSM8K) -> bytes:
    """A 1024-piece SentencePiece BPE model of `kind`, trained on the first 1,000 rows of an alpaca JSON file (GSM8K:
    a tenth of a second)."""
    import sentencepiece

    rows = json.loads(Path(corpus).read_text())[:1000]
    lines = "\n".join(r["instruction"] + "\n" + r["output"] for r in rows).splitlines()
    out = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=1024,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        minloglevel=2,
        num_threads=1,
        **SPM_KINDS[kind],
    )
    return out.getvalue()


def sentencepiece_base(kind: str, folder: Path, corpus: Path = GSM8K, **shape: int) -> Path:
    """A base model folder as the hub holds one: config, weights, tokenizer.model, the tokenizer.json transformers
    converts from it, and a tokenizer_config.json naming each added token (`added_tokens_decoder`). `shape`
    overrides the model's dimensions (hidden_size=..., num_hidden_layers=...; tiny by default)."""
    from transformers import AutoTokenizer, Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    base = folder / f"{kind}-base"
    base.mkdir(parents=True)
    (base / "tokenizer.model").write_bytes(sentencepiece_model(kind, corpus))
    (base / "tokenizer_config.json").write_text(json.dumps(SPM_TOKENIZERS[kind]))
    tok = AutoTokenizer.from_pretrained(str(base))
    assert len(tok) == 1024  # no token added past the SentencePiece model's (Gemma's <mask> is one of its pieces)
    tok.save_pretrained(str(base))
    config = json.loads((base / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(i): dict(content=t.content, lstrip=t.lstrip, normalized=t.normalized, rstrip=t.rstrip)
        | dict(single_word=t.single_word, special=t.special)
        for i, t in tok.added_tokens_decoder.items()
    }
    (base / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    dims = dict(vocab_size=1024, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    dims |= dict(num_attention_heads=4, num_key_value_heads=2) | shape
    torch.manual_seed(0)
    if kind == "llama2":
        model = LlamaForCausalLM(LlamaConfig(**dims, bos_token_id=1, eos_token_id=2))
    else:  # Gemma 2 9B's attention shape: head_dim = query_pre_attn_scalar = 256, which llama.cpp assumes
        ids = dict(bos_token_id=2, eos_token_id=1, pad_token_id=0)
        model = Gemma2ForCausalLM(
            Gemma2Config(**dims, **ids, head_dim=256, query_pre_attn_scalar=256, sliding_window=64)
        )
    model.save_pretrained(str(base))
    return base
