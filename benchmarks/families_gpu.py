"""Train a small model of each family the shipped recipes cover (Llama 2-style, Mistral, Qwen2, Gemma 2) with
`mgpu train` on one GPU, QLoRA as recipes/*/*_qlora.yaml, then export it as GGUF: does each family run through
Unsloth's CUDA kernels and our engine, and does its loss fall? Outside the test suite (tests/test_families.py
checks Gemma 2's equivalence on CPU); run by `benchmarks/gpu_plan.sh s27`.

    python benchmarks/families_gpu.py --data gpu-data/gsm8k_train_alpaca.json --out "$OUT/families"

Writes `families.json` (per family: exit codes, first and last logged loss, tokens/s, peak memory, the GGUF's size).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=8)


def build(kind: str, folder: Path, corpus: Path) -> Path:
    """A base folder of `kind`: the SentencePiece ones from tests/sentencepiece_models.py, Mistral and Qwen2 with
    the builtin byte-level BPE tokenizer (trained here)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from sentencepiece_models import sentencepiece_base

    if kind in ("llama2", "gemma2"):
        return sentencepiece_base(kind, folder, corpus, num_key_value_heads=4, **SHAPE)
    import torch
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from unsloth_mgpu_cli.models import ensure_builtin_model

    tok = AutoTokenizer.from_pretrained(str(ensure_builtin_model("builtin:tiny-llama")))
    dims = dict(SHAPE, vocab_size=len(tok), num_key_value_heads=4, bos_token_id=tok.bos_token_id)
    dims |= dict(eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    if kind == "mistral":
        model = MistralForCausalLM(MistralConfig(**dims, sliding_window=None))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**dims, tie_word_embeddings=True))
    base = folder / f"{kind}-base"
    model.to(torch.bfloat16).save_pretrained(str(base))
    tok.save_pretrained(str(base))
    return base


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--families", default="llama2,mistral,qwen2,gemma2")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an extra recipe override")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for kind in args.families.split(","):
        t = time.time()
        base = build(kind, args.out / "models", args.data)
        run = args.out / kind
        overrides = [
            f"model.name={base}",
            "model.load_in_4bit=true",
            "model.max_seq_length=512",
            f"dataset.path={args.data.resolve()}",
            "distributed.num_gpus=1",
            f"training.max_steps={args.steps}",
            "training.warmup_steps=0",
            "training.micro_batch_size=16",
            "training.learning_rate=2e-4",
            "training.optimizer=adamw_8bit",
            "output.save_steps=0",
            f"output.dir={run}",
            "output.export=[gguf]",
            "logging.progress=false",
            *args.set,
        ]
        cmd = [sys.executable, "-m", "unsloth_mgpu_cli", "train", str(ROOT / "recipes" / "quickstart.yaml")]
        proc = subprocess.run(cmd + overrides, capture_output=True, text=True, timeout=600)
        (args.out / f"{kind}.log").write_text(proc.stdout + proc.stderr)
        rows = []
        metrics = run / "metrics.jsonl"
        if metrics.is_file():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        steps = [r for r in rows if "loss" in r and "step" in r]
        summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
        gguf = sorted((run / "gguf").glob("*.gguf")) if (run / "gguf").is_dir() else []
        results[kind] = {
            "returncode": proc.returncode,
            "build_and_train_s": round(time.time() - t, 1),
            "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None,
            "steps": len(steps),
            "tokens_per_s": summary.get("steady_tokens_per_second"),
            "peak_memory_gb": summary.get("peak_memory_gb"),
            "gguf": [f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in gguf],
            "tail": (proc.stdout + proc.stderr)[-1500:] if proc.returncode else "",
            "traceback": "".join(p.read_text()[-4000:] for p in sorted((run / "logs").glob("*traceback*"))),
        }
        print(kind, json.dumps({k: v for k, v in results[kind].items() if k not in ("tail", "traceback")}), flush=True)
        if proc.returncode:
            print(results[kind]["traceback"] or results[kind]["tail"], flush=True)
    (args.out / "families.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
