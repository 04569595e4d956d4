"""The worker image: its content-derived tag, and an offline build.

The tag is ``model-sandbox-worker:<digest>`` where the digest covers the worker package's
source, the recipe version, the Python version and the versions of the distributions the
image carries. The host always asks for the image that matches its own code; an image with
that tag but another digest label is refused (:class:`~sandbox.errors.ImageMismatch`).

Offline build (no registry needed): a root filesystem is assembled as a tar stream from the
running interpreter (binary, standard library, and the shared-library closure that ``ldd``
reports), the installed distributions the worker needs (torch, numpy, safetensors, joblib,
lz4 and their requirements) and the worker package, then handed to ``docker import``.
``images/Dockerfile`` is the equivalent for machines that can pull a base image.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from . import _version
from ._worker import _protocol as P

if TYPE_CHECKING:
    import importlib.metadata as md

RECIPE_VERSION = "2"
REPOSITORY = "model-sandbox-worker"
DIGEST_LABEL = "org.model-sandbox.worker-digest"
WORKER_SRC = Path(__file__).parent / "_worker"
ROOT_DISTRIBUTIONS = ("torch", "numpy", "safetensors", "joblib", "lz4")
PY = "/opt/python"
#: how a sandbox starts its supervisor (the image's entrypoint; bwrap runs it too)
ENTRYPOINT = (f"{PY}/bin/python3", "-I", "-S", "-c", P.BOOT)
SANDBOX_UID = 65534

# Parts of distributions the worker never uses: headers, test suites, build tooling.
_SKIP_PREFIXES = (
    "torch/include/",
    "torch/test/",
    "torch/share/",
    "torch/bin/",
    "numpy/_core/include/",
    "numpy/core/include/",
    "numpy/f2py/",
    "numpy/tests/",
    "numpy/_core/tests/",
)
_SKIP_STDLIB = (
    "site-packages",
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "config-3.11-x86_64-linux-gnu",
)
_EXTRA_STDLIB_SKIP = re.compile(r"(^|/)(tests?|__phello__)(/|$)")


def _worker_files() -> list[Path]:
    return sorted(p for p in WORKER_SRC.rglob("*.py") if "__pycache__" not in p.parts)


def _closure(roots: Iterable[str]) -> list[tuple[str, str, str]]:
    """(normalised name, name, version) of the installed distributions ``roots`` need (their
    non-extra requirements, recursively), sorted; read from their metadata headers."""
    index = _version.installed()
    seen: dict[str, tuple[str, str, str]] = {}
    todo = list(roots)
    while todo:
        key = _version.normalise(re.split(r"[\s<>=!~;\[(]", todo.pop().strip(), maxsplit=1)[0])
        meta = index.get(key)
        if not key or key in seen or meta is None:
            continue
        fields = _version.headers(meta)
        seen[key] = (key, fields.get("Name", [key])[0], fields.get("Version", [""])[0])
        for req in fields.get("Requires-Dist", []):
            if "extra ==" not in req and "extra==" not in req:
                todo.append(req)
    return [seen[k] for k in sorted(seen)]


def _distributions() -> list[md.Distribution]:
    """The distributions of :func:`_closure`, with their file lists (for the build)."""
    import importlib.metadata as md

    return [md.distribution(key) for key, _name, _version_ in _closure(ROOT_DISTRIBUTIONS)]


@functools.lru_cache(maxsize=4)
def _pinned_closure(environment: tuple[tuple[str, int], ...]) -> str:
    """``name==version`` lines of the worker's distributions, for one state of ``sys.path``
    (every load asks)."""
    return "".join(f"{name}=={version}\n" for _key, name, version in _closure(ROOT_DISTRIBUTIONS))


def _environment() -> tuple[tuple[str, int], ...]:
    """``sys.path``'s directories and their modification times: installing, upgrading or
    removing a distribution changes its directory's."""
    key = []
    for entry in sys.path:
        with contextlib.suppress(OSError):
            key.append((entry, os.stat(entry or ".").st_mtime_ns))
    return tuple(key)


def worker_digest() -> str:
    """Hex digest of everything that decides what the worker image contains."""
    h = hashlib.sha256()
    h.update(f"recipe={RECIPE_VERSION};python={sys.version_info[:3]}\n".encode())
    h.update(_pinned_closure(_environment()).encode())
    h.update(Path(__file__).read_bytes() + b"\0")  # the recipe itself
    for path in _worker_files():
        h.update(path.relative_to(WORKER_SRC).as_posix().encode() + b"\0")
        h.update(path.read_bytes() + b"\0")
    return h.hexdigest()


def image_tag(digest: str | None = None) -> str:
    return f"{REPOSITORY}:{(digest or worker_digest())[:16]}"


# -- offline root filesystem -------------------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    arcname: str
    source: Path | None = None  # a file to copy
    data: bytes | None = None  # or literal content
    mode: int = 0o644
    link: str | None = None  # or a symlink target


