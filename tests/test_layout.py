"""The package's layout is its architecture: folders in layers, each importing only from its
own folder and from the layers below; the sans-IO modules import no I/O at all."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "trio_bridge"

#: a folder's layer; the package's own private top-level modules are the base (0), its public
#: top-level modules (``__init__``, ``testing``, ``__main__``) the top
LAYERS = {
    "": 0,
    "relay": 1,
    "http": 1,
    "accounts": 2,
    "admin": 3,
    "broker": 4,
    "connector": 4,
    "cli": 5,
    "testing": 6,
    "top": 6,
}
#: pure code over bytes and values: no trio, no sockets, no threads, no HTTP client
SANS_IO = [
    "relay/_frames.py",
    "relay/_heads.py",
    "relay/_protocol.py",
    "http/_messages.py",
    "http/_target.py",  # httpx.URL only: a value, no I/O
    "accounts/_limits.py",
    "accounts/_usage.py",
]
IO_MODULES = {"trio", "socket", "select", "ssl", "threading", "httpx", "sqlite3", "asyncio"}


def _folder(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    if len(rel.parts) == 1:
        return "" if rel.name.startswith("_") and not rel.name.startswith("__") else "top"
    return rel.parts[0]


def _imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}: relative import (the package imports absolutely)"
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names]
    return found


def _target_folder(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != "trio_bridge":
        return None
    if len(parts) == 1:
        return "top"
    return parts[1] if parts[1] in LAYERS else ("" if parts[1].startswith("_") else "top")


def test_every_module_imports_only_its_folder_and_the_layers_below() -> None:
    wrong = []
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        here = _folder(path)
        for module in _imports(path):
            there = _target_folder(module)
            if there is None or there == here:
                continue
            if LAYERS[there] >= LAYERS[here]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert wrong == []


def test_the_sans_io_modules_import_no_io() -> None:
    for rel in SANS_IO:
        used = {m.split(".")[0] for m in _imports(PACKAGE / rel)}
        allowed = {"httpx"} if rel == "http/_target.py" else set()
        assert used & IO_MODULES <= allowed, rel
