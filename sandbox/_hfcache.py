"""Host: what ``model-sandbox scan`` scans when given a directory, and Hugging Face caches.

A plain directory is walked as a batch walks it (``_batch.discover``: sorted, symlinked
directories not entered, a symlink to a file followed only inside the directory) and every
regular file that is a checkpoint *by content* is scanned. A Hugging Face hub cache
(``models--org--name/snapshots/<revision>/<file>``, each file a symlink to
``models--org--name/blobs/<hash>``) is read as models and revisions: a blob that several
revisions share is scanned once and its report shown under each of them. A symlink is followed
only when its target stays inside the cache (or directory) it was found in.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from . import _scan

__all__ = ["Target", "default_cache", "expand"]

#: formats ``scan`` loads (SafeTensors, unknown and text files are not checkpoints to scan)
_CHECKPOINTS = frozenset(
    {"torch-zip", "torch-legacy", "torch-tar", "pickle", "joblib", "numpy-npy", "numpy-npz", "torchscript"}
)


@dataclass(frozen=True)
class Target:
    """One file to report on: ``path`` as found, ``real`` the file scanned (a blob of the cache
    for a snapshot entry), and for a Hugging Face cache its model and revision."""

    path: str
    real: str
    repo: str | None = None
    revision: str | None = None

    @property
    def label(self) -> str:
        if self.repo is None:
            return self.path
        name = self.path.split(f"/snapshots/{self.revision}/", 1)[-1]
        return f"{self.repo}@{(self.revision or '')[:12]}: {name}"


def default_cache() -> Path:
    """Where ``huggingface_hub`` keeps its cache: ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, or
    ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "huggingface"
    )
    return Path(home) / "hub"


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def _regular(path: str, root_real: str) -> str | None:
    """The real path of a regular file reached from ``root`` without leaving it."""
    try:
        real = os.path.realpath(path)
        if not _inside(real, root_real) or not stat.S_ISREG(os.stat(real).st_mode):
            return None
    except OSError:
        return None
    return real


def _checkpoint(real: str) -> bool:
    try:
        return _scan.identify(real) in _CHECKPOINTS
    except Exception:  # unreadable: the scan itself will report it if asked by name
        return False


def _walk(root: str) -> list[str]:
    out: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        out += [os.path.join(dirpath, f) for f in sorted(filenames)]
    return out


def _model_dirs(root: Path) -> list[Path]:
    """``models--*`` directories: ``root`` itself, or its children (a hub cache)."""
    if root.name.startswith("models--") and (root / "snapshots").is_dir():
        return [root]
    try:
        children = sorted(p for p in root.iterdir() if p.name.startswith("models--") and not p.is_symlink())
    except OSError:
        return []
    return [p for p in children if (p / "snapshots").is_dir()]


def expand(path: str) -> list[Target]:
    """The files to scan for one ``scan`` argument: itself when it is a file; the checkpoints
    of every model and revision when it is a Hugging Face cache (or one model in it); else the
    checkpoints found by walking the directory."""
    if not os.path.isdir(path):
        return [Target(path=path, real=path)]
    root = Path(path)
    models = _model_dirs(root)
    if models:
        out: list[Target] = []
        for model in models:
            repo = model.name.removeprefix("models--").replace("--", "/")
            model_real = os.path.realpath(model)
            for snap in sorted((model / "snapshots").iterdir()):
                if snap.is_symlink() or not snap.is_dir():
                    continue
                for f in _walk(str(snap)):
                    real = _regular(f, model_real)
                    if real is not None and _checkpoint(real):
                        out.append(Target(path=f, real=real, repo=repo, revision=snap.name))
        return out
    from ._batch import discover  # the batch's walk: the same symlink and file-type rules

    entries, _skipped, _excluded = discover([path])
    return [Target(path=e.source, real=e.real) for e in entries if _checkpoint(e.real)]
