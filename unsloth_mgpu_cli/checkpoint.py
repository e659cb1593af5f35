"""Checkpoints: written to a temporary folder and renamed (atomic), newest K kept, loaded safely.

    <output.dir>/checkpoints/step-<N>/
        trainable.safetensors   trainable parameters by name
        optimizer.pt            optimizer state (identical on every rank under data parallelism; under
                                strategy fsdp gathered from the shards, keyed by parameter name)
        scheduler.pt            learning-rate scheduler state
        rng.pt                  torch RNG states of every rank
        state.json              step, run totals (tokens, time, last metrics), and what must match to resume
                                (model, data, global batch, seed); written last

Everything is loaded with `torch.load(..., weights_only=True)`: no code runs from a checkpoint.

This module also knows what a run writes into output.dir (`RUN_FILES`, `RUN_FOLDERS`): `--overwrite` deletes
only those (`survey_output_dir`), and `mgpu export` never writes over them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .errors import Problem, UserError, first_line

STEP_PREFIX = "step-"

# What `mgpu train` writes directly in output.dir (plus `mgpu report`'s report.png): the only entries
# `--overwrite` deletes, and only in a folder that holds a run (RUN_SIGNS). ".stop-requested" is engine.STOP_FILE.
RUN_FILES = frozenset(
    {"recipe.resolved.yaml", "metrics.jsonl", "summary.json", "report.png", "wandb-run-id", ".stop-requested"}
)
# ".cache": Unsloth's compiled modules, one folder per rank (trainer.Trainer.setup's UNSLOTH_COMPILE_LOCATION).
RUN_FOLDERS = frozenset({"adapter", "model", "best", "checkpoints", "logs", "tensorboard", "wandb", ".cache"})
# Files every run writes (recipe.resolved.yaml before its workers start): with a complete checkpoint, the signs
# that a folder holds a run. A `checkpoints/` or `logs/` alone may be another tool's.
RUN_SIGNS = ("recipe.resolved.yaml", "metrics.jsonl", "summary.json")
# `mgpu export` writes this into every export: a folder that has it may be replaced by the next export.
EXPORT_MARKER = ".mgpu-export.json"
# Leftovers of a write killed half-way: atomic_dir's temporary folders, truncate_metrics' file, the write probe.
_LEFTOVER_PREFIXES = (
    *(f"{kind}-{name}-" for kind in (".tmp", ".old") for name in (*RUN_FOLDERS, "merged")),
    ".mgpu-write-test-",
)
_LEFTOVER_FILES = (".metrics.jsonl.tmp",)
# What file browsers and notebooks leave in any folder they show; .nfs* are NFS's files of deleted open files.
_SYSTEM_JUNK = frozenset({".DS_Store", "Thumbs.db", "desktop.ini", ".ipynb_checkpoints"})
# What transformers/peft write for a model: an unmarked `<run>/merged` (exported before the marker existed) that
# holds only such files is still taken for an export.
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".jinja")
_MODEL_FILE_NAMES = ("tokenizer.model", "spiece.model", "merges.txt", "vocab.txt")


@contextlib.contextmanager
def atomic_dir(dest: Path, may_replace: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside `dest`; on success it replaces `dest` in one rename.

    Args:
        dest: the folder to write.
        may_replace: asked just before the rename whether a `dest` that exists and is not empty may be replaced;
            None replaces it (checkpoints, adapter/: folders only this tool writes). When it says no, nothing is
            replaced and FileExistsError is raised.

    What was written gets the modes a new file or folder gets here (the umask, or the folder's default ACL):
    writers such as safetensors go through mkstemp, whose 0600 would hide the weights from other users.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _make_temp_dir(dest)
    try:
        yield tmp
        _give_normal_modes(tmp)
        if dest.exists() or dest.is_symlink():
            if may_replace is not None and _non_empty(dest) and not may_replace(dest):
                raise FileExistsError(errno.EEXIST, "exists and may not be replaced; nothing was written", str(dest))
            old = dest.with_name(f".old-{dest.name}-{os.getpid()}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _make_temp_dir(dest: Path) -> Path:
    """A new folder `.tmp-<name>-<random>` beside `dest`, made with mkdir's 0777 less the umask.

    Not tempfile.mkdtemp: its folder is 0700, and the rename would hand that mode on to adapter/ or merged/.
    """
    for _ in range(100):
        path = dest.with_name(f".tmp-{dest.name}-{secrets.token_hex(4)}")
        try:
            path.mkdir(mode=0o777)
            return path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(dest.parent))


def _give_normal_modes(folder: Path) -> None:
    """chmod everything under `folder` to the mode a plain new file (or folder) gets in it.

    The file mode is learnt by creating one (0666 less the umask, or what a default ACL says), so this follows
    the user's settings instead of assuming 0644. Executable files keep their execute bits.
    """
    probe = folder / f".mode-probe-{secrets.token_hex(4)}"
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    file_mode = stat.S_IMODE(probe.stat().st_mode)
    probe.unlink()
    dir_mode = stat.S_IMODE(folder.stat().st_mode)
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            info = os.lstat(path)
            mode = dir_mode if stat.S_ISDIR(info.st_mode) else dir_mode if info.st_mode & 0o111 else file_mode
            if stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode):
                with contextlib.suppress(OSError):  # a mount that refuses chmod (FUSE, SMB): keep what it gave
                    os.chmod(path, mode)


def _non_empty(path: Path) -> bool:
    if not path.is_dir():
        return path.exists() or path.is_symlink()
    with os.scandir(path) as entries:
        return next(entries, None) is not None


def is_export(folder: Path, run: Path | None = None) -> bool:
    """Whether `folder` is an earlier `mgpu export` (it has EXPORT_MARKER).

    `run` also accepts `<run>/merged` written before exports were marked, when it holds only model files.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / EXPORT_MARKER).is_file():
        return True
    if run is None or folder.resolve() != (Path(run).resolve() / "merged") or not holds_run(Path(run)):
        return False
    return (folder / "config.json").is_file() and all(
        p.is_file() and not p.is_symlink() and (p.name.endswith(_MODEL_FILE_SUFFIXES) or p.name in _MODEL_FILE_NAMES)
        for p in folder.iterdir()
    )


