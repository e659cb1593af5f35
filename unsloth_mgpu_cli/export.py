"""`mgpu export OUTPUT_DIR --merged`: fold a trained LoRA adapter into its base and save a plain 16-bit HF model.

    mgpu export outputs/quickstart --merged --dtype bfloat16

Only transformers and peft are used (no Unsloth, no GPU needed): the base is loaded in the target dtype (never
4-bit, so QLoRA adapters merge into 16-bit weights), `PeftModel.merge_and_unload()` folds the adapter in, and
the result (safetensors, config, tokenizer) is written atomically, loadable with `AutoModelForCausalLM` alone.

The destination is checked before the slow merge: an existing folder is replaced only when it is empty or an
earlier export (it holds `.mgpu-export.json`), and never when it is the run folder, one of the run's own files
or folders, an ancestor of the run or of the current directory, or the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__
from .checkpoint import (
    EXPORT_MARKER,
    STEP_PREFIX,
    atomic_dir,
    describe_entries,
    is_export,
    is_run_entry,
    safetensors_damage,
)
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


def check_export_args(output_dir: Path, dtype: str, dest: Path | None = None) -> tuple[Path, str]:
    """The adapter folder and the base model reference, or a UserError saying what is missing.

    Also checks the destination (`--output`, default `<output_dir>/merged`) with `check_export_dest`.
    """
    out = Path(output_dir)
    if dtype not in DTYPES:
        raise UserError(
            Problem("argument --dtype", f"expected one of {', '.join(DTYPES)}, found {dtype!r}"), "invalid arguments"
        )
    adapter, base = find_adapter(out)
    check_export_dest(out, dest, base)
    return adapter, base


def find_adapter(out: Path, full_model_ok: bool = False, command: str = "export") -> tuple[Path, str]:
    """(the run's adapter folder, its base model reference), or a UserError saying what is missing.

    `full_model_ok`: a full fine-tune's run gives (its model/ folder, that folder) instead of an error. `command`
    names the command in the hints (`mgpu export`, `mgpu generate`)."""
    if not out.is_dir():
        raise UserError(
            Problem("argument OUTPUT_DIR", f"not a folder: {out}", "give the output.dir of an `mgpu train` run"),
            "invalid arguments",
        )
    adapter = out / "adapter"
    if not (adapter / "adapter_config.json").exists():
        if (out / "model" / "config.json").exists() and full_model_ok:
            return out / "model", str(out / "model")
        if (out / "model" / "config.json").exists():
            raise UserError(
                Problem(
                    "argument OUTPUT_DIR",
                    f"{out} is a full fine-tune: {out / 'model'} already is a complete "
                    "HF model, there is no adapter to merge",
                ),
                f"nothing to {command}",
            )
        from .engine import live_run

        a_run = (out / "recipe.resolved.yaml").is_file()  # what every `mgpu train` writes first
        training = live_run(out) if a_run else None
        found = f"no adapter in {out} (expected adapter/adapter_config.json)"
        if training:
            found += f": the run is still training ({training})"
            hint = f"the adapter is written when training ends: run `mgpu {command}` once it has"
        elif a_run:
            hint = (
                f"the adapter is written when training ends; finish the run with `mgpu train "
                f"{out / 'recipe.resolved.yaml'} --resume auto`"
            )
        elif out.name.startswith(STEP_PREFIX) and (out / "state.json").is_file():
            found = f"{out} is a checkpoint, not a run folder: {command} takes the run's output.dir"
            hint = (
                f"finish the run ({out.parent.parent}) with `mgpu train RECIPE --resume auto`, then "
                f"`mgpu {command} {out.parent.parent}`"
            )
        else:
            found += "; it holds no recipe.resolved.yaml either: not the folder of an mgpu run"
            hint = "give the output.dir of an `mgpu train` run"
        raise UserError(Problem("argument OUTPUT_DIR", found, hint), f"nothing to {command}")
    try:
        base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(
            Problem(str(adapter / "adapter_config.json"), f"unreadable adapter config: {exc}"), "invalid adapter"
        ) from exc
    weights = adapter / "adapter_model.safetensors"
    damage = safetensors_damage(weights) if weights.is_file() else f"{weights.name} is missing"
    if damage and not (adapter / "adapter_model.bin").is_file():
        raise UserError(
            Problem(
                str(weights),
                damage if damage.endswith("missing") else f"{weights.name} {damage}",
                "the adapter is incomplete or damaged (a copy cut short?): copy the run folder again, or train again",
            ),
            "invalid adapter",
        )
    name = (_resolved_recipe(out).get("model") or {}).get("name", "")
    if isinstance(name, str) and name.startswith("builtin:"):
        from .models import resolve_model_path

        base = resolve_model_path(name)  # the builtin's cache folder may have moved since training
    return adapter, base


def check_export_dest(run: Path, dest: Path | None, base: str, default_name: str = "merged") -> None:
    """Refuse a destination whose replacement would lose something (exit 2), before anything loads.

    Refused: the run folder itself, anything of the run that a run writes (adapter/, checkpoints/, ...), a
    folder that contains the run or the current directory, the base model's folder, a file, and a folder that is
    not empty and not an earlier export. An earlier export (or `<run>/merged`) is replaced, atomically.
    `default_name`: the folder in the run written without --output (merged/, gguf/).
    """
    run = Path(run).expanduser().resolve()
    default = run / default_name
    where = "argument --output" if dest is not None else f"argument --output (default {default})"
    target = Path(dest if dest is not None else default).expanduser()
    shown = target
    target = target.resolve()  # a symlink is judged by the folder it points to
    cwd = Path.cwd().resolve()
    elsewhere = "choose a new or empty folder" + (
        f", e.g. --output {default}" if target != default else " with --output"
    )
    problem = None
    if target == run:
        problem = (
            f"{shown} is the run folder; the export would replace its adapter, checkpoints and metrics",
            elsewhere,
        )
    elif run.is_relative_to(target) or cwd.is_relative_to(target):
        inside = "the run folder" if run.is_relative_to(target) else "the current directory"
        problem = (f"{shown} contains {inside}; the export would replace all of it", elsewhere)
    elif target.is_relative_to(run) and is_run_entry(target.relative_to(run).parts[0]):
        part = target.relative_to(run).parts[0]
        what = f"the run's {part}" if target == run / part else f"inside the run's {part}/"
        problem = (f"{shown} is {what}; the export would replace it", elsewhere)
    elif Path(base).exists() and _overlaps(target, Path(base).resolve()):
        problem = (f"{shown} is (or holds) the base model {base}, which the export reads", elsewhere)
    elif target.exists() and not target.is_dir():
        problem = (f"{shown} is a file, not a folder", elsewhere)
    elif target.is_dir() and any(target.iterdir()) and not is_export(target, run):
        entries = sorted(target.iterdir())
        problem = (
            f"{shown} is not empty and is not an earlier export (no {EXPORT_MARKER}): it holds "
            f"{describe_entries(entries)}",
            f"{elsewhere}; the export replaces only an earlier export, so delete this folder yourself if it may go",
        )
    if problem is not None:
        raise UserError(Problem(where, *problem), "cannot export")


def _overlaps(a: Path, b: Path) -> bool:
    return a.is_relative_to(b) or b.is_relative_to(a)


def export_merged(
    output_dir: Path, dest: Path | None = None, dtype: str = "bfloat16", say: Callable[[str], None] | None = None
) -> Path:
    """Merge `<output_dir>/adapter` into its base model and save it to `dest` (default `<output_dir>/merged`).

    `say` gets a line as each slow phase starts (loading the base, merging, writing): minutes each for a large
    model, with nothing else on the screen where there is no terminal for the libraries' bars."""
    say = say or (lambda message: None)
    adapter, base = check_export_args(output_dir, dtype, dest)
    run = Path(output_dir).expanduser()
    # `~` as the checks read it, and a symlink's target (a `merged` linked to a larger disk is written there)
    dest = (Path(dest).expanduser() if dest is not None else run / "merged").resolve()
    merged = _load_merged(run, adapter, base, dtype, say)
    model_cfg = _resolved_recipe(run).get("model") or {}
    revision = {"revision": model_cfg["revision"]} if model_cfg.get("revision") else {}
    tokenizer = _run_tokenizer(adapter, base, bool(model_cfg.get("trust_remote_code", False)), revision)
    from .gguf_export import complete_sentencepiece_files

    say(f"writing {dest}")
    try:
        # checked again at the rename: something may have appeared at dest during the merge
        with atomic_dir(dest, may_replace=lambda d: is_export(d, run)) as tmp:
            merged.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
            # a SentencePiece tokenizer's model and special tokens, which llama.cpp's converter reads
            complete_sentencepiece_files(tmp, tokenizer, lambda: _run_sentencepiece_source(run, adapter, base))
            marker = {"tool": "unsloth-mgpu", "version": __version__, "run": str(run.resolve()), "dtype": dtype}
            (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except OSError as exc:
        raise _cannot_write(dest, exc) from exc
    return dest


def _cannot_write(dest: Path, exc: OSError) -> UserError:
    return UserError(
        Problem(
            "argument --output",
            f"cannot write {dest}: {exc.strerror or exc}",
            "choose a writable folder with enough space",
        ),
        "cannot export",
    )


def _forget_quantizer_conversions(model: Any) -> None:
    """After `dequantize()`: drop the load-time weight conversions that cannot be reversed (the quantizer's).

    transformers 5 records how each weight was converted while loading and reverses it in save_pretrained; the
    4-bit quantizer's step has no reverse (NotImplementedError), and after dequantize() there is nothing to undo."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return
    kept = []
    for conversion in conversions:
        try:
            conversion.reverse_transform()
        except NotImplementedError:
            continue
        kept.append(conversion)
    model._weight_conversions = kept


def _load_merged(run: Path, weights: Path, base: str, dtype: str, say: Callable[[str], None]) -> Any:
    """The model with the adapter folded in, loaded in `dtype` with transformers and peft.

    `weights` is the run's adapter folder, or a full fine-tune's model/ folder (then `base` is that folder and
    nothing is merged)."""
    model_cfg = _resolved_recipe(run).get("model") or {}
    from .hub import work_offline_if_unreachable

    work_offline_if_unreachable([base])  # before huggingface_hub is imported: it reads the switch then
    from .models import hide_hf_bars_off_terminal, quiet_library_noise

    quiet_library_noise()
    import torch
    from transformers import AutoModelForCausalLM

    hide_hf_bars_off_terminal()

    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": bool(model_cfg.get("trust_remote_code", False)),
    }
    if model_cfg.get("revision") and Path(base) != weights:
        kwargs["revision"] = model_cfg["revision"]
    say(f"loading the {'base ' if Path(base) != weights else ''}model {base} in {dtype}")
    try:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(base, **{k: v for k, v in kwargs.items() if k != "dtype"})
        if getattr(config, "quantization_config", None):  # a pre-quantized base (unsloth/...-bnb-4bit), on the CPU
            kwargs["device_map"] = "cpu"
        model = AutoModelForCausalLM.from_pretrained(base, **kwargs)
    except OSError as exc:
        raise UserError(
            Problem(
                str(weights / ("adapter_config.json" if Path(base) != weights else "config.json")),
                f"cannot load the base model {base!r}: {str(exc).splitlines()[0]}",
                "the base must be a local folder or in the HF cache",
            ),
            "cannot export",
        ) from exc
    if getattr(model, "hf_quantizer", None) is not None:
        # the weights QLoRA trained on, in `dtype`: merged into 4-bit weights the adapter would be rounded away,
        # and a 4-bit model is neither saved by transformers nor read by llama.cpp
        say(f"dequantizing the base's {config.quantization_config.get('quant_method', 'quantized')} weights")
        model = model.dequantize().to(getattr(torch, dtype))
        _forget_quantizer_conversions(model)
    if Path(base) != weights:
        from peft import PeftModel

        say(f"merging the adapter {weights}")
        model = PeftModel.from_pretrained(model, str(weights)).merge_and_unload()
    return model


def _run_tokenizer(weights: Path, base: str, trust: bool, revision: dict[str, str]) -> Any:
    """The tokenizer saved with the run's weights (its chat template), else the base's (at `revision`)."""
    from transformers import AutoTokenizer

    if (weights / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(weights), trust_remote_code=trust)
    return AutoTokenizer.from_pretrained(str(base), trust_remote_code=trust, **revision)


def sentencepiece_source(names: list[str], revision: str | None = None) -> Path | None:
    """The SentencePiece model (`tokenizer.model`) of a tokenizer: in the first of the folders `names` that holds
    one, else in the HF cache or on the hub for the names that are hub ids (at `revision`); None where there is none
    (a byte-level BPE tokenizer has none). gguf_export.check_sentencepiece_model checks that it fits."""
    from .gguf_export import SENTENCEPIECE_MODEL

    for name in names:
        if (Path(name) / SENTENCEPIECE_MODEL).is_file():
            return Path(name) / SENTENCEPIECE_MODEL
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in dict.fromkeys(n for n in names if not Path(n).exists()):
        try:
            return Path(hf_hub_download(name, SENTENCEPIECE_MODEL, **({"revision": revision} if revision else {})))
        except (OSError, ValueError, EntryNotFoundError):  # not in the repo, not cached offline, not a repo id
            continue
    return None


def _run_sentencepiece_source(run: Path, weights: Path, base: str) -> Path | None:
    """sentencepiece_source of a run: its adapter (or model/) folder, its base, the recipe's model.name (a full
    fine-tune's base), at the recipe's revision."""
    from .models import resolve_model_path

    model_cfg = _resolved_recipe(run).get("model") or {}
    names = [str(weights), base] + ([resolve_model_path(model_cfg["name"])] if model_cfg.get("name") else [])
    return sentencepiece_source(names, model_cfg.get("revision"))


def export_gguf(
    output_dir: Path, dest: Path | None = None, quant: str = "q8_0", say: Callable[[str], None] | None = None
) -> Path:
    """Write the run's model (adapter merged, or a full fine-tune's model/) as one GGUF file `<run>.<QUANT>.gguf`
    in `dest` (default `<output_dir>/gguf`); other GGUF files already there stay (q8_0 beside f16). See
    gguf_export.py for what is covered.

    Everything that can refuse (arguments, destination, architecture, rope, tokenizer) is checked before the
    weights load; the file appears whole or not at all."""
    from .gguf_export import (
        QUANTS,
        check_model,
        complete_sentencepiece_files,
        gguf_file_name,
        ollama_modelfile,
        plan_conversion,
        write_gguf,
    )

    say = say or (lambda message: None)
    if quant not in QUANTS:
        raise UserError(
            Problem("argument --quant", f"expected one of {', '.join(QUANTS)}, found {quant!r}"), "invalid arguments"
        )
    if dest is not None and Path(dest).suffix.lower() == ".gguf":
        raise UserError(
            Problem(
                "argument --output",
                f"expected a folder, found a file name: {dest}",
                f"give the folder (--output {Path(dest).parent / 'gguf'}): the file in it is named "
                f"{gguf_file_name(Path(output_dir).expanduser().resolve(), quant)}",
            ),
            "invalid arguments",
        )
    run = Path(output_dir).expanduser()
    weights, base = find_adapter(run, full_model_ok=True)
    check_export_dest(run, dest, base, default_name="gguf")
    dest = (Path(dest).expanduser() if dest is not None else run / "gguf").resolve()
    model_cfg = _resolved_recipe(run).get("model") or {}
    trust = bool(model_cfg.get("trust_remote_code", False))
    # the base as training loaded it: its revision, where it is a hub id (never for a local folder)
    revision = {"revision": model_cfg["revision"]} if model_cfg.get("revision") and Path(base) != weights else {}
    from .hub import work_offline_if_unreachable

    work_offline_if_unreachable([base])
    from .models import quiet_library_noise

    quiet_library_noise()
    import tempfile

    from transformers import AutoConfig

    config_source = weights if Path(base) == weights else base
    where = str(Path(config_source) / "config.json") if Path(config_source).is_dir() else f"{base} config.json"
    try:
        config = AutoConfig.from_pretrained(str(config_source), trust_remote_code=trust, **revision).to_dict()
        check_model(config, where)  # before the tokenizer: a model of another kind may have none we could read
        tokenizer = _run_tokenizer(weights, base, trust, revision)
    except (OSError, ValueError) as exc:
        raise UserError(
            Problem(where, f"cannot read the model's config or tokenizer: {str(exc).splitlines()[0]}"), "cannot export"
        ) from exc
    name = gguf_file_name(run, quant)
    with tempfile.TemporaryDirectory(prefix="mgpu-gguf-") as saved:
        tokenizer_dir = Path(saved)
        tokenizer.save_pretrained(saved)  # the files llama.cpp's converter reads, as a merged export holds them
        complete_sentencepiece_files(tokenizer_dir, tokenizer, lambda: _run_sentencepiece_source(run, weights, base))
        plan = plan_conversion(config, tokenizer, tokenizer_dir, where)
        model = _load_merged(run, weights, base, "float32", say)
        dataset = _resolved_recipe(run).get("dataset") or {}
        modelfile = ollama_modelfile(name, getattr(tokenizer, "eos_token", None), dataset)

        def write(path: Path, shown: str | None) -> None:
            state = model.state_dict()
            write_gguf(state, tokenizer_dir, tokenizer, plan, path, quant, run.resolve().name, say, shown=shown)

        _write_into_gguf_folder(run, dest, name, write, {"Modelfile": modelfile})
    return dest / name


def _write_into_gguf_folder(
    run: Path, dest: Path, name: str, write: Callable[[Path, str | None], None], beside: dict[str, str]
) -> None:
    """`write(path, shown)` the file `name` into `dest`, with the text files `beside` it: into an earlier export
    (check_export_dest allowed it) the file joins the others, each file replaced whole; else the folder appears
    whole or not at all."""
    marker = {"tool": "unsloth-mgpu", "version": __version__, "run": str(run.resolve()), "gguf": name}
    try:
        if dest.is_dir() and any(dest.iterdir()):  # an earlier export (check_export_dest): the file joins it
            part = dest / f".{name}.part-{os.getpid()}"
            try:
                write(part, name)
                os.replace(part, dest / name)
                for file, text in beside.items():
                    part.write_text(text)
                    os.replace(part, dest / file)
            finally:
                part.unlink(missing_ok=True)
            (dest / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        else:
            with atomic_dir(dest, may_replace=lambda d: is_export(d, run)) as tmp:
                write(tmp / name, None)
                for file, text in beside.items():
                    (tmp / file).write_text(text)
                (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    except OSError as exc:
        raise _cannot_write(dest, exc) from exc


def export_gguf_lora(
    output_dir: Path, dest: Path | None = None, quant: str = "f16", say: Callable[[str], None] | None = None
) -> Path:
    """Write the run's LoRA adapter as a LoRA GGUF `<run>.LoRA.<QUANT>.gguf` in `dest` (default
    `<output_dir>/gguf`), for llama.cpp's `--lora` or Ollama's ADAPTER over the base model's own GGUF
    (gguf_export.write_lora_gguf). Refusals (arguments, destination, architecture, adapter) come before anything
    is written; the base's weights are never loaded, only its config."""
    from .gguf_export import QUANTS, GgufPlan, check_lora_adapter, check_model, lora_file_name, write_lora_gguf

    say = say or (lambda message: None)
    if quant not in QUANTS:
        raise UserError(
            Problem("argument --quant", f"expected one of {', '.join(QUANTS)}, found {quant!r}"), "invalid arguments"
        )
    run = Path(output_dir).expanduser()
    if not (run / "adapter" / "adapter_config.json").exists() and (run / "model" / "config.json").exists():
        raise UserError(
            Problem(
                "argument OUTPUT_DIR",
                f"{run} is a full fine-tune: it has no adapter to write as a LoRA GGUF",
                f"export the whole model: mgpu export {run} --format gguf",
            ),
            "nothing to export",
        )
    weights, base = find_adapter(run)
    check_export_dest(run, dest, base, default_name="gguf")
    dest = (Path(dest).expanduser() if dest is not None else run / "gguf").resolve()
    check_lora_adapter(weights)
    model_cfg = _resolved_recipe(run).get("model") or {}
    revision = {"revision": model_cfg["revision"]} if model_cfg.get("revision") else {}
    from .hub import work_offline_if_unreachable

    work_offline_if_unreachable([base])
    from .models import quiet_library_noise

    quiet_library_noise()
    from transformers import AutoConfig

    where = str(Path(base) / "config.json") if Path(base).is_dir() else f"{base} config.json"
    try:
        trust = bool(model_cfg.get("trust_remote_code", False))
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust, **revision).to_dict()
    except (OSError, ValueError) as exc:
        raise UserError(
            Problem(where, f"cannot read the base model's config: {str(exc).splitlines()[0]}"), "cannot export"
        ) from exc
    arch, permute, rope = check_model(config, where)
    plan = GgufPlan(arch, permute, config, rope, pre="")
    name = lora_file_name(run, quant)

    def write(path: Path, shown: str | None) -> None:
        write_lora_gguf(weights, plan, path, quant, run.resolve().name, say, shown=shown)

    _write_into_gguf_folder(run, dest, name, write, {})
    return dest / name


