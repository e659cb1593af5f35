"""Data: read rows, render prompts, tokenise once in the parent, and plan which samples each rank trains on.

The seam with the engine is small: `prepare()` (parent, tokenizer only, no Unsloth, no GPU) returns the
folder of a tokenised cache; workers `TokenizedData.open()` it (memory-mapped) and ask a `StepPlanner`
for their micro-batches of step s. The samples of a step depend only on the seed, the epoch and the
global batch size, never on the number of workers (contract.md).
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UTF8_HINT, Problem, UserError, first_line, read_utf8
from .recipe import CHAT_TEMPLATE_NAMES, DatasetSection, DataSource, Recipe, why_not_a_hub_id

IGNORE_INDEX = -100
PACKED_LENGTHS_KEY = "packed_seq_lengths"  # a packed row's sample lengths, the keyword Unsloth reads
_CACHE_VERSION = "3"  # 3: a token across a turn's start is trained on (session 13)

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
    return prompt, str(row["output"]).rstrip()  # leading indentation is the answer's (code): kept


# ----------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------

_SUFFIXES = (".json", ".jsonl", ".csv", ".parquet")
_REQUIRED = {"alpaca": ("instruction", "output"), "text": ("text",), "chat": ("messages",)}
# Roles a chat message may have; ShareGPT's names are accepted as aliases.
CHAT_ROLES = ("system", "user", "assistant", "tool")
_ROLE_ALIASES = {"human": "user", "gpt": "assistant"}

# Templates for tokenizers without one (dataset.chat_template: NAME). Each renders a prefix of the
# conversation as a prefix of the full text, which the response-only masking relies on.
NAMED_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
        "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
        "'<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    "zephyr": (
        "{% for message in messages %}{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}


# Bad rows listed in one error; the others are counted ("... and 12 more bad rows").
MAX_LISTED = 20

# Where a problem is, for listing every problem of the data in file order: (source, file, line or row number).
Position = tuple[int, ...]


@dataclass
class _Source:
    """Where a run of rows came from, so a bad row can be named by file:line (or file: row N)."""

    name: str
    start: int  # index of its first row among all rows
    numbers: list[int] | None = None  # line (or row number) of each row; None: rows numbered from 1
    label_rows: bool = False  # name rows `file: row N` (CSV, JSON arrays, Parquet, hub) rather than `file:N`

    def number(self, local: int) -> int:
        """The line (or row number) of the source's row `local` (0-based)."""
        return self.numbers[local] if self.numbers is not None and local < len(self.numbers) else local + 1

    def where(self, number: int) -> str:
        return f"{self.name}: row {number}" if self.label_rows else f"{self.name}:{number}"


@dataclass
class _Bad:
    """The bad lines of one file, in file order: the first MAX_LISTED as problems, the others counted (a file of
    the wrong kind has a bad line per line)."""

    problems: list[tuple[int, Problem]] = field(default_factory=list)
    more: int = 0

    def add(self, number: int, problem: Problem) -> None:
        if len(self.problems) < MAX_LISTED:
            self.problems.append((number, problem))
        else:
            self.more += 1


@dataclass
class Rows:
    """Every row of the dataset as dicts, plus where each came from."""

    rows: list[dict[str, Any]]
    sources: list[_Source]
    index: np.ndarray | None = None  # original row of each kept row (dataset.max_samples)
    total: int = -1  # rows the data holds, before dataset.max_samples (-1: len(rows))
    # lines that are no rows (malformed JSON, an unparsable CSV row): reported with the bad rows, in file order
    problems: list[tuple[Position, Problem]] = field(default_factory=list)
    more: int = 0  # such lines beyond those in `problems`

    def __post_init__(self) -> None:
        if self.total < 0:
            self.total = len(self.rows)

    def position(self, i: int) -> Position:
        """(source, line or row number) of row i."""
        if self.index is not None:
            i = int(self.index[i])
        k = 0
        for j, s in enumerate(self.sources):
            if s.start <= i:
                k = j
        return k, self.sources[k].number(i - self.sources[k].start)

    def where(self, i: int) -> str:
        """file:line (or `file: row N`) of row i."""
        k, number = self.position(i)
        return self.sources[k].where(number)


def _data_error(where: str, message: str, hint: str | None = None) -> UserError:
    return UserError(Problem(where, message, hint), "invalid data")


