"""``MODEL_SANDBOX_PATCH=1``: route every ``torch.load`` of an unmodified script through
:func:`sandbox.safe_load`, from interpreter start.

``model-sandbox patch install`` writes :data:`PTH_NAME` into site-packages (or ``--user`` site,
or ``--target DIR``). Python runs its one line at every start; the line does nothing unless
``MODEL_SANDBOX_PATCH=1`` is set (so other programs pay one environment lookup). When it is
set, :func:`activate` waits for ``torch`` to be imported (it never imports torch itself) and
then applies :class:`sandbox.patch_torch`. ``model-sandbox patch uninstall`` removes the file.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import os
import sys
import sysconfig
from pathlib import Path
from types import ModuleType

__all__ = ["ENV", "PTH_NAME", "activate", "install", "pth_text", "site_dir", "uninstall"]

ENV = "MODEL_SANDBOX_PATCH"
PTH_NAME = "model_sandbox_patch.pth"


def pth_text() -> str:
    """The .pth file's one executable line (``site`` runs lines that start with ``import``)."""
    return (
        f"import os; exec('import sandbox._autopatch as _m; _m.activate()') "
        f"if os.environ.get('{ENV}') == '1' else None\n"
    )


def _apply() -> None:
    from . import patch_torch

    patch_torch()


class _AfterTorch(importlib.abc.MetaPathFinder):
    """Finds ``torch`` with the other finders and patches it once it has been executed."""

    def find_spec(
        self, name: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if name != "torch":
            return None
        sys.meta_path.remove(self)  # once; the real finders locate torch
        spec = importlib.util.find_spec("torch")
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        original = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original(module)
            _apply()

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def activate() -> None:
    """Patch ``torch.load`` now if torch is loaded, else as soon as it is."""
    if os.environ.get(ENV) != "1":
        return
    if "torch" in sys.modules:
        _apply()
    elif not any(isinstance(f, _AfterTorch) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTorch())


def site_dir(user: bool = False) -> Path:
    """Where ``install`` writes the .pth file: this interpreter's site-packages."""
    if user:
        import site

        return Path(site.getusersitepackages())
    return Path(sysconfig.get_paths()["purelib"])


def install(target: Path) -> Path:
    """Write the .pth file into ``target``; returns its path."""
    from sandbox import _files  # not at interpreter start, where this module is imported

    path = target / PTH_NAME
    _files.atomic_write(path, pth_text().encode())
    return path


def uninstall(target: Path) -> bool:
    """Remove the .pth file from ``target``; whether there was one."""
    try:
        (target / PTH_NAME).unlink()
        return True
    except FileNotFoundError:
        return False
