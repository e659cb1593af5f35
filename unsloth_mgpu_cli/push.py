"""`mgpu push OUTPUT_DIR REPO_ID`: a run's adapter, merged export or GGUF files to a Hugging Face hub repo.

Unsloth users call `model.push_to_hub(...)`, `push_to_hub_merged` or `push_to_hub_gguf`, and axolotl users set
`hub_model_id`. This command is the counterpart for a finished run. One artifact goes to one repo, as the hub
expects: the adapter (peft loads it from the repo's root), the merged model (`mgpu export`), or the GGUF files
(`mgpu export --format gguf`). The upload is a single commit, so the repo gets every file or none.

The model card (README.md) is written here, not taken from the folder. peft's own card names the base model by
its local path, which would publish this machine's folders. Ours names the base model only when it is a hub id.
It gives the run's figures from summary.json and recipe.resolved.yaml, but no local path.

The token comes from `HF_TOKEN` or `hf auth login` (huggingface_hub.get_token) and is never printed. Everything
that can be refused is checked before the first request: the folder, the repo id, offline mode and the token.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .errors import Problem, UserError

WHAT = ("adapter", "merged", "gguf")
# files of ours that are no part of the model: the export marker, a part file of an interrupted GGUF write
_SKIP = (".mgpu-export.json", ".part")


class PushFailed(Exception):
    """The hub did not take the upload (a network or server error): nothing local is lost; exit 1."""

    exit_code = 1


def _bad(where: str, found: str, hint: str | None = None) -> UserError:
    return UserError(Problem(where, found, hint), "cannot push")


def artifact_files(run: Path, what: str) -> tuple[Path, list[Path]]:
    """The folder to push and its files (paths relative to it), or a UserError saying what to run first."""
    if what not in WHAT:
        raise UserError(
            Problem("argument --what", f"expected one of {', '.join(WHAT)}, found {what!r}"), "invalid arguments"
        )
    if not (run / "recipe.resolved.yaml").is_file():
        raise _bad(
            "argument OUTPUT_DIR",
            f"{run} holds no mgpu run (no recipe.resolved.yaml)",
            "give the output.dir of a finished `mgpu train`",
        )
    folder = run / what
    if what == "merged" and not folder.is_dir() and (run / "model" / "config.json").is_file():
        folder = run / "model"  # a full fine-tune: its weights already are an HF model
    files = sorted(
        p.relative_to(folder)
        for p in (folder.rglob("*") if folder.is_dir() else [])
        if p.is_file() and not p.name.endswith(_SKIP) and p.name != "README.md"
    )
    if what == "gguf":
        files = [f for f in files if f.suffix == ".gguf"]
    needed = {"adapter": "adapter_config.json", "merged": "config.json"}.get(what)
    if not files or (needed and not (folder / needed).is_file()):
        make = {
            "adapter": "the run saved no adapter: a full fine-tune's weights (model/) go with --what merged",
            "merged": f"run `mgpu export {run}` first",
            "gguf": f"run `mgpu export {run} --format gguf` first",
        }[what]
        raise _bad("argument --what", f"{folder} holds no {what} to push", make)
    return folder, files


def check_repo_id(repo_id: str, where: str = "argument REPO_ID") -> None:
    """A repo id the hub accepts ("name" or "namespace/name"), or exit 2 naming `where` before anything is sent."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        found = f"{repo_id!r} is no hub repo id: {exc}"
        raise _bad(where, found, "e.g. your-name/llama-3-gsm8k-lora") from None
    if repo_id.count("/") > 1:
        raise _bad(where, f"{repo_id!r} has more than one '/'", "namespace/name, e.g. your-name/run-1")


def hub_token(env: Mapping[str, str]) -> str:
    """The token to push with; exit 2 when offline or without one (the token itself is never shown)."""
    from .hub import OFFLINE_VARIABLES, UNRESOLVED

    on = [name for name in OFFLINE_VARIABLES if env.get(name, "").strip().lower() in ("1", "true", "yes", "on")]
    if "HF_HUB_OFFLINE" in on and env.get(UNRESOLVED):  # set by us: the hub's name did not resolve (hub.py)
        raise _bad(
            "hub",
            f"{env[UNRESOLVED]} does not resolve from this machine: pushing needs the hub",
            "push from a machine that reaches the hub (or set HF_ENDPOINT to one that does)",
        )
    if "HF_HUB_OFFLINE" in on:
        raise _bad("HF_HUB_OFFLINE", "is set: pushing needs the hub", "unset HF_HUB_OFFLINE for this command")
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise _bad(
            "hub token",
            "none found (HF_TOKEN is unset and `hf auth login` was not run)",
            "run `hf auth login`, or set HF_TOKEN to a token with write access",
        )
    return token