def _describe(value: Any) -> str:
    """A JSON value as a person would name it: `the number 5`, `the boolean true`, `null`, `a list of 2`."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"the boolean {str(value).lower()}"
    if isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN and Infinity, JSON has neither
        return (
            "NaN (not a number: what some exporters write for a missing value)"
            if value != value
            else (f"{'-' if value < 0 else ''}Infinity")
        )
    if isinstance(value, (int, float)):
        return f"the number {value}"
    if isinstance(value, str):
        return f"the string {value!r:.60}"
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _names(keys: Any, limit: int = 20, keep_order: bool = False) -> str:
    """Column names for a message: sorted (or in their order, as a CSV header's), quoted, at most `limit`."""
    names = [str(k) for k in keys] if keep_order else sorted(str(k) for k in keys)
    shown = ", ".join(repr(n) for n in names[:limit])
    return f"[{shown}{f', ... ({len(names)} in all)' if len(names) > limit else ''}]"


def _refuse_one_object(path: Path, raw: bytes) -> None:
    """A .json file over several lines that is one JSON object (pretty-printed, or `{"data": [...]}` as some
    exports write it) is no dataset: say so, rather than a "malformed JSON line" error for each of its lines.
    `raw`: the file's bytes, already read."""
    try:
        whole = json.loads(raw)  # stops at the end of the first object of JSON Lines ("Extra data")
    except (json.JSONDecodeError, UnicodeDecodeError):
        return  # JSON Lines with objects over one line each, or broken: the line-by-line reader names the lines
    if not isinstance(whole, dict):
        return
    lists = [key for key, value in whole.items() if isinstance(value, list) and value and isinstance(value[0], dict)]
    hint = (
        f"the rows look like the list under '{lists[0]}': extract it, e.g. jq '.{lists[0]}' {path.name} > rows.json"
        if len(lists) == 1
        else "write a JSON array of objects ([{...}, {...}]) or JSON Lines (one object per line)"
    )
    raise _data_error(
        str(path),
        f"expected a JSON array of objects (one per row), found one object with keys {_names(list(whole))}",
        hint,
    )


def _read_json(path: Path, bad: _Bad) -> tuple[list[Any], list[int], bool]:
    """A JSON array (rows numbered from 1), or JSON Lines (rows named by their line).

    A line that is not UTF-8 or not a JSON object is a problem, and the other lines are still read, so the bad
    rows among them are found too. Lines are split at newlines only: JSON strings may hold U+2028 and the
    other separators that str.splitlines() would cut at.
    """
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # some Windows editors write one
    if path.suffix.lower() == ".json" and raw[bom:].lstrip().startswith(b"["):
        text = read_utf8(path, "invalid data")
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise _data_error(f"{path}:{exc.lineno}", f"malformed JSON: {exc.msg} at column {exc.colno}") from exc
        for n, row in enumerate(data, 1):
            if not isinstance(row, dict):
                bad.add(n, Problem(f"{path}: row {n}", f"expected an object with named fields, found {_describe(row)}"))
        numbers = [n for n, row in enumerate(data, 1) if isinstance(row, dict)]
        return [row for row in data if isinstance(row, dict)], numbers, True
    if path.suffix.lower() == ".json" and raw[bom:].lstrip().startswith(b"{") and raw.strip().count(b"\n"):
        _refuse_one_object(path, raw[bom:])  # JSON Lines otherwise: one object per line
    rows, lines = [], []
    offset = bom
    for lineno, line in enumerate(raw[bom:].split(b"\n"), 1):
        start, offset = offset, offset + len(line) + 1
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            message = f"not UTF-8 text: byte 0x{line[exc.start]:02x} at offset {start + exc.start} ({exc.reason})"
            bad.add(lineno, Problem(f"{path}:{lineno}", message, UTF8_HINT))
            continue
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            cr_only = "\r" in text.rstrip("\r")  # lines that end in CR alone (classic Mac OS): one "line" here
            hint = (
                "the file's lines end in a carriage return (CR) alone; convert them: "
                f"tr '\\r' '\\n' < {path.name} > fixed.jsonl"
                if cr_only
                else "each line of a JSON Lines file must be one JSON object"
            )
            bad.add(lineno, Problem(f"{path}:{lineno}", f"malformed JSON line: {exc.msg} at column {exc.colno}", hint))
            continue
        if not isinstance(row, dict):
            bad.add(
                lineno, Problem(f"{path}:{lineno}", f"expected an object with named fields, found {_describe(row)}")
            )
            continue
        rows.append(row)
        lines.append(lineno)
    return rows, lines, False


# A field that is not UTF-8, decoded with surrogateescape: its bytes 0x80-0xff became U+DC80-U+DCFF.
_NOT_UTF8 = re.compile("[\udc80-\udcff]")
_CSV_HINT = 'a field that holds a comma, a quote or a line break must be quoted: "a, b" (a quote inside doubled: "")'


def _read_csv(path: Path, bad: _Bad) -> tuple[list[dict[str, Any]], list[int]]:
    """The rows of a CSV file, every field a string, each named by the line it starts on (`file: row N`; the
    header is row 1).

    Read with Python's csv module rather than pyarrow, whose errors name no row and which types a column (a
    column of numbers becomes integers) and reads a whole column as binary when one of its fields is not UTF-8.
    A row that cannot be parsed, or has another number of fields than the header, is a problem and the other
    rows are still read. A field that is not UTF-8 is kept as bytes and refused where a format reads it, so
    only the rows that hold one are reported.
    """
    import csv
    import io

    csv.field_size_limit(2**31 - 1)  # the default, 128 KiB, is less than one long document
    text = path.read_bytes().decode("utf-8", "surrogateescape").removeprefix("\ufeff")
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header: list[str] | None = None
    rows, lines = [], []
    end = 0  # the last line of the previous row
    while True:
        start = end + 1
        try:
            record = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            if reader.line_num <= end:  # no progress: nothing more can be read
                break
            end = reader.line_num
            span = f" (it runs to line {end})" if end > start else ""
            bad.add(start, Problem(f"{path}: row {start}", f"cannot parse the CSV row{span}: {exc}", _CSV_HINT))
            continue
        end = reader.line_num
        if not record:  # a blank line
            continue
        if header is None:
            if any(_NOT_UTF8.search(name) for name in record):
                raise _data_error(f"{path}: row {start}", "the header (column names) is not UTF-8 text", UTF8_HINT)
            twice = sorted({name for name in record if record.count(name) > 1})
            if twice:  # the rows would keep the last of them only
                fields = ", ".join(
                    f"'{name}' (fields {' and '.join(str(i + 1) for i, n in enumerate(record) if n == name)})"
                    for name in twice
                )
                raise _data_error(
                    f"{path}: row {start}",
                    f"the header names a column twice: {fields}",
                    "rename one of them (dataset.columns can then map the one to use)",
                )
            header = record
            continue
        if len(record) != len(header):
            columns = _names(header, keep_order=True)
            message = f"expected {len(header)} fields, as the header {columns}, found {len(record)}"
            bad.add(start, Problem(f"{path}: row {start}", message, _CSV_HINT))
            continue
        rows.append(
            {
                name: value.encode("utf-8", "surrogateescape") if _NOT_UTF8.search(value) else value
                for name, value in zip(header, record, strict=True)
            }
        )
        lines.append(start)
    return rows, lines


def _read_file(path: Path, key: str = "dataset") -> tuple[list[dict[str, Any]], _Source, _Bad]:
    suffix = path.suffix.lower()
    if path.stat().st_size == 0:
        raise _data_error(f"{key}.path ({path})", "the dataset file is empty")
    bad = _Bad()
    if suffix in (".json", ".jsonl"):
        rows, numbers, label_rows = _read_json(path, bad)
        return rows, _Source(str(path), 0, numbers, label_rows), bad
    if suffix == ".csv":
        rows, numbers = _read_csv(path, bad)
        return rows, _Source(str(path), 0, numbers, True), bad
    try:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types; all mean "cannot parse this file"
        msg = first_line(exc)
        raise _data_error(str(path), f"cannot read the {suffix[1:]} file: {msg}") from exc
    return table.to_pylist(), _Source(str(path), 0, None, True), bad


def _hub_rows(ds: DatasetSection, key: str = "dataset") -> tuple[list[dict[str, Any]], _Source]:
    import datasets

    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    from .hub import offline as hub_offline
    from .hub import unreachable_because

    offline = hub_offline(os.environ, datasets=True)
    if not _hub_dataset_cached(ds.path) and (host := unreachable_because(os.environ)) is not None:
        raise _data_error(
            f"{key}.path ({ds.path})",
            f"no local file or folder of that name exists (relative paths start from the recipe's folder), it is "
            f"not in the Hugging Face cache, and the hub's host name ({host}) does not resolve",
            "give a local .json/.jsonl/.csv/.parquet file (or fix the path), or download the dataset once where "
            "the hub is reachable; check DNS and HF_ENDPOINT",
        )
    try:
        table = datasets.load_dataset(ds.path, split=ds.split)
    except Exception as exc:  # offline misses, unknown ids and bad splits arrive as many exception types
        msg = first_line(exc)
        hint = (
            "the hub is offline (HF_HUB_OFFLINE=1): download it once with network access, or give a local file"
            if offline
            else f"check the dataset id and {key}.split, or give a local .json/.jsonl/.csv/.parquet file"
        )
        raise _data_error(
            f"{key}.path ({ds.path})",
            f"no local file or folder of that name exists (relative paths start from the recipe's folder), "
            f"and it cannot be loaded as a hub dataset: {msg}",
            hint,
        ) from exc
    return table.to_list(), _Source(f"{ds.path} [{ds.split}]", 0, None, True)


def _hub_dataset_cached(repo_id: str) -> bool:
    """Whether the HF hub cache or the datasets cache may hold `repo_id` (datasets then loads it without network)."""
    import datasets
    from huggingface_hub import constants

    owner, _, name = repo_id.rpartition("/")
    folders = [
        Path(constants.HF_HUB_CACHE) / ("datasets--" + repo_id.replace("/", "--")),
        Path(datasets.config.HF_DATASETS_CACHE) / (f"{owner}___{name}" if owner else name),
    ]
    return any(folder.exists() for folder in folders)


def _column_maps(ds: DatasetSection) -> tuple[dict[str, str], dict[str, str]]:
    """dataset.columns as (top-level renames, renames inside chat messages: role and content)."""
    inner_names = ("role", "content") if ds.format == "chat" else ()
    top = {k: v for k, v in ds.columns.items() if k not in inner_names}
    inner = {k: v for k, v in ds.columns.items() if k in inner_names}
    return top, inner


def _check_columns(rows: list[dict[str, Any]], ds: DatasetSection, columns_key: str) -> list[Problem]:
    """Every column that dataset.columns maps from must be in the data: a mapping that matches nothing would
    otherwise do nothing, silently (the format's own column, if there is one, would be trained on instead)."""
    top, inner = _column_maps(ds)
    problems = []
    if top:
        found = set().union(*(r.keys() for r in rows))
        for name, source in top.items():
            if source not in found:
                problems.append(
                    Problem(
                        f"{columns_key}.{name}",
                        f"maps the column {source!r} to {name}, but the data ({ds.path}) has no column {source!r}; "
                        f"its columns: {_names(found)}",
                        f"set {columns_key}.{name} to one of these columns, or remove it",
                    )
                )
    if inner:
        messages = top.get("messages", "messages")
        found = {
            k for r in rows if isinstance(r.get(messages), list) for m in r[messages] if isinstance(m, dict) for k in m
        }
        for name, source in inner.items():
            if found and source not in found:
                problems.append(
                    Problem(
                        f"{columns_key}.{name}",
                        f"maps the message key {source!r} to {name}, but no message in the data ({ds.path}) has "
                        f"it; the messages' keys: {_names(found)}",
                        f"set {columns_key}.{name} to one of these keys, or remove it",
                    )
                )
    return problems


def _apply_columns(rows: list[dict[str, Any]], ds: DatasetSection) -> None:
    """Rename the user's columns to the format's names in place (role/content inside chat messages)."""
    top, inner = _column_maps(ds)
    if not top and not inner:
        return
    for row in rows:
        for name, source in top.items():
            if source in row:
                row[name] = row.pop(source)
        msgs = row.get("messages")
        if inner and isinstance(msgs, list):
            for m in msgs:
                if isinstance(m, dict):
                    for name, source in inner.items():
                        if source in m:
                            m[name] = m.pop(source)


def _source_files(ds: DatasetSection, key: str) -> list[Path]:
    """The files to read for `ds.path` (a file, or a folder's data files: those named after `dataset.split` when
    there are any); none for a hub dataset id. Raises UserError for a path that is none of these."""
    path = Path(ds.path)
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix.lower() in _SUFFIXES
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise _data_error(f"{key}.path ({path})", "the folder holds no .json, .jsonl, .csv or .parquet file")
        # A folder with split-named files (train.jsonl, test.jsonl) is read by dataset.split.
        split_files = [p for p in files if p.stem == ds.split]
        files = split_files or files
        held_out = Path(ds.eval_path).resolve() if ds.eval_path else None
        inside = [
            f for f in files if held_out is not None and (f.resolve() == held_out or held_out in f.resolve().parents)
        ]
        if inside:  # it would be trained on, and then scored as unseen data
            raise _data_error(
                f"{key}.path ({path})",
                f"the folder's files are all read for training, and dataset.eval_path ({ds.eval_path}) is among them",
                "move the evaluation data out of the training folder, or name the training files by dataset.split "
                f"(e.g. {path / (ds.split + '.jsonl')} beside the evaluation file)",
            )
    elif path.exists():
        if ds.eval_path and Path(ds.eval_path).resolve() == path.resolve():  # scored as unseen, after training on it
            raise _data_error(
                f"{key}.path ({path})",
                "dataset.eval_path is the training file itself: the evaluation would score samples the run trained on",
                "give held-out samples in another file, or hold some out of this one with dataset.eval_ratio (e.g. "
                "0.05)",
            )
        if path.suffix.lower() not in _SUFFIXES:
            raise _data_error(
                f"{key}.path ({path})",
                f"unsupported file type {path.suffix!r}; expected .json, "
                ".jsonl, .csv or .parquet (or a folder of them)",
            )
        files = [path]
    else:
        reason = why_not_a_hub_id(ds.path)
        if reason is not None:
            raise _data_error(
                f"{key}.path ({ds.path})",
                f"no such file or folder, and it cannot be a hub dataset id ({reason})",
                "check the path; relative paths start from the recipe's folder",
            )
        files = []
    return files


def _column_problems(
    rows: list[dict[str, Any]], ds: DatasetSection, key: str, columns_key: str | None, first_source: str
) -> list[Problem]:
    """Rename the columns `dataset.columns` maps (in place), then the recipe problems: a mapped column that is not in
    the data, or a column the format needs that no row has (named after `first_source`)."""
    columns_key = columns_key or f"{key}.columns"
    # A mapping a mix source inherits from dataset.columns is meant for the sources that need it: one that already
    # has the format's columns is not an error (the missing-column check below still catches a source with neither).
    inherited = key != "dataset" and not columns_key.startswith(key)
    recipe_problems = [] if inherited else _check_columns(rows, ds, columns_key)
    if not recipe_problems:
        _apply_columns(rows, ds)
        found = sorted({k for r in rows[:1000] for k in r})
        missing = [c for c in _REQUIRED[ds.format] if not any(c in r for r in rows[:1000])]
        if missing:
            mapped = ", ".join(f"{c}: <your column>" for c in missing)
            recipe_problems.append(
                Problem(
                    first_source,
                    f"format {ds.format} needs column(s) {missing}; found {found}",
                    f"set {key}.format to match the data, or map columns with {key}.columns: {{{mapped}}}",
                )
            )
    return recipe_problems


# Rows read ahead by `preload_rows`, each taken (once) by the `load_rows` call that asks for the same source
_PRELOADED: dict[tuple[Any, ...], Rows] = {}


def preload_rows(recipe: Recipe) -> bool:
    """Read every source's rows ahead, for `prepare` in this process or in a fork of it (datagate.py): True when
    they hold no problem and, for one source, at least a global batch of rows, so that tokenising (which may still
    refuse: rows longer than model.max_seq_length, a chat template) can run beside the workers' start. False (and
    nothing kept) when `prepare` will refuse the run at once: it then does so before any worker starts.
    """
    kept: dict[tuple[Any, ...], Rows] = {}
    try:
        for src in recipe.dataset.sources():
            # the arguments prepare's own load_rows call will give (_single_source_samples, _mixed_samples)
            section, key, columns = src.section, src.key, src.key_of("columns")
            if recipe.dataset.mix is None:
                section, key, columns = recipe.dataset, "dataset", None
            rows = read_rows(section, recipe.training.seed, key, columns)
            if rows.problems:
                return False
            kept[_rows_key(section, recipe.training.seed, key, columns)] = rows
        if recipe.dataset.mix is None:
            n = len(next(iter(kept.values())).rows)
            workers = recipe.distributed.num_gpus * recipe.distributed.nnodes
            if n - eval_hold_out(recipe, n) < recipe.global_batch_size(workers):
                return False  # too few samples for one step: check_batch_fits refuses it before the workers start
    except UserError:
        return False
    _PRELOADED.update(kept)
    return True


def forget_preloaded_rows() -> None:
    """Drop rows read ahead (the launcher, once the fork that tokenises them has its own copy)."""
    _PRELOADED.clear()


def _rows_key(ds: DatasetSection, seed: int, key: str, columns_key: str | None) -> tuple[Any, ...]:
    return (ds.model_dump_json(), seed, key, columns_key)


def load_rows(ds: DatasetSection, seed: int = 0, key: str = "dataset", columns_key: str | None = None) -> Rows:
    """Rows read ahead for this source (`preload_rows`), else `read_rows`."""
    rows = _PRELOADED.pop(_rows_key(ds, seed, key, columns_key), None)
    return rows if rows is not None else read_rows(ds, seed, key, columns_key)


def read_rows(ds: DatasetSection, seed: int = 0, key: str = "dataset", columns_key: str | None = None) -> Rows:
    """Read every row of a local file, a folder of files, or a cached hub dataset.

    Lines that are no rows (malformed JSON, an unparsable CSV row) do not stop the reading: they come back in
    `Rows.problems`, to be reported with the bad rows. Columns named in `dataset.columns` are renamed first
    (each must exist); a format's required column missing from the data is reported once, naming the columns
    that were found.

    Args:
        ds: a single-path dataset section (one of `DatasetSection.sources()`).
        seed: seeds the `dataset.max_samples` draw.
        key: the recipe key of the source, for messages (`dataset`, or `dataset.mix.<i>` in a mix).
        columns_key: the key that sets the source's columns (default `<key>.columns`).

    Raises:
        UserError: unreadable files, a path that is neither a file, a folder nor a hub dataset, an empty
            dataset, a mapped column that is not in the data, a required column missing from every row.
    """
    assert ds.path is not None, "read_rows reads one source: see DatasetSection.sources()"
    files = _source_files(ds, key)
    rows: list[dict[str, Any]] = []
    sources: list[_Source] = []
    problems: list[tuple[Position, Problem]] = []
    more = 0
    if files:
        for k, f in enumerate(files):
            part, src, bad = _read_file(f, key)
            src.start = len(rows)
            rows.extend(part)
            sources.append(src)
            problems += [((k, number), p) for number, p in bad.problems]
            more += bad.more
    else:
        rows, src = _hub_rows(ds, key)
        sources.append(src)
    if not rows:
        _raise_bad_rows(problems, more)
        raise _data_error(f"{key}.path ({Path(ds.path)})", "the dataset has no rows")
    recipe_problems = _column_problems(rows, ds, key, columns_key, sources[0].name)
    if recipe_problems:
        raise UserError(recipe_problems + _listed(problems, more), "invalid data")
    if ds.max_samples is not None and ds.max_samples < len(rows):
        keep = np.sort(np.random.default_rng([seed, 1]).choice(len(rows), ds.max_samples, replace=False))
        # `index` keeps the original row numbers, so errors still name the right line
        return Rows([rows[i] for i in keep], sources, keep, len(rows), problems, more)
    return Rows(rows, sources, None, len(rows), problems, more)


# ----------------------------------------------------------------------------------------------------
# Tokenising (once, in the parent) and the cache
# ----------------------------------------------------------------------------------------------------


class _RowError(Exception):
    """A problem with one row; the parent turns it into a Problem naming file:line."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message, hint)  # both in args: the error is pickled back from tokenizer processes
        self.message, self.hint = message, hint


@dataclass(frozen=True)
class Encoding:
    """How rows become tokens and labels (picklable, for tokenizer worker processes)."""

    format: str
    responses_only: bool
    max_seq_length: int
    too_long: str
    chat_template: str | None = None
    system_prompt: str | None = None  # chat: put first in a conversation without a system message


assert tuple(NAMED_CHAT_TEMPLATES) == CHAT_TEMPLATE_NAMES  # the recipe validates names against its own list


def encoding_of(recipe: Recipe, ds: DatasetSection | None = None) -> Encoding:
    """The encoding of the recipe's dataset, or of one of its sources (`ds`, from `DatasetSection.sources()`)."""
    ds = ds if ds is not None else recipe.dataset
    tpl = ds.chat_template
    return Encoding(
        ds.format,
        ds.responses_only(),
        recipe.model.max_seq_length,
        ds.too_long,
        NAMED_CHAT_TEMPLATES.get(tpl, tpl) if tpl else None,
        ds.system_prompt if ds.format == "chat" else None,
    )


def _missing(row: dict[str, Any], name: str, fmt: str) -> _RowError:
    """The row lacks a field its format needs: name the row's fields, the column mapping and a likely format."""
    guess = next((f for col, f in _FORMAT_COLUMNS_SEEN if col in row), None)
    hint = f"if another column holds it, map it: dataset.columns={{{name}: <column>}}"
    if guess is not None and guess != fmt:
        hint += f"; if the data is in {guess} format, set dataset.format={guess}"
    return _RowError(f"{name}: missing (format {fmt} needs it); the row's fields are {_names(row)}", hint)


# A column that tells which format a row is in (for the hint of a missing field).
_FORMAT_COLUMNS_SEEN = (("messages", "chat"), ("conversations", "chat"), ("instruction", "alpaca"), ("text", "text"))


def _field(row: dict[str, Any], name: str, fmt: str, required: bool = True) -> str:
    """The text of a field: a string, or a number written as text (`"output": 42`, a numeric Parquet column: the
    answer of a maths dataset). Anything else (true/false, a list, an object) is refused: it is no text to learn."""
    if name not in row:
        if required:
            raise _missing(row, name, fmt)
        return ""
    value = row[name]
    if value is None or (isinstance(value, float) and value != value):  # null, or NaN (a gap in a Parquet column)
        if required:
            raise _RowError(
                f"{name} is empty ({'null' if value is None else 'NaN: a missing value'})",
                "fill it in, or drop the row: every row needs it to train on",
            )
        return ""
    if isinstance(value, bytes):  # a CSV field that is not UTF-8 (see _read_csv), or a binary Parquet column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise _RowError(
                f"{name}: not UTF-8 text: byte 0x{value[exc.start]:02x} at offset {exc.start} of the field", UTF8_HINT
            ) from None
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        value = str(value)
    if not isinstance(value, str):
        hint = (
            f'quote it in the file so that it is text: "{json.dumps(value)}"'
            if isinstance(value, bool)
            else "map the column that holds the text with dataset.columns, or check dataset.format"
        )
        raise _RowError(f"{name}: expected text (a string or a number), found {_describe(value)}", hint)
    if required and not value.strip():
        raise _RowError(
            f"{name} is empty{' (only whitespace)' if value else ''}",
            "fill it in, or drop the row: every row needs it to train on",
        )
    return value


