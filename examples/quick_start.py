"""Hook mode: an ordinary Unsloth + TRL fine-tuning script, made multi-GPU by one added line.

    python examples/quick_start.py                       # every visible GPU (1 CPU worker without a GPU)
    python examples/quick_start.py --num-gpus 2          # 2 GPUs, or 2 CPU worker processes without a GPU
    python examples/quick_start.py --model /tmp/models/llama-1b --data gpu-data/gsm8k_train_alpaca.json \
        --steps 40 --batch-size 8 --num-gpus 2           # a real run (prints tokens/s)

Everything below the `enable_multi_gpu` line is what you would write for one GPU. The line re-launches
this script once per GPU; each copy trains on its own slice of every global batch, and the gradients
are combined before each optimizer step, so the run equals one GPU with `num_gpus` times the batch.
"""

import argparse
import os

import unsloth_multigpu

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--num-gpus", type=int, default=None)
ap.add_argument("--model", default="builtin:tiny-llama", help="builtin:tiny-llama, a local folder or a hub id")
ap.add_argument("--data", default=None, help="alpaca .json/.jsonl (default: a few built-in examples)")
ap.add_argument("--steps", type=int, default=3)
ap.add_argument("--batch-size", type=int, default=2, help="per GPU")
ap.add_argument("--seq-len", type=int, default=256)
ap.add_argument("--output", default="outputs/quick_start")
args = ap.parse_args()

# The one line. weighted: N GPUs compute exactly the update of one GPU over the whole global batch.
unsloth_multigpu.enable_multi_gpu(
    num_gpus=args.num_gpus, batch_size_per_gpu=args.batch_size, gradient_aggregation="weighted"
)

import torch  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.models import resolve_model_path  # noqa: E402

on_gpu = torch.cuda.is_available()
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=resolve_model_path(args.model),
    max_seq_length=args.seq_len,
    dtype=None if on_gpu else torch.float32,
    load_in_4bit=on_gpu,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=16,
    lora_alpha=16,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing="unsloth" if on_gpu else False,
    random_state=3407,
)

if args.data:
    rows = load_dataset("json", data_files=args.data, split="train")
else:
    from unsloth_mgpu_cli.templates import generate_quickstart_rows

    rows = Dataset.from_list(generate_quickstart_rows(64, seed=0))


def to_text(row):
    return {
        "text": f"### Instruction:\n{row['instruction']}\n{row.get('input') or ''}\n\n### Response:\n"
        f"{row['output']}{tokenizer.eos_token}"
    }


dataset = rows.map(to_text, remove_columns=rows.column_names)
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=dataset,
    args=SFTConfig(
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        output_dir=args.output,
        dataset_text_field="text",
        max_length=args.seq_len,
        optim="adamw_torch",
        seed=3407,
    ),
)
trainer.train()
model.save_pretrained(os.path.join(args.output, "adapter"))  # rank 0 writes; the other ranks skip it

if unsloth_multigpu.is_main_process():
    report = unsloth_multigpu.worker_report()  # tokens are counted over all workers
    print(
        f"done: {report['optimizer_steps']} steps on {report['world_size']} worker(s); final loss "
        f"{trainer.state.log_history[-2]['loss']:.4f}; {report['tokens']} tokens in {report['train_seconds']:.1f} s: "
        f"{report['tokens_per_second']:,.0f} tokens/s (steady {report.get('steady_tokens_per_second', 0):,.0f}); "
        f"adapter in {os.path.join(args.output, 'adapter')}"
    )
