"""A real OpenID provider for the portal's tests: the npm package ``oidc-provider`` (certified),
run by node from ``tests/oidc/provider.mjs``, installed (``npm ci``, pinned by
``tests/oidc/package-lock.json``) into a cache outside the clone, ``$TB_OIDC_DIR`` or
``/var/tmp/tb-oidc`` (``.ci/run`` installs it first; a test installs it if it is missing).
Tests skip, saying so, only where node or npm is missing."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from joserfc.jwk import RSAKey

HERE = Path(__file__).resolve().parent / "oidc"
CACHE = Path(os.environ.get("TB_OIDC_DIR", "/var/tmp/tb-oidc"))
NODE, NPM = shutil.which("node"), shutil.which("npm")
CLIENT_ID = "trio-bridge-portal"
CLIENT_SECRET = "portal-test-secret-0123456789"


def installed_script() -> Path:
    """The provider's script in the cache, its package installed there (once per lock file)."""
    if NODE is None or NPM is None:
        pytest.skip("node and npm are needed for the OpenID provider (apt-get install nodejs npm)")
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = (HERE / "package-lock.json").read_bytes()
    with (CACHE / ".lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)  # pytest-xdist workers: one installs, others wait
        done = CACHE / ".installed-lock.json"
        if not done.exists() or done.read_bytes() != lock:
            shutil.copy(HERE / "package.json", CACHE / "package.json")
            shutil.copy(HERE / "package-lock.json", CACHE / "package-lock.json")
            subprocess.run(
                [NPM, "ci", "--no-audit", "--no-fund", "--silent"], cwd=CACHE, check=True
            )
            done.write_bytes(lock)
        script = CACHE / "provider.mjs"
        source = (HERE / "provider.mjs").read_bytes()
        if not script.exists() or script.read_bytes() != source:
            tmp = CACHE / f".provider.{os.getpid()}.mjs"
            tmp.write_bytes(source)
            tmp.replace(script)
    return script


def signing_key(kid: str) -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": kid, "use": "sig", "alg": "RS256"})


@asynccontextmanager
async def run_provider(
    *,
    redirect_uris: list[str],
    users: dict[str, dict[str, Any]],
    keys: list[RSAKey],
    port: int = 0,
) -> AsyncIterator[str]:
    """Start the provider on 127.0.0.1 (``port``; 0: a free one) with one confidential client
    (``CLIENT_ID``/``CLIENT_SECRET``, PKCE) and ``users`` (login → claims); its issuer URL."""
    script = installed_script()
    conf = {
        "port": port,
        "clients": [
            {
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "redirect_uris": redirect_uris,
                "grant_types": ["authorization_code"],
                "response_types": ["code"],
                "token_endpoint_auth_method": "client_secret_basic",
            }
        ],
        "jwks": {"keys": [k.as_dict(private=True) for k in keys]},
        "users": users,
    }
    env = {**os.environ, "TB_OIDC": json.dumps(conf), "NODE_ENV": "test"}
    proc = await trio.lowlevel.open_process(
        [NODE or "node", str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        cwd=str(script.parent),
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = b""
        with trio.fail_after(20):
            while not line.endswith(b"\n"):
                chunk = await proc.stdout.receive_some(4096)
                if not chunk:
                    raise RuntimeError("the OpenID provider exited before it listened")
                line += chunk
        yield json.loads(line)["issuer"]
    finally:
        with trio.move_on_after(5, shield=True):
            await proc.stdin.aclose()
            await proc.wait()
        if proc.returncode is None:
            proc.kill()
            with trio.move_on_after(2, shield=True):
                await proc.wait()