def holds_run(out: Path) -> bool:
    """Whether output.dir holds (part of) a run: a file of RUN_SIGNS, or a complete checkpoint."""
    return any((Path(out) / name).is_file() for name in RUN_SIGNS) or bool(list_checkpoints(Path(out)))


def survey_output_dir(out: Path) -> tuple[list[Path], list[Path]]:
    """Split what output.dir holds into what mgpu wrote there (what `--overwrite` deletes) and everything else.

    Ours: the entries a run writes (RUN_FILES as files, RUN_FOLDERS as folders) when the folder holds a run,
    earlier exports (EXPORT_MARKER; merged/ of a run), and leftovers of an interrupted write. A symlink is
    never ours: a run does not make one, and deleting its target's contents would be wrong.
    """
    out = Path(out)
    ours: list[Path] = []
    others: list[Path] = []
    if not out.is_dir():
        return ours, others
    run = holds_run(out)
    for p in sorted(out.iterdir()):
        if p.name in _SYSTEM_JUNK or p.name.startswith(".nfs"):
            continue  # left by whatever showed the folder (Finder, Jupyter, NFS): not ours, no reason to refuse
        if p.is_symlink():
            mine = False
        elif p.name.startswith(_LEFTOVER_PREFIXES) or p.name in _LEFTOVER_FILES:
            mine = True
        elif p.is_dir():
            mine = (run and p.name in RUN_FOLDERS) or is_export(p, out)
        else:
            mine = run and p.name in RUN_FILES
        (ours if mine else others).append(p)
    return ours, others


def is_run_entry(name: str) -> bool:
    """Whether a run (or an interrupted write of one) puts an entry called `name` directly in output.dir."""
    return name in RUN_FILES or name in RUN_FOLDERS or name.startswith(_LEFTOVER_PREFIXES) or name in _LEFTOVER_FILES


def describe_entries(paths: list[Path], limit: int = 5) -> str:
    """'a, b/, c (and 4 more)': a few names for a message, folders with a slash."""
    names = [p.name + ("/" if p.is_dir() and not p.is_symlink() else "") for p in paths]
    more = f" (and {len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def remove_entries(paths: list[Path]) -> None:
    """Delete files and folders (a folder with everything in it); a symlink itself, never its target."""
    for p in paths:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def list_checkpoints(out: Path) -> list[Path]:
    """`<out>/checkpoints/step-N` folders, oldest first (unfinished `.tmp` folders left out)."""
    folder = Path(out) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if p.is_dir()
        and p.name.startswith(STEP_PREFIX)
        and p.name[len(STEP_PREFIX) :].isdigit()
        and (p / "state.json").exists()
    ]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", "state.json")


