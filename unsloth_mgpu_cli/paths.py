"""Files a command writes where the user says (`suggest --output`, `report --png`): checked before any work."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import Problem


def output_file_problems(path: Path, flag: str, force: bool = True, suffix: str | None = None) -> list[Problem]:
    """What stops `flag PATH` from being written, found before any work; creates nothing.

    Args:
        path: the file to write.
        flag: the option that named it (`--output`), for the message.
        force: an existing file may be replaced (otherwise it is refused, as `mgpu init` does without --force).
        suffix: the file name must end in it (`.png`).
    """
    where, name = f"argument {flag}", f"file{suffix or ''}"
    if path.is_dir():
        example = path / (f"report{suffix}" if suffix else "recipe.yaml")
        return [Problem(where, f"expected a {name} path, found the folder {path}", f"e.g. {flag} {example}")]
    if suffix and path.suffix.lower() != suffix:  # `.png` alone is a nameless hidden file: its suffix is ""
        example = path.parent / f"report{suffix}" if path.name.startswith(".") else path.with_suffix(suffix)
        return [
            Problem(where, f"expected a file name ending in {suffix}, found {str(path)!r}", f"e.g. {flag} {example}")
        ]
    parent = path.parent
    if not parent.exists():
        return [
            Problem(where, f"folder {parent} does not exist", f"create it (mkdir -p {parent}) or choose another path")
        ]
    if not parent.is_dir():
        return [Problem(where, f"{parent} is a file, not a folder", "choose a path in an existing folder")]
    if path.exists() and not force:
        return [Problem(where, f"{path} exists", "pass --force to overwrite it or choose another path")]
    try:  # permissions lie for root (and read-only mounts): try it
        with tempfile.NamedTemporaryFile(dir=parent, prefix=f".{path.name}.", suffix=".tmp"):
            pass
    except OSError as exc:
        return [Problem(where, f"cannot write to {parent}: {exc.strerror or exc}", "choose another path")]
    return []


def write_text_atomically(path: Path, text: str) -> None:
    """Write `text` beside `path` and rename it over `path`: a failed write leaves the old file (or none)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    f = open(tmp, "x", encoding="utf-8")  # not mkstemp: the file gets the umask's permissions, not 0600
    try:
        with f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