def _shared_libs(binaries: Iterable[Path]) -> dict[str, Path]:
    """soname -> resolved file, for every library ``ldd`` finds for ``binaries``."""
    libs: dict[str, Path] = {}
    batch: list[str] = []

    def run(paths: list[str]) -> None:
        proc = subprocess.run(["ldd", *paths], capture_output=True, text=True, check=False)
        for line in proc.stdout.splitlines():
            m = re.match(r"\s*(\S+) => (/\S+)", line)
            if m:
                libs.setdefault(m.group(1), Path(m.group(2)))
            m = re.match(r"\s*(/\S*ld-linux\S*)", line)
            if m:
                libs.setdefault("__interp__", Path(m.group(1)))

    for b in binaries:
        batch.append(str(b))
        if len(batch) == 200:
            run(batch)
            batch = []
    if batch:
        run(batch)
    return libs


def _rootfs_entries(site_dirs: list[Path]) -> Iterator[_Entry]:
    exe = Path(os.path.realpath(sys.executable))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    version = f"python{sys.version_info[0]}.{sys.version_info[1]}"
    dest_lib = f"{PY}/lib/{version}"
    yield _Entry(f"{PY}/bin/{version}", exe, mode=0o755)
    yield _Entry(f"{PY}/bin/python3", link=version)
    binaries: list[Path] = [exe]

    for path in sorted(stdlib.rglob("*")):
        rel = path.relative_to(stdlib).as_posix()
        if rel.split("/")[0] in _SKIP_STDLIB or _EXTRA_STDLIB_SKIP.search(rel) or not path.is_file():
            continue
        if path.suffix == ".so":
            binaries.append(path)
        yield _Entry(f"{dest_lib}/{rel}", path, mode=0o755 if path.suffix == ".so" else 0o644)

    for dist in _distributions():
        for f in dist.files or []:
            rel = f.as_posix()
            if rel.startswith("..") or any(rel.startswith(p) for p in _SKIP_PREFIXES):
                continue
            src = Path(str(f.locate()))
            if not src.is_file():
                continue
            if src.suffix == ".so" or ".so." in src.name:
                binaries.append(src)
            yield _Entry(f"{dest_lib}/site-packages/{rel}", src, mode=0o755 if ".so" in src.name else 0o644)

    site_roots = tuple(str(d) + "/" for d in site_dirs)
    for soname, path in sorted(_shared_libs(binaries).items()):
        real = Path(os.path.realpath(path))
        if str(real).startswith(site_roots):
            continue  # found through $ORIGIN inside site-packages: already copied
        if soname == "__interp__":
            yield _Entry(str(path), real, mode=0o755)
            continue
        yield _Entry(f"/usr/lib/{soname}", real, mode=0o755)

    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "sandbox_worker"
        pkg.mkdir()
        for src in _worker_files():
            (pkg / src.name).write_bytes(src.read_bytes())
        import compileall

        compileall.compile_dir(str(pkg), quiet=1, ddir=f"{dest_lib}/site-packages/sandbox_worker")
        for path in sorted(pkg.rglob("*")):
            if path.is_file():
                # from the file, with its mtime: each .pyc records its source's mtime, and a
                # mismatch makes the loader try to rewrite it on the read-only root (refused,
                # and reported as a write outside the output directory)
                yield _Entry(f"{dest_lib}/site-packages/sandbox_worker/{path.relative_to(pkg)}", source=path)

    # torch checks at import that its shared-memory manager exists; the worker never shares
    # tensors between processes, so an inert placeholder stands in for the executable.
    yield _Entry(f"{dest_lib}/site-packages/torch/bin/torch_shm_manager", data=b"", mode=0o644)
    yield _Entry(
        "/etc/passwd",
        data=(
            "root:x:0:0:root:/root:/sbin/nologin\n"
            f"user:x:{SANDBOX_UID}:{SANDBOX_UID}:user:{P.CANARY_HOME}:/bin/sh\n"
        ).encode(),
    )
    yield _Entry("/etc/group", data=f"root:x:0:\nuser:x:{SANDBOX_UID}:\n".encode())
    # mount points: Docker binds its own over them; the bwrap runner binds the sandbox's name
    yield _Entry("/etc/hostname", data=b"")
    yield _Entry("/etc/hosts", data=b"")


def write_rootfs(fileobj: io.BufferedWriter | io.BytesIO) -> int:
    """Write the worker's root filesystem as an uncompressed tar stream. Returns file count."""
    site_dirs = sorted(
        {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    )
    count = 0
    seen: set[str] = set()
    with tarfile.open(fileobj=fileobj, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for d in (
            "/tmp",
            "/run",
            P.CHANNEL_DIR,
            P.CANARY_HOME,
            "/proc",
            "/sys",
            "/dev",
            "/etc",
            "/usr/lib",
            "/lib64",
        ):
            info = tarfile.TarInfo(d.lstrip("/"))
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "/tmp" else 0o755
            tar.addfile(info)
        for entry in _rootfs_entries(site_dirs):
            name = entry.arcname.lstrip("/")
            if name in seen:
                continue
            seen.add(name)
            info = tarfile.TarInfo(name)
            info.mode = entry.mode
            info.mtime = int(time.time())
            if entry.link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = entry.link
                tar.addfile(info)
            elif entry.data is not None:
                info.size = len(entry.data)
                tar.addfile(info, io.BytesIO(entry.data))
            else:
                assert entry.source is not None
                st = entry.source.stat()
                info.size = st.st_size
                info.mtime = int(st.st_mtime)  # keeps copied .pyc files valid
                with entry.source.open("rb") as f:
                    tar.addfile(info, f)
            count += 1
    return count
