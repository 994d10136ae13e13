"""A real ``redis-server`` (Debian's package) for a test: on 127.0.0.1, a free port, in the
test's own directory, no persistence; with a password or TLS (a self-signed certificate made
by ``openssl``) when asked. It can be killed and started again on the same port."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import trio
from netutil import free_port

REDIS = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(
    REDIS is None, reason="redis-server missing (Debian: apt-get install redis-server)"
)


async def self_signed(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) for 127.0.0.1 and localhost, made by openssl."""
    cert, key = directory / "redis-cert.pem", directory / "redis-key.pem"
    await trio.run_process(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        capture_stdout=True,
        capture_stderr=True,
    )  # fmt: skip
    return cert, key


class RedisServer:
    """One redis-server process at a time, always on the same port."""

    def __init__(self, directory: Path, *, password: str = "", tls: bool = False) -> None:
        self.dir = directory
        self.password = password
        self.tls = tls
        self.port = free_port()
        self.cert: Path | None = None
        self.process: trio.Process | None = None

    @property
    def url(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        args = [str(REDIS), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", str(self.dir), "--daemonize", "no"]  # fmt: skip
        if self.tls:
            if self.cert is None:
                self.cert, self.key = await self_signed(self.dir)
            args += ["--port", "0", "--tls-port", str(self.port),
                     "--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key),
                     "--tls-ca-cert-file", str(self.cert), "--tls-auth-clients", "no"]  # fmt: skip
        else:
            args += ["--port", str(self.port)]
        if self.password:
            args += ["--requirepass", self.password]
        self.process = await trio.lowlevel.open_process(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        with trio.fail_after(10):
            while True:
                try:
                    stream = await trio.open_tcp_stream("127.0.0.1", self.port)
                except OSError:
                    await trio.sleep(0.02)
                    continue
                await stream.aclose()
                return

    async def kill(self) -> None:
        """SIGKILL: the store vanishes with everything in it (no persistence)."""
        if self.process is not None:
            self.process.kill()
            await self.process.wait()
            self.process = None
