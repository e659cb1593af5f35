"""Direct mode: MultiGPUTrainer with your own model, optimizer and data loader.

    python examples/direct_trainer_usage.py --num-gpus 2     # 2 GPUs, or 2 CPU workers without a GPU

`enable_multi_gpu` starts one worker per GPU, each running this script; every worker builds the same
model and data loader, and `MultiGPUTrainer` trains its slice of each batch and combines the gradients.
Each batch of the loader is one global batch, so the same script with --num-gpus 1 computes the same
weights (with weighted aggregation): the last line prints a checksum to compare (equal to float32 rounding,
about 7 significant digits: the ranks add their partial gradients in another order).
"""

import argparse

import unsloth_multigpu
from unsloth_multigpu import AggregationMethod, MultiGPUTrainer

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--num-gpus", type=int, default=None)
ap.add_argument("--model", default="builtin:tiny-llama")
ap.add_argument("--batch-size", type=int, default=4, help="global batch (rows per optimizer step, all GPUs)")
ap.add_argument("--samples", type=int, default=16)
args = ap.parse_args()

unsloth_multigpu.enable_multi_gpu(num_gpus=args.num_gpus)

import torch  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.models import resolve_model_path  # noqa: E402
from unsloth_mgpu_cli.templates import generate_quickstart_rows  # noqa: E402

on_gpu = torch.cuda.is_available()
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=resolve_model_path(args.model),
    max_seq_length=256,
    dtype=None if on_gpu else torch.float32,
    load_in_4bit=False,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    target_modules=["q_proj", "v_proj"],
    use_gradient_checkpointing=False,
    random_state=0,
)

texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in generate_quickstart_rows(args.samples, seed=0)]
encoded = [tokenizer(t, truncation=True, max_length=128)["input_ids"] for t in texts]


def collate(rows):
    """Right-pad a list of token lists; padding is masked out of attention and loss."""
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": mask}


# Every worker must iterate the same batches: a seeded generator (or shuffle=False) guarantees it.
loader = torch.utils.data.DataLoader(
    encoded, batch_size=args.batch_size, shuffle=True, collate_fn=collate, generator=torch.Generator().manual_seed(0)
)
trainer = MultiGPUTrainer(
    model=model,
    num_gpus=args.num_gpus,
    optimizer_config={"class": torch.optim.AdamW, "kwargs": {"lr": 5e-3, "weight_decay": 0.0}},
    aggregation_method=AggregationMethod.WEIGHTED,
    verify_every=1,
)
trainer.setup()
stats = trainer.train_epoch(loader)
checksum = sum(float(p.detach().double().abs().sum()) for p in trainer.params)
if trainer.is_main_process:
    print(
        f"epoch: loss {stats['loss']:.4f}, {stats['steps']} steps, {stats['tokens']} tokens on "
        f"{stats['world_size']} worker(s), {stats['time_s']:.1f} s ({stats['tokens_per_second']:,.0f} tokens/s)"
    )
    print(f"trainable weights checksum: {checksum:.6g}")
