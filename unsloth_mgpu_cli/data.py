"""Data: read rows, render prompts, tokenise once in the parent, and plan which samples each rank trains on.

The seam with the engine is small: `prepare()` (parent, tokenizer only, no Unsloth, no GPU) returns the
folder of a tokenised cache; workers `TokenizedData.open()` it (memory-mapped) and ask a `StepPlanner`
for their micro-batches of step s. The samples of a step depend only on the seed, the epoch and the
global batch size, never on the number of workers (contract.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import Problem, UserError
from .recipe import DatasetSection, Recipe

IGNORE_INDEX = -100
_CACHE_VERSION = "1"

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{input_clause}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)


def render_alpaca(row: dict[str, Any]) -> tuple[str, str]:
    """(prompt, response) of one alpaca row."""
    inp = (row.get("input") or "").strip()
    prompt = ALPACA_PROMPT.format(
        input_clause=", paired with an input that provides further context" if inp else "",
        instruction=str(row["instruction"]).strip(),
        input_block=f"### Input:\n{inp}\n\n" if inp else "",
    )
    return prompt, str(row["output"]).strip()


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

_LOADERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}
_REQUIRED = {"alpaca": ("instruction", "output"), "text": ("text",), "chat": ("messages",)}


def _check_json_lines(path: Path) -> None:
    """Name the file:line of a malformed JSON line (datasets' own error does not)."""
    with path.open("r", encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    json.loads(line)
                except json.JSONDecodeError as exc:
                    raise UserError(Problem(f"{path}:{lineno}", f"malformed JSON line: {exc.msg} at column {exc.colno}",
                                            "each line of a .jsonl file must be one JSON object"), "invalid data") from exc


def load_rows(ds: DatasetSection) -> list[dict[str, Any]]:
    """Read every row of a local file (or cached hub dataset) as dicts, checking the format's columns."""
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(ds.path)
    where = f"dataset.path ({path})"
    try:
        if path.exists():
            kind = _LOADERS.get(path.suffix.lower())
            if kind is None:
                raise UserError(Problem(where, f"unsupported file type {path.suffix!r}; expected .json, .jsonl, "
                                        ".csv or .parquet"), "invalid data")
            if path.stat().st_size == 0:
                raise UserError(Problem(where, "the dataset file is empty"), "invalid data")
            if path.suffix.lower() == ".jsonl":
                _check_json_lines(path)
            table = datasets.load_dataset(kind, data_files=str(path), split="train")
        else:
            table = datasets.load_dataset(ds.path, split=ds.split)
    except UserError:
        raise
    except FileNotFoundError as exc:
        raise UserError(Problem(where, f"dataset not found: {exc}", "offline runs need the dataset in the local "
                                "HF cache, or give a local file"), "invalid data") from exc
    except Exception as exc:  # datasets wraps parser errors in many types; all mean "cannot read this file"
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(Problem(where, f"cannot read the dataset: {msg}"), "invalid data") from exc
    if len(table) == 0:
        raise UserError(Problem(where, "the dataset has no rows"), "invalid data")
    missing = [c for c in _REQUIRED[ds.format] if c not in table.column_names]
    if missing:
        raise UserError(Problem(where, f"format {ds.format} needs column(s) {missing}; found {table.column_names}",
                                "set dataset.format to match the data"), "invalid data")
    return table.to_list()


# ----------------------------------------------------------------------------------------------------
# Tokenising (once, in the parent) and the cache
# ----------------------------------------------------------------------------------------------------


@dataclass
class PrepareSummary:
    samples: int
    tokens: int
    loss_tokens: int
    truncated: int
    dropped: int
    longest: int


def _fingerprint(recipe: Recipe, model_path: str) -> str:
    h = hashlib.sha256()
    h.update(_CACHE_VERSION.encode())
    p = Path(recipe.dataset.path)
    if p.exists():
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
        with p.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    else:
        h.update(recipe.dataset.path.encode())
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        f = Path(model_path) / name
        if f.exists():
            h.update(f.read_bytes())
    h.update(model_path.encode())
    # The eval keys do not change how the training file is tokenised: leave them out, so one cache serves both.
    h.update(json.dumps([recipe.dataset.model_dump(mode="json", exclude={"eval_path", "eval_ratio"}),
                         recipe.model.max_seq_length,
                         recipe.train_on_responses_only()], sort_keys=True).encode())
    return h.hexdigest()[:20]


def _tokenize_rows(rows: list[dict[str, Any]], tokenizer: Any, recipe: Recipe) -> tuple[list[np.ndarray],
                                                                                          list[np.ndarray], int, int]:
    fmt = recipe.dataset.format
    responses_only = recipe.train_on_responses_only()
    max_len = recipe.model.max_seq_length
    eos = tokenizer.eos_token_id
    ids_out, labels_out = [], []
    truncated = dropped = 0
    for i, row in enumerate(rows):
        if fmt == "alpaca":
            if row.get("instruction") is None or row.get("output") is None:
                raise UserError(Problem(f"{recipe.dataset.path}: row {i + 1}", "instruction and output must not be "
                                        "empty"), "invalid data")
            prompt, response = render_alpaca(row)
            p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
            ids = p_ids + r_ids
            labels = ([IGNORE_INDEX] * len(p_ids) if responses_only else list(p_ids)) + r_ids
        elif fmt == "text":
            text = row.get("text")
            if not isinstance(text, str) or not text:
                raise UserError(Problem(f"{recipe.dataset.path}: row {i + 1}", "text must be a non-empty string"),
                                "invalid data")
            ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [eos]
            labels = list(ids)
        else:
            raise UserError(Problem("dataset.format", f"format {fmt!r} arrives with the data pipeline; use alpaca or "
                                    "text for now"), "invalid recipe")
        if len(ids) > max_len:
            if recipe.dataset.too_long == "drop":
                dropped += 1
                continue
            truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        ids_out.append(np.asarray(ids, dtype=np.int32))
        labels_out.append(np.asarray(labels, dtype=np.int32))
    return ids_out, labels_out, truncated, dropped


def prepare(recipe: Recipe, model_path: str) -> tuple[Path, PrepareSummary, bool]:
    """Tokenise the dataset once and cache it; returns (cache folder, summary, cache_hit)."""
    from .models import cache_dir

    fp = _fingerprint(recipe, model_path)
    dest = cache_dir() / "data" / fp
    if (dest / "meta.json").exists():
        meta = json.loads((dest / "meta.json").read_text())
        return dest, PrepareSummary(**meta["summary"]), True
    rows = load_rows(recipe.dataset)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, trust_remote_code=recipe.model.trust_remote_code)
    ids, labels, truncated, dropped = _tokenize_rows(rows, tokenizer, recipe)
    if not ids:
        raise UserError(Problem("dataset.path", f"no samples left after dropping {dropped} longer than "
                                f"model.max_seq_length={recipe.model.max_seq_length}",
                                "raise model.max_seq_length or set dataset.too_long: truncate"), "invalid data")
    lengths = np.asarray([len(x) for x in ids], dtype=np.int64)
    # loss tokens after the model's one-token shift: labels[1:] that are not ignored
    loss_counts = np.asarray([int((lab[1:] != IGNORE_INDEX).sum()) for lab in labels], dtype=np.int64)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    summary = PrepareSummary(samples=len(ids), tokens=int(lengths.sum()), loss_tokens=int(loss_counts.sum()),
                             truncated=truncated, dropped=dropped, longest=int(lengths.max()))
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{fp}-", dir=dest.parent))
    try:
        np.save(tmp / "input_ids.npy", np.concatenate(ids))
        np.save(tmp / "labels.npy", np.concatenate(labels))
        np.save(tmp / "offsets.npy", offsets)
        np.save(tmp / "loss_counts.npy", loss_counts)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        meta = {"summary": summary.__dict__, "pad_token_id": int(pad), "fingerprint": fp}
        (tmp / "meta.json").write_text(json.dumps(meta))
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run wrote the same cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest, summary, False


class TokenizedData:
    """Read-only, memory-mapped view of a prepared cache."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        self.input_ids = np.load(folder / "input_ids.npy", mmap_mode="r")
        self.labels = np.load(folder / "labels.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")
        self.loss_counts = np.load(folder / "loss_counts.npy")
        self.meta = json.loads((folder / "meta.json").read_text())
        self.pad_token_id = int(self.meta["pad_token_id"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.input_ids[a:b], self.labels[a:b]

    def collate(self, indices: list[int]) -> dict[str, Any]:
        """Right-padded tensors for one micro-batch (padding is masked out of attention and loss)."""
        import torch

        longest = max(int(self.offsets[i + 1] - self.offsets[i]) for i in indices)
        ids = torch.full((len(indices), longest), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(indices), longest), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            x, y = self.sample(i)
            n = len(x)
            ids[row, :n] = torch.from_numpy(np.asarray(x, dtype=np.int64))
            labels[row, :n] = torch.from_numpy(np.asarray(y, dtype=np.int64))
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------
# Evaluation split (additive: the training cache and the planner are untouched)
# ----------------------------------------------------------------------------------------------------


def prepare_eval(recipe: Recipe, model_path: str) -> tuple[Path, PrepareSummary, bool] | None:
    """Tokenise `dataset.eval_path` into its own cache (same rules as the training file); None without one."""
    if recipe.dataset.eval_path is None:
        return None
    eval_recipe = recipe.model_copy(deep=True)
    eval_recipe.dataset.path = recipe.dataset.eval_path
    eval_recipe.dataset.eval_path = None
    try:
        return prepare(eval_recipe, model_path)
    except UserError as exc:
        # the problems name dataset.path; the user wrote dataset.eval_path
        for p in exc.problems:
            p.where = p.where.replace("dataset.path", "dataset.eval_path")
        raise UserError(exc.problems, exc.title) from None


def split_eval_indices(num_samples: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of a tokenised cache: a seeded, sorted hold-out of `ratio` of the samples."""
    n_eval = max(1, int(round(num_samples * ratio)))
    if n_eval >= num_samples:
        raise UserError(Problem("dataset.eval_ratio", f"holding out {n_eval} of {num_samples} samples leaves none "
                                "to train on", "lower dataset.eval_ratio or add data"), "invalid recipe")
    # A stream of its own ([seed, 1]), so the hold-out does not depend on the planner's epoch permutations.
    perm = np.random.default_rng([seed, 1]).permutation(num_samples)
    return np.sort(perm[n_eval:]), np.sort(perm[:n_eval])


class SubsetData:
    """A `TokenizedData` restricted to some of its samples, renumbered 0..len-1 (the training part of a split)."""

    def __init__(self, base: TokenizedData, indices: np.ndarray):
        self.base = base
        self.indices = np.asarray(indices, dtype=np.int64)
        self.loss_counts = base.loss_counts[self.indices]
        self.pad_token_id = base.pad_token_id

    def __len__(self) -> int:
        return len(self.indices)

    def lengths(self) -> np.ndarray:
        return self.base.lengths()[self.indices]

    def sample(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self.base.sample(int(self.indices[i]))

    def collate(self, indices: list[int]) -> dict[str, Any]:
        return self.base.collate([int(self.indices[i]) for i in indices])


# ----------------------------------------------------------------------------------------------------
# Which samples each rank trains on
# ----------------------------------------------------------------------------------------------------


@dataclass
class StepBatches:
    """The samples of one optimizer step: all ranks' micro-batches, so every rank knows the global counts."""

    step: int
    epoch: int
    per_rank: list[list[list[int]]]  # [rank][micro_batch] -> sample indices
    loss_tokens: list[int]  # per rank

    @property
    def global_loss_tokens(self) -> int:
        return int(sum(self.loss_tokens))


class StepPlanner:
    """Deterministic step -> samples plan. Samples of a step depend on seed and global batch only."""

    def __init__(self, num_samples: int, loss_counts: np.ndarray, micro_batch_size: int, grad_accum: int,
                 world_size: int, seed: int, shuffle: bool = True):
        self.n = num_samples
        self.loss_counts = loss_counts
        self.mb, self.ga, self.world = micro_batch_size, grad_accum, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.seed, self.shuffle = seed, shuffle
        if self.global_batch > num_samples:
            raise UserError(Problem("training.micro_batch_size", f"one optimizer step needs {self.global_batch} "
                                    f"samples (micro_batch_size x workers x gradient_accumulation_steps) but the "
                                    f"dataset has {num_samples}", "lower the batch settings or add data"),
                            "invalid recipe")
        self.steps_per_epoch = num_samples // self.global_batch
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if self.shuffle:
                rng = np.random.default_rng([self.seed, epoch])
                self._perm_cache = {epoch: rng.permutation(self.n)}
            else:
                self._perm_cache = {epoch: np.arange(self.n)}
        return self._perm_cache[epoch]

    def total_steps(self, epochs: int, max_steps: int | None) -> int:
        return max_steps if max_steps is not None else epochs * self.steps_per_epoch

    def batches(self, step: int) -> StepBatches:
        epoch, within = divmod(step, self.steps_per_epoch)
        idx = self._perm(epoch)[within * self.global_batch:(within + 1) * self.global_batch]
        per_rank: list[list[list[int]]] = []
        counts: list[int] = []
        per = self.mb * self.ga
        for r in range(self.world):
            mine = [int(i) for i in idx[r * per:(r + 1) * per]]
            per_rank.append([mine[j * self.mb:(j + 1) * self.mb] for j in range(self.ga)])
            counts.append(int(self.loss_counts[mine].sum()))
        return StepBatches(step=step, epoch=epoch, per_rank=per_rank, loss_tokens=counts)

    def __iter__(self) -> Iterator[StepBatches]:  # pragma: no cover - convenience
        step = 0
        while True:
            yield self.batches(step)
            step += 1
