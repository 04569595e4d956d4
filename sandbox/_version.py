"""The package's version, from its installed metadata (one definition: ``pyproject.toml``), and
the metadata of installed distributions, read without :mod:`importlib.metadata`.

Every process needs the version, and every load the versions of the worker image's
distributions (its tag derives from them); :mod:`importlib.metadata` parses each file as an
e-mail message and costs a new process about 40 ms to import. The distributions on
``sys.path`` are found by their ``*.dist-info`` / ``*.egg-info`` directories in path order (the
first of a name wins, as for :mod:`importlib.metadata`), and only the header block of their
``METADATA`` (``PKG-INFO``) is read.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence

__all__ = ["VERSION", "headers", "installed", "normalise"]


def normalise(name: str) -> str:
    """A distribution name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def installed(path: Sequence[str] | None = None) -> dict[str, str]:
    """Normalised distribution name -> its metadata file, first on ``path`` (``sys.path``)."""
    found: dict[str, str] = {}
    for entry in sys.path if path is None else path:
        base = entry or "."
        try:
            names = os.listdir(base)
        except OSError:
            continue
        for name in sorted(names):
            if name.endswith(".dist-info"):
                meta = os.path.join(base, name, "METADATA")
            elif name.endswith(".egg-info"):
                meta = os.path.join(base, name, "PKG-INFO")
            else:
                continue
            key = normalise(name.rsplit(".", 1)[0].split("-", 1)[0])
            if key not in found and os.path.isfile(meta):
                found[key] = meta
    return found


def headers(meta: str) -> dict[str, list[str]]:
    """The header block of a metadata file: field -> its values, in order. Unreadable: {}."""
    out: dict[str, list[str]] = {}
    try:
        with open(meta, encoding="utf-8", errors="replace") as f:
            for line in f:
                if not line.strip():
                    break  # the body (the description) follows the first blank line
                if line[0] in " \t":
                    continue  # a folded continuation of a long field
                field, sep, value = line.partition(":")
                if sep:
                    out.setdefault(field.strip(), []).append(value.strip())
    except OSError:
        return {}
    return out


def _own_version() -> str:
    meta = installed().get("model-sandbox")
    version = headers(meta).get("Version", [""])[0] if meta else ""
    return version or "0+unknown"  # "0+unknown": run from a source tree never installed


VERSION = _own_version()