def _chat_messages(row: dict[str, Any]) -> list[dict[str, str]]:
    if "messages" not in row:
        raise _missing(row, "messages", "chat")
    msgs = row["messages"]
    if not isinstance(msgs, list) or not msgs:
        hint = None
        if isinstance(msgs, str) and msgs.lstrip().startswith("["):  # a CSV cell, or a JSON string, holding JSON
            hint = (
                "the conversation is stored as text (a CSV cell or a quoted JSON string); write the data as JSON Lines "
                'with the list itself: {"messages": [{"role": "user", "content": "..."}, ...]}'
            )
        raise _RowError(f"messages: expected a non-empty list of {{role, content}} objects, found {msgs!r:.60}", hint)
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise _RowError(
                f"messages[{j}]: expected an object with role and content, found {m!r:.60}",
                "map other key names with dataset.columns: {role: from, content: value}",
            )
        role = _ROLE_ALIASES.get(str(m["role"]), str(m["role"]))
        if role not in CHAT_ROLES:
            raise _RowError(
                f"messages[{j}].role: expected one of {', '.join(CHAT_ROLES)}, found {m['role']!r}",
                "ShareGPT's human and gpt are accepted too; rename other roles in the data",
            )
        content = m["content"]
        if isinstance(content, (int, float)) and not isinstance(content, bool) and math.isfinite(content):
            content = str(content)  # a number is trained as its text, as in the other formats
        if not isinstance(content, str):
            raise _RowError(f"messages[{j}].content: expected text (a string or a number), found {_describe(content)}")
        if role != "system" and not content.strip():
            raise _RowError(
                f"messages[{j}].content is empty ({'an' if role[0] in 'aeiou' else 'a'} {role} message)",
                "every user, assistant and tool message needs text: fill it in or drop the row",
            )
        out.append({"role": role, "content": content})
    return out


def _render_chat(tokenizer: Any, msgs: list[dict[str, str]], template: str | None, gen: bool) -> str:
    try:
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen, chat_template=template)
    except Exception as exc:  # the template is the user's code (Jinja): it refused this conversation, or failed on it
        from jinja2 import TemplateError

        if type(exc) is TemplateError:  # what the template's raise_exception('...') raises
            raise _RowError(
                f"the chat template refused this conversation: {exc}",
                "fix the conversation, or choose another dataset.chat_template",
            ) from None
        raise _RowError(
            f"the chat template failed on this conversation: {type(exc).__name__}: {exc}",
            "fix the template (dataset.chat_template), or the conversation",
        ) from None


def _first_header(tokenizer: Any, enc: Any, full: str) -> str:
    """What the template writes before a conversation's first message when that is the assistant's (its header,
    e.g. `<|im_start|>assistant\n`): masked like every other turn's. Found by rendering a one-message
    conversation around a marker (transformers renders no empty conversation); "" where the conversation does not
    start that way."""
    marker = "\u2063mgpu-first-turn\u2063"
    rendered = _render_chat(tokenizer, [{"role": "assistant", "content": marker}], enc.chat_template, False)
    head = rendered[: max(0, rendered.find(marker))]
    return head if full.startswith(head) else ""


def encode_row(row: dict[str, Any], tokenizer: Any, enc: Encoding) -> tuple[list[int], list[int]]:
    """Token ids and labels of one row (IGNORE_INDEX where no loss is taken), before the length policy."""
    eos = tokenizer.eos_token_id
    if enc.format == "alpaca":
        prompt, response = render_alpaca(
            {
                "instruction": _field(row, "instruction", "alpaca"),
                "input": _field(row, "input", "alpaca", required=False),
                "output": _field(row, "output", "alpaca"),
            }
        )
        p_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
        return p_ids + r_ids, ([IGNORE_INDEX] * len(p_ids) if enc.responses_only else list(p_ids)) + r_ids
    if enc.format == "text":
        text = _field(row, "text", "text")
        ids = tokenizer(text, add_special_tokens=True)["input_ids"] + [eos]
        return ids, list(ids)
    # chat: render the whole conversation once, then find each assistant turn's characters by rendering the
    # conversation up to it; tokens whose characters fall in an assistant turn are trained on. Character
    # offsets (not per-turn tokenisation) keep the ids exactly those of the full text, merges included.
    msgs = _chat_messages(row)
    if enc.system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": enc.system_prompt}, *msgs]
    full = _render_chat(tokenizer, msgs, enc.chat_template, False)
    spans = []
    if enc.responses_only:
        for j, m in enumerate(msgs):
            if m["role"] != "assistant":
                continue
            a = _render_chat(tokenizer, msgs[:j], enc.chat_template, True) if j else _first_header(tokenizer, enc, full)
            b = _render_chat(tokenizer, msgs[: j + 1], enc.chat_template, False)
            if not (full.startswith(a) and full.startswith(b)):
                raise _RowError(
                    "the chat template does not render a conversation's beginning as a prefix of the "
                    "whole, so assistant turns cannot be located",
                    "set dataset.train_on_responses_only: false, or choose dataset.chat_template",
                )
            spans.append((len(a), len(b)))
    bos = tokenizer.bos_token
    add_special = not (bos and full.startswith(bos))  # templates that write the BOS themselves
    out = tokenizer(full, add_special_tokens=add_special, return_offsets_mapping=True)
    ids = list(out["input_ids"])
    if not enc.responses_only:
        return ids, list(ids)
    labels = [IGNORE_INDEX] * len(ids)
    for t, (s, e) in enumerate(out["offset_mapping"]):
        # any character in a turn: a template whose generation prompt ends with a space puts the reply's first
        # token (" 5") across the boundary, and a token starting before the turn would lose it from the loss
        if e > s and any(s < b and e > a for a, b in spans):
            labels[t] = ids[t]
    return ids, labels


def encode_prompt(
    tokenizer: Any, fmt: str, chat_template: str | None, text: str, input_text: str = "", system: str | None = None
) -> list[int]:
    """The token ids that prompt a model trained on `fmt` rows: what `encode_row` puts before a response.

    alpaca: the instruction (`text`, with `input_text`) in the alpaca frame up to `### Response:`; chat: a user turn
    (after an optional system one) rendered with the training template and its generation prompt; text: `text`."""
    if fmt == "alpaca":
        prompt, _ = render_alpaca({"instruction": text, "input": input_text, "output": ""})
        return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if fmt == "text":
        return list(tokenizer(text, add_special_tokens=True)["input_ids"])
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    full = _render_chat(tokenizer, msgs, chat_template, True)
    bos = tokenizer.bos_token
    return list(tokenizer(full, add_special_tokens=not (bos and full.startswith(bos)))["input_ids"])


_WORKER_TOKENIZER: Any = None


def _load_tokenizer(model_path: str, trust_remote_code: bool) -> Any:
    """The model's tokenizer. A hub id that is neither in the HF cache nor reachable is a UserError naming
    model.name (it was a 100-line traceback and exit 1 after the hub client's retries); at once when the hub's name
    does not resolve (hub.py)."""
    from transformers import AutoTokenizer

    from .hub import offline as hub_offline

    local = Path(model_path).is_dir()
    offline = hub_offline(os.environ)
    if not local and not _in_hf_cache(model_path):
        _refuse_unreachable_hub(model_path)
        if not offline:
            print(f"model.name {model_path}: downloading its tokenizer from the Hugging Face hub ...", file=sys.stderr)
    try:
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:  # not in the cache and no network, an unknown id, a folder without one
        if local:
            found = f"the folder holds no tokenizer that transformers can load: {first_line(exc)}"
            hint = "point model.name at a folder saved with save_pretrained (tokenizer files included)"
        else:
            found = f"cannot load its tokenizer: {first_line(exc)}"
            hint = (
                "the hub is offline (HF_HUB_OFFLINE=1): download the model once with network access, or give a "
                "local folder"
                if offline
                else "check the id (and network access to huggingface.co, or HF_ENDPOINT), or give a local folder"
            )
        raise UserError(Problem(f"model.name ({model_path})", found, hint), "invalid model") from None


def _refuse_unreachable_hub(model_id: str) -> None:
    """A model download that cannot start fails at once, naming model.name."""
    from .hub import unreachable_because

    host = unreachable_because(os.environ)
    if host is not None:
        raise UserError(
            Problem(
                f"model.name ({model_id})",
                f"not in the Hugging Face cache, and the hub's host name ({host}) does not resolve: no download "
                "is possible from this machine",
                "give a local folder (model.name: /path/to/model, saved with save_pretrained), or download the "
                "model once where the hub is reachable and copy the cache (HF_HUB_CACHE); check DNS and HF_ENDPOINT",
            ),
            "invalid model",
        )