def check_recipe_exports(recipe: Any) -> None:
    """Before training: refuse (UserError, exit 2) an `output.export` that would fail when training ends.

    The destinations (<output.dir>/merged, <output.dir>/gguf) must be new, empty or earlier exports, and a gguf
    export needs a model and tokenizer it covers (gguf_export.check_model, pre_tokenizer): hours of training
    should not end in a refusal."""
    exports = list(dict.fromkeys(recipe.output.export))
    if not exports:
        return
    from .models import resolve_model_path

    run = Path(recipe.output.dir).expanduser()
    base = resolve_model_path(recipe.model.name)
    for kind in exports:
        try:
            check_export_dest(run, None, base, default_name="merged" if kind == "hf" else "gguf")
            if kind == "gguf-lora":
                _check_recipe_lora_gguf(recipe, base)
        except UserError as exc:
            raise _as_recipe_problem(exc, kind) from None
    if "gguf" in exports:
        import tempfile

        from transformers import AutoConfig, AutoTokenizer

        from .gguf_export import complete_sentencepiece_files, plan_conversion

        m = recipe.model
        options: dict[str, Any] = {"trust_remote_code": m.trust_remote_code}
        if m.revision:
            options["revision"] = m.revision
        try:
            config = AutoConfig.from_pretrained(base, **options).to_dict()
            tokenizer = AutoTokenizer.from_pretrained(base, **options)
        except (OSError, ValueError):
            return  # training reports a model it cannot load, better than this check could
        with tempfile.TemporaryDirectory(prefix="mgpu-gguf-") as saved:
            tokenizer.save_pretrained(saved)
            complete_sentencepiece_files(Path(saved), tokenizer, lambda: sentencepiece_source([base], m.revision))
            try:
                plan_conversion(config, tokenizer, Path(saved), f"model.name ({recipe.model.name})")
            except UserError as exc:
                raise _as_recipe_problem(exc, "gguf") from None


