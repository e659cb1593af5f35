"""Advanced configuration: inspect the devices, ask for an optimal configuration, pass it to enable_multi_gpu.

    python examples/advanced_config.py                        # on GPUs: sized for the GPUs found
    python examples/advanced_config.py --num-gpus 2 --gpu-memory 24GB    # without GPUs: a CPU demo

`ConfigManager().get_optimal_config(...)` runs the memory forecast behind `mgpu suggest`; its result is
accepted as is by `enable_multi_gpu(**config)` (batch size per GPU, accumulation, aggregation, and the
model-loading advice - 4-bit, checkpointing, sequence length - that the script applies itself).
"""

import argparse

import unsloth_multigpu
from unsloth_multigpu import ConfigManager, DeviceManager, MemoryManager

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("--model", default="builtin:tiny-llama")
ap.add_argument("--num-gpus", type=int, default=None)
ap.add_argument("--gpu-memory", default=None, help='memory per GPU, e.g. "24GB" (default: detected)')
ap.add_argument("--steps", type=int, default=2)
args = ap.parse_args()

from unsloth_mgpu_cli.models import resolve_model_path  # noqa: E402

model_path = resolve_model_path(args.model)
devices = DeviceManager().get_available_devices()
# Without a GPU there is no memory to detect: size the plan for a 24 GB card (the CPU demo trains anyway).
memory_per_gpu = args.gpu_memory or (None if devices else "24GB")
config = ConfigManager().get_optimal_config(
    model_size=model_path,
    available_memory=memory_per_gpu,
    num_gpus=args.num_gpus,  # None: the GPUs found here; in a worker (one GPU visible), the launched count
    seq_len=128,
    global_batch=8,
)
if unsloth_multigpu.dist_info() is None:  # the launching process (this part runs again in every worker)
    print(f"devices: {[f'{d.name} ({d.memory_total_gb:.0f} GB)' for d in devices] or 'no GPU (CPU workers)'}")
    print(f"optimal config: {config}")
    # OOM pre-flight: the forecast against the memory free right now (GPU, or host RAM without one).
    MemoryManager().check_fits(
        model_path,
        seq_len=config["max_seq_length"],
        micro_batch_size=config["batch_size_per_gpu"],
        method="qlora" if config["load_in_4bit"] else "lora",
        gradient_checkpointing=config["gradient_checkpointing"],
    )

settings = unsloth_multigpu.enable_multi_gpu(**config)

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402
from unsloth import FastLanguageModel  # noqa: E402

from unsloth_mgpu_cli.templates import generate_quickstart_rows  # noqa: E402

on_gpu = torch.cuda.is_available()
memory = MemoryManager()
with memory.phase("load"):
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=settings.max_seq_length,
        dtype=None if on_gpu else torch.float32,
        load_in_4bit=bool(settings.load_in_4bit) and on_gpu,
    )  # 4-bit needs a GPU
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        use_gradient_checkpointing=settings.gradient_checkpointing if on_gpu else False,
        random_state=0,
    )
rows = [{"text": f"{r['instruction']}\n{r['output']}{tokenizer.eos_token}"} for r in generate_quickstart_rows(64)]
trainer = SFTTrainer(
    model=model,
    processing_class=tokenizer,
    train_dataset=Dataset.from_list(rows),
    args=SFTConfig(
        per_device_train_batch_size=1,
        max_steps=args.steps,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        output_dir="outputs/advanced_config",
        dataset_text_field="text",
        max_length=settings.max_seq_length,
        optim="adamw_torch",
    ),
)
with memory.phase("train"):
    trainer.train()
if unsloth_multigpu.is_main_process():
    report = unsloth_multigpu.worker_report()
    print(
        f"trained {report['optimizer_steps']} steps on {report['world_size']} worker(s) with batch "
        f"{trainer.args.per_device_train_batch_size} per worker x {trainer.args.gradient_accumulation_steps} "
        f"accumulation (from the config); memory by phase: {memory.history}; now: {memory.get_memory_usage()}"
    )