def _in_hf_cache(model_id: str) -> bool:
    """Whether the HF cache holds `model_id`'s tokenizer config (then no download is announced)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "tokenizer_config.json"), str)
    except Exception:  # not a valid repo id: from_pretrained names the problem
        return True


def _init_worker(model_path: str, trust_remote_code: bool) -> None:
    global _WORKER_TOKENIZER
    import signal

    # Ctrl-C reaches the whole process group: the parent stops the pool (see _encode_all); a pool process that
    # took it too would die in the middle of a queue operation and leave the parent waiting on it forever. It was
    # born with SIGINT blocked (_encode_all), so a Ctrl-C since its fork is still pending: ignored, then dropped.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # SIGTERM ends it (the parent's _stop_pool, the parent's death below). It inherited the parent's handler: the
    # tokenising child's (datagate._stop_once) took its parent-death signal as a stop, then ignored SIGTERM, and
    # the process waited for work forever, an orphan holding the run's output open (the child killed outright).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    from .distributed import die_with_parent

    die_with_parent()  # a tokenising process killed before it could stop its pool takes the pool along
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_TOKENIZER = _load_tokenizer(model_path, trust_remote_code)


def _encode_chunk(rows: list[dict[str, Any]], start: int, enc: Encoding, tokenizer: Any = None) -> list[Any]:
    """[(row index, ids, labels) | (row index, _RowError)] for a chunk of rows."""
    tok = tokenizer if tokenizer is not None else _WORKER_TOKENIZER
    out: list[Any] = []
    for k, row in enumerate(rows):
        try:
            ids, labels = encode_row(row, tok, enc)
            out.append((start + k, np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32)))
        except _RowError as exc:
            out.append((start + k, exc))
    return out


@dataclass
class SourceCount:
    """What one source of a `dataset.mix` gave to the mixed dataset (reported by `mgpu prepare`)."""

    key: str  # dataset.mix.<i>
    source: str  # its path or hub id
    format: str
    weight: float
    rows: int  # rows the source holds
    taken: int  # samples drawn from it (with repeats when upsampled), before the length policy
    share: float  # taken / all mixed samples
    truncated: int = 0
    dropped: int = 0

    @property
    def upsampled(self) -> bool:
        return self.taken > self.rows

    def describe(self) -> str:
        """One line for people (rich markup)."""
        text = (
            f"{self.key}: {self.source} ({self.format}, weight {self.weight:g}): {self.taken} samples "
            f"({self.share:.1%}) from {self.rows} rows"
        )
        if self.upsampled:
            text += f", [yellow]upsampled x{self.taken / self.rows:.2f}[/]"
        elif self.taken < self.rows:  # its weight's share leaves rows out (equal weights are equal shares)
            text += f", [yellow]{self.rows - self.taken} rows not drawn[/]"
        if self.dropped:
            text += f", [yellow]{self.dropped} dropped as too long[/]"
        return text


@dataclass
class PrepareSummary:
    """What tokenisation produced; printed by `mgpu train` and `mgpu prepare`, stored in the cache."""

    samples: int
    tokens: int
    loss_tokens: int
    truncated: int
    dropped: int
    longest: int
    rows: int = 0
    longest_before: int = 0  # longest sample before the length policy
    tokens_cut: int = 0  # tokens removed by truncation (or in dropped samples)
    no_loss: int = 0  # samples with nothing to train on (e.g. a conversation without an assistant turn)
    percentiles: dict[str, int] = field(default_factory=dict)  # p50, p90, p99 of sample lengths
    mix: list[SourceCount] = field(default_factory=list)  # per source of a dataset.mix; empty without one

    def __post_init__(self) -> None:
        self.mix = [SourceCount(**m) if isinstance(m, dict) else m for m in self.mix]  # read back from meta.json

    @property
    def masked_share(self) -> float:
        """Share of tokens that take no loss (prompts, user turns)."""
        return 1.0 - self.loss_tokens / max(1, self.tokens)

    def describe(self, max_seq_length: int) -> str:
        """One line for people (rich markup)."""
        text = f"{self.samples:,} samples, {self.tokens:,} tokens ({self.loss_tokens:,} trained on), "
        text += f"longest {self.longest}"
        if self.truncated:
            text += (
                f", [yellow]{self.truncated:,} truncated to {max_seq_length} tokens (longest was "
                f"{self.longest_before}; {self.tokens_cut:,} tokens cut)[/]"
            )
        if self.dropped:
            text += (
                f", [yellow]{self.dropped:,} dropped as longer than {max_seq_length} tokens (longest "
                f"{self.longest_before})[/]"
            )
        if self.no_loss:
            text += f", [yellow]{self.no_loss_text()}[/]"
        return text

    def no_loss_text(self) -> str:
        """The samples without a loss token: how many, and the likely cause with its fix (they cost a step's
        compute and teach nothing)."""
        share = self.no_loss / max(1, self.samples)
        text = f"{self.no_loss:,} ({share:.0%}) with nothing to train on"
        if self.truncated:
            return (
                text
                + " (most likely cut before their response): set dataset.too_long: drop or raise model.max_seq_length"
            )
        return text + " (no response, or an empty one, in those rows)"


def _hash_source(h: Any, path: str) -> None:
    """Feed a source's bytes (every file of a file or folder) into `h`; a hub id by its name."""
    p = Path(path)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else ([p] if p.exists() else [])
    for f in files:
        h.update(f"{f.resolve()}|{f.stat().st_size}".encode())
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    if not files:
        h.update(path.encode())  # a hub id: keyed by name and split


# Every file a Hugging Face tokenizer may read (fast, slow SentencePiece, BPE and WordPiece ones, added and special
# tokens, a chat template of its own): a change to any of them changes tokens, so the cache key covers them all.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "spiece.model",
    "chat_template.jinja",
    "chat_template.json",
)


def _fingerprint(recipe: Recipe, model_path: str) -> str:
    """Cache key: the data's bytes, the tokenizer, and every setting that changes tokens or labels.

    Batching, shuffling and process counts are left out: they change no token, so they reuse the cache.
    """
    h = hashlib.sha256()
    h.update(_CACHE_VERSION.encode())
    d = recipe.dataset
    sources = d.sources()
    for src in sources:
        _hash_source(h, str(src.section.path))
    for name in TOKENIZER_FILES:
        f = Path(model_path) / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes())
    h.update(model_path.encode())
    keys: dict[str, Any] = {
        "format": d.format,
        "split": d.split,
        "columns": d.columns,
        "chat_template": d.chat_template,
        "system_prompt": d.system_prompt,
        "too_long": d.too_long,
        "max_samples": d.max_samples,
        "seed": recipe.training.seed if d.max_samples else None,
        "responses_only": recipe.train_on_responses_only(),
        "max_seq_length": recipe.model.max_seq_length,
    }
    if d.mix is not None:
        # which rows are drawn, and their order, depend on the weights and the seed; each source on its settings
        keys["seed"] = recipe.training.seed
        keys["mix"] = [
            {
                "path": s.section.path,
                "weight": s.weight,
                "format": s.section.format,
                "split": s.section.split,
                "columns": s.section.columns,
                "chat_template": s.section.chat_template,
                "responses_only": s.section.responses_only(),
            }
            for s in sources
        ]
    h.update(json.dumps(keys, sort_keys=True).encode())
    return h.hexdigest()[:20]


