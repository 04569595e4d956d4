"""The worker image's recipe: a tag derived from everything that decides its content, and a
root filesystem that carries the interpreter, the loader's distributions and the worker
package, and nothing of the host's (no host code, no credentials, no path outside its roots)."""

from __future__ import annotations

import shutil
import sysconfig
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest

from sandbox import _image


def test_the_digest_follows_the_worker_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = _image.worker_digest()
    assert first == _image.worker_digest() and len(first) == 64
    assert _image.image_tag(first) == f"{_image.REPOSITORY}:{first[:16]}"
    copy = tmp_path / "_worker"
    shutil.copytree(_image.WORKER_SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(_image, "WORKER_SRC", copy)
    assert _image.worker_digest() == first  # the same bytes at another place: the same image
    (copy / "_loader.py").write_bytes((copy / "_loader.py").read_bytes() + b"\n# changed\n")
    changed = _image.worker_digest()
    assert changed != first
    (copy / "extra.py").write_text("")
    assert _image.worker_digest() not in (first, changed)


def test_the_digest_follows_the_installed_distributions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The distributions' versions are looked up once per state of ``sys.path`` (every load
    asks for the digest), and again when a directory on it changes: an upgrade is seen."""
    first = _image.worker_digest()
    calls = []
    closure = _image._closure

    def counted(roots: Iterable[str]) -> list[tuple[str, str, str]]:
        calls.append(roots)
        return closure(roots)

    monkeypatch.setattr(_image, "_closure", counted)
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    assert _image.worker_digest() == first and len(calls) == 1  # a new path: looked up again
    assert _image.worker_digest() == first and len(calls) == 1  # nothing changed: cached
    meta = site / "safetensors-99.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: safetensors\nVersion: 99.0\n")
    upgraded = _image.worker_digest()
    assert upgraded != first and len(calls) == 2


def test_the_closure_is_the_loaders_distributions_only() -> None:
    names = {key for key, _name, _version in _image._closure(_image.ROOT_DISTRIBUTIONS)}
    assert {"torch", "numpy", "safetensors", "joblib", "lz4"} <= names
    assert "filelock" in names  # a requirement of torch's, found recursively
    assert not names & {"docker", "rich", "model-sandbox", "distributed", "requests", "psutil"}
    # the build ships the same distributions the digest names, with their versions
    shipped = {d.metadata["Name"]: d.version for d in _image._distributions()}
    assert shipped == {name: version for _key, name, version in _image._closure(_image.ROOT_DISTRIBUTIONS)}


@pytest.fixture(scope="module")
def entries() -> list[_image._Entry]:
    paths = sysconfig.get_paths()
    return list(_image._rootfs_entries(sorted({Path(paths["purelib"]), Path(paths["platlib"])})))


def test_the_root_filesystem_holds_only_its_own_roots(entries: list[_image._Entry]) -> None:
    roots = (
        PurePosixPath(_image.PY),
        PurePosixPath("/usr/lib"),
        PurePosixPath("/lib64"),
        PurePosixPath("/etc"),
        PurePosixPath("/lib"),
    )
    for e in entries:
        path = PurePosixPath(e.arcname)
        assert path.is_absolute() and ".." not in path.parts, e.arcname
        assert any(path.is_relative_to(r) for r in roots), e.arcname
        assert ".ssh" not in path.parts and ".aws" not in path.parts, e.arcname
        if e.source is not None and "/sandbox_worker/" not in e.arcname:  # those: compiled
            assert e.source.is_file(), e.source  # in a scratch dir
        if e.link is not None:
            assert not e.link.startswith("/") and ".." not in e.link, e
    names = [e.arcname for e in entries]
    # the host's package never goes in: only the worker, under its own name
    assert not [n for n in names if "/site-packages/sandbox/" in n]
    worker = {PurePosixPath(n).name for n in names if "/site-packages/sandbox_worker/" in n}
    assert {p.name for p in _image._worker_files()} <= worker
    passwd = next(e for e in entries if e.arcname == "/etc/passwd")
    assert passwd.data is not None and f":{_image.SANDBOX_UID}:" in passwd.data.decode()
    assert any(n == f"{_image.PY}/bin/python3" for n in names)
