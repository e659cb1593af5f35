"""Measure Unsloth's real peak GPU memory and compare it with the forecast of `unsloth_mgpu_cli.memory`.

    HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 python benchmarks/memory_accuracy.py --out "$OUT" --gpus 2
    python benchmarks/memory_accuracy.py --tiny --out /tmp/memacc   # CPU plumbing check, tiny random model

Random-weight Llama models (about 1B, and Llama-3.1-8B dimensions with a 32k vocabulary) are built once
with transformers and saved in bf16 with a small WordLevel tokenizer. Each configuration then runs in its
own process (so peaks never mix; up to --gpus at a time, one GPU each): Unsloth's `from_pretrained`,
`get_peft_model` (r=16 on all seven projections), and a few AdamW steps on random tokens. Recorded:
torch.cuda.max_memory_allocated / max_memory_reserved over the training steps (loading is reset out,
because 4-bit quantisation on load has its own transient) and the process's NVML memory (nvidia-smi),
polled every 20 ms. Writes results.json and results.md (predicted vs measured, error %) to --out.
A failing configuration is recorded, not fatal; configurations that would overrun --budget-s are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from unsloth_mgpu_cli.memory import Architecture, GiB, TrainingSetup, estimate  # noqa: E402

MODELS = {
    # Llama-shaped ~1B (1.1B parameters): hidden 2048, 16 layers, MLP 8192, 32 heads / 8 KV heads, 32k vocab.
    "1B": Architecture(2048, 16, 32, 8, 8192, 32000, False, name="llama-1b-32k"),
    # Llama-3.1-8B dimensions with a 32k vocabulary (7.24B parameters, as in docs/suggest.md).
    "8B": Architecture(4096, 32, 32, 8, 14336, 32000, False, name="llama-8b-32k"),
    "tiny": Architecture(64, 2, 4, 2, 128, 512, False, name="llama-tiny"),
}
# (model, method, seq_len, micro_batch, gradient_checkpointing): two sizes, QLoRA and LoRA, two lengths,
# checkpointing off / True / unsloth.
CONFIGS = [
    ("1B", "qlora", 2048, 8, "unsloth"),
    ("1B", "qlora", 2048, 8, False),
    ("1B", "lora", 512, 8, True),
    ("8B", "qlora", 2048, 4, "unsloth"),
    ("8B", "qlora", 512, 4, False),
    ("8B", "lora", 2048, 2, False),
]
# Configurations the model was not calibrated on (the constants in memory.py were set from CONFIGS' first run).
VALIDATION_CONFIGS = [
    ("1B", "qlora", 1024, 16, True),
    ("1B", "lora", 2048, 4, "unsloth"),
    ("8B", "qlora", 1024, 8, True),
    ("8B", "qlora", 2048, 2, False),
]
TINY_CONFIGS = [("tiny", "lora", 64, 2, False), ("tiny", "lora", 64, 2, True)]


def build_model(arch: Architecture, folder: Path, dtype_name: str) -> Path:
    """Save a random-weight LlamaForCausalLM and a WordLevel tokenizer padded to the vocabulary."""
    if (folder / "config.json").exists() and (folder / "tokenizer.json").exists():
        return folder
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, dtype_name)
    config = LlamaConfig(
        hidden_size=arch.hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_heads,
        num_key_value_heads=arch.num_kv_heads,
        intermediate_size=arch.intermediate_size,
        vocab_size=arch.vocab_size,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=4096,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        torch_dtype=dtype_name,
    )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build directly in the target dtype: an fp32 8B would need 32 GB first
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    vocab.update({f"w{i}": i for i in range(4, arch.vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    if device == "cuda":
        torch.cuda.empty_cache()
    return folder


def worker(spec: dict) -> dict:
    """One configuration in this (fresh) process: load with Unsloth, train a few steps, measure."""
    import torch
    from unsloth import FastLanguageModel  # noqa: I001  (Unsloth must be imported before transformers/peft)

    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    model, _ = FastLanguageModel.from_pretrained(
        spec["path"],
        max_seq_length=spec["seq_len"],
        dtype=dtype,
        load_in_4bit=spec["method"] == "qlora",
    )
    model = FastLanguageModel.get_peft_model(
        model,
        r=16,
        lora_alpha=16,
        lora_dropout=0.0,
        bias="none",
        random_state=0,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        use_gradient_checkpointing=spec["ckpt"],
    )
    device = next(p for p in model.parameters() if p.requires_grad).device
    result: dict = {"device": str(device)}
    nvml = _NvmlPoller() if cuda else None
    if cuda:
        torch.cuda.synchronize()
        result["after_load_allocated_gb"] = torch.cuda.memory_allocated() / GiB
        result["load_peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
        torch.cuda.reset_peak_memory_stats()
        result["gpu_total_gb"] = torch.cuda.get_device_properties(0).total_memory / GiB
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    model.train()
    step_times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        ids = torch.randint(4, spec["vocab"], (spec["micro_batch"], spec["seq_len"]), generator=gen).to(device)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        step_times.append(time.perf_counter() - t0)
    result.update(loss=float(loss.detach()), step_seconds=step_times)
    if cuda:
        result["max_allocated_gb"] = torch.cuda.max_memory_allocated() / GiB
        result["max_reserved_gb"] = torch.cuda.max_memory_reserved() / GiB
        result["nvml_peak_gb"] = nvml.stop() / GiB if nvml else None
    return result


class _NvmlPoller:
    """Peak NVML-reported memory of this process on its GPU (what nvidia-smi shows), sampled in a thread."""

    def __init__(self, interval: float = 0.02):
        self.peak, self._stop = 0, threading.Event()
        try:
            import pynvml
            import torch

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(0).uuid)
            uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
            self._handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._nvml = pynvml
        except Exception as exc:  # no NVML or no UUID: leave the column empty rather than fail the run
            self._handle, self.error = None, repr(exc)
            return
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        pid = os.getpid()
        while not self._stop.is_set():
            try:
                for proc in self._nvml.nvmlDeviceGetComputeRunningProcesses(self._handle):
                    if proc.pid == pid and proc.usedGpuMemory:
                        self.peak = max(self.peak, proc.usedGpuMemory)
            except Exception:
                pass
            time.sleep(interval)

    def stop(self) -> int | None:
        if self._handle is None:
            return None
        self._stop.set()
        self._thread.join(timeout=1)
        return self.peak or None


def predict(cfg: tuple, gpu_bytes: int | None) -> dict:
    size, method, seq, mb, ckpt = cfg
    b = estimate(
        MODELS[size],
        TrainingSetup(
            method=method,
            seq_len=seq,
            micro_batch_size=mb,
            gradient_checkpointing=ckpt,
            optimizer="adamw",
            num_gpus=1,
            gpu_memory_bytes=gpu_bytes,
        ),
    )
    return {
        "allocated_gb": b.allocated / GiB,
        "reserved_gb": b.reserved / GiB,
        "peak_gb": b.peak / GiB,
        "breakdown": b.to_dict(),
    }


def run_one(cfg: tuple, path: Path, gpu: int | None, args, out: Path) -> dict:
    size, method, seq, mb, ckpt = cfg
    spec = {
        "path": str(path),
        "method": method,
        "seq_len": seq,
        "micro_batch": mb,
        "ckpt": ckpt,
        "steps": args.steps,
        "vocab": MODELS[size].vocab_size,
    }
    name = f"{size}_{method}_seq{seq}_mb{mb}_ckpt{str(ckpt).lower()}"
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        UNSLOTH_DISABLE_STATISTICS="1",
        UNSLOTH_COMPILE_LOCATION=str(out / f"unsloth_compiled_cache_{gpu if gpu is not None else 'cpu'}"),
    )
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    record = {
        "name": name,
        "model": size,
        "method": method,
        "seq_len": seq,
        "micro_batch": mb,
        "gradient_checkpointing": ckpt,
        "gpu": gpu,
    }
    t0 = time.time()
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(spec)],
            env=env,
            cwd=out,
            capture_output=True,
            text=True,
            timeout=args.timeout,
        )
        (out / f"{name}.log").write_text(proc.stdout + proc.stderr)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            record["error"] = f"exit {proc.returncode}: " + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        else:
            record["measured"] = json.loads(lines[-1][7:])
    except subprocess.TimeoutExpired:
        record["error"] = f"timed out after {args.timeout} s"
    record["seconds"] = round(time.time() - t0, 1)
    gpu_bytes = int(record.get("measured", {}).get("gpu_total_gb", 0) * GiB) or args.gpu_memory_bytes
    record["predicted"] = predict(cfg, gpu_bytes)
    print(f"{name}: {record.get('error') or 'ok'} ({record['seconds']} s)", flush=True)
    return record


def _err(pred: float, meas: float | None) -> str:
    return "" if not meas else f"{100 * (pred - meas) / meas:+.0f}%"


def write_report(records: list[dict], out: Path, header: str) -> None:
    (out / "results.json").write_text(json.dumps({"header": header, "results": records}, indent=2))
    lines = [
        f"# Memory forecast vs measurement\n\n{header}\n",
        "| config | predicted allocated GB | torch max allocated GB | error | predicted reserved GB | "
        "torch max reserved GB | error | predicted peak GB | NVML peak GB | error |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        p, m = r["predicted"], r.get("measured") or {}
        if "error" in r:
            lines.append(
                f"| {r['name']} | {p['allocated_gb']:.2f} | failed: {r['error'][:80]} | | "
                f"{p['reserved_gb']:.2f} | | | {p['peak_gb']:.2f} | | |"
            )
            continue
        cells = []
        for pk, mk in (
            ("allocated_gb", "max_allocated_gb"),
            ("reserved_gb", "max_reserved_gb"),
            ("peak_gb", "nvml_peak_gb"),
        ):
            mv = m.get(mk)
            cells += [f"{p[pk]:.2f}", f"{mv:.2f}" if mv else "n/a", _err(p[pk], mv)]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or "outputs/memory_accuracy"))
    ap.add_argument("--models-dir", type=Path, default=None, help="where to build/cache models (default OUT/models)")
    ap.add_argument("--gpus", type=int, default=None, help="configs run in parallel, one per GPU (default: all)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--timeout", type=int, default=170, help="seconds per configuration")
    ap.add_argument("--budget-s", type=int, default=480, help="skip configurations that would start after this")
    ap.add_argument(
        "--set",
        choices=["calibration", "validation", "all"],
        default="calibration",
        help="which configurations: the six calibration ones, four unseen ones, or both",
    )
    ap.add_argument("--only", default="", help="comma-separated substrings of config names to run")
    ap.add_argument("--tiny", action="store_true", help="CPU plumbing check with a tiny model (float32, no 4-bit)")
    ap.add_argument("--dry-run", action="store_true", help="build nothing, run nothing: print the predictions")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    start = time.time()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    chosen = {"calibration": CONFIGS, "validation": VALIDATION_CONFIGS, "all": CONFIGS + VALIDATION_CONFIGS}
    configs = TINY_CONFIGS if args.tiny else chosen[args.set]
    if args.only:
        configs = [c for c in configs if any(s in "_".join(map(str, c)) for s in args.only.split(","))]
    args.gpu_memory_bytes = None
    if args.dry_run:
        records = [
            {"name": "_".join(map(str, c)), "predicted": predict(c, 139 * GiB), "error": "dry run"} for c in configs
        ]
        write_report(records, out, "Dry run: predictions only (H200, 139 GiB).")
        return
    import torch

    n_gpu = 0 if args.tiny else torch.cuda.device_count()
    if not args.tiny and n_gpu == 0:
        sys.exit("no CUDA GPU: use --tiny for the CPU plumbing check or --dry-run for predictions only")
    workers = max(1, min(args.gpus or n_gpu or 1, n_gpu or 1))
    models_dir = (args.models_dir or out / "models").resolve()
    paths = {}
    for size in sorted({c[0] for c in configs}):
        t0 = time.time()
        paths[size] = build_model(MODELS[size], models_dir / MODELS[size].name, "float32" if args.tiny else "bfloat16")
        print(f"model {size}: {paths[size]} ({time.time() - t0:.0f} s)", flush=True)

    free = list(range(workers)) if n_gpu else [None]
    lock = threading.Lock()

    def task(cfg):
        if time.time() - start > args.budget_s:
            return {
                "name": "_".join(map(str, cfg)),
                "error": f"skipped: past the {args.budget_s} s budget",
                "predicted": predict(cfg, None),
            }
        with lock:
            gpu = free.pop(0)
        try:
            return run_one(cfg, paths[cfg[0]], gpu, args, out)
        finally:
            with lock:
                free.append(gpu)

    with ThreadPoolExecutor(max_workers=len(free)) as pool:
        records = list(pool.map(task, configs))
    device_name = "CPU (tiny plumbing check)" if args.tiny else torch.cuda.get_device_name(0)
    header = (
        f"{len(configs)} configurations, {args.steps} AdamW steps each, random tokens, LoRA r=16 on all seven "
        f"projections; torch {torch.__version__}; {device_name}; "
        f"total {time.time() - start:.0f} s. GB = GiB. Error = (predicted - measured) / measured."
    )
    write_report(records, out, header)


if __name__ == "__main__":
    main()