def find_resume_checkpoint(out: Path, resume: str, notes: list[str] | None = None) -> Path | None:
    """`--resume auto`: the newest complete, readable checkpoint (None when there is none; a damaged newer one is
    passed over, with a line in `notes`); else the given folder, which must be readable (see
    `verify_safe_to_load`)."""
    if resume == "auto":
        found = list_checkpoints(out)
        if notes is not None:  # a step folder without state.json (a copy cut short) is no checkpoint: say so
            newest = _step_of(found[-1]) if found else -1
            folder = Path(out) / "checkpoints"
            bare = [p for p in folder.glob(f"{STEP_PREFIX}*") if p.is_dir() and not (p / "state.json").exists()]
            for ckpt in sorted((p for p in bare if _step_of(p) > newest), key=_step_of):
                notes.append(f"--resume auto: passed over {ckpt.name}, which is damaged (state.json is missing)")
        damaged: list[str] = []
        for ckpt in reversed(found):
            damage = checkpoint_damage(ckpt)
            if damage is None:
                return ckpt
            damaged.append(f"{ckpt.name} ({damage})")
            if notes is not None:
                notes.append(f"--resume auto: passed over {ckpt.name}, which is damaged ({damage})")
        if len(found) > 1:  # every one damaged: rather than a silent start from step 0, each one named
            raise UserError(
                Problem(
                    f"argument --resume auto ({Path(out) / 'checkpoints'})",
                    f"every checkpoint is damaged: {'; '.join(damaged)}",
                    "no intact one is left (a full disk, or copies cut short?): restore one, or start anew with "
                    "--overwrite",
                ),
                "damaged checkpoint",
            )
        if found:  # the only one: its own error
            verify_safe_to_load(found[-1])
        return None
    path = Path(resume).expanduser().resolve()
    if not (path / "state.json").exists():
        found = f"no such folder: {path}" if not path.exists() else f"not a checkpoint folder (no state.json): {path}"
        raise UserError(Problem("argument --resume", found, _checkpoints_hint(out)), "invalid arguments")
    own = list_checkpoints(out)
    if own and path.parent.parent != Path(out).expanduser().resolve():
        # Its saves would go among this run's checkpoints, whose retention (output.save_total_limit) then deletes
        # them, and metrics.jsonl would join this run's first steps to the other run's later ones.
        raise UserError(
            Problem(
                "argument --resume",
                f"{path} is a checkpoint of another run, and output.dir ({out}) holds this run's own checkpoints "
                f"({', '.join(p.name for p in own[-3:])}): resuming it there would delete them and mix the two "
                "runs' metrics",
                "continue that run into a new folder (output.dir=NEW_DIR), or this run from its own checkpoints "
                "(--resume auto)",
            ),
            "invalid arguments",
        )
    return path


def _checkpoints_hint(out: Path) -> str:
    """The checkpoints there are to resume from, by name (the newest last), or that there are none."""
    found = list_checkpoints(out)
    if not found:
        return f"{out} holds no checkpoint yet: start without --resume (or with --resume auto)"
    names = ", ".join(str(p) for p in found[-3:])
    return f"use --resume auto (the newest), or one of: {names}" + (" (the newest 3)" if len(found) > 3 else "")


def checkpoint_damage(ckpt: Path) -> str | None:
    """What makes a checkpoint unusable (a missing or unreadable file), or None."""
    try:
        verify_safe_to_load(ckpt, suggest=False)
    except UserError as exc:
        return exc.problems[0].message
    return None


