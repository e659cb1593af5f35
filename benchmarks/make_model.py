"""Build Llama-shaped models with random weights locally (no hub) for GPU runs and benchmarks.

    python benchmarks/make_model.py --size 1b --out /tmp/models/llama-1b --corpus ../shared/data/gsm8k_train_alpaca.json

The tokenizer is a byte-level BPE trained on the given corpus (GSM8K: about 155 tokens per example).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

# (hidden, layers, intermediate, heads, kv_heads, vocab)
SIZES = {
    "tiny": (128, 2, 256, 4, 2, 1024),
    "1b": (2048, 16, 8192, 32, 8, 32000),  # Llama-3.2-1B shape with a 32k vocabulary: about 1.0B parameters
    "8b": (4096, 32, 14336, 32, 8, 32000),  # Llama-3.1-8B shape with a 32k vocabulary: about 7.2B parameters
    # Llama-3.2-1B with its real head: 128,256 rows (the tokenizer still learns about 25k tokens from GSM8K)
    "1b-v128k": (2048, 16, 8192, 32, 8, 128256),
}
PADDED = {"1b-v128k"}  # sizes whose embedding and head have the vocabulary's rows, used by the tokenizer or not


def corpus_from(path: Path) -> list[str]:
    rows = json.loads(path.read_text())
    return [f"{r['instruction']}\n{r.get('input', '')}\n{r['output']}" for r in rows]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="1b")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, required=True, help="alpaca JSON to train the tokenizer on")
    ap.add_argument(
        "--device", default="auto", help="where to draw the random weights: auto (cuda if present), cpu, cuda"
    )
    args = ap.parse_args()
    import torch

    from unsloth_mgpu_cli.models import build_tiny_llama

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    if (args.out / "config.json").exists():
        print(f"exists: {args.out}")
        return
    hidden, layers, inter, heads, kv, vocab = SIZES[args.size]
    t = time.time()
    build_tiny_llama(
        args.out,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        intermediate=inter,
        heads=heads,
        kv_heads=kv,
        corpus=corpus_from(args.corpus),
        dtype="bfloat16",
        device=device,
        vocab_rows=vocab if args.size in PADDED else None,
    )
    print(f"built {args.size} at {args.out} in {time.time() - t:.0f} s (weights drawn on {device})")


if __name__ == "__main__":
    main()
