"""`mgpu generate OUTPUT_DIR PROMPT...`: try a trained run: its adapter on its base model, prompted as it was trained.

    mgpu generate outputs/quickstart "Add 17 and 25."
    mgpu generate outputs/chat "What is NCCL?" --system "Answer in one sentence." --max-new-tokens 64
    mgpu generate outputs/quickstart - < prompts.txt      # one prompt per line

Each prompt is framed as the run's training rows were (`data.encode_prompt`): an alpaca instruction up to
`### Response:`, a user turn under the run's chat template with its generation prompt, or plain text. The reply
streams to stdout as it is generated; greedy unless `--temperature` is above 0.

Only transformers and peft are used (no Unsloth), as `mgpu export` does: the base loads in 16-bit on a GPU (a
QLoRA run's too) or float32 on CPU, with the adapter on top, unmerged.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .errors import Problem, UserError

FORMATS = ("alpaca", "chat", "text")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerationArgs:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    device: str = "auto"
    format: str | None = None  # None: the run's dataset.format
    input_text: str = ""
    system: str | None = None

    def problems(self, prompts: list[str]) -> list[Problem]:
        out = []
        if not prompts or not all(p.strip() for p in prompts):
            out.append(Problem("argument PROMPT", "expected one or more prompts with text, found none or an empty one"))
        if not 1 <= self.max_new_tokens <= 1_000_000:
            out.append(Problem("argument --max-new-tokens", f"expected 1 or more, found {self.max_new_tokens}"))
        if self.temperature < 0:
            out.append(Problem("argument --temperature", f"expected 0 (greedy) or more, found {self.temperature}"))
        if not 0 < self.top_p <= 1:
            out.append(Problem("argument --top-p", f"expected a value in (0, 1], found {self.top_p}"))
        if self.device not in DEVICES:
            out.append(Problem("argument --device", f"expected one of {', '.join(DEVICES)}, found {self.device!r}"))
        if self.format is not None and self.format not in FORMATS:
            out.append(Problem("argument --format", f"expected one of {', '.join(FORMATS)}, found {self.format!r}"))
        return out


def read_prompts(given: list[str], stdin: TextIO) -> list[str]:
    """The prompts of the command line; `-` stands for stdin's lines, one prompt each (blank lines skipped)."""
    prompts: list[str] = []
    for p in given:
        prompts += [line.rstrip("\n") for line in stdin if line.strip()] if p == "-" else [p]
    return prompts


@dataclass
class LoadedRun:
    model: Any
    tokenizer: Any
    format: str
    chat_template: str | None
    device: str
    system_prompt: str | None = None  # the run's dataset.system_prompt


def load_run(output_dir: Path, args: GenerationArgs) -> LoadedRun:
    """The run's model (base + adapter, or a full fine-tune's model/) on the device, its tokenizer and prompt frame."""
    from .data import NAMED_CHAT_TEMPLATES
    from .export import _resolved_recipe, find_adapter

    out = Path(output_dir).expanduser()
    weights, base = find_adapter(out, full_model_ok=True, command="generate")
    recipe = _resolved_recipe(out)
    ds, model_cfg = recipe.get("dataset") or {}, recipe.get("model") or {}
    fmt = args.format or ds.get("format") or "alpaca"
    template = ds.get("chat_template")
    template = NAMED_CHAT_TEMPLATES.get(template, template) if template else None
    from .hub import work_offline_if_unreachable

    work_offline_if_unreachable([base])
    from .models import hide_hf_bars_off_terminal, quiet_library_noise

    quiet_library_noise()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hide_hf_bars_off_terminal()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise UserError(
            Problem("argument --device", "cuda: no CUDA GPU is visible here", "use --device cpu (slower), or auto"),
            "invalid arguments",
        )
    kwargs: dict[str, Any] = {
        "dtype": torch.bfloat16 if device == "cuda" else torch.float32,
        "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
    }
    if model_cfg.get("revision") and weights.name == "adapter":
        kwargs["revision"] = model_cfg["revision"]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise UserError(
            Problem(
                str(weights),
                f"cannot load the model {base!r}: {str(exc).splitlines()[0]}",
                "the base must be a local folder or in the HF cache",
            ),
            "cannot generate",
        ) from exc
    if weights.name == "adapter":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(weights))
    tok_source = weights if (weights / "tokenizer_config.json").exists() else Path(base)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=kwargs["trust_remote_code"])
    model.to(device).eval()
    return LoadedRun(model, tokenizer, fmt, template, device, ds.get("system_prompt"))


def prompt_ids(run: LoadedRun, text: str, args: GenerationArgs) -> list[int]:
    """The prompt's token ids, framed as the run's training rows were."""
    from .data import _RowError, encode_prompt

    try:
        system = args.system if args.system is not None else run.system_prompt
        return encode_prompt(run.tokenizer, run.format, run.chat_template, text, args.input_text, system)
    except _RowError as exc:
        raise UserError(Problem("argument PROMPT", str(exc), exc.hint), "cannot generate") from None


def generate(
    output_dir: Path, prompts: list[str], args: GenerationArgs, stream: TextIO | None = sys.stdout
) -> list[list[int]]:
    """Each prompt's reply (its new token ids), streamed as text to `stream` (None: silent), one paragraph each."""
    problems = args.problems(prompts)
    if problems:
        raise UserError(problems, "invalid arguments")
    run = load_run(output_dir, args)
    import torch

    replies = []
    for k, text in enumerate(prompts):
        ids = prompt_ids(run, text, args)
        torch.manual_seed(args.seed)
        sampled = args.temperature > 0
        options: dict[str, Any] = {"do_sample": sampled}
        if sampled:
            options.update(temperature=args.temperature, top_p=args.top_p)
        tok = run.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        streamer = _streamer(tok, stream) if stream is not None else None
        with torch.no_grad():
            out = run.model.generate(
                input_ids=torch.tensor([ids], device=run.device),
                attention_mask=torch.ones((1, len(ids)), dtype=torch.long, device=run.device),
                max_new_tokens=args.max_new_tokens,
                eos_token_id=tok.eos_token_id,
                pad_token_id=pad,
                streamer=streamer,
                **options,
            )
        replies.append(out[0, len(ids) :].tolist())
        if stream is not None:
            stream.write("\n" if k == len(prompts) - 1 else "\n\n")
            stream.flush()
    return replies


def _streamer(tokenizer: Any, stream: TextIO) -> Any:
    """transformers' TextStreamer writing to `stream`, without the prompt and special tokens."""
    from transformers import TextStreamer

    class To(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            stream.write(text)
            stream.flush()

    return To(tokenizer, skip_prompt=True, skip_special_tokens=True)