def verify_safe_to_load(ckpt: Path, suggest: bool = True) -> None:
    """Check every file of a checkpoint in the parent, before anything is written or any worker starts: all
    present, the tensors' header readable, `state.json` valid JSON, and each pickled file opened with
    `weights_only=True`. A file that needs arbitrary code to unpickle (a tampered or foreign checkpoint) is
    refused without running that code. Raises a UserError naming the file (and an older intact checkpoint).
    """
    import pickle

    import torch

    ckpt = Path(ckpt)

    def refuse(name: str, what: str, title: str, hint: str | None = None) -> None:
        older = [c for c in list_checkpoints(ckpt.parent.parent) if _step_of(c) < _step_of(ckpt)] if suggest else []
        intact = next((c for c in reversed(older) if checkpoint_damage(c) is None), None)
        fix = hint or "the checkpoint is incomplete or damaged (a full disk or a copy cut short?)"
        if intact is not None:
            fix += f"; an older one is intact: --resume {intact}"
        raise UserError(Problem(f"argument --resume ({ckpt / name})", what, fix), title)

    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):  # first: an unsafe file is named as such
        if not (ckpt / name).is_file():
            continue
        try:
            with warnings.catch_warnings():  # "Detected pickle protocol 4": torch's own note on a foreign file
                warnings.simplefilter("ignore")
                torch.load(ckpt / name, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            # torch's text advises weights_only=False, the unsafe way out: only its own diagnosis is repeated
            match = re.search(r"WeightsUnpickler error:\s*(.+)", str(exc))
            why = match.group(1).strip() if match else first_line(exc)
            if "Unsupported global" in why or _is_raw_pickle(ckpt / name):
                # weights_only refused an object, or a bare pickle stream (not torch.save's zip): not a file this
                # tool wrote, and one whose loading could run code
                refuse(
                    name,
                    f"refused to load: not a plain tensor file ({why.split('. ')[0]})",
                    "unsafe checkpoint",
                    "checkpoints are loaded with weights_only=True; only resume from checkpoints this tool wrote",
                )
            refuse(name, f"cannot be read: not a whole torch.save file ({why})", "damaged checkpoint")
        except (RuntimeError, EOFError, ValueError, OSError) as exc:  # cut short, zeroed, unreadable
            refuse(name, f"cannot be read: {first_line(exc)}", "damaged checkpoint")
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            refuse(name, f"{name} is missing", "damaged checkpoint")
    try:
        json.loads((ckpt / "state.json").read_text())
    except (ValueError, OSError) as exc:
        refuse("state.json", f"cannot be read: {first_line(exc)}", "damaged checkpoint")
    problem = safetensors_damage(ckpt / "trainable.safetensors")
    if problem:
        refuse("trainable.safetensors", problem, "damaged checkpoint")


def _is_raw_pickle(path: Path) -> bool:
    """Whether `path` starts as a pickle stream does (PROTO 2-5), rather than as torch.save's zip archive or bytes
    that are neither (damage)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5


def _step_of(ckpt: Path) -> int:
    tail = ckpt.name[len(STEP_PREFIX) :]
    return int(tail) if ckpt.name.startswith(STEP_PREFIX) and tail.isdigit() else -1


def safetensors_damage(path: Path) -> str | None:
    """Why a .safetensors file is unusable, from its header alone: unreadable, or shorter than its tensors."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < n <= size - 8:
                return f"cannot be read: its header length ({n}) does not fit a file of {size} bytes"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as exc:
        return f"cannot be read: {first_line(exc)}"
    try:
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (KeyError, TypeError, IndexError, ValueError, AttributeError):
        return "cannot be read: its header does not describe tensors"
    expected = 8 + n + max(ends, default=0)
    if size < expected:
        return f"cut short: {size} of {expected} bytes"
    return None


# What must not change between a run and its resumption, with the recipe keys a person would edit.
# Recipe keys that change the tokenised data (its fingerprint): named when a resume finds it changed.
_DATA_KEYS = ("dataset.", "model.max_seq_length", "model.name")
_IDENTITY_LABELS = {
    "model": ("model", "model.name"),
    "lora": ("LoRA settings", "lora"),
    "dataset": ("training data", "dataset.path / dataset.format / dataset.mix"),
    "data": ("tokenised data", "dataset.* or model.max_seq_length (or the data file's contents)"),
    "eval_ratio": ("eval hold-out", "dataset.eval_ratio"),
    "global_batch": (
        "global batch (samples per optimizer step)",
        "training.micro_batch_size x workers x training.gradient_accumulation_steps",
    ),
    "seed": ("seed", "training.seed"),
    # the checkpoint's optimizer state and tensor layout are those of its optimizer and strategy
    "optimizer": ("optimizer", "training.optimizer"),
    "strategy": ("distributed strategy", "distributed.strategy"),
}


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
            print(
                f"restart {info.restart_count}: "
                + (f"resuming from {mine}" if mine else "no checkpoint yet, starting from step 0"),
                file=sys.stderr,
                flush=True,
            )
    chosen = D.broadcast_object(mine, info)
    if chosen != mine:
        raise RuntimeError(
            f"rank {info.rank} would start from {mine or 'step 0'} but rank 0 from "
            f"{chosen or 'step 0'}: output.dir must be one folder all nodes reach (shared filesystem)"
        )
    return Path(chosen) if chosen else None


def run_identity(recipe: Any, data_fingerprint: str, global_batch: int) -> dict[str, Any]:
    """What must not change between a run and its resumption (the data order depends on all of it)."""
    ds = recipe.dataset
    if ds.mix is None:
        dataset = f"{ds.path} ({ds.format})"
    else:
        dataset = "mix of " + ", ".join(f"{s.section.path} ({s.section.format}) x{s.weight:g}" for s in ds.sources())
    return {
        "model": recipe.model.name,
        # lora.init_from only sets where a new run starts: a resume takes its weights from the checkpoint
        "lora": recipe.lora.model_dump(mode="json", exclude={"init_from"}) if recipe.lora else None,
        "dataset": dataset,
        "data": data_fingerprint,
        "eval_ratio": ds.eval_ratio,
        "global_batch": global_batch,
        "seed": recipe.training.seed,
        "optimizer": recipe.training.optimizer,
        "strategy": recipe.distributed.strategy,
    }


def changed_settings(before: str, after: str) -> list[str]:
    """`key: old -> new` for each recipe value that differs between two resolved recipes (YAML text)."""
    import yaml

    def flat(node: Any, prefix: str = "") -> dict[str, Any]:
        if isinstance(node, dict):
            return {k: v for key, sub in node.items() for k, v in flat(sub, f"{prefix}{key}.").items()}
        return {prefix.rstrip("."): node}

    try:
        old, new = flat(yaml.safe_load(before) or {}), flat(yaml.safe_load(after) or {})
    except yaml.YAMLError:  # an earlier file edited by hand: nothing to compare with
        return []
    if not old:  # no recipe to compare with (a checkpoint copied without its run): every key would be "None -> x"
        return []
    return [f"{k}: {old.get(k)} -> {new.get(k)}" for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)]


