"""Lock files: pin the sha256 of every model file before anything opens it.

``model-sandbox lock PATH... > models.lock`` writes one line per model file found under the
PATHs (recognised by content, as the batch does), and ``model-sandbox convert --lock
models.lock ...`` refuses, before any sandbox opens it, every input whose sha256 differs from
its line or that has no line.

The format is the one ``sha256sum`` writes and ``sha256sum -c`` checks, so the lock can be
verified with standard tools and reviewed in a diff::

    # model-sandbox lock file 1: sha256sum format; `sha256sum -c FILE` checks it as well
    9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08  models/a/b/x.pt

* lines are ``HEX`` (64 lower-case hex digits), two spaces (or space and ``*``), then the
  path; blank lines and lines starting with ``#`` are ignored (``sha256sum -c`` only warns);
* a path that holds a backslash, newline or carriage return is escaped as ``sha256sum``
  does: the line starts with ``\\`` and those characters are written ``\\\\``, ``\\n``, ``\\r``;
* relative paths are relative to the current directory, as for ``sha256sum -c``: run
  ``lock`` and ``convert --lock`` from the same directory (or give absolute PATHs);
* a path listed twice with different hashes makes the lock invalid.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

from . import _batch, _scan
from .errors import LockFileError, MalformedInput

__all__ = ["LockFileError", "lock_entries", "parse_lock", "read_lock", "render_lock"]

HEADER = "# model-sandbox lock file 1: sha256sum format; `sha256sum -c FILE` checks it as well"
_LINE = re.compile(r"^(\\?)([0-9a-fA-F]{64}) [ *](.+)$", re.DOTALL)


def _display(path: str) -> str:
    """The path as written in a lock: relative to the current directory when inside it."""
    cwd = os.getcwd()
    ab = os.path.abspath(path)
    return os.path.relpath(ab, cwd) if ab.startswith(cwd.rstrip(os.sep) + os.sep) else ab


def lock_entries(
    paths: Sequence[str | os.PathLike[str]], *, include: Sequence[str] = (), exclude: Sequence[str] = ()
) -> list[tuple[str, str]]:
    """(sha256, path) of every model file under ``paths``, identified by content, sorted."""
    entries, _, _ = _batch.discover(paths, include=include, exclude=exclude)
    never = threading.Event()
    out: list[tuple[str, str]] = []
    for e in entries:
        try:
            if _scan.identify(e.real) not in _batch.MODEL_FORMATS:
                continue
            sha, _ = _batch.hash_input(e.real, never)
        except (MalformedInput, OSError) as exc:
            raise LockFileError(f"cannot read {e.source!r}: {exc}") from None
        out.append((sha, _display(e.source)))
    return sorted(out, key=lambda t: t[1])


def _escape(path: str) -> tuple[str, str]:
    if not any(c in path for c in "\\\n\r"):
        return "", path
    return "\\", path.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _unescape(path: str) -> str:
    out, i = [], 0
    while i < len(path):
        c = path[i]
        if c == "\\" and i + 1 < len(path):
            nxt = path[i + 1]
            out.append({"\\": "\\", "n": "\n", "r": "\r"}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def render_lock(entries: Sequence[tuple[str, str]]) -> str:
    lines = [HEADER]
    for sha, path in entries:
        prefix, text = _escape(path)
        lines.append(f"{prefix}{sha}  {text}")
    return "\n".join(lines) + "\n"


def parse_lock(
    text: str, *, source: str = "<lock>", base: str | os.PathLike[str] | None = None
) -> dict[str, str]:
    """Pins from a lock file's text: absolute path (as written, and resolved) -> sha256.

    Relative paths are taken relative to ``base`` (default: the current directory)."""
    root = os.fspath(base) if base is not None else os.getcwd()
    pins: dict[str, str] = {}
    problems: list[str] = []
    for n, line in enumerate(text.split("\n"), 1):
        if not line.strip() or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            problems.append(f"line {n}: not `HEX  PATH`")
            continue
        escaped, sha, path = m.group(1), m.group(2).lower(), m.group(3)
        if escaped:
            path = _unescape(path)
        full = os.path.normpath(os.path.join(root, path))
        for key in {full, os.path.realpath(full)}:
            if pins.get(key, sha) != sha:
                problems.append(f"line {n}: {path!r} is listed with two different hashes")
            pins[key] = sha
    if problems:
        raise LockFileError(f"{source} is not a valid lock file: " + "; ".join(problems[:10]))
    return pins


def read_lock(path: str | os.PathLike[str]) -> dict[str, str]:
    try:
        text = Path(path).read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LockFileError(f"cannot read the lock file {os.fspath(path)!r}: {exc}") from None
    return parse_lock(text, source=os.fspath(path))
