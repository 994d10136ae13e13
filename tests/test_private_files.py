"""Every file the bridge creates is readable by its user alone (0600), whatever the umask:
usage counts with SQLite's -wal and -shm files, keys, tokens (issue 23 item 7)."""

from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import trio
from netutil import free_port

from trio_bridge.accounts._usagestore import UsageStore

PY = sys.executable


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(directory: Path, skip: tuple[str, ...] = ()) -> dict[str, int]:
    return {
        p.name: stat.S_IMODE(p.stat().st_mode)
        for p in directory.iterdir()
        if p.is_file() and p.name not in skip
    }


def test_a_new_usage_store_and_its_wal_and_shm_files_are_private(tmp_path: Path) -> None:
    with umask(0o022):
        store = UsageStore(tmp_path / "usage.sqlite3")
        store.record("k1", "m", prompt=1, completion=2, estimated=False, error=False, now=0.0)
        trio.run(store.flush)
        found = modes(tmp_path)
        store.close()
    assert {"usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"} <= set(found)
    assert found == dict.fromkeys(found, 0o600)


def test_usage_files_an_older_release_left_readable_are_made_private(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    with umask(0o022):
        old = sqlite3.connect(path)  # as it was: 0644, then WAL files copying that mode
        old.execute("PRAGMA journal_mode=WAL")
        old.execute("CREATE TABLE t (x)")
        old.execute("INSERT INTO t VALUES (1)")
        old.commit()
        assert modes(tmp_path)["usage.sqlite3-wal"] == 0o644
        store = UsageStore(path)
    found = modes(tmp_path)
    assert {"usage.sqlite3", "usage.sqlite3-wal", "usage.sqlite3-shm"} <= set(found)
    assert found == dict.fromkeys(found, 0o600)
    store.close()
    old.close()


def test_every_file_the_roles_create_is_private_under_umask_022(tmp_path: Path) -> None:
    """A first start as a deployment does it (CLI, processes, umask 022): the keys and tokens
    files, and the usage file with its -wal and -shm while the connector runs."""
    public, model_port = free_port(), free_port()
    (tmp_path / "b.toml").write_text(
        f'[broker]\nlisten = "127.0.0.1:{public}"\nadmin_listen = ""\n'
    )
    (tmp_path / "c.toml").write_text(
        f'[connector]\nbroker_urls = ["ws://127.0.0.1:{public}/_bridge/relay"]\n'
        f'local_url = "http://127.0.0.1:{model_port}"\nadmin_listen = ""\n'
        'usage_flush_interval = "200ms"\n'
    )
    ours = ("b.toml", "c.toml", "connector.token")  # written by this test, not by the bridge

    def cli(*args: str) -> str:
        return subprocess.run(
            [PY, "-m", "trio_bridge", *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            umask=0o022,
        ).stdout

    token = cli("tokens", "add", "home", "-c", str(tmp_path / "b.toml")).strip()
    (tmp_path / "connector.token").write_text(token)
    os.chmod(tmp_path / "connector.token", 0o600)
    key = cli("keys", "add", "alice", "-c", str(tmp_path / "c.toml")).strip()
    procs = [
        subprocess.Popen(
            [PY, "-m", "trio_bridge", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            umask=0o022,
        )
        for args in (
            ["test-model", "--listen", f"127.0.0.1:{model_port}", "--token-delay", "0"],
            ["broker", "-c", str(tmp_path / "b.toml")],
            ["connector", "-c", str(tmp_path / "c.toml")],
        )
    ]
    try:
        deadline = time.monotonic() + 20
        auth = {"Authorization": f"Bearer {key}"}
        body = {"model": "m", "messages": [{"role": "user", "content": "count to 3"}]}
        while True:
            try:
                r = httpx.post(
                    f"http://127.0.0.1:{public}/v1/chat/completions", json=body, headers=auth
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the bridge did not come up"
            time.sleep(0.1)
        time.sleep(0.8)  # a few flushes: the usage file, its WAL and shared memory exist
        found = modes(tmp_path, skip=ours)
        if os.path.exists(f"/proc/{procs[1].pid}/status"):  # Linux: the roles' own umask
            for p in procs[1:]:
                status = Path(f"/proc/{p.pid}/status").read_text()
                assert "Umask:\t0077" in status, status
    finally:
        for p in procs:
            p.kill()
            p.wait()
    expected = {"tokens.toml", "keys.toml", "usage.sqlite3", "usage.sqlite3-wal"}
    assert expected | {"usage.sqlite3-shm"} <= set(found), found
    assert found == dict.fromkeys(found, 0o600), found
