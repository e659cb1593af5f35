"""Checkpoints: written to a temporary folder and renamed (atomic), newest K kept, loaded safely.

    <output.dir>/checkpoints/step-<N>/
        trainable.safetensors   trainable parameters by name
        optimizer.pt            optimizer state (identical on every rank under data parallelism)
        scheduler.pt            learning-rate scheduler state
        rng.pt                  torch RNG states of every rank
        state.json              step, and what must match to resume (model, data, global batch)

Everything is loaded with `torch.load(..., weights_only=True)`: no code runs from a checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import Problem, UserError

STEP_PREFIX = "step-"


@contextlib.contextmanager
def atomic_dir(dest: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{dest.name}-", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def list_checkpoints(out: Path) -> list[Path]:
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(STEP_PREFIX)
             and p.name[len(STEP_PREFIX):].isdigit() and (p / "state.json").exists()]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX):]))


def find_resume_checkpoint(out: Path, resume: str) -> Path | None:
    """`--resume auto`: the newest complete checkpoint (None when there is none); else the given folder."""
    if resume == "auto":
        found = list_checkpoints(out)
        return found[-1] if found else None
    path = Path(resume).expanduser().resolve()
    if not (path / "state.json").exists():
        raise UserError(Problem("--resume", f"not a checkpoint folder (no state.json): {path}",
                                f"use --resume auto, or one of {out}/checkpoints/step-N"), "invalid arguments")
    return path


def resume_point(out: Path, resume_from: str | None, info: Any) -> Path | None:
    """The checkpoint a worker starts from.

    On the first attempt: the one the parent chose at launch (`--resume`), if any. After an elastic restart
    (`distributed.max_restarts`; `info.restart_count > 0`) that choice is stale: the newest complete
    checkpoint in `out/checkpoints` (falling back to the launch choice). Every rank decides, and all must
    agree with rank 0, so all nodes continue from the same step.

    Raises:
        RuntimeError: this rank's choice differs from rank 0's (output.dir not shared between nodes).
    """
    from . import distributed as D

    mine = resume_from
    if info.restart_count > 0:
        found = list_checkpoints(out)
        mine = str(found[-1]) if found else resume_from
        if info.is_main:
            print(f"restart {info.restart_count}: " + (f"resuming from {mine}" if mine else "no checkpoint yet, "
                  "starting from step 0"), file=sys.stderr, flush=True)
    chosen = D.broadcast_object(mine, info)
    if chosen != mine:
        raise RuntimeError(f"rank {info.rank} would start from {mine or 'step 0'} but rank 0 from "
                           f"{chosen or 'step 0'}: output.dir must be one folder all nodes reach (shared filesystem)")
    return Path(chosen) if chosen else None


def run_identity(recipe: Any, data_fingerprint: str, global_batch: int) -> dict[str, Any]:
    """What must not change between a run and its resumption."""
    return {"model": recipe.model.name, "lora": recipe.lora.model_dump(mode="json") if recipe.lora else None,
            "data": data_fingerprint, "global_batch": global_batch, "seed": recipe.training.seed}


def check_resume_compatible(ckpt: Path, identity: dict[str, Any]) -> None:
    state = json.loads((ckpt / "state.json").read_text())
    saved = state.get("identity", {})
    changed = [f"{k}: checkpoint has {saved.get(k)!r}, recipe now gives {v!r}" for k, v in identity.items()
               if saved.get(k) != v]
    if changed:
        raise UserError([Problem("--resume", f"cannot resume {ckpt.name}: {c}") for c in changed]
                        + [Problem("", "", "restore the original settings, or start anew with --overwrite")],
                        "incompatible checkpoint")


def save_checkpoint(trainer: Any) -> Path | None:
    """Save the trainer's state at its current step (rank 0 writes; every rank contributes its RNG)."""
    import torch
    from safetensors.torch import save_file

    from . import distributed as D

    info = trainer.info
    rng = {"cpu": torch.get_rng_state()}
    if info.device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = _gather_objects(rng, info)
    path = None
    if info.is_main:
        dest = trainer.out / "checkpoints" / f"{STEP_PREFIX}{trainer.step}"
        with atomic_dir(dest) as tmp:
            tensors = {n: p.detach().to("cpu").contiguous() for n, p in zip(trainer.param_names, trainer.params,
                                                                            strict=True)}
            save_file(tensors, str(tmp / "trainable.safetensors"))
            torch.save(trainer.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save({f"rank{r}": s for r, s in enumerate(rngs)}, tmp / "rng.pt")
            state = {"step": trainer.step, "world_size": info.world_size, "identity": trainer.plan.identity,
                     "history": trainer.history}
            (tmp / "state.json").write_text(json.dumps(state))
        _prune(trainer.out, trainer.recipe.output.save_total_limit)
        path = dest
    D.barrier(info)
    return path


def _gather_objects(obj: Any, info: Any) -> list[Any]:
    import torch.distributed as dist

    if not dist.is_initialized() or info.world_size == 1:
        return [obj]
    out: list[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def _prune(out: Path, keep: int) -> None:
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, trainer: Any) -> int:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the step to continue from."""
    import torch
    from safetensors.torch import load_file

    state = json.loads((path / "state.json").read_text())
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n in trainer.param_names if n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for n, p in zip(trainer.param_names, trainer.params, strict=True):
            p.copy_(tensors[n].to(p.device, p.dtype))
    map_loc = trainer.info.device
    trainer.optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=map_loc, weights_only=True))
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    rngs = torch.load(path / "rng.pt", weights_only=True)
    mine = rngs.get(f"rank{trainer.info.rank}")
    if mine is not None and state.get("world_size") == trainer.info.world_size:
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and trainer.info.device_type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"])
    trainer.history = list(state.get("history", []))
    return int(state["step"])
