"""Unsloth's own multi-GPU route, measured like `mgpu train`: TRL SFTTrainer + Unsloth, one process per GPU.

    python3 benchmarks/trl_baseline.py --model /tmp/models/llama-1b --data gpu-data/gsm8k_train_alpaca.json \
        --out /tmp/trl-1 --mode pf                                          # 1 GPU
    python3 -m torch.distributed.run --standalone --nproc_per_node 2 benchmarks/trl_baseline.py ... --mode pack

Same prompt as `unsloth_mgpu_cli.data.render_alpaca` (as a prompt/completion dataset, so that TRL computes the loss
on the response only, as `mgpu` does for alpaca data), LoRA r=16/alpha=16 on all seven projections, dropout 0.
`--mode pf` leaves `padding_free` unset (Unsloth's default choice, recorded in the result); `--mode pack` sets
`packing=True`. Each rank writes OUT/rank<r>.json: per optimizer step the real (non-padding) tokens and samples it
consumed, counted on the batches that `training_step` actually received, the wall-clock end of the step, the logged
loss, and torch.cuda.max_memory_allocated. benchmarks/run.py merges the ranks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

PROCESS_START = time.time()
ROOT = Path(__file__).resolve().parents[1]
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_batch(batch: dict[str, Any], pad_token_id: int | None) -> tuple[Any, Any]:
    """(real tokens, samples) of one micro-batch as 0-d tensors on the batch's device (no host sync).

    Padded batches carry an attention_mask: tokens = its sum, samples = rows with any token. Padding-free and packed
    batches (TRL's collator with padding_free) are flattened rows with position_ids restarting at 0 for every sample
    and no attention_mask; only a trailing run of pad tokens at position 0 (pad_to_multiple_of) is padding, and
    samples are the positions where position_ids is 0 among the real tokens.
    """
    import torch

    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.shape == ids.shape:
        mask = mask.to(torch.int64)
        return mask.sum(), (mask.sum(-1) > 0).sum()
    pos = batch.get("position_ids")
    if pos is None:
        return torch.tensor(ids.numel(), device=ids.device), torch.tensor(ids.shape[0], device=ids.device)
    pos = pos.reshape(ids.shape)
    starts = pos == 0
    if pad_token_id is None:
        real = torch.ones_like(starts)
    else:
        padish = (ids == pad_token_id) & starts
        # trailing[i] is True when i and everything after it in the row is pad-at-position-0
        trailing = torch.flip(torch.cumprod(torch.flip(padish.to(torch.int64), [-1]), -1), [-1]).bool()
        real = ~trailing
    return real.sum(), (starts & real).sum()


def alpaca_prompt_completion(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Columns prompt/completion rendered with mgpu's own alpaca template."""
    sys.path.insert(0, str(ROOT))
    from unsloth_mgpu_cli.data import render_alpaca

    prompts, completions = [], []
    for row in rows:
        p, c = render_alpaca(row)
        prompts.append(p)
        completions.append(c)
    return {"prompt": prompts, "completion": completions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="local model folder")
    ap.add_argument("--data", required=True, help="alpaca JSON/JSONL")
    ap.add_argument("--out", type=Path, required=True, help="folder for rank<r>.json and the trainer's output")
    ap.add_argument(
        "--mode", choices=["pf", "pack"], default="pf", help="pf: Unsloth's default (padding-free); pack: packing=True"
    )
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--gradient-checkpointing", default="false", choices=["false", "true", "unsloth"])
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--cpu", action="store_true", help="CPU smoke: float32, no 4-bit, adamw_torch")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    launch_time = float(os.environ.get("BENCH_LAUNCH_TIME", PROCESS_START))
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    # Per-rank compile cache: ranks writing one unsloth_compiled_cache/ race (unsloth #3031).
    os.environ.setdefault("UNSLOTH_COMPILE_LOCATION", str(args.out / f"unsloth_compiled_rank{rank}"))

    # isort: off
    import torch
    from unsloth import FastLanguageModel  # Unsloth must be imported before transformers/trl/peft (it patches them)

    # isort: on
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from unsloth_mgpu_cli.profiling import StepProfiler

    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(local_rank)
    load_kwargs: dict[str, Any] = dict(
        model_name=args.model,
        max_seq_length=args.seq_len,
        dtype=torch.bfloat16 if cuda else torch.float32,
        load_in_4bit=cuda,
    )
    if cuda:
        load_kwargs["device_map"] = {"": local_rank}  # each rank owns its GPU (no device_map="auto" under DDP)
    model, tokenizer = FastLanguageModel.from_pretrained(**load_kwargs)
    gc = {"false": False, "true": True, "unsloth": "unsloth"}[args.gradient_checkpointing]
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        target_modules=TARGET_MODULES,
        use_gradient_checkpointing=gc,
        random_state=args.seed,
    )
    datasets.disable_progress_bars()
    table = datasets.load_dataset("json", data_files=str(args.data), split="train")
    train = datasets.Dataset.from_dict(alpaca_prompt_completion(table.to_list()))

    config_kwargs: dict[str, Any] = dict(
        output_dir=str(args.out / "trainer"),
        per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=args.warmup_steps,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_8bit" if cuda else "adamw_torch",
        bf16=cuda,
        fp16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        max_length=args.seq_len,
        packing=args.mode == "pack",
        seed=args.seed,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        use_cpu=not cuda,
        disable_tqdm=True,
    )
    sft_config = SFTConfig(**config_kwargs)
    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=train, args=sft_config)
    pad_id = getattr(tokenizer, "pad_token_id", None)
    meter = _Meter(cuda, pad_id)
    original_step = trainer.training_step

    def counted_step(model_, inputs, *a, **kw):  # every micro-batch that is trained on passes here
        meter.count(inputs)
        return original_step(model_, inputs, *a, **kw)

    trainer.training_step = counted_step

    # MGPU_PROFILE=DIR:FIRST:LAST[:trace]: the same torch profiler report as `mgpu train` writes (profile-rank<R>.txt)
    profiler = StepProfiler.from_env(rank)

    class _Callback(TrainerCallback):
        def on_step_end(self, _args, state, control, **kwargs):
            meter.step_end(state.global_step)
            if profiler is not None:
                profiler.after_step(state.global_step)

        def on_log(self, _args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                meter.losses[state.global_step] = float(logs["loss"])

    trainer.add_callback(_Callback())
    if cuda:
        torch.cuda.synchronize()
    error = None
    try:
        trainer.train()
    except Exception as exc:  # recorded, then re-raised so the exit code says it failed
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        collator = getattr(trainer, "data_collator", None)
        result = {
            "rank": rank,
            "world_size": world,
            "mode": args.mode,
            "device": "cuda" if cuda else "cpu",
            "launch_time": launch_time,
            "process_start": PROCESS_START,
            "first_step_time": meter.first_step_time,
            "steps": meter.rows,
            "losses": meter.losses,
            "peak_memory_gb": (torch.cuda.max_memory_allocated() / 2**30) if cuda else _peak_rss_gb(),
            "peak_reserved_gb": (torch.cuda.max_memory_reserved() / 2**30) if cuda else None,
            "padding_free": bool(getattr(collator, "padding_free", False)),
            "padding_free_config": getattr(sft_config, "padding_free", None),
            "collator": type(collator).__name__,
            "packing": bool(sft_config.packing),
            "micro_batch": args.micro_batch,
            "grad_accum": args.grad_accum,
            "error": error,
            "versions": _versions(),
        }
        (args.out / f"rank{rank}.json").write_text(json.dumps(result, indent=1))


class _Meter:
    """Per-step real tokens/samples of the consumed micro-batches and the step's end time (after a device sync)."""

    def __init__(self, cuda: bool, pad_token_id: int | None):
        self.cuda, self.pad = cuda, pad_token_id
        self.tokens: Any = 0
        self.samples: Any = 0
        self.rows: list[dict[str, Any]] = []
        self.losses: dict[int, float] = {}
        self.first_step_time: float | None = None

    def count(self, inputs: dict[str, Any]) -> None:
        t, s = count_batch(inputs, self.pad)
        self.tokens = self.tokens + t
        self.samples = self.samples + s

    def step_end(self, step: int) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        now = time.time()
        if self.first_step_time is None:
            self.first_step_time = now
        self.rows.append({"step": step, "t": now, "tokens": int(self.tokens), "samples": int(self.samples)})
        self.tokens, self.samples = 0, 0


def _peak_rss_gb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def _versions() -> dict[str, str]:
    out = {}
    for name in ("torch", "transformers", "trl", "unsloth", "peft", "bitsandbytes"):
        try:
            from importlib.metadata import version

            out[name] = version(name)
        except Exception:
            out[name] = "?"
    return out


if __name__ == "__main__":
    main()
