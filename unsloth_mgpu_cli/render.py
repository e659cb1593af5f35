"""Rich rendering of recipes and summaries for the terminal (rank 0 / parent process only)."""

from __future__ import annotations

from rich.console import Console
from rich.panel import Panel
from rich.syntax import Syntax
from rich.table import Table

from .recipe import LoadedRecipe, to_yaml

console = Console(highlight=False)


def method_name(loaded: LoadedRecipe) -> str:
    r = loaded.recipe
    if r.lora is None:
        return "full fine-tuning"
    return "QLoRA (4-bit base + LoRA)" if r.model.load_in_4bit else "LoRA (16-bit base)"


def print_recipe(loaded: LoadedRecipe) -> None:
    """Print the resolved recipe as YAML plus a short summary of what it will do."""
    r = loaded.recipe
    title = f"resolved recipe: {loaded.path}" if loaded.path else "resolved recipe"
    console.print(Panel(Syntax(to_yaml(r), "yaml", theme="ansi_dark", background_color="default"), title=title))
    t = Table(show_header=False, box=None, pad_edge=False)
    t.add_row("method", method_name(loaded))
    t.add_row("workers", f"{r.distributed.num_gpus} on {r.distributed.device}")
    mb, ga = r.training.micro_batch_size, r.training.gradient_accumulation_steps
    t.add_row("global batch", f"{mb} x workers x {ga} samples per optimizer step")
    t.add_row("length", "max_steps=" + str(r.training.max_steps) if r.training.max_steps else f"{r.training.epochs} epoch(s)")
    autos = [k for k, v in (("training.micro_batch_size", mb), ("training.gradient_accumulation_steps", ga),
                            ("distributed.num_gpus", r.distributed.num_gpus),
                            ("memory.gradient_checkpointing", r.memory.gradient_checkpointing)) if v == "auto"]
    if autos:
        t.add_row("auto", ", ".join(autos) + " (filled at `mgpu train` from the detected hardware)")
    console.print(t)
    console.print("[green]valid[/]")


def print_summary(summary: dict) -> None:
    """The end-of-run table: time, tokens, throughput, memory per GPU, where the results are."""
    if not summary:
        return
    t = Table(title="run summary", show_header=False, box=None, pad_edge=False)
    t.add_row("steps", str(summary.get("steps")))
    t.add_row("time", f"{summary.get('elapsed_s', 0):.1f} s (first step after {summary.get('first_step_s') or 0:.1f} s)")
    t.add_row("tokens", f"{summary.get('tokens', 0):,} (non-padding, all workers)")
    world = max(1, int(summary.get("world_size", 1)))
    tps = float(summary.get("tokens_per_second", 0.0))
    t.add_row("throughput", f"{tps:,.0f} tokens/s total, {tps / world:,.0f} per worker")
    t.add_row("final loss", f"{summary.get('final_loss', float('nan')):.4f}")
    t.add_row("peak memory", " / ".join(f"{m:.2f}" for m in summary.get("peak_memory_gb", [])) + " GB per worker")
    t.add_row("output", str(summary.get("output_dir")))
    console.print(t)
