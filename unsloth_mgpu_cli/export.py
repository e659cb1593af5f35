"""`mgpu export OUTPUT_DIR --merged`: fold a trained LoRA adapter into its base and save a plain 16-bit HF model.

    mgpu export outputs/quickstart --merged --dtype bfloat16

Only transformers and peft are used (no Unsloth, no GPU needed): the base is loaded in the target dtype (never
4-bit, so QLoRA adapters merge into 16-bit weights), `PeftModel.merge_and_unload()` folds the adapter in, and
the result (safetensors, config, tokenizer) is written atomically, loadable with `AutoModelForCausalLM` alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import Problem, UserError

DTYPES = ("bfloat16", "float16", "float32")


def _resolved_recipe(out: Path) -> dict[str, Any]:
    import yaml

    path = out / "recipe.resolved.yaml"
    if not path.exists():
        return {}
    try:
        return yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return {}


def check_export_args(output_dir: Path, dtype: str) -> tuple[Path, str]:
    """The adapter folder and the base model reference, or a UserError saying what is missing."""
    out = Path(output_dir)
    if dtype not in DTYPES:
        raise UserError(
            Problem("--dtype", f"expected one of {', '.join(DTYPES)}, found {dtype!r}"), "invalid arguments"
        )
    if not out.is_dir():
        raise UserError(
            Problem("OUTPUT_DIR", f"not a folder: {out}", "give the output.dir of an `mgpu train` run"),
            "invalid arguments",
        )
    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").exists():
        if (out / "model" / "config.json").exists():
            raise UserError(
                Problem(
                    "OUTPUT_DIR",
                    f"{out} is a full fine-tune: {out / 'model'} already is a complete "
                    "HF model, there is no adapter to merge",
                ),
                "nothing to export",
            )
        raise UserError(
            Problem(
                "OUTPUT_DIR",
                f"no adapter in {out} (expected adapter/adapter_config.json)",
                "the adapter is written when training ends; finish the run with `mgpu train RECIPE --resume auto`",
            ),
            "nothing to export",
        )
    try:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            Problem(str(adapter / "adapter_config.json"), f"unreadable adapter config: {exc}"), "invalid adapter"
        ) from exc
    name = (_resolved_recipe(out).get("model") or {}).get("name", "")
    if isinstance(name, str) and name.startswith("builtin:"):
        from .models import resolve_model_path

        base = resolve_model_path(name)  # the builtin's cache folder may have moved since training
    return adapter, base


def export_merged(output_dir: Path, dest: Path | None = None, dtype: str = "bfloat16") -> Path:
    """Merge `<output_dir>/adapter` into its base model and save it to `dest` (default `<output_dir>/merged`)."""
    adapter, base = check_export_args(output_dir, dtype)
    dest = Path(dest) if dest is not None else Path(output_dir) / "merged"
    model_cfg = _resolved_recipe(Path(output_dir)).get("model") or {}
    from .models import hide_hf_bars_off_terminal, quiet_library_noise

    quiet_library_noise()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import atomic_dir

    hide_hf_bars_off_terminal()

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
    }
    if model_cfg.get("revision"):
        kwargs["revision"] = model_cfg["revision"]
    try:
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise UserError(
            Problem(
                str(adapter / "adapter_config.json"),
                f"cannot load the base model {base!r}: {str(exc).splitlines()[0]}",
                "the base must be a local folder or in the HF cache",
            ),
            "cannot export",
        ) from exc
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    tok_source = adapter if (adapter / "tokenizer_config.json").exists() else base
    tokenizer = AutoTokenizer.from_pretrained(str(tok_source), trust_remote_code=kwargs["trust_remote_code"])
    try:
        with atomic_dir(dest) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
    except OSError as exc:
        raise UserError(
            Problem(
                "--output", f"cannot write {dest}: {exc.strerror or exc}", "choose a writable folder with enough space"
            ),
            "cannot export",
        ) from exc
    return dest
