"""Rules on time in the package's source, checked on its syntax tree.

- Every shielded cancel scope has a deadline: a shield without one turns a peer that stops
  reading (a TLS close, a WebSocket close handshake) into a task that never ends, and nothing
  outside can cut it short. Written as ``trio.move_on_after(s, shield=True)`` (or
  ``fail_after``, or ``CancelScope(deadline=..., shield=True)``); never ``cs.shield = True``
  afterwards, where the rule cannot be seen.
- Durations, windows and deadlines run on trio's clock (``trio.current_time()``, ``sleep``,
  ``move_on_after``), which tests control (the autojump clock). Wall time is for timestamps
  shown to people only: such a line says so with a ``# wall clock`` comment.

``FOLDERS``: the parts of the package held to these rules (all of it, with its base).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parent.parent / "trio_bridge"
FOLDERS = ("relay", "http", "admin", "accounts", "broker", "connector", "cli", "testing")

#: bounded scopes: (function name, how its deadline is given)
BOUNDED = {"move_on_after", "move_on_at", "fail_after", "fail_at"}
#: monotonic clocks outside trio: never (trio.current_time() is the one tests control)
FOREIGN_CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns"}
#: wall time: only on a line marked ``# wall clock``
WALL_CLOCKS = {("time", "time"), ("time", "time_ns"), ("datetime", "now"), ("datetime", "utcnow")}


def sources() -> list[Path]:
    """The folders' modules and the package's own top-level modules (the base)."""
    inside = [p for folder in FOLDERS for p in (PACKAGE / folder).rglob("*.py")]
    return sorted([*inside, *PACKAGE.glob("*.py")])


def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


def _is_true(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unbounded_shields(source: str) -> list[tuple[int, str]]:
    """(line, what) for each shield without a deadline in ``source``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Attribute) and target.attr == "shield":
                    found.append((node.lineno, "shield set after the scope was made"))
        if not isinstance(node, ast.Call):
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        if "shield" not in keywords or not _is_true(keywords["shield"]):
            continue
        name = _name(node.func)
        if name in BOUNDED:
            continue
        if name == "CancelScope" and "deadline" in keywords:
            continue
        found.append((node.lineno, f"{name}(shield=True) without a deadline"))
    return sorted(found)


def clock_misuse(source: str) -> list[tuple[int, str]]:
    """(line, what) for each clock read that is not trio's (wall time unmarked)."""
    lines = source.splitlines()
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = _name(node.func.value)
        attr = node.func.attr
        if owner == "time" and attr in FOREIGN_CLOCKS:
            found.append((node.lineno, f"time.{attr}(): use trio.current_time()"))
        elif (owner, attr) in WALL_CLOCKS and "# wall clock" not in lines[node.lineno - 1]:
            found.append((node.lineno, f"{owner}.{attr}() without a '# wall clock' comment"))
    return sorted(found)


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_shielded_scope_has_a_deadline(path: Path) -> None:
    assert unbounded_shields(path.read_text()) == []


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_durations_run_on_trios_clock_and_wall_time_is_only_shown(path: Path) -> None:
    assert clock_misuse(path.read_text()) == []


def test_the_rules_see_what_they_forbid() -> None:
    assert unbounded_shields(
        "with trio.CancelScope(shield=True):\n    pass\n"
        "with trio.move_on_after(1) as cs:\n    cs.shield = True\n"
    ) == [
        (1, "CancelScope(shield=True) without a deadline"),
        (4, "shield set after the scope was made"),
    ]
    assert (
        unbounded_shields(
            "with trio.move_on_after(1, shield=True):\n    pass\n"
            "with trio.CancelScope(deadline=d, shield=True):\n    pass\n"
        )
        == []
    )
    assert clock_misuse(
        "a = time.monotonic()\nb = time.time()\nc = time.time()  # wall clock: shown\n"
    ) == [(1, "time.monotonic(): use trio.current_time()"),
          (2, "time.time() without a '# wall clock' comment")]  # fmt: skip