def _check_recipe_lora_gguf(recipe: Any, base: str) -> None:
    """Before training: what gguf_export.check_lora_adapter will refuse in the adapter, and the base's architecture
    (its config, where it can be read here: else the export names the problem when training ends)."""
    from .gguf_export import check_model, lora_gguf_refusal

    lora = recipe.lora
    refusal = lora_gguf_refusal({"use_dora": lora.use_dora, "target_modules": list(lora.target_modules)})
    if refusal is not None:
        raise UserError(
            Problem(f"lora.{refusal[0]}", refusal[1], "export the merged model instead (gguf)"), "cannot export"
        )
    from transformers import AutoConfig

    options: dict[str, Any] = {"trust_remote_code": recipe.model.trust_remote_code}
    if recipe.model.revision:
        options["revision"] = recipe.model.revision
    try:
        config = AutoConfig.from_pretrained(base, **options).to_dict()
    except (OSError, ValueError):
        return
    check_model(config, f"model.name ({recipe.model.name})")


def _as_recipe_problem(exc: UserError, kind: str) -> UserError:
    """An export's refusal, said of the recipe key that asked for the export."""
    first = exc.problems[0]
    found = f"{first.where}: {first.message}" if first.where else first.message
    hint = (first.hint + "; or " if first.hint else "") + f"drop {kind} from output.export"
    return UserError(
        Problem("output.export", f"the {kind} export would fail when training ends: {found}", hint), "invalid recipe"
    )


def run_recipe_exports(recipe: Any, say: Callable[[str], None]) -> list[Path]:
    """After training (node 0): the exports `output.export` asks for, into their default folders."""
    run = Path(recipe.output.dir).expanduser()
    written = []
    for kind in dict.fromkeys(recipe.output.export):
        if kind == "hf":
            written.append(export_merged(run, None, recipe.output.export_dtype, say=say))
        elif kind == "gguf-lora":
            written.append(export_gguf_lora(run, None, "f16", say=say))
        else:
            written.append(export_gguf(run, None, recipe.output.gguf_quant, say=say))
    return written
