"""The portal's operator commands on a pool: `trio-bridge users block` revokes the user's key
where the pool's keys live (the store), not in a keys file no connector reads."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from redisserver import RedisServer, needs_redis

from trio_bridge.accounts._users import ACTIVE, UserStore
from trio_bridge.cli._cli import main

pytestmark = needs_redis


def test_users_block_revokes_the_pool_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = RedisServer(tmp_path)
    trio.run(server.start)
    try:
        cfg = tmp_path / "connector.toml"
        cfg.write_text(
            f'[connector]\nstore = "{server.url}"\nusage_file = ""\n'
            '[portal]\nusers_file = "portal.sqlite3"\n'
        )
        user, _ = UserStore(tmp_path / "portal.sqlite3").sign_in(
            "sub-1", "ann@example.com", "Ann", (), ACTIVE
        )
        assert main(["keys", "add", user.key_name, "-c", str(cfg)]) == 0
        capsys.readouterr()
        assert main(["users", "block", "ann@example.com", "-c", str(cfg)]) == 0
        assert "revoked" in capsys.readouterr().out
        assert main(["keys", "list", "-c", str(cfg)]) == 0
        [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith(user.key_name)]
        assert "revoked" in line
        assert not (tmp_path / "keys.toml").exists()  # no stray keys file
    finally:
        trio.run(server.kill)