def _hub_id(name: Any) -> str | None:
    """A model or dataset name that is a hub id (not a local path, not builtin:), to name in the card."""
    if not isinstance(name, str) or name.startswith(("builtin:", "/", ".", "~")) or os.path.exists(name):
        return None
    return name if name.count("/") == 1 else None


def model_card(run: Path, what: str, files: list[Path]) -> str:
    """README.md for the repo: the hub's metadata block and the run's figures, without local paths."""
    import yaml

    from . import __version__

    recipe = yaml.safe_load((run / "recipe.resolved.yaml").read_text()) or {}
    summary_file = run / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    model, data, training = recipe.get("model") or {}, recipe.get("dataset") or {}, recipe.get("training") or {}
    base, dataset = _hub_id(model.get("name")), _hub_id(data.get("path"))
    meta = [
        "---",
        *([f"base_model: {base}"] if base else []),
        {"adapter": "library_name: peft", "merged": "library_name: transformers", "gguf": "library_name: gguf"}[what],
        "pipeline_tag: text-generation",
        "tags:",
        "- unsloth",
        "- unsloth-mgpu",
        *(["- lora"] if what == "adapter" else []),
        *(["- gguf"] if what == "gguf" else []),
        *([f"datasets:\n- {dataset}"] if dataset else []),
        "---",
    ]
    kind = {"adapter": "A LoRA adapter", "merged": "A merged model", "gguf": "GGUF files"}[what]
    gpus = (recipe.get("distributed") or {}).get("num_gpus")
    nodes = (recipe.get("distributed") or {}).get("nnodes") or 1
    lines = [
        f"# {run.resolve().name}",
        "",
        f"{kind} trained with unsloth-mgpu {__version__} ([Unsloth](https://github.com/unslothai/unsloth) on "
        f"{gpus * nodes if isinstance(gpus, int) else 'several'} worker(s)), "
        + (f"from [{base}](https://huggingface.co/{base})." if base else "from a base model given by local path."),
        "",
        "| | |",
        "| --- | --- |",
        f"| steps | {summary.get('steps', '?')} |",
        f"| samples per step | {_global_batch(recipe)} |",
        f"| final loss | {_num(summary.get('final_loss'))} |",
        *(
            [f"| eval loss | {_num(summary['final_eval_loss'])} |"]
            if summary.get("final_eval_loss") is not None
            else []
        ),
        f"| learning rate | {training.get('learning_rate', '?')} |",
        f"| max sequence length | {model.get('max_seq_length', '?')} |",
        *([f"| dataset | {dataset} |"] if dataset else []),
        "",
        "Files: " + ", ".join(f"`{f.as_posix()}`" for f in files[:20]) + (" ..." if len(files) > 20 else ""),
        "",
    ]
    return "\n".join(meta + [""] + lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "?"


def _global_batch(recipe: dict[str, Any]) -> str:
    t, d = recipe.get("training") or {}, recipe.get("distributed") or {}
    parts = [t.get("micro_batch_size"), t.get("gradient_accumulation_steps"), d.get("num_gpus"), d.get("nnodes") or 1]
    if all(isinstance(p, int) for p in parts):
        return str(parts[0] * parts[1] * parts[2] * parts[3])
    return "?"


def push(
    run: Path,
    repo_id: str,
    what: str,
    private: bool,
    revision: str | None,
    message: str | None,
    say: Callable[[str], None],
) -> str:
    """Check, then upload `run/what` and a model card to `repo_id` in one commit; returns the commit's URL."""
    folder, files = artifact_files(run, what)
    check_repo_id(repo_id)
    token = hub_token(os.environ)
    card = model_card(run, what, files)
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    size = sum((folder / f).stat().st_size for f in files)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        say(f"uploading {len(files)} file(s), {size / 1e6:.1f} MB, and README.md to {repo.repo_id}")
        operations = [CommitOperationAdd(f.as_posix(), str(folder / f)) for f in files]
        operations.append(CommitOperationAdd("README.md", card.encode()))
        commit = api.create_commit(
            repo.repo_id,
            operations,
            commit_message=message or f"mgpu push: {what} of {run.resolve().name}",
            revision=revision,
        )
    except HfHubHTTPError as exc:
        status = getattr(exc.response, "status_code", None)
        if status in (401, 403):
            raise _bad(
                "hub token",
                f"the hub refused it for {repo_id} (HTTP {status})",
                "use a token with write access to that namespace (`hf auth login`, or HF_TOKEN)",
            ) from None
        raise PushFailed(f"the hub did not take the upload: {str(exc).splitlines()[0]}") from None
    except Exception as exc:  # connection refused, DNS, TLS (httpx's errors, OSError): the hub was not reached
        raise PushFailed(f"the hub could not be reached: {type(exc).__name__}: {exc}") from None
    return str(commit.commit_url)