def check_resume_compatible(ckpt: Path, identity: dict[str, Any], recipe_yaml: str = "") -> None:
    """Raise a UserError naming every setting that differs from the checkpoint's run (exit 2). `recipe_yaml`
    (the resolved recipe now) names which keys changed the tokenised data, when the checkpoint's run folder still
    has the recipe it was trained with."""
    state = read_state(ckpt)
    saved = state.get("identity", {})
    problems = []
    for key, now in identity.items():
        if key not in saved or saved[key] == now:
            continue  # keys added by newer versions are not a reason to refuse an older checkpoint
        label, keys = _IDENTITY_LABELS.get(key, (key, key))
        was, given = saved[key], now
        if isinstance(was, dict) and isinstance(now, dict):  # a section (lora): only the keys that differ
            # a key one side lacks came with another version (lora.use_dora, lora.loraplus_lr_ratio): not a change
            differ = sorted(k for k in was.keys() & now.keys() if was[k] != now[k])
            if not differ:
                continue
            was, given = ({k: d.get(k) for k in differ} for d in (saved[key], now))
            keys = ", ".join(f"{key}.{k}" for k in differ)
        found = f"{label} changed: the checkpoint was trained with {was!r}, the recipe now gives {given!r}"
        if key == "data" and recipe_yaml:  # fingerprints say nothing: the keys that made them differ, if known
            source = Path(ckpt).parent.parent / "recipe.resolved.yaml"
            before = source.read_text(errors="replace") if source.is_file() else ""
            data_keys = [c for c in changed_settings(before, recipe_yaml) if c.startswith(_DATA_KEYS)]
            if data_keys:
                found = f"{label} changed ({'; '.join(data_keys)})"
                keys = ", ".join(c.split(":")[0] for c in data_keys)
        problems.append(Problem(f"argument --resume {ckpt.name}", found, f"set {keys} back"))
    if problems:
        raise UserError(
            problems
            + [
                Problem(
                    "",
                    "resuming would not continue the same run",
                    "restore the original settings, or start anew with --overwrite",
                )
            ],
            "incompatible checkpoint",
        )


