"""The layers of the package, as rules on its imports, checked by reading every module with ``ast``.

``LAYERS`` is the one statement of the rules (``docs/design.md`` draws it): for each layer, the
layers it may import and the outside packages it must not. A module may always import its own
layer. Imports are read from the source, wherever they are (top level, inside functions, under
``TYPE_CHECKING``), so a lazy import cannot slip a dependency past the rules.

A second rule keeps torch's private APIs in one module, ``astage/_torch.py``: no other module
imports a private torch module or touches a private torch name.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import astage

PACKAGE_DIR = Path(astage.__file__).resolve().parent

SHARED_MODULES = frozenset({"_errors", "_paths", "_options", "_torch"})
"""Top modules that every layer may import; they import only each other."""

ASYNC_AND_THREADS = frozenset({"asyncio", "anyio", "trio", "sniffio", "threading", "concurrent"})
"""What an I/O-free module must not import: event loops, threads, executors."""


@dataclass(frozen=True)
class Layer:
    """One row of the table: what a layer may import from the package, and what never."""

    may_import: frozenset[str]
    """Other layers of the package this one may import (its own layer always)."""
    must_not_import: frozenset[str] = frozenset()
    """Outside top-level packages this layer must not import."""
    summary: str = ""


def _layers(*names: str) -> frozenset[str]:
    return frozenset(names)


LAYERS: dict[str, Layer] = {
    "shared": Layer(
        _layers(),
        ASYNC_AND_THREADS,
        "_errors, _paths, _options, _torch: imported by all, and the core imports them",
    ),
    "_core": Layer(
        _layers("shared"),
        ASYNC_AND_THREADS,
        "plan, walk, tensor kinds, cache, batches, run state, stats: I/O-free",
    ),
    "_devices": Layer(_layers("shared", "_core"), summary="host copies, CUDA streams, pinning"),
    "_drivers": Layer(
        _layers("shared", "_core", "_devices"), summary="the base, the async and sync faces, GC"
    ),
    "_files": Layer(
        _layers("shared", "_core", "_devices", "_drivers"),
        summary="skeleton codec, safetensors, writer, save, CheckpointDir",
    ),
    "_replication": Layer(
        _layers("shared", "_core", "_devices", "_drivers", "_files"),
        summary="pairing, wire codec, transport, persistence, ReplicationStager",
    ),
    "compat": Layer(
        _layers("shared", "_core", "_devices", "_drivers", "_files", "_replication"),
        summary="DCP's stagers, storage layer (on the files layer's writes) and replication stager",
    ),
    "lightning": Layer(
        _layers("shared", "_core", "_devices", "_drivers", "_files"),
        summary="astage.lightning: the Lightning CheckpointIO plugin (optional, imports lightning)",
    ),
    "public": Layer(
        _layers("shared", "_core", "_devices", "_drivers", "_files", "_replication", "compat"),
        summary="astage/__init__.py: the public names",
    ),
    "_cli": Layer(
        _layers("shared", "_files", "public"),
        summary="the astage command (inspect): reads checkpoint headers and folders",
    ),
    "__main__": Layer(_layers("_cli"), summary="astage/__main__.py: python -m astage"),
}
"""The layer rules, bottom up. Keys: a subpackage of ``astage``, ``shared`` or ``public``."""


def layer_of(module: str) -> str:
    """The layer of a module of the package, from its dotted name (``astage._core._walk``)."""
    parts = module.split(".")
    assert parts[0] == "astage", module
    if len(parts) == 1:
        return "public"
    if parts[1] in SHARED_MODULES:
        return "shared"
    return parts[1]


def module_name(path: Path, package_dir: Path = PACKAGE_DIR) -> str:
    relative = path.relative_to(package_dir.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> list[Path]:
    return sorted(PACKAGE_DIR.rglob("*.py"))


def imports_of(path: Path, package_dir: Path = PACKAGE_DIR) -> list[tuple[int, str]]:
    """Every module ``path`` imports, as (line, absolute dotted name); relative ones resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if node.module is None or (node.level and target == "astage"):
                # ``from .. import _torch``: each name may be a module of the package.
                found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
            else:
                found.append((node.lineno, target))
    return found


def _package_import_layer(imported: str) -> str | None:
    """The layer of an import of the package (None for an outside import)."""
    if imported != "astage" and not imported.startswith("astage."):
        return None
    parts = imported.split(".")
    if len(parts) > 1 and parts[1] not in SHARED_MODULES and parts[1] not in LAYERS:
        # ``from .. import Name`` of a public name re-exported by astage/__init__.py
        return "public"
    return layer_of(imported)


def violations(path: Path, package_dir: Path = PACKAGE_DIR) -> list[str]:
    """What ``path`` imports against the rules, one line each."""
    own = layer_of(module_name(path, package_dir))
    layer = LAYERS[own]
    allowed = layer.may_import | {own}
    found = []
    for line, imported in imports_of(path, package_dir):
        target = _package_import_layer(imported)
        if target is None:
            top = imported.split(".")[0]
            if top in layer.must_not_import:
                found.append(f"line {line}: imports {imported} ({own} must not import {top})")
        elif target not in allowed:
            found.append(f"line {line}: imports {imported} ({own} may not import {target})")
    return found


MODULES = package_modules()


def _id(path: Path) -> str:
    return str(path.relative_to(PACKAGE_DIR.parent))


def test_every_module_is_in_a_layer() -> None:
    unplaced = [_id(p) for p in MODULES if layer_of(module_name(p)) not in LAYERS]
    assert not unplaced, f"modules in no layer of LAYERS (add a row): {unplaced}"


