"""The package's version, from its installed metadata (one definition: ``pyproject.toml``)."""

from __future__ import annotations

from importlib import metadata

__all__ = ["VERSION"]


try:
    VERSION = metadata.version("model-sandbox")
except metadata.PackageNotFoundError:  # run from a source tree that was never installed
    VERSION = "0+unknown"