def read_state(ckpt: Path) -> dict[str, Any]:
    """A checkpoint's state.json; a UserError naming the file when it is missing or unreadable."""
    try:
        return json.loads((Path(ckpt) / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(
            Problem(
                "argument --resume",
                f"cannot read {Path(ckpt) / 'state.json'}: {exc}",
                "choose another checkpoint folder",
            ),
            "invalid checkpoint",
        ) from exc


def clean_stale(out: Path) -> None:
    """Remove half-written checkpoint folders left by a run that was killed while saving."""
    folder = Path(out) / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if p.is_dir() and p.name.startswith((".tmp-", ".old-")):
                shutil.rmtree(p, ignore_errors=True)


def truncate_metrics(out: Path, step: int) -> int:
    """Drop metrics.jsonl rows past `step` (logged after the checkpoint we resume from); return rows dropped.

    Rewritten through a temporary file and a rename, so a crash here cannot lose the rows kept.
    """
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row_step = int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            dropped += 1  # a line torn by a kill mid-write
            continue
        if row_step <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(".metrics.jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, quota, I/O error); the previous one is untouched."""


# What torch.save and safetensors raise when the disk fills or a file-size limit is hit, instead of an OSError
# (torch 2.x: "[enforce fail at inline_container.cc:...] . unexpected pos ..." or "PytorchStreamWriter failed
# writing file ..." or "basic_ios::clear: iostream error"; safetensors: SafetensorError "... File too large")
_WRITE_FAILURES = (
    "inline_container",
    "PytorchStreamWriter",
    "unexpected pos",
    "iostream error",
    "File too large",
    "No space left",
)


def write_failure(exc: BaseException, folder: Path) -> str | None:
    """Why writing under `folder` failed, for a message (with the free space there), or None when `exc` is not a
    failed write (a real bug keeps its traceback)."""
    text = str(exc)
    if not (
        isinstance(exc, OSError)
        or type(exc).__name__ == "SafetensorError"
        or (isinstance(exc, RuntimeError) and any(w in text for w in _WRITE_FAILURES))
    ):
        return None
    reason = getattr(exc, "strerror", None) or text.splitlines()[0][:200]
    try:
        free = shutil.disk_usage(next(p for p in (folder, *folder.parents) if p.exists())).free
        reason += f"; {free / 2**20:,.0f} MB free there"
    except (OSError, StopIteration):
        pass
    return reason


def save_checkpoint(trainer: Any) -> Path | None:
    """Save the trainer's state at its current step (rank 0 writes; every rank contributes its RNG).

    Raises:
        CheckpointWriteError: on rank 0 when writing fails; the message says which checkpoint is still usable.
    """
    import torch
    from safetensors.torch import save_file

    from . import distributed as D

    info = trainer.info
    rng = {"cpu": torch.get_rng_state()}
    if info.device_type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = D.all_gather_object(rng, info)
    sharded = getattr(trainer, "sharded", False)
    if sharded:
        # Shards gathered into full tensors (collectives on every rank): the checkpoint does not depend on the
        # number of GPUs, and rank 0 writes it exactly as in ddp mode.
        tensors = D.gather_full_tensors(list(zip(trainer.param_names, trainer.params, strict=True)))
        optim_state = _full_optimizer_state(trainer)
    path = None
    if info.is_main:
        dest = trainer.out / "checkpoints" / f"{STEP_PREFIX}{trainer.step}"
        previous = [p for p in list_checkpoints(trainer.out) if p != dest]
        try:
            with atomic_dir(dest) as tmp:
                if not sharded:
                    tensors = {
                        n: p.detach().to("cpu").contiguous()
                        for n, p in zip(trainer.param_names, trainer.params, strict=True)
                    }
                    optim_state = trainer.optimizer.state_dict()
                save_file(tensors, str(tmp / "trainable.safetensors"))
                torch.save(optim_state, tmp / "optimizer.pt")
                torch.save(trainer.scheduler.state_dict(), tmp / "scheduler.pt")
                torch.save({f"rank{r}": s for r, s in enumerate(rngs)}, tmp / "rng.pt")
                state = {
                    "step": trainer.step,
                    "world_size": info.world_size,
                    "strategy": "fsdp" if sharded else "ddp",
                    "identity": trainer.plan.identity,
                    "run_state": dict(getattr(trainer, "run_state", {})),
                }
                # state.json last: list_checkpoints only counts folders that have it
                (tmp / "state.json").write_text(json.dumps(state))
        except Exception as exc:  # disk full: torch and safetensors raise their own types (write_failure)
            reason = write_failure(exc, dest)
            if reason is None:
                raise
            usable = (
                f"the previous checkpoint {previous[-1]} is intact: resume from it with "
                "`mgpu train RECIPE --resume auto` once there is room"
                if previous
                else "no earlier checkpoint exists"
            )
            raise CheckpointWriteError(
                f"could not write checkpoint {dest.name} ({reason}); nothing half-written was kept; {usable}"
            ) from exc
        _prune(trainer.out, trainer.recipe.output.save_total_limit)
        path = dest
    D.barrier(info)
    return path


def _full_optimizer_state(trainer: Any) -> dict[str, Any]:
    """The optimizer state of a sharded model as full CPU tensors keyed by parameter name (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(trainer.model, trainer.optimizer, options=options)


def _prune(out: Path, keep: int | None) -> None:
    if keep is None:  # output.save_total_limit: null keeps every checkpoint
        return
    for old in list_checkpoints(out)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _follow_the_recipe(scheduler: Any, training: Any) -> None:
    """The checkpoint's scheduler state brings back its run's base learning rate, and the optimizer's its last rate
    and weight decay: continue with this recipe's, whose `training.learning_rate`, `max_steps`, warm-up,
    `weight_decay` or Adam settings may differ, at the step reached. With an unchanged recipe these are the very
    values the checkpoint holds."""
    from .optim import adam_settings

    groups, adam = scheduler.optimizer.param_groups, adam_settings(training)
    for group in groups:
        if "weight_decay" in group:
            group["weight_decay"] = training.weight_decay
        if "betas" in group:  # training.adam_beta1/2 and adam_epsilon, as the recipe gives them now
            group["betas"], group["eps"] = (*adam["betas"], *group["betas"][2:]), adam["eps"]
    # a group's multiple of the rate (LoRA+'s B matrices: lora.loraplus_lr_ratio) is the recipe's, as the rate is
    scheduler.base_lrs = [training.learning_rate * group.get("lr_scale", 1.0) for group in groups]
    for group, base, fn in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["initial_lr"] = base
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in scheduler.optimizer.param_groups]


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG; return the checkpoint's state.json."""
    import torch
    from safetensors.torch import load_file

    state = read_state(path)
    tensors = load_file(str(path / "trainable.safetensors"))
    missing = [n for n in trainer.param_names if n not in tensors]
    if missing:
        raise RuntimeError(f"checkpoint {path} lacks {len(missing)} trainable tensors, e.g. {missing[0]}")
    sharded = getattr(trainer, "sharded", False)
    if sharded != (state.get("strategy", "ddp") == "fsdp"):
        raise RuntimeError(
            f"checkpoint {path} was written with distributed.strategy {state.get('strategy', 'ddp')}; "
            "resume it with the same strategy"
        )
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        from torch.distributed.tensor import distribute_tensor

        with torch.no_grad():  # every rank read the full tensors: each keeps its own shard
            for n, p in zip(trainer.param_names, trainer.params, strict=True):
                full = tensors[n].to(trainer.info.device, p.dtype)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
        optim = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_optimizer_state_dict(
            trainer.model, trainer.optimizer, optim, options=StateDictOptions(full_state_dict=True)
        )
    else:
        with torch.no_grad():
            for n, p in zip(trainer.param_names, trainer.params, strict=True):
                p.copy_(tensors[n].to(p.device, p.dtype))
        map_loc = trainer.info.device
        optim = torch.load(path / "optimizer.pt", map_location=map_loc, weights_only=True)
        saved_keys = {k for v in optim.get("state", {}).values() if isinstance(v, dict) for k in v}
        if hasattr(trainer.optimizer, "use_flat") and "exp_avg" in saved_keys:
            raise RuntimeError(
                f"checkpoint {path} holds torch AdamW moments, but training.optimizer adamw_8bit now runs "
                "bitsandbytes' 8-bit AdamW on CPU too (it used to fall back to torch's AdamW there); this checkpoint "
                "cannot continue with it. Start the run again without --resume"
            )
        trainer.optimizer.load_state_dict(optim)
    trainer.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _follow_the_recipe(trainer.scheduler, trainer.recipe.training)
    rngs = torch.load(path / "rng.pt", weights_only=True)
    mine = rngs.get(f"rank{trainer.info.rank}")
    # RNG streams are per rank: with another world size there is no matching stream to continue.
    if mine is not None and state.get("world_size") == trainer.info.world_size:
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and trainer.info.device_type == "cuda":
            torch.cuda.set_rng_state(mine["cuda"])
    return state