def _num_proc(recipe: Recipe, rows: int) -> int:
    n = recipe.dataset.num_proc
    if n == "auto":
        # Process start-up and a tokenizer load per process cost ~1 s: only worth it for large data.
        return 1 if rows < 20_000 else max(1, min(8, os.cpu_count() or 1))
    return max(1, min(int(n), rows // 100 or 1))


# Tokenising shows a progress bar (rows/s, ETA) on a terminal from this many rows on (GSM8K, tiny tokenizer: about
# 1,900 rows/s in one process on the 2-core dev machine).
PROGRESS_ROWS = 5_000
CHUNK_ROWS = 1_000  # rows per progress update, one process
LOG_EVERY_S = 10.0  # a progress line this often where there is no terminal


@contextlib.contextmanager
def work_progress(
    total: int, label: str, unit: str = "rows", minimum: int | None = None
) -> Iterator[Callable[[int], None]]:
    """advance(n) for `total` units of work (rows, tensors): from `minimum` units on (default PROGRESS_ROWS) a
    transient rich bar on a terminal, else (a log, a pipe) a line as it starts and one every LOG_EVERY_S seconds."""
    if total < (PROGRESS_ROWS if minimum is None else minimum):
        yield lambda n: None
        return
    if not sys.stdout.isatty():
        t0 = last = time.monotonic()
        done = 0
        print(f"{label} {total:,} {unit}", flush=True)

        def log_line(n: int) -> None:
            nonlocal done, last
            done += n
            now = time.monotonic()
            if now - last >= LOG_EVERY_S and done < total:
                last = now
                rate = done / (now - t0)
                print(
                    f"{label}: {done:,}/{total:,} {unit}, {_rate(rate)} {unit}/s, ETA {(total - done) / rate:.0f} s",
                    flush=True,
                )

        yield log_line
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (
        TextColumn(f"[bold]{label}[/]"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TextColumn(unit),
        TextColumn(f"[green]{{task.fields[rate]}}[/] {unit}/s"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(label, total=total, rate="-")

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed  # the one task
            bar.update(task, rate=_rate(speed) if speed else "-")

        yield advance


def _rate(per_second: float) -> str:
    return f"{per_second:,.0f}" if per_second >= 10 else f"{per_second:.1f}"  # 1,250 rows/s; 2.4 tensors/s


def _encode_all(rows: Rows, recipe: Recipe, model_path: str, tokenizer: Any, enc: Encoding) -> list[Any]:
    n = len(rows.rows)
    procs = _num_proc(recipe, n)
    label = "tokenising" if procs == 1 else f"tokenising ({procs} processes)"
    with work_progress(n, label) as advance:
        if procs == 1:
            out: list[Any] = []
            for i in range(0, n, CHUNK_ROWS):
                out += _encode_chunk(rows.rows[i : i + CHUNK_ROWS], i, enc, tokenizer)
                advance(min(CHUNK_ROWS, n - i))
            return out
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        size = -(-n // (procs * 16))  # small enough that progress moves steadily, large enough to keep IPC cheap
        # fork: the parent holds no CUDA context or threads of ours, and the rows need not be pickled twice
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        pool = ProcessPoolExecutor(
            procs, mp_context=ctx, initializer=_init_worker, initargs=(model_path, recipe.model.trust_remote_code)
        )
        try:
            # The pool's processes are forked by the first submit, with this thread's signal mask: born with SIGINT
            # and SIGTERM blocked, they set their handlers before they unblock them (_init_worker). Before, a Ctrl-C
            # in the first tenth of a second of their start ended one with a KeyboardInterrupt traceback. Here they
            # are delivered once the queue is filled, and stop the pool below.
            with _stops_blocked():
                futures = {
                    pool.submit(_encode_chunk, rows.rows[i : i + size], i, enc): min(size, n - i)
                    for i in range(0, n, size)
                }
            for fut in as_completed(futures):
                advance(futures[fut])
            out = [item for fut in futures for item in fut.result()]
        except BaseException as exc:  # Ctrl-C, or a chunk that failed: stop at once rather than finish the queue
            from concurrent.futures.process import BrokenProcessPool

            died = _pool_process_died(pool, procs) if isinstance(exc, BrokenProcessPool) else None
            _stop_pool(pool)  # (after: it ends the other processes)
            if died is not None:
                raise died from None
            raise
        pool.shutdown()
        return out


def _pool_process_died(pool: Any, procs: int) -> Exception:
    """The fault of a tokenising process that died (the kernel's out-of-memory killer, `kill -9`), which broke the
    pool: what ended it, that nothing was cached, what to change."""
    import signal

    from .errors import TrainingFailed, how_it_ended

    # the one that died first; the pool's manager then terminated the others (SIGTERM)
    codes = [p.exitcode for p in (getattr(pool, "_processes", None) or {}).values() if p.exitcode not in (None, 0)]
    code = next((c for c in codes if c != -signal.SIGTERM), codes[0] if codes else -signal.SIGKILL)
    return TrainingFailed(
        f"one of the {procs} tokenising processes ended abruptly ({how_it_ended(code)}); nothing was cached",
        f"hint: run it again; if memory ran out, lower dataset.num_proc (now {procs}: each process holds a "
        "tokenizer and its share of the rows) or free memory",
        title="preparing the data failed",
    )


@contextlib.contextmanager
def _stops_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM blocked in this thread (and in the processes it forks) for the block's duration;
    delivered after."""
    import signal

    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks (and no fork)
        yield
        return
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _stop_pool(pool: Any) -> None:
    """Drop a process pool's queued work and end its processes now (shutdown(wait=True) would run the queue)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    manager = getattr(pool, "_executor_manager_thread", None)  # shutdown() drops the pool's reference to it
    results = getattr(pool, "_result_queue", None)  # and to its result queue
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        proc.terminate()
    for proc in processes:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    # Its manager thread sees the processes gone and ends, closing its wake-up pipe. The interpreter's exit hook
    # wakes every manager it knows of through that pipe, unlocked: one that closes it meanwhile (still ending after
    # the join below on a loaded machine; seen in CI) gave "Exception ignored ... Bad file descriptor" after the
    # interrupted message. It was woken by shutdown() already: forget it whether or not it has ended (the
    # interpreter still joins it, a non-daemon thread, at exit). (Until this session it was looked up after
    # shutdown(), which had already set the pool's reference to None: never forgotten.)
    import concurrent.futures.process as cfp

    # A process terminated in the middle of sending a result (one larger than the pipe's buffer goes in several
    # writes) left the manager reading the rest forever: the pipe's other write end is this process's own. Closing
    # it ends that read (EOF), and the manager ends as for a broken pool. (Once in CI: the exit hung for 120 s.)
    writer = getattr(results, "_writer", None)  # a SimpleQueue's (3.9-3.13)
    if writer is not None:
        writer.close()
    if manager is not None:
        manager.join(timeout=5)
        getattr(cfp, "_threads_wakeups", {}).pop(manager, None)


def _encode_source(
    rows: Rows, recipe: Recipe, model_path: str, tokenizer: Any, enc: Encoding, key: str = "dataset"
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[tuple[Position, Problem]]]:
    """(ids, labels) of every row, and a problem naming file:line for every bad one (with its position).

    `key`: the source's recipe key; in a mix (`dataset.mix.<i>`) the hints name its own columns, format and
    chat template.
    """
    samples, bad = [], []
    for i, *item in _encode_all(rows, recipe, model_path, tokenizer, enc):
        if isinstance(item[0], _RowError):
            message, hint = _for_source(item[0].message, key), _for_source(item[0].hint, key)
            bad.append((rows.position(i), Problem(rows.where(i), message, hint)))
        else:
            samples.append((item[0], item[1]))
    return samples, bad


# The dataset keys a source of a mix sets for itself (`dataset.mix.<i>.columns`).
_PER_SOURCE_KEY = re.compile(r"\bdataset\.(columns|format|chat_template)\b")


def _for_source(text: str | None, key: str) -> str | None:
    """A row's message for the source `key`: in a mix, the keys it sets for itself are `dataset.mix.<i>.<name>`."""
    return _PER_SOURCE_KEY.sub(rf"{key}.\1", text) if text and key != "dataset" else text


def _listed(problems: list[tuple[Position, Problem]], more: int = 0) -> list[Problem]:
    """The problems in file order, at most MAX_LISTED, then a line counting the others (`more` besides them)."""
    ordered = [p for _, p in sorted(problems, key=lambda item: item[0])]
    shown = ordered[:MAX_LISTED]
    hidden = len(ordered) - len(shown) + more
    if hidden:
        shown.append(Problem("", f"... and {hidden} more bad rows"))
    return shown


def _raise_bad_rows(problems: list[tuple[Position, Problem]], more: int = 0) -> None:
    if problems or more:
        raise UserError(_listed(problems, more), "invalid data")


def _check_chat_template(tokenizer: Any, source: DataSource) -> list[Problem]:
    ds, key = source.section, source.key_of("chat_template")
    if ds.format != "chat":
        return []
    tpl = ds.chat_template
    if tpl is None and not getattr(tokenizer, "chat_template", None):
        return [
            Problem(
                key,
                "the tokenizer has no chat template",
                f"name one ({', '.join(NAMED_CHAT_TEMPLATES)}) or give a Jinja template",
            )
        ]
    if tpl is not None and tpl not in NAMED_CHAT_TEMPLATES and "{" not in tpl:
        return [
            Problem(
                key,
                f"unknown template name {tpl!r}",
                f"expected one of {', '.join(NAMED_CHAT_TEMPLATES)}, or a Jinja template",
            )
        ]
    # Compile the template once, on a trial conversation, so that a syntax error is one problem naming the key
    # rather than an error on every row. Any other error is the template refusing the trial conversation
    # (raise_exception): the rows will tell whether theirs are refused.
    from jinja2 import TemplateSyntaxError

    trial = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]
    try:
        tokenizer.apply_chat_template(trial, tokenize=False, chat_template=NAMED_CHAT_TEMPLATES.get(tpl, tpl))
    except TemplateSyntaxError as exc:
        where = key if tpl is not None else f"{key} (not set: the tokenizer's own template)"
        return [
            Problem(
                where,
                f"the Jinja template does not compile: line {exc.lineno}: {exc.message}",
                "fix the template ({{ expression }}, {% statement %}), or name one: " + ", ".join(NAMED_CHAT_TEMPLATES),
            )
        ]
    except Exception:  # noqa: BLE001 - see above
        pass
    return []


def _template_problems_too(recipe: Recipe, model_path: str) -> list[Problem]:
    """The chat-template problems of the recipe's chat sources, for an error about the data: every problem at
    once. None when no source is chat, or when the tokenizer cannot be loaded (the data error then stands alone)."""
    sources = [s for s in recipe.dataset.sources() if s.section.format == "chat"]
    if not sources:
        return []
    try:
        tokenizer = _load_tokenizer(model_path, recipe.model.trust_remote_code)
    except Exception:  # noqa: BLE001 - reported where the tokenizer is needed, once the data is right
        return []
    return [p for src in sources for p in _check_chat_template(tokenizer, src)]


# ----------------------------------------------------------------------------------------------------
# Mixing several sources by weight (dataset.mix)
# ----------------------------------------------------------------------------------------------------


def mix_quotas(total: int, weights: list[float]) -> list[int]:
    """Samples each source gives to a mix of `total`: total x w_i / sum(w), rounded so they add up to `total`.

    Each quota is its exact share rounded down or up (largest remainder: the shares losing most to rounding
    down get the leftover samples, the earlier source first on a tie).
    """
    w = np.asarray(weights, dtype=np.float64)
    exact = total * w / w.sum()
    quotas = np.floor(exact).astype(np.int64)
    short = total - int(quotas.sum())
    quotas[np.argsort(-(exact - quotas), kind="stable")[:short]] += 1
    return [int(q) for q in quotas]


def mix_rows(size: int, quota: int, seed: int, source: int) -> np.ndarray:
    """The rows (sorted, with repeats) a source of `size` rows gives for its `quota`.

    Without replacement when the source has enough rows; otherwise every row `quota // size` times plus a
    seeded draw of the remainder without replacement (upsampling). Each source draws from its own stream
    ([seed, 2, source]): its rows depend on the seed, its position in the list and its quota only.
    """
    passes, rest = divmod(quota, size)
    rng = np.random.default_rng([seed, 2, source])
    extra = rng.choice(size, rest, replace=False) if rest else np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate([np.tile(np.arange(size, dtype=np.int64), passes), extra.astype(np.int64)]))


def _mixed_samples(
    recipe: Recipe, model_path: str
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, list[SourceCount], Any]:
    """Read, draw and tokenise every source of dataset.mix (each with its own format).

    Returns:
        (samples in their stored, shuffled order; the source of each; per-source counts; the tokenizer).

    Raises:
        UserError: every unreadable source and every bad drawn row (file:line), at once.
    """
    d, seed = recipe.dataset, recipe.training.seed
    sources = d.sources()
    loaded: list[Rows] = []
    problems: list[Problem] = []
    bad_lines: list[tuple[Position, Problem]] = []  # every source's lines that are no rows, and its bad drawn rows
    more = 0
    for i, src in enumerate(sources):
        try:
            rows = load_rows(src.section, seed, src.key, src.key_of("columns"))
        except UserError as exc:
            problems += exc.problems
            continue
        loaded.append(rows)
        bad_lines += [((i, *pos), p) for pos, p in rows.problems]
        more += rows.more
    if problems:
        raise UserError(
            _template_problems_too(recipe, model_path) + problems + _listed(bad_lines, more), "invalid data"
        )
    sizes = [len(r.rows) for r in loaded]
    total = d.max_samples if d.max_samples is not None else sum(sizes)
    quotas = mix_quotas(total, [s.weight for s in sources])
    tokenizer = _load_tokenizer(model_path, recipe.model.trust_remote_code)
    problems = [p for src in sources for p in _check_chat_template(tokenizer, src)]
    if problems:
        raise UserError(problems + _listed(bad_lines, more), "invalid recipe")
    parts: list[list[tuple[np.ndarray, np.ndarray]]] = []
    for i, (src, rows, quota) in enumerate(zip(sources, loaded, quotas, strict=True)):
        picked = mix_rows(len(rows.rows), quota, seed, i)
        unique = np.unique(picked)
        # only the drawn rows are tokenised (once each); `index` keeps their original numbers for file:line
        subset = Rows([rows.rows[j] for j in unique], rows.sources, unique)
        encoding = encoding_of(recipe, src.section)
        encoded, bad = _encode_source(subset, recipe, model_path, tokenizer, encoding, src.key)
        bad_lines += [((i, *pos), p) for pos, p in bad]
        parts.append([encoded[k] for k in np.searchsorted(unique, picked)] if not bad else [])
    _raise_bad_rows(bad_lines, more)
    # one seeded shuffle of the whole mix, so the sources are interleaved even with dataset.shuffle: false
    order = np.random.default_rng([seed, 3]).permutation(total)
    flat = [x for part in parts for x in part]
    owner = np.repeat(np.arange(len(sources)), quotas)
    counts = [
        SourceCount(
            src.key,
            str(src.section.path),
            src.section.format,
            src.weight,
            size,
            quota,
            quota / max(1, total),
        )
        for src, size, quota in zip(sources, sizes, quotas, strict=True)
    ]
    return [flat[k] for k in order], owner[order], counts, tokenizer


def check_cache_dir() -> Path:
    """The root of mgpu's caches (`UNSLOTH_MGPU_CACHE`, default ~/.cache/unsloth-mgpu), checked to be usable.

    Probed by creating (and removing) a temporary folder in it or its nearest existing parent, since permissions
    lie for root; nothing is left behind.

    Raises:
        UserError: the path is a file, lies under a file, or cannot be written to; names UNSLOTH_MGPU_CACHE.
    """
    from .models import cache_dir

    root = cache_dir()
    where = f"UNSLOTH_MGPU_CACHE ({root})" if os.environ.get("UNSLOTH_MGPU_CACHE") else f"cache folder {root}"
    hint = "set UNSLOTH_MGPU_CACHE to a folder you can write to (unset, it is ~/.cache/unsloth-mgpu)"
    if root.exists() and not root.is_dir():
        raise UserError(Problem(where, f"expected a folder, found a file: {root}", hint), "invalid environment")
    parent = next(p for p in (root, *root.parents) if p.exists())
    if not parent.is_dir():
        raise UserError(Problem(where, f"cannot create {root}: {parent} is a file", hint), "invalid environment")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mgpu-probe-", dir=parent))
    except OSError as exc:
        raise UserError(
            Problem(where, f"cannot write to {parent}: {exc.strerror or exc}", hint), "invalid environment"
        ) from None
    return root


def cache_path(recipe: Recipe, model_path: str) -> Path:
    """Where `prepare` keeps the tokenised data of `recipe` for `model_path`'s tokenizer (its cache key's folder)."""
    return check_cache_dir() / "data" / _fingerprint(recipe, model_path)


def eval_cache_path(recipe: Recipe, model_path: str) -> Path | None:
    """`cache_path` of `dataset.eval_path`; None without one."""
    eval_recipe = _eval_recipe(recipe)
    return None if eval_recipe is None else cache_path(eval_recipe, model_path)


def is_cached(folder: Path) -> bool:
    """Whether a complete cache is there (meta.json is written last)."""
    return (folder / "meta.json").exists()


def prepare(recipe: Recipe, model_path: str, dest: Path | None = None) -> tuple[Path, PrepareSummary, bool]:
    """Tokenise the dataset once and cache it (tokenizer only: no Unsloth, no GPU).

    With `dataset.mix` the cache holds the mixed dataset: each source's drawn rows, tokenised with the source's
    own settings, in one seeded shuffled order (see `mix_quotas` and `mix_rows`).

    Args:
        recipe: the validated recipe (dataset and model.max_seq_length are read).
        model_path: the folder or hub id whose tokenizer is used.
        dest: `cache_path(recipe, model_path)`, when the caller has it (the key hashes the data's bytes).

    Returns:
        (cache folder, summary, cache_hit). On a hit nothing is read but the cache's meta.json; the
        tokenizer is not even loaded.

    Raises:
        UserError: unreadable data, bad rows (every bad row named, up to 20), nothing left to train on.
    """
    dest = dest or cache_path(recipe, model_path)
    fp = dest.name
    if is_cached(dest):
        meta = json.loads((dest / "meta.json").read_text())
        return dest, PrepareSummary(**meta["summary"]), True
    d = recipe.dataset
    mix: list[SourceCount] = []
    if d.mix is None:
        samples, num_rows, tokenizer = _single_source_samples(recipe, model_path)
        owner = np.zeros(len(samples), dtype=np.int64)
    else:
        samples, owner, mix, tokenizer = _mixed_samples(recipe, model_path)
        num_rows = sum(m.rows for m in mix)
    fitted = _fit_to_length(samples, owner, mix, d.too_long, recipe.model.max_seq_length)
    if not fitted.ids:
        raise UserError(
            Problem(
                "dataset.path" if d.mix is None else "dataset.mix",
                f"no samples left after dropping {fitted.dropped} longer than "
                f"model.max_seq_length={recipe.model.max_seq_length}",
                "raise model.max_seq_length or set dataset.too_long: truncate",
            ),
            "invalid data",
        )
    lengths = np.asarray([len(x) for x in fitted.ids], dtype=np.int64)
    # loss tokens after the model's one-token shift: labels[1:] that are not ignored
    loss_counts = np.asarray([int((lab[1:] != IGNORE_INDEX).sum()) for lab in fitted.labels], dtype=np.int64)
    summary = PrepareSummary(
        samples=len(fitted.ids),
        tokens=int(lengths.sum()),
        loss_tokens=int(loss_counts.sum()),
        truncated=fitted.truncated,
        dropped=fitted.dropped,
        longest=int(lengths.max()),
        rows=num_rows,
        longest_before=fitted.longest_before,
        tokens_cut=fitted.cut,
        no_loss=int((loss_counts == 0).sum()),
        percentiles={f"p{q}": int(np.percentile(lengths, q)) for q in (50, 90, 99)},
        mix=mix,
    )
    if summary.loss_tokens == 0:
        raise UserError(_nothing_to_train_on(recipe, summary), "invalid data")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    meta = {
        "summary": asdict(summary),
        "pad_token_id": int(pad),
        "fingerprint": fp,
        "format": d.format if d.mix is None else "mix",
        "source": d.path if d.mix is None else [s.path for s in d.mix],
    }
    _write_cache(dest, fitted, lengths, loss_counts, meta)
    return dest, summary, False


def _single_source_samples(recipe: Recipe, model_path: str) -> tuple[list[Any], int, Any]:
    """(encoded samples, rows in the file, tokenizer) of `dataset.path`; every bad row (and a chat template that
    cannot render the data) reported at once."""
    d = recipe.dataset
    try:
        rows = load_rows(d, recipe.training.seed)
    except UserError as exc:
        raise UserError(_template_problems_too(recipe, model_path) + exc.problems, exc.title) from None
    tokenizer = _load_tokenizer(model_path, recipe.model.trust_remote_code)
    problems = _check_chat_template(tokenizer, d.sources()[0])
    if problems:
        raise UserError(problems + _listed(rows.problems, rows.more), "invalid recipe")
    samples, bad = _encode_source(rows, recipe, model_path, tokenizer, encoding_of(recipe))
    _raise_bad_rows(rows.problems + bad, rows.more)
    return samples, rows.total, tokenizer  # rows before dataset.max_samples: `mgpu prepare` shows "100 (of 512 rows)"


@dataclass
class _Fitted:
    """Samples after `dataset.too_long` (truncate or drop), with what that cost."""

    ids: list[Any] = field(default_factory=list)
    labels: list[Any] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    cut: int = 0  # tokens cut off or dropped
    longest_before: int = 0


def _fit_to_length(samples: list[Any], owner: Any, mix: list[SourceCount], too_long: str, max_len: int) -> _Fitted:
    """Truncate or drop the samples longer than `max_len`, counted per mix source too (`owner`: each sample's)."""
    out = _Fitted()
    for (ids, labels), src in zip(samples, owner, strict=True):
        out.longest_before = max(out.longest_before, len(ids))
        if len(ids) > max_len:
            out.cut += len(ids) - (0 if too_long == "drop" else max_len)
            if too_long == "drop":
                out.dropped += 1
                if mix:
                    mix[src].dropped += 1
                continue
            out.truncated += 1
            if mix:
                mix[src].truncated += 1
            ids, labels = ids[:max_len], labels[:max_len]
        out.ids.append(ids)
        out.labels.append(labels)
    return out


def _write_cache(dest: Path, fitted: _Fitted, lengths: Any, loss_counts: Any, meta: dict[str, Any]) -> None:
    """Write the cache in a temporary folder beside `dest` and rename it into place (meta.json last: its presence
    marks a complete cache; a concurrent run that wrote the same cache first wins)."""
    offsets = np.zeros(len(fitted.ids) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        try:
            np.save(tmp / "input_ids.npy", np.concatenate(fitted.ids))
            np.save(tmp / "labels.npy", np.concatenate(fitted.labels))
            np.save(tmp / "offsets.npy", offsets)
            np.save(tmp / "loss_counts.npy", loss_counts)
            (tmp / "meta.json").write_text(json.dumps(meta))  # written last: its presence marks a complete cache
        except OSError as exc:  # a full disk, a file size limit
            from .models import cache_write_failed

            raise cache_write_failed("the tokenised data", dest.parent, exc) from None
        try:
            os.replace(tmp, dest)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent run wrote the same cache
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


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

    def collate(self, indices: list[int], packed: bool = False, pad_to: int = 1) -> dict[str, Any]:
        """Tensors for one micro-batch.

        Padded (default): one right-padded row per sample, as long as the longest sample rounded up to a multiple
        of `pad_to`; padding is masked out of attention and loss.
        Packed: one row holding every sample back to back, `position_ids` restarting at 0 at each sample and
        no attention mask. Unsloth and transformers read restarting positions as sample boundaries and attend
        within each sample only (Unsloth: variable-length kernels or one SDPA call per sample; never an L x L
        mask). The first token of each sample takes no loss, so no sample learns to predict the next one's
        start and the loss-token count equals the padded one (`loss_counts` already starts after the shift).
        `packed_seq_lengths` (int32, kept on the host: `PACKED_LENGTHS_KEY`) gives Unsloth the sample lengths, as
        its padding-free collator does for TRL; without it Unsloth finds them in `position_ids` on the GPU, with
        several host-device syncs at the start of every forward.
        """
        import torch

        if packed:
            parts = [self.sample(i) for i in indices]
            ids = torch.from_numpy(np.concatenate([np.asarray(x, dtype=np.int64) for x, _ in parts]))
            labels = torch.from_numpy(np.concatenate([np.asarray(y, dtype=np.int64) for _, y in parts]))
            starts = np.cumsum([0] + [len(x) for x, _ in parts[:-1]])
            labels[torch.from_numpy(starts)] = IGNORE_INDEX
            pos = torch.from_numpy(np.concatenate([np.arange(len(x), dtype=np.int64) for x, _ in parts]))
            lengths = torch.tensor([len(x) for x, _ in parts], dtype=torch.int32)
            row = {"input_ids": ids[None], "labels": labels[None], "position_ids": pos[None]}
            return {**row, PACKED_LENGTHS_KEY: lengths}
        # One gather from the token arrays for the whole micro-batch (a Python loop per row costs ~20 us a sample,
        # on the host of a step that is host-bound on the GPU).
        idx = np.asarray(indices, dtype=np.int64)
        starts = self.offsets[idx]
        lens = self.offsets[idx + 1] - starts
        longest = -(-int(lens.max()) // pad_to) * pad_to
        col = np.arange(longest)
        mask = col[None, :] < lens[:, None]
        src = starts[:, None] + np.minimum(col[None, :], np.maximum(lens[:, None] - 1, 0))
        ids = np.where(mask, self.input_ids[src], self.pad_token_id).astype(np.int64)
        labels = np.where(mask, self.labels[src], IGNORE_INDEX).astype(np.int64)
        return {
            "input_ids": torch.from_numpy(ids),
            "attention_mask": torch.from_numpy(mask.astype(np.int64)),
            "labels": torch.from_numpy(labels),
        }


# ----------------------------------------------------------------------------------------------------
# Evaluation split (additive: the training cache and the planner are untouched)
# ----------------------------------------------------------------------------------------------------


def _nothing_to_train_on(recipe: Recipe, summary: PrepareSummary) -> Problem:
    """Why no sample has a loss token, as far as the counts tell: the prompts filled model.max_seq_length, or the
    data has no response (an empty output, a conversation without an assistant turn)."""
    d = recipe.dataset
    where = f"dataset.path ({d.path})" if d.mix is None else "dataset.mix"
    found = f"none of the {summary.samples:,} samples has a token to train on"
    if summary.truncated and summary.truncated == summary.samples:
        return Problem(
            where,
            f"{found}: all were cut to model.max_seq_length={recipe.model.max_seq_length} before their response",
            "raise model.max_seq_length, or set dataset.too_long: drop to leave such rows out",
        )
    what = {
        "chat": "a conversation without an assistant turn, or with empty assistant messages",
        "alpaca": "an empty output",
        "text": "an empty text",
    }.get(d.format, "no response")
    hint = (
        "every sample needs a response to learn from; check dataset.format and dataset.columns"
        + (", or set dataset.train_on_responses_only: false to train on whole samples"
           if d.mix is None and d.responses_only() else "")
    )  # fmt: skip
    return Problem(where, f"{found} (each has {what}, or its response was masked)", hint)


def _eval_recipe(recipe: Recipe) -> Recipe | None:
    """The recipe that reads `dataset.eval_path` as its data (None without one): the dataset section's own format,
    columns and split (a mix's sources do not apply to it), not max_samples (which limits the training data)."""
    if recipe.dataset.eval_path is None:
        return None
    update = {"path": recipe.dataset.eval_path, "mix": None, "eval_path": None, "max_samples": None}
    section = recipe.dataset.model_copy(update=update)
    return recipe.model_copy(update={"dataset": section})


def prepare_eval(recipe: Recipe, model_path: str, dest: Path | None = None) -> tuple[Path, PrepareSummary, bool] | None:
    """Tokenise `dataset.eval_path` into its own cache (same rules as the training file); None without one."""
    eval_recipe = _eval_recipe(recipe)
    if eval_recipe is None:
        return None
    try:
        return prepare(eval_recipe, model_path, dest)
    except UserError as exc:
        # the problems name dataset.path; the user wrote dataset.eval_path
        for p in exc.problems:
            p.where = p.where.replace("dataset.path", "dataset.eval_path")
        raise UserError(exc.problems, exc.title) from None


def held_out_count(num_samples: int, ratio: float | None) -> int:
    """How many of `num_samples` `dataset.eval_ratio` holds out for evaluation (0 without it).

    Raises:
        UserError: the hold-out leaves no sample to train on.
    """
    n_eval = max(1, int(round(num_samples * ratio))) if ratio else 0
    if n_eval and n_eval >= num_samples:
        raise UserError(
            Problem(
                "dataset.eval_ratio",
                f"holding out {n_eval} of {num_samples} samples leaves none to train on",
                "lower dataset.eval_ratio or add data",
            ),
            "invalid recipe",
        )
    return n_eval


def eval_hold_out(recipe: Recipe, num_samples: int) -> int:
    """The samples of the training file kept for evaluation (`dataset.eval_ratio`; 0 with `eval_path` or none),
    checked in the parent as the workers will split them (`mgpu train` and `mgpu prepare` alike)."""
    return 0 if recipe.dataset.eval_path else held_out_count(num_samples, recipe.dataset.eval_ratio)


def split_eval_indices(num_samples: int, ratio: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices) of a tokenised cache: a seeded, sorted hold-out of `ratio` of the samples."""
    n_eval = held_out_count(num_samples, ratio)
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

    def collate(self, indices: list[int], packed: bool = False, pad_to: int = 1) -> dict[str, Any]:
        return self.base.collate([int(self.indices[i]) for i in indices], packed, pad_to)


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
    rank_tokens: list[int] = field(default_factory=list)  # non-padding tokens per rank
    compute_tokens: list[int] = field(default_factory=list)  # tokens the model processes per rank, padding included
    speeds: tuple[float, ...] | None = None  # the ranks' relative speeds the split followed (None: tokens alone)

    @property
    def global_loss_tokens(self) -> int:
        return int(sum(self.loss_tokens))


def split_contiguous(lengths: list[int], parts: int) -> list[int]:
    """Cut points splitting `lengths` (in order) into `parts` non-empty runs of about equal token sums."""
    total, cuts, acc = sum(lengths), [], 0
    for k, n in enumerate(lengths):
        remaining = len(lengths) - k
        opened = len(cuts) + 1
        if k > 0 and opened < parts and (remaining == parts - opened or acc >= total * opened / parts):
            cuts.append(k)
        acc += n
    return cuts


def rows_within(lengths: list[int], cap: int) -> int:
    """How many runs `lengths` (in order) needs when no run holds more than `cap` tokens (fewest: greedy is optimal
    for runs in order); a sample longer than `cap` is a run of its own."""
    runs, acc = 1, 0
    for n in lengths:
        if acc and acc + n > cap:
            runs, acc = runs + 1, 0
        acc += n
    return runs


def min_max_cuts(lengths: list[int], parts: int) -> list[int]:
    """Cut points splitting `lengths` (in order, at least `parts` of them) into exactly `parts` non-empty runs whose
    largest token sum is as small as it can be (binary search on that sum, then halve the runs holding the most
    samples until there are `parts`: halving never raises the largest sum)."""
    lo, hi = max(lengths), sum(lengths)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if rows_within(lengths, mid) <= parts else (mid + 1, hi)
    starts, acc = [0], 0
    for k, n in enumerate(lengths):
        if acc and acc + n > lo:
            starts.append(k)
            acc = 0
        acc += n
    bounds = [*starts, len(lengths)]
    while len(bounds) - 1 < parts:
        j = max(range(len(bounds) - 1), key=lambda j: (bounds[j + 1] - bounds[j], -j))
        bounds.insert(j + 1, (bounds[j] + bounds[j + 1]) // 2)
    return bounds[1:-1]


def _rebalance(
    per_rank: list[list[list[int]]],
    lens: np.ndarray,
    cap: int,
    max_rounds: int = 64,
    speeds: Sequence[float] | None = None,
) -> None:
    """Even out the ranks' padded cost (in place) by moving or swapping single samples between micro-batches.

    Contiguous length groups are coarse: one sample more or less in the group of the longest samples shifts a
    rank's cost by a whole longest sample, so ranks can end 10-20% apart. Each round takes the costliest rank and
    applies the single move (one of its samples to another rank's micro-batch) or swap (a micro-batch's longest
    sample for a shorter one elsewhere) that lowers the larger of the two ranks' costs the most; it stops when
    nothing lowers the costliest rank. No micro-batch is emptied or made costlier than `cap` (the largest group
    before, which bounds memory); the step's samples never change, only where they run. A micro-batch costs
    rows x longest, so only a group's longest and shortest samples matter as candidates: O(groups) per round.
    `speeds`: each rank's relative speed (padded tokens per second, mean 1); a rank's load is its cost divided by
    its speed, so that ranks finish together when one device runs slower than the others.
    """
    ln = {i: int(lens[i]) for rank in per_rank for g in rank for i in g}  # the step's samples only
    inv = [1.0 / s for s in speeds] if speeds is not None else [1.0] * len(per_rank)
    for rank in per_rank:
        for g in rank:
            g.sort(key=lambda i: (-ln[i], i))  # longest first

    def cost(g: list[int]) -> int:
        return len(g) * ln[g[0]] if g else 0

    load = [sum(cost(g) for g in rank) for rank in per_rank]
    for _ in range(max_rounds):
        top = max(range(len(per_rank)), key=lambda r: (load[r] * inv[r], -r))
        now = load[top] * inv[top]
        best: tuple[float, tuple[int, int, int, int, int, int | None]] | None = None  # (worst, (top, g, a, h, r, b))
        for gi, g in enumerate(per_rank[top]):
            g_cost = cost(g)
            for a in {g[0], g[-1]}:  # the longest (may shorten g) and the shortest (removes a row)
                g_long_rest = ln[g[1]] if a == g[0] and len(g) > 1 else ln[g[0]]
                for r, rank in enumerate(per_rank):
                    if r == top:
                        continue
                    for hi, h in enumerate(rank):
                        h_cost = cost(h)
                        if len(g) > 1:  # move a from g to h
                            new_h = (len(h) + 1) * max(ln[h[0]], ln[a])
                            worst = max(
                                (load[top] - g_cost + (len(g) - 1) * g_long_rest) * inv[top],
                                (load[r] - h_cost + new_h) * inv[r],
                            )
                            if new_h <= cap and worst < now and (best is None or worst < best[0]):
                                best = (worst, (top, gi, a, hi, r, None))
                        for b in {h[0], h[-1]}:  # swap a with a shorter b: h's longest or its shortest
                            if ln[b] >= ln[a]:
                                continue
                            h_long_rest = ln[h[1]] if b == h[0] and len(h) > 1 else ln[h[0]]
                            new_g = len(g) * max(g_long_rest if len(g) > 1 else 0, ln[b])
                            new_h = len(h) * max(h_long_rest if len(h) > 1 else 0, ln[a])
                            worst = max((load[top] - g_cost + new_g) * inv[top], (load[r] - h_cost + new_h) * inv[r])
                            if max(new_g, new_h) <= cap and worst < now and (best is None or worst < best[0]):
                                best = (worst, (top, gi, a, hi, r, b))
        if best is None:
            return
        top, gi, a, hi, r, b = best[1]
        g, h = per_rank[top][gi], per_rank[r][hi]
        g.remove(a)
        h.append(a)
        if b is not None:  # a swap
            h.remove(b)
            g.append(b)
        for grp in (g, h):
            grp.sort(key=lambda i: (-ln[i], i))
        load[top] = sum(cost(x) for x in per_rank[top])
        load[r] = sum(cost(x) for x in per_rank[r])


def epoch_steps(epochs: float, steps_per_epoch: int) -> int:
    """Optimizer steps of `epochs` passes of `steps_per_epoch`, rounded up (1.5 epochs of 10 steps: 15; 0.01: 1);
    rounded first to nine decimals, so that 0.3 x 10 is 3 steps, not 4."""
    return math.ceil(round(epochs * steps_per_epoch, 9))


class StepPlanner:
    """Deterministic step -> samples plan. Samples of a step depend on seed and global batch only.

    Which rank and micro-batch a sample goes to depends on `batching`:

    - padded: the step's samples in shuffled order, `micro_batch_size` per micro-batch (the classic split).
    - balanced / packed: the step's samples sorted by length, each given to the rank with the fewest tokens so
      far (longest-processing-time first), so ranks finish together; each rank's samples, still sorted, are cut
      into `gradient_accumulation_steps` runs of about equal tokens, so a micro-batch holds samples of similar
      length (little padding) and may hold more short samples than `micro_batch_size` (balanced then moves or
      swaps single samples between ranks while that lowers the slowest rank's padded cost). Every rank keeps
      exactly `gradient_accumulation_steps` non-empty micro-batches (the engine's loop and collectives stay in
      step); ranks may hold different sample counts. With `distributed.aggregation: weighted` the update equals
      one worker's on the same samples for any assignment.
    - packed with `row_tokens` (training: micro_batch_size x model.max_seq_length, what a padded micro-batch may
      hold): each rank's samples run in as few packed rows as hold at most `row_tokens` tokens each, the same
      number on every rank and never more than `gradient_accumulation_steps`. Short samples then share one
      forward where `micro_batch_size` alone would have run several smaller ones (on an H200 one row of 128
      GSM8K samples trained 27% faster than two rows of 64). The step's samples, and so the update, are the same.
    """

    def __init__(
        self,
        num_samples: int,
        loss_counts: np.ndarray,
        micro_batch_size: int,
        grad_accum: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        lengths: np.ndarray | None = None,
        batching: str = "padded",
        pad_to: int = 1,
        row_tokens: int | None = None,
    ):
        self.n = num_samples
        self.row_tokens = row_tokens if batching == "packed" else None
        self.loss_counts = loss_counts
        self.lengths = lengths if lengths is not None else np.ones(num_samples, dtype=np.int64)
        # what a padded micro-batch row costs: the length rounded up like collate(pad_to=...) pads it
        self.padded_lengths = -(-self.lengths // pad_to) * pad_to
        self.mb, self.ga, self.world = micro_batch_size, grad_accum, world_size
        self.global_batch = micro_batch_size * grad_accum * world_size
        self.seed, self.shuffle = seed, shuffle
        if batching not in ("padded", "balanced", "packed"):
            raise ValueError(f"unknown batching {batching!r}")
        self.batching = batching
        if self.global_batch > num_samples:
            raise UserError(
                Problem(
                    "training.micro_batch_size",
                    f"one optimizer step needs {self.global_batch} "
                    f"samples (micro_batch_size x workers x gradient_accumulation_steps) but the "
                    f"dataset has {num_samples}",
                    "lower the batch settings or add data",
                ),
                "invalid recipe",
            )
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

    def total_steps(self, epochs: float, max_steps: int | None) -> int:
        """`max_steps`, else `epochs` passes (a fraction ends within a pass; rounded up as transformers does)."""
        return max_steps if max_steps is not None else epoch_steps(epochs, self.steps_per_epoch)

    def step_samples(self, step: int) -> np.ndarray:
        """The samples of optimizer step `step` (independent of the number of workers)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        return self._perm(epoch)[within * self.global_batch : (within + 1) * self.global_batch]

    def _assign_packed(self, idx: np.ndarray, speeds: Sequence[float] | None = None) -> list[list[list[int]]]:
        """Longest first to the rank with the fewest tokens (a packed row costs its real tokens); with `speeds`,
        the fewest tokens for its speed."""
        lens = self.lengths
        order = sorted((int(i) for i in idx), key=lambda i: (-int(lens[i]), i))
        members: list[list[int]] = [[] for _ in range(self.world)]
        load = [0] * self.world
        inv = [1.0 / s for s in speeds] if speeds is not None else [1.0] * self.world
        for i in order:
            r = min(range(self.world), key=lambda k: ((load[k] + int(lens[i])) * inv[k], len(members[k]), k))
            members[r].append(i)
            load[r] += int(lens[i])
        rows = self.ga
        if self.row_tokens is not None:  # as few rows of at most row_tokens as the fullest rank needs
            need = max(rows_within(sorted((int(lens[i]) for i in m), reverse=True), self.row_tokens) for m in members)
            rows = max(1, min(self.ga, need))
        # A rank needs a sample per micro-batch: take the shortest samples of the rank holding the most.
        for r in range(self.world):
            while len(members[r]) < rows:
                donor = max(range(self.world), key=lambda k: (len(members[k]), -k))
                members[r].append(members[donor].pop())
            members[r].sort(key=lambda i: (-int(lens[i]), i))
        per_rank = []
        for m in members:
            sizes = [int(lens[i]) for i in m]
            inner = split_contiguous(sizes, rows) if self.row_tokens is None else min_max_cuts(sizes, rows)
            cuts = [0, *inner, len(m)]
            per_rank.append([m[a:b] for a, b in zip(cuts[:-1], cuts[1:], strict=True)])
        return per_rank

    def _assign_balanced(self, idx: np.ndarray, speeds: Sequence[float] | None = None) -> list[list[list[int]]]:
        """Padded micro-batches of similar-length samples with about equal padded cost, spread over ranks.

        A padded micro-batch costs (samples x its longest sample). The step's samples, sorted by length, are cut
        into world x grad_accum contiguous groups minimising the largest cost (binary search on the cost with a
        greedy fill), so long samples share a micro-batch with few others and short ones with many; the groups
        then go, costliest first, to the rank with the least cost so far that still needs a micro-batch.
        `speeds` (each rank's relative speed, mean 1): the groups are cut to cost in proportion to the speed of
        the rank they are meant for, costs count divided by the rank's speed, and no micro-batch costs more than
        the largest speed-blind group times the largest speed over the mean (the memory bound).
        """
        lens = self.padded_lengths
        order = sorted((int(i) for i in idx), key=lambda i: (-int(lens[i]), i))
        sl = [int(lens[i]) for i in order]
        bins = self.world * self.ga

        def fill(cap: int, room: Callable[[int, int], int]) -> list[int] | None:
            starts, k = [], 0
            while k < len(sl):
                starts.append(k)
                if len(starts) > bins:
                    return None
                k += max(1, room(cap, len(starts) - 1) // sl[k])  # everything after k is no longer than sl[k]
            return starts

        def smallest_cap(room: Callable[[int, int], int]) -> int:
            lo, hi = sl[0], sl[0] * len(sl)
            while lo < hi:
                mid = (lo + hi) // 2
                if fill(mid, room) is None:
                    lo = mid + 1
                else:
                    hi = mid
            return lo

        def cut(starts: list[int] | None) -> list[list[int]]:
            starts = starts or [0]
            return [order[a:b] for a, b in zip(starts, [*starts[1:], len(order)], strict=True)]

        def even(cap: int, b: int) -> int:
            return cap

        groups = cut(fill(smallest_cap(even), even))
        bound = max(len(g) * int(lens[g[0]]) for g in groups)  # no speed-aware micro-batch costs more x speed
        inv = [1.0] * self.world
        if speeds is not None:
            speeds = [v * len(speeds) / sum(speeds) for v in speeds]  # mean 1
            inv = [1.0 / v for v in speeds]
            share = [speeds[b % self.world] for b in range(bins)]  # ga groups per rank, the ranks in turn

            def by_speed(cap: int, b: int) -> int:
                return min(int(cap * share[b]), int(bound * max(1.0, share[b])))

            groups, bound = cut(fill(smallest_cap(by_speed), by_speed)), int(bound * max(1.0, *speeds))
        while len(groups) < bins:  # fewer groups than micro-batches: halve the group holding the most samples
            g = max(range(len(groups)), key=lambda j: (len(groups[j]), -j))
            half = len(groups[g]) // 2
            groups[g : g + 1] = [groups[g][:half], groups[g][half:]]
        cost = [len(g) * int(lens[g[0]]) for g in groups]
        per_rank: list[list[list[int]]] = [[] for _ in range(self.world)]
        load = [0] * self.world
        for j in sorted(range(bins), key=lambda j: (-cost[j], j)):
            r = min(
                (k for k in range(self.world) if len(per_rank[k]) < self.ga),
                key=lambda k: ((load[k] + cost[j]) * inv[k], k),
            )
            per_rank[r].append(groups[j])
            load[r] += cost[j]
        if self.world > 1:
            _rebalance(per_rank, lens, cap=max(max(cost), bound) if speeds is not None else max(cost), speeds=speeds)
        return per_rank

    def batches(self, step: int, speeds: Sequence[float] | None = None) -> StepBatches:
        """The step's plan. `speeds`: each rank's relative speed (mean 1; `SpeedBalance`), for balanced and packed
        batching: a slower rank gets fewer padded tokens. The step's samples never depend on it."""
        epoch = step // self.steps_per_epoch
        idx = self.step_samples(step)
        if self.batching == "padded":
            per = self.mb * self.ga
            per_rank = []
            for r in range(self.world):
                mine = [int(i) for i in idx[r * per : (r + 1) * per]]
                per_rank.append([mine[j * self.mb : (j + 1) * self.mb] for j in range(self.ga)])
        elif self.batching == "balanced":
            per_rank = self._assign_balanced(idx, speeds)
        else:
            per_rank = self._assign_packed(idx, speeds)
        lens = self.lengths
        counts, tokens, compute = [], [], []
        for rank in per_rank:
            flat = [i for mb in rank for i in mb]
            counts.append(int(self.loss_counts[flat].sum()))
            tokens.append(int(lens[flat].sum()))
            if self.batching == "packed":
                compute.append(tokens[-1])
            else:
                compute.append(int(sum(len(mb) * int(self.padded_lengths[mb].max()) for mb in rank)))
        return StepBatches(
            step=step,
            epoch=epoch,
            per_rank=per_rank,
            loss_tokens=counts,
            rank_tokens=tokens,
            compute_tokens=compute,
            speeds=tuple(speeds) if speeds is not None and self.batching != "padded" else None,
        )


# ----------------------------------------------------------------------------------------------------
# `mgpu prepare`: statistics, one rendered example, and what each batching mode would cost
# ----------------------------------------------------------------------------------------------------


@dataclass
class BatchingEstimate:
    """How one batching mode would lay out the first steps (computed from lengths only, no model)."""

    mode: str
    padding_efficiency: float  # real tokens / tokens the model processes (padding included)
    rank_imbalance: float  # mean over steps of (slowest rank's processed tokens / mean rank's) - 1
    max_micro_batch_tokens: int  # largest micro-batch in processed tokens (a memory proxy)


@dataclass
class DataReport:
    """What `mgpu prepare` shows: the summary, where the cache is, one example, batching estimates."""

    summary: PrepareSummary
    cache: Path
    cache_hit: bool
    max_seq_length: int
    example_index: int
    example: list[tuple[str, bool]]  # (text, trained on) runs of the example's tokens
    workers: int
    estimates: list[BatchingEstimate]
    train_refusal: Problem | None = None  # why `mgpu train` would refuse these batch settings (global batch > data)
    eval_note: str | None = None  # the evaluation data: dataset.eval_path tokenised (its rows checked), or the hold-out
    batch_note: str | None = None  # what the batching table assumed, or why there is none


def estimate_batching(
    data: TokenizedData,
    micro_batch_size: int,
    grad_accum: int,
    workers: int,
    seed: int,
    max_steps: int = 200,
    pad_to: int = 1,
    row_tokens: int | None = None,
) -> list[BatchingEstimate]:
    """Padding efficiency and rank imbalance of each batching mode over the first `max_steps` steps (`row_tokens`:
    the packed rows' bound, `StepPlanner`'s)."""
    lengths = data.lengths()
    out = []
    for mode in ("padded", "balanced", "packed"):
        planner = StepPlanner(
            len(data),
            data.loss_counts,
            micro_batch_size,
            grad_accum,
            workers,
            seed,
            lengths=lengths,
            batching=mode,
            pad_to=pad_to,
            row_tokens=row_tokens,
        )
        real = computed = 0
        imbalance, biggest = [], 0
        for step in range(min(max_steps, planner.steps_per_epoch)):
            b = planner.batches(step)
            real += sum(b.rank_tokens)
            computed += sum(b.compute_tokens)
            imbalance.append(max(b.compute_tokens) / max(1e-9, float(np.mean(b.compute_tokens))) - 1.0)
            for rank in b.per_rank:
                for mb in rank:
                    n = int(lengths[mb].sum()) if mode == "packed" else len(mb) * int(planner.padded_lengths[mb].max())
                    biggest = max(biggest, n)
        out.append(BatchingEstimate(mode, real / max(1, computed), float(np.mean(imbalance)), biggest))
    return out


def example_runs(data: TokenizedData, index: int, tokenizer: Any) -> list[tuple[str, bool]]:
    """The sample's text cut into runs that are / are not trained on (a token is trained on when it is a
    label, i.e. the model learns to predict it)."""
    ids, labels = data.sample(index)
    runs: list[tuple[list[int], bool]] = []
    for t, (tok, lab) in enumerate(zip(ids, labels, strict=True)):
        trained = bool(lab != IGNORE_INDEX) and t > 0  # the first token is never predicted
        if runs and runs[-1][1] == trained:
            runs[-1][0].append(int(tok))
        else:
            runs.append(([int(tok)], trained))
    return [(tokenizer.decode(r, skip_special_tokens=False), trained) for r, trained in runs]


def report(recipe: Recipe) -> DataReport:
    """Run `mgpu prepare`: tokenise (or find the cache) and describe the result.

    Raises:
        UserError: as `prepare`.
    """
    from .models import resolve_model_path
    from .recipe import check_batch_fits

    check_cache_dir()  # before the builtin model is built into it
    model_path = resolve_model_path(recipe.model.name)
    folder, summary, hit = prepare(recipe, model_path)
    data = TokenizedData(folder)
    # the first sample that has something to train on shows the masking best
    index = int(np.argmax(data.loss_counts > 0))
    tokenizer = _load_tokenizer(model_path, recipe.model.trust_remote_code)
    t = recipe.training
    workers = recipe.distributed.num_gpus if isinstance(recipe.distributed.num_gpus, int) else 1
    mb = t.micro_batch_size if isinstance(t.micro_batch_size, int) else 8
    ga = t.gradient_accumulation_steps if isinstance(t.gradient_accumulation_steps, int) else 1
    estimates = []
    if mb * ga * workers <= len(data):
        pad_to, rows = recipe.dataset.pad_to_multiple_of, mb * recipe.model.max_seq_length
        estimates = estimate_batching(data, mb, ga, workers, t.seed, pad_to=pad_to, row_tokens=rows)
    chosen = {
        "training.micro_batch_size": t.micro_batch_size,
        "training.gradient_accumulation_steps": t.gradient_accumulation_steps,
        "distributed.num_gpus": recipe.distributed.num_gpus,
    }
    autos = [key for key, value in chosen.items() if not isinstance(value, int)]  # auto: filled by mgpu train
    batch_note = None
    if autos:
        batch_note = (
            f"{', '.join(autos)} auto: the batching table assumes micro-batch {mb} x {ga} x {workers} worker(s) "
            "(mgpu train fills auto from the GPUs it finds; set the values to see theirs)"
        )
    if not estimates:
        why = f"a global batch of {mb * ga * workers} samples is more than the {len(data)} there are"
        batch_note = f"no batching table: {why}" + (f"; {batch_note}" if batch_note else "")
    eval_note = None
    evaluated = prepare_eval(recipe, model_path)  # its bad rows refused here, as `mgpu train` would
    if evaluated is not None:
        e = evaluated[1]
        eval_note = (
            f"{e.samples:,} samples from {recipe.dataset.eval_path}, {e.tokens:,} tokens ({e.loss_tokens:,} scored)"
        )
    held_out = eval_hold_out(recipe, len(data))
    if held_out:
        eval_note = (
            f"{held_out:,} of the {len(data):,} samples held out (dataset.eval_ratio {recipe.dataset.eval_ratio:g})"
        )
    refusal = None
    if isinstance(t.micro_batch_size, int) and isinstance(t.gradient_accumulation_steps, int):
        try:
            # what `mgpu train` checks before it starts the workers
            check_batch_fits(recipe, len(data), workers, held_out)
        except UserError as exc:
            refusal = exc.problems[0]
    return DataReport(
        summary,
        folder,
        hit,
        recipe.model.max_seq_length,
        index,
        example_runs(data, index, tokenizer),
        workers,
        estimates,
        refusal,
        eval_note,
        batch_note,
    )
