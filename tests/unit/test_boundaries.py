"""Module boundaries: the worker never imports the host package; the host imports only the
worker's wire protocol; ``import sandbox`` imports neither torch nor a third-party HTTP stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import sandbox

ROOT = Path(sandbox.__file__).parent
WORKER = ROOT / "_worker"
# what the worker image carries (sandbox._image.ROOT_DISTRIBUTIONS): joblib for joblib archives
WORKER_THIRD_PARTY = {"torch", "numpy", "safetensors", "joblib"}


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, level) for every import statement in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(a.name, 0) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.module or "", node.level))
    return found


def test_worker_imports_only_stdlib_torch_numpy_safetensors() -> None:
    for path in WORKER.glob("*.py"):
        for module, level in imports(path):
            if level > 1:
                raise AssertionError(f"{path.name} reaches outside the worker package: {module}")
            if level == 1:
                continue
            top = module.split(".")[0]
            assert top != "sandbox", f"{path.name} imports the host package"
            assert top in sys.stdlib_module_names or top in WORKER_THIRD_PARTY, (
                f"{path.name} imports {module}"
            )


def test_host_imports_only_the_protocol_from_the_worker() -> None:
    for path in ROOT.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and "_worker" in node.module:
                names = {a.name for a in node.names}
                if node.module.endswith("_worker"):
                    assert names == {"_protocol"}, f"{path.name} imports {names} from the worker"
                else:
                    assert node.module.endswith("_worker._protocol"), f"{path.name}: {node.module}"


def test_import_sandbox_is_light() -> None:
    """Neither the loaders' stack nor an HTTP client library, nor the metadata parser of the
    standard library (the version and the image's digest read the headers directly): what
    every new process, every CLI call, pays before its first sandbox."""
    heavy = ("torch", "docker", "numpy", "safetensors", "requests", "urllib3", "importlib.metadata")
    code = (
        "import sys, sandbox, sandbox._cli, sandbox._image\n"
        "sandbox._image.worker_digest()\n"
        f"heavy = [m for m in {heavy!r} if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_all_is_sorted_and_complete() -> None:
    assert sandbox.__all__ == sorted(sandbox.__all__)
    public = {n for n in vars(sandbox) if not n.startswith("_")} - {"errors", "policy", "report", "policies"}
    assert set(sandbox.__all__) == public


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def test_host_never_unpickles() -> None:
    """Belt and braces beside the ruff banned-api rule: no host module calls an unpickler,
    whether by attribute (``torch.load(...)``) or by import (``from pickle import loads``)."""
    banned = {
        "torch.load",
        "torch.serialization.load",
        "pickle.load",
        "pickle.loads",
        "pickle.Unpickler",
        "_pickle.Unpickler",
        "np.load",
        "numpy.load",
        "dill.load",
        "joblib.load",
        "marshal.loads",
    }
    for path in ROOT.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):  # patch_torch may *name* torch.load to replace it
                name = _dotted(node.func)
                assert name not in banned, f"{path.name}:{node.lineno} calls {name}"
            if isinstance(node, ast.ImportFrom) and node.module in (
                "pickle",
                "_pickle",
                "marshal",
                "dill",
                "joblib",
            ):
                names = {a.name for a in node.names}
                assert not names & {"load", "loads", "Unpickler"}, f"{path.name} imports {names}"


def test_every_package_directory_is_installed() -> None:
    """A wheel holds the packages pyproject.toml lists: each directory of ``sandbox`` with an
    ``__init__.py`` must be one of them (an editable install would hide the omission)."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    on_disk = {
        ".".join(p.parent.relative_to(ROOT.parent).parts)
        for p in ROOT.rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    assert on_disk <= listed, f"packages missing from pyproject.toml: {sorted(on_disk - listed)}"


def test_no_module_imports_a_private_name_of_another() -> None:
    """Modules share what they export: ``from sandbox.x import _name`` (a private function,
    class or constant of another module, not a private submodule) is not used."""
    offenders = []
    for path in ROOT.rglob("*.py"):
        package = path.parent.relative_to(ROOT.parent).parts
        tree = ast.parse(path.read_text())
        modules: set[str] = set()
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = base + (node.module.split(".") if node.module else [])
            if not module or module[0] != "sandbox":
                continue
            where = ROOT.parent.joinpath(*module)
            for alias in node.names:
                submodule = (where / alias.name).is_dir() or (where / f"{alias.name}.py").exists()
                if alias.name.startswith("_") and not submodule:
                    offenders.append(f"{path.relative_to(ROOT)}: {'.'.join(module)}.{alias.name}")
                elif submodule:
                    modules.add(alias.asname or alias.name)
        # ... nor reaches into one: ``_batch._helper`` on a module imported as a name
        offenders += [
            f"{path.relative_to(ROOT)}: {node.value.id}.{node.attr}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and node.attr.startswith("_")
            and not node.attr.startswith("__")
        ]
    assert not offenders, offenders


def test_no_test_module_imports_another() -> None:
    """What tests share lives in tests/fakes.py, tests/checkpoints.py or a conftest."""
    tests = ROOT.parent / "tests"
    offenders = []
    for path in sorted(tests.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else ([a.name for a in node.names] if isinstance(node, ast.Import) else [])
            )
            offenders += [
                f"{path.relative_to(tests)}: {n}"
                for n in names
                if n.startswith("tests.") and n.rpartition(".")[2].startswith("test_")
            ]
    assert not offenders, offenders
