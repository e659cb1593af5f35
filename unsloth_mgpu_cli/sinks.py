"""Optional metric sinks beside metrics.jsonl (`logging.report_to`): TensorBoard and Weights & Biases.

Rank 0 owns them. Both are imported only when asked for; a sink asked for but not installed is a user
error found before any worker starts (`check_sinks_available`), not a crash mid-run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import os
import secrets
from pathlib import Path
from typing import Any

from .errors import Problem, UserError

_PACKAGES = {
    "tensorboard": ("tensorboard", "pip install tensorboard"),
    "wandb": ("wandb", "pip install 'unsloth-mgpu[wandb]'  (or: pip install wandb)"),
}


def check_sinks_available(loaded: Any) -> None:
    """Raise a UserError (exit 2) naming logging.report_to (and its file:line) when a sink's package is missing.

    Args:
        loaded: a `recipe.LoadedRecipe` (its line map places the key in the file), or a bare `Recipe`.
    """
    recipe = getattr(loaded, "recipe", loaded)
    where = getattr(loaded, "where", lambda dotted: dotted)
    problems = []
    for i, name in enumerate(recipe.logging.report_to):
        module, hint = _PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            message = f"{name} was asked for but the `{module}` package is not installed"
            problems.append(Problem(where(f"logging.report_to.{i}"), message, hint))
    if problems:
        raise UserError(problems, "invalid recipe")


class MetricSinks:
    """Fan one metrics row out to every sink in `logging.report_to` (numeric values only)."""

    def __init__(self, recipe: Any, out: Path, start_step: int = 0):
        self._writers: list[Any] = []
        self._wandb: Any = None
        names = recipe.logging.report_to
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: after a resume, TensorBoard hides the events logged past the checkpoint
            self._writers.append(SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1))
        if "wandb" in names:
            import wandb

            # Offline unless the user chose otherwise: runs on clusters without internet; `wandb sync` later.
            os.environ.setdefault("WANDB_MODE", "offline")
            id_file = out / "wandb-run-id"
            # our own id (W&B's generator moved between wandb releases: wandb.util.generate_id is gone in 0.31)
            run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id)
            self._wandb = wandb.init(
                project=recipe.logging.wandb_project,
                dir=str(out),
                id=run_id,
                resume="allow",
                name=out.name,
                config=recipe.model_dump(mode="json"),
            )

    def write(self, row: dict[str, Any]) -> None:
        step = int(row["step"])
        scalars = {
            k: float(v)
            for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        for i, mem in enumerate(row.get("peak_memory_gb") or []):
            scalars[f"peak_memory_gb/rank{i}"] = float(mem)
        for w in self._writers:
            for key, value in scalars.items():
                w.add_scalar(_tag(key), value, step)
            w.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        for w in self._writers:
            with contextlib.suppress(Exception):
                w.close()
        if self._wandb is not None:
            with contextlib.suppress(Exception):
                self._wandb.finish()


def _tag(key: str) -> str:
    """TensorBoard tag: eval_loss -> eval/loss, loss -> train/loss; tags that have a group keep it."""
    if "/" in key:
        return key
    return f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
