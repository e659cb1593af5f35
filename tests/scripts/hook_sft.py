"""An ordinary Unsloth + TRL SFT script plus the one enable_multi_gpu line (used by tests/test_api_hooks.py).

    HOOK_NGPU=2 HOOK_BS=2 HOOK_SEED=3 HOOK_DUMP=/tmp/d python tests/scripts/hook_sft.py

Only the lines marked `test instrumentation` are not part of the ordinary script: they dump each rank's
trainable weights and the samples it was given.
"""

import os

import unsloth_multigpu

unsloth_multigpu.enable_multi_gpu(
    num_gpus=int(os.environ["HOOK_NGPU"]),
    batch_size_per_gpu=int(os.environ["HOOK_BS"]),
    gradient_aggregation="weighted",
    verify_every=1,
)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.models import ensure_builtin_model  # noqa: E402

SEED = int(os.environ.get("HOOK_SEED", "3"))
model, tokenizer = FastLanguageModel.from_pretrained(
    model_name=str(ensure_builtin_model("builtin:tiny-llama")),
    max_seq_length=128,
    dtype=torch.float32,
    load_in_4bit=False,
)
model = FastLanguageModel.get_peft_model(
    model,
    r=8,
    lora_alpha=16,
    lora_dropout=0.0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
    use_gradient_checkpointing=False,
    random_state=SEED,
)
# 48 rows of different lengths: ranks see different token counts, which `weighted` aggregation handles exactly
rows = [
    {
        "text": f"Question {i}: what is {i} plus {i * 7 % 13}? "
        + "Let us think. " * (i % 5)
        + f"Answer: {i + i * 7 % 13}."
    }
    for i in range(48)
]
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    # HOOK_ITERABLE=1: a streaming-style dataset, which hook mode cannot shard (refused before the first step)
    train_dataset=Dataset.from_list(rows).to_iterable_dataset()
    if os.environ.get("HOOK_ITERABLE")
    else Dataset.from_list(rows),
    args=SFTConfig(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=1,
        max_steps=4,
        learning_rate=5e-3,
        warmup_steps=0,
        lr_scheduler_type="linear",
        optim=os.environ.get("HOOK_OPTIM", "adamw_torch"),
        max_grad_norm=float(os.environ.get("HOOK_CLIP", "1.0")),
        bf16=False,  # exact comparison: bf16 autocast rounding depends on how a batch is split
        fp16=False,
        weight_decay=0.0,
        seed=SEED,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        output_dir=os.environ["HOOK_DUMP"],
        dataset_text_field="text",
        max_length=128,
        padding_free=False,
    ),
)
trainer.train()

# test instrumentation
import json  # noqa: E402

from safetensors.torch import save_file  # noqa: E402

report = unsloth_multigpu.worker_report()
save_file(
    {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad},
    os.path.join(os.environ["HOOK_DUMP"], f"rank{report['rank']}.safetensors"),
)
report["logged_loss"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
with open(os.path.join(os.environ["HOOK_DUMP"], f"rank{report['rank']}.json"), "w") as fh:
    json.dump(report, fh)
