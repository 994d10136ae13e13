"""Regenerate the example service files in packaging/ (tests check they are current):

    python packaging/generate.py
"""

from __future__ import annotations

from pathlib import Path

from trio_bridge.cli._service import render_plist, render_unit

HERE = Path(__file__).resolve().parent
PYTHON = "/opt/trio-bridge/bin/python"  # e.g. `pipx install trio-bridge` puts a venv here


def files() -> dict[Path, bytes]:
    out = {}
    for role in ("broker", "connector"):
        out[HERE / "systemd" / f"trio-bridge-{role}.service"] = render_unit(
            role, f"/etc/trio-bridge/{role}.toml", python=PYTHON).encode()
        out[HERE / "systemd-user" / f"trio-bridge-{role}.service"] = render_unit(
            role, f"%h/.config/trio-bridge/{role}.toml", user=True, python=PYTHON).encode()
        out[HERE / "launchd" / f"org.trio-bridge.{role}.plist"] = render_plist(
            role, f"/usr/local/etc/trio-bridge/{role}.toml", user=True,
            python="/usr/local/opt/trio-bridge/bin/python")
    return out


if __name__ == "__main__":
    for path, data in files().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        print(path.relative_to(HERE.parent))
