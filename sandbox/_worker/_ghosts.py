"""Container side: load checkpoints whose classes are not installed in the sandbox.

Real checkpoints pickle objects from packages the worker image does not carry (a Lightning
``AttributeDict``, an OmegaConf config, a project's own ``nn.Module`` subclass). Plain
``torch.load`` fails on the first such global and returns nothing. Here a global that cannot be
imported becomes a *ghost* class: it accepts whatever the pickle does with it (construction
arguments, ``__setstate__``, item and list appends) and keeps it as data, so the load goes on,
every tensor inside is still recovered, and the report names each missing class.

Ghosts change nothing about isolation: they exist only inside the sandbox, and what crosses
to the host is the same JSON skeleton and SafeTensors as for any other object.
"""

from __future__ import annotations

import pickle
import types
from typing import Any

MAX_GHOST_CLASSES = 10_000


class Ghost:
    """Base of every stand-in class. ``_ghost_type`` is the dotted name the pickle asked for."""

    _ghost_type = "?"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_ghost_args"] = args
        self.__dict__["_ghost_kwargs"] = kwargs

    def __new__(cls, *args: Any, **kwargs: Any) -> Ghost:
        obj = super().__new__(cls)
        obj.__dict__.update(
            _ghost_args=args, _ghost_kwargs=kwargs, _ghost_items={}, _ghost_list=[], _ghost_state=None
        )
        return obj

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_ghost_state"] = state

    # copyreg._reconstructor makes instances with object.__new__, bypassing ours: hence setdefault
    def __setitem__(self, key: Any, value: Any) -> None:
        self.__dict__.setdefault("_ghost_items", {})[key] = value

    def append(self, value: Any) -> None:
        self.__dict__.setdefault("_ghost_list", []).append(value)

    def extend(self, values: Any) -> None:
        self.__dict__.setdefault("_ghost_list", []).extend(values)

    def __repr__(self) -> str:
        return f"<ghost of {self._ghost_type}>"


_classes: dict[str, type[Ghost]] = {}
missing: list[str] = []


def ghost_class(dotted: str) -> type[Ghost]:
    cls = _classes.get(dotted)
    if cls is None:
        if len(_classes) >= MAX_GHOST_CLASSES:
            raise pickle.UnpicklingError("too many missing classes")
        module, _, name = dotted.rpartition(".")
        cls = type(name or "Ghost", (Ghost,), {"_ghost_type": dotted, "__module__": module or "?"})
        _classes[dotted] = cls
        missing.append(dotted)
    return cls


def ghost_parts(obj: Ghost) -> dict[str, Any]:
    """The data a ghost holds, for extraction: only what is present."""
    d = obj.__dict__
    parts: dict[str, Any] = {}
    if d.get("_ghost_args"):
        parts["args"] = list(d["_ghost_args"])
    if d.get("_ghost_kwargs"):
        parts["kwargs"] = dict(d["_ghost_kwargs"])
    if d.get("_ghost_state") is not None:
        parts["state"] = d["_ghost_state"]
    if d.get("_ghost_items"):
        parts["items"] = dict(d["_ghost_items"])
    if d.get("_ghost_list"):
        parts["list"] = list(d["_ghost_list"])
    extra = {k: v for k, v in d.items() if not k.startswith("_ghost_")}
    if extra:  # set by BUILD without __setstate__ semantics (slots/state tuples)
        parts["attributes"] = extra
    return parts


class Unpickler(pickle.Unpickler):
    """The standard unpickler, except that a global it cannot import becomes a ghost class."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            return ghost_class(f"{module}.{name}")


# torch.load(pickle_module=...) wants a module-like object with Unpickler, load and loads.
pickle_module = types.SimpleNamespace(
    Unpickler=Unpickler,
    load=lambda f, **kw: Unpickler(f, **kw).load(),
    loads=pickle.loads,
    __name__="sandbox_worker._ghosts",
)