@pytest.mark.parametrize("path", MODULES, ids=_id)
def test_imports_follow_the_layer_rules(path: Path) -> None:
    found = violations(path)
    assert not found, f"{_id(path)} breaks the layer rules:\n" + "\n".join(found)


# -- the rules catch what they should: checked on sources written for the purpose ----------------


def _write(tmp_path: Path, relative: str, source: str) -> Path:
    """A module placed as if it were ``astage/<relative>``, for the checker to read."""
    target = tmp_path / "astage" / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(source, encoding="utf-8")
    return target


@pytest.mark.parametrize(
    ("relative", "source", "expected"),
    [
        ("_core/_x.py", "import threading\n", "_core must not import threading"),
        ("_core/_x.py", "def f():\n    import anyio\n", "_core must not import anyio"),
        ("_core/_x.py", "from concurrent.futures import Future\n", "must not import concurrent"),
        ("_core/_x.py", "from .._devices import _pinning\n", "_core may not import _devices"),
        ("_core/_x.py", "from astage._drivers._base import X\n", "_core may not import _drivers"),
        ("_devices/_x.py", "from .._drivers._gc import g\n", "_devices may not import _drivers"),
        ("_drivers/_x.py", "from .._files._save import s\n", "_drivers may not import _files"),
        ("_files/_x.py", "from .._replication import _wire\n", "may not import _replication"),
        ("_replication/_x.py", "from ..compat import DefaultStager\n", "may not import compat"),
        ("compat/_x.py", "from ..lightning import W\n", "compat may not import lightning"),
        ("_torch.py", "from ._core._cache import BufferCache\n", "shared may not import _core"),
        ("_options.py", "import asyncio\n", "shared must not import asyncio"),
        ("_core/_x.py", "from .. import Stager\n", "_core may not import public"),
    ],
)
def test_a_violation_is_caught(tmp_path: Path, relative: str, source: str, expected: str) -> None:
    found = violations(_write(tmp_path, relative, source), tmp_path / "astage")
    assert any(expected in line for line in found), found


def test_allowed_imports_pass(tmp_path: Path) -> None:
    package_dir = tmp_path / "astage"
    source = "import torch\nfrom .. import _torch\nfrom .._errors import E\nfrom ._cache import C\n"
    assert violations(_write(tmp_path, "_core/_x.py", source), package_dir) == []
    source = (
        "import threading\nimport anyio\nfrom .._core._cache import C\nfrom .._devices import h\n"
    )
    assert violations(_write(tmp_path, "_drivers/_x.py", source), package_dir) == []


# -- torch's private APIs live in astage/_torch.py ------------------------------------------------

PRIVATE_TORCH_NAMES = frozenset(
    {
        "_cdata",
        "_foreach_copy_",
        "_indices",
        "_values",
        "_init_from_local_shards_and_global_metadata",
        "_local_tensor",
        "_make_subclass",
        "_neg_view",
        "_new_shared",
        "_process_group",
        "_spec",
        "_storage_Use_Count",
        "cudart",
        "is_traceable_wrapper_subclass",
    }
)
"""Private torch names reached as attributes (``x._cdata``), whatever the object."""


def _private_torch_module(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "torch" and any(part.startswith("_") for part in parts[1:])


def private_torch_uses(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [
                f"line {node.lineno}: import {a.name}"
                for a in node.names
                if _private_torch_module(a.name)
            ]
        elif isinstance(node, ast.ImportFrom) and not node.level:
            module = node.module or ""
            if _private_torch_module(module):
                found.append(f"line {node.lineno}: from {module} import ...")
        elif isinstance(node, ast.Attribute):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            torch_private = (
                isinstance(root, ast.Name)
                and root.id == "torch"
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
            )
            if torch_private or node.attr in PRIVATE_TORCH_NAMES:
                found.append(f"line {node.lineno}: .{node.attr}")
        elif isinstance(node, ast.keyword) and node.arg and node.arg.startswith("_"):
            # A private switch of a public constructor (DeviceMesh(..., _init_backend=False)).
            found.append(f"line {node.lineno}: keyword {node.arg}=")
    return found


@pytest.mark.parametrize("path", [p for p in MODULES if p.name != "_torch.py"], ids=_id)
def test_private_torch_apis_only_through_astage_torch(path: Path) -> None:
    found = private_torch_uses(path)
    assert not found, (
        f"{_id(path)} uses torch's private APIs; go through astage/_torch.py:\n" + "\n".join(found)
    )


@pytest.mark.parametrize(
    "source",
    [
        "import torch\nn = torch._C._storage_Use_Count(1)\n",
        "def f(s):\n    return s._cdata\n",
        "from torch.utils._python_dispatch import is_traceable_wrapper_subclass\n",
        "import torch.distributed._shard.sharded_tensor.api\n",
        "import torch\ntorch.cuda.cudart()\n",
        "def f(DeviceMesh):\n    return DeviceMesh('cpu', [0], _init_backend=False)\n",
    ],
)
def test_a_private_torch_use_is_caught(tmp_path: Path, source: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(source, encoding="utf-8")
    assert private_torch_uses(path)


def test_astage_torch_imports_no_distributed_or_cuda_state_at_import() -> None:
    # Reading the module must stay cheap: torch.distributed and CUDA only on use.
    source = (PACKAGE_DIR / "_torch.py").read_text(encoding="utf-8")
    top_level = ast.parse(source).body
    imported = [
        alias.name if isinstance(node, ast.Import) else node.module or ""
        for node in top_level
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert not [name for name in imported if name.startswith("torch.distributed")]
