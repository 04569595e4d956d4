"""Loader side: a Python audit hook (PEP 578) that reports what the unpickled code asked for.

The hook runs inside the loader, next to the payload, so everything it writes is
*self-reported*: a payload can forge, flood or silence it (ctypes and ``_posixsubprocess`` do not
pass through audit events at all). The supervisor keeps these events apart from the kernel's,
and no verdict rests on them; they add context such as which pickle global was resolved.

Events go as JSON lines into a non-blocking pipe the supervisor drains; when the pipe is full or
a bound is reached, events are dropped (and counted). Reading an environment variable is not an
audit event: ``os.environ`` is a dict, so no layer sees it.

Noisy events (``import``, ``open``, ``exec``, ``compile``, ``ctypes.*``) are
only recorded once the unpickler resolved its first global: importing torch itself raises
thousands of them, while a pickle can run no code of its own before resolving a global.
``marshal.loads`` is not recorded (every ``.pyc`` import raises it; a pickle reaching it shows
up as the ``pickle.find_class`` of ``marshal.loads``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from typing import Any

MAX_EVENTS = 2000
MAX_PER_KIND = 200
MAX_LINE = 2048

ALWAYS = frozenset(
    {
        "pickle.find_class",
        "os.system",
        "subprocess.Popen",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.kill",
        "os.killpg",
        "socket.__new__",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "pty.spawn",
        "shutil.rmtree",
        "os.remove",
        "os.rename",
        "os.chmod",
        "urllib.Request",
        "http.client.connect",
        "ftplib.connect",
        "smtplib.connect",
        "webbrowser.open",
        "sys.setprofile",
        "sys.settrace",
        "sys.addaudithook",
        "ctypes.dlopen",
    }
)
ARMED = frozenset(
    {
        "import",
        "open",
        "exec",
        "compile",
        "ctypes.dlsym",
        "ctypes.call_function",
        "ctypes.string_at",
        "ctypes.cdata",
        "builtins.input",
    }
)
# stdlib modules that generate code only from validated identifiers (namedtuple, dataclasses),
# or only parse (ast.parse: inspect reads builtin signatures with it)
_CODEGEN = ("/collections/__init__.py", "/dataclasses.py", "/ast.py")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]{0,200}$")


def _importing() -> bool:
    """Whether a module import is in progress below the audited call: a payload's own call
    through the unpickler has no import machinery on its stack."""
    f = sys._getframe(3)
    while f is not None:
        if f.f_code.co_filename.startswith("<frozen importlib"):
            return True
        f = f.f_back  # type: ignore[assignment]
    return False


def _harmless_codegen(caller: str, event: str, obj: Any) -> bool:
    """Code the standard library makes for itself: namedtuple/dataclass methods, ast parses, and
    typing's forward references that are plain (dotted) names. A payload reaching typing with
    any other expression is still reported."""
    if caller.endswith(_CODEGEN):
        return True
    if not caller.endswith("/typing.py"):
        return False
    if event == "compile":
        return isinstance(obj, str) and bool(_NAME.match(obj))
    code = obj
    return (
        getattr(code, "co_filename", "") == "<string>"
        and not [c for c in getattr(code, "co_consts", (1,)) if c is not None]
        and len(getattr(code, "co_code", b"x" * 99)) <= 24
    )


OWN_PACKAGES = frozenset({"torch", "numpy", "safetensors", "sandbox_worker"})
INSTALLED = "/opt/python/"
QUIET_OPEN = (
    "/opt/python/",
    "/usr/lib/",
    "/lib/",
    "/lib64/",
    "/proc/self/",
    "/sys/",
    "/tmp/",
    "/dev/null",
    "/dev/urandom",
)


def _short(value: Any, limit: int = 300) -> Any:
    if isinstance(value, bool | int | float) or value is None:
        return value
    if isinstance(value, bytes | bytearray):
        text = bytes(value[:limit]).decode("latin-1")
    elif isinstance(value, list | tuple):
        return [_short(v, 120) for v in list(value)[:16]]
    else:
        try:
            text = str(value)
        except Exception:
            text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def install(fd: int, start: float) -> None:
    """Add the hook; events go to ``fd``. ``start`` is the monotonic time of the load start."""
    os.set_blocking(fd, False)
    state = {"armed": False, "total": 0, "dropped": 0, "busy": False}
    per_kind: dict[str, int] = {}
    seen_globals: set[tuple[str, str]] = set()
    write = os.write
    mono = time.monotonic
    dumps = json.dumps

    def emit(kind: str, detail: dict[str, Any]) -> None:
        n = per_kind.get(kind, 0)
        if state["total"] >= MAX_EVENTS or n >= MAX_PER_KIND:
            state["dropped"] += 1
            return
        per_kind[kind] = n + 1
        state["total"] += 1
        line = (
            dumps({"t": round(mono() - start, 4), "kind": kind, "detail": detail}, default=str).encode()[
                : MAX_LINE - 1
            ]
            + b"\n"
        )
        try:
            write(fd, line)
        except OSError:
            state["dropped"] += 1

    def hook(event: str, args: tuple[Any, ...]) -> None:
        if state["busy"] or (event not in ALWAYS and event not in ARMED):
            return
        if event in ARMED and not state["armed"]:
            return
        state["busy"] = True  # our own json/os calls raise events too
        try:
            detail = _detail(event, args, seen_globals)
            if detail is not None:
                emit(event, detail)
            if event == "pickle.find_class":
                state["armed"] = True
        except Exception:
            pass
        finally:
            state["busy"] = False

    sys.addaudithook(hook)


def _detail(event: str, args: tuple[Any, ...], seen: set[tuple[str, str]]) -> dict[str, Any] | None:
    if event.startswith("ctypes.") and _importing():
        return None  # an installed module loading its native library while it is imported
    if event == "pickle.find_class":
        key = (str(args[0])[:200], str(args[1])[:200])
        if key in seen:
            return None
        seen.add(key)
        return {"module": key[0], "name": key[1]}
    if event == "import":
        name = str(args[0])
        if name in sys.modules or name.partition(".")[0] in OWN_PACKAGES or ("import", name) in seen:
            return None
        seen.add(("import", name))
        return {"module": _short(name)}
    if event == "exec" and getattr(args[0], "co_filename", "").startswith(INSTALLED):
        return None  # a module of the image being imported
    if event in ("exec", "compile"):
        caller = sys._getframe(2).f_code.co_filename  # _detail <- hook <- the running frame
        if caller.startswith(INSTALLED) and _harmless_codegen(caller, event, args[0]):
            return None
        if _importing() and (event == "compile" or getattr(args[0], "co_filename", "<").startswith("<")):
            # an installed module generating code while it is imported (torch's lazy
            # submodules, sympy, mpmath): code from a file outside the image is still reported
            return None
    if event == "open":
        path = args[0]
        if isinstance(path, int) or not isinstance(path, str | bytes):
            return None
        p = os.fsdecode(path)
        if p.startswith(QUIET_OPEN):
            return None
        return {"path": _short(p), "mode": _short(args[1])}
    if event in ("exec", "ctypes.call_function", "ctypes.cdata"):
        return {"object": _short(args[0] if args else None, 200)}
    if event == "compile":
        return {
            "source": _short(args[0], 300),
            "filename": _short(args[1] if len(args) > 1 else None),
            "caller": _short(sys._getframe(2).f_code.co_filename, 200),
        }
    if event == "socket.__new__":
        return {"family": _short(args[1]), "type": _short(args[2])}
    if event in ("socket.connect", "socket.bind", "socket.sendto"):
        return {"address": _short(args[1] if len(args) > 1 else args)}
    if event == "subprocess.Popen":
        return {"executable": _short(args[0]), "args": _short(args[1])}
    if event in ("os.exec", "os.posix_spawn", "os.spawn"):
        return {"path": _short(args[0]), "args": _short(args[1] if len(args) > 1 else None)}
    return {"args": _short(list(args), 300)}
