"""Services: sd_notify, graceful drain of real processes, unit files and plists, `service`."""

from __future__ import annotations

import itertools
import json
import os
import plistlib
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from netutil import free_port, wait_port

sys.path.insert(0, str(Path(__file__).parent.parent / "packaging"))

from trio_bridge._notify import Notifier
from trio_bridge.cli._service import render_plist, render_unit

PY = sys.executable


# -- unit files and plists --------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
@pytest.mark.parametrize("role", ["broker", "connector"])
@pytest.mark.parametrize("user", [False, True])
def test_units_pass_systemd_analyze_verify(tmp_path: Path, role: str, user: bool) -> None:
    unit = tmp_path / f"trio-bridge-{role}.service"
    unit.write_text(render_unit(role, str(tmp_path / "bridge.toml"), user=user))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
    if not user:
        r = subprocess.run(
            ["systemd-analyze", "security", "--offline=yes", "--threshold=30", str(unit)],
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout[-500:]


def test_unit_promises() -> None:
    unit = render_unit("connector", "/etc/trio-bridge/connector.toml", shutdown_grace=60)
    lines = set(unit.splitlines())
    for required in (
        "Type=notify",
        "Restart=always",
        "RestartSec=1",
        "WatchdogSec=5",
        "KillMode=mixed",
        "RestartPreventExitStatus=2",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ):
        assert required in lines
    stop = next(int(x.split("=")[1]) for x in lines if x.startswith("TimeoutStopSec="))
    assert stop > 60 + 6  # longer than shutdown_grace plus the hard-stop backstop
    assert f"ExecStart={PY} -m trio_bridge connector -c /etc/trio-bridge/connector.toml" in lines


@pytest.mark.parametrize("role", ["broker", "connector"])
def test_plists_round_trip_with_the_required_keys(role: str) -> None:
    doc = plistlib.loads(render_plist(role, "/usr/local/etc/trio-bridge/x.toml"))
    assert plistlib.loads(plistlib.dumps(doc)) == doc
    assert doc["Label"] == f"org.trio-bridge.{role}"
    assert doc["RunAtLoad"] is True
    assert doc["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(doc["ThrottleInterval"], int) and doc["ThrottleInterval"] <= 9
    assert os.path.isabs(doc["ProgramArguments"][0])
    assert doc["ProgramArguments"][1:4] == ["-m", "trio_bridge", role]
    assert doc["StandardErrorPath"].endswith(f"trio-bridge-{role}.log")


def test_packaging_files_are_current() -> None:
    import generate

    for path, data in generate.files().items():
        assert path.read_bytes() == data, f"run: python packaging/generate.py ({path.name})"


def test_service_print_equals_what_install_writes(tmp_path: Path) -> None:
    cfg = tmp_path / "connector.toml"
    cfg.write_text("[connector]\nmax_concurrent = 4\n")
    printed = subprocess.run(
        [PY, "-m", "trio_bridge", "service", "print", "connector", "-c", str(cfg)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    root = tmp_path / "root"
    r = subprocess.run(
        [
            PY,
            "-m",
            "trio_bridge",
            "service",
            "install",
            "connector",
            "-c",
            str(cfg),
            "--root",
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    unit = root / "etc/systemd/system/trio-bridge-connector.service"
    assert unit.read_text() == printed
    assert "systemctl enable --now trio-bridge-connector.service" in r.stderr  # what it runs
    r = subprocess.run(
        [PY, "-m", "trio_bridge", "service", "uninstall", "connector", "--root", str(root)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and not unit.exists()


def test_service_install_refuses_a_broken_config_with_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "broker.toml"
    cfg.write_text('[broker]\nlisten = "nowhere"\n')
    r = subprocess.run(
        [
            PY,
            "-m",
            "trio_bridge",
            "service",
            "install",
            "broker",
            "-c",
            str(cfg),
            "--root",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "broker.listen" in r.stderr


# -- sd_notify -------------------------------------------------------------------------------


def test_notifier_is_silent_without_systemd() -> None:
    n = Notifier({})
    assert not n.enabled
    n.ready("x")  # no error, nothing sent


class Bench:
    """A broker, a connector and a test model as real processes, with sd_notify sockets."""

    def __init__(self, tmp: Path, grace: str = "30s", relay: str = "") -> None:
        self.tmp = tmp
        self.port, self.model_port = free_port(), free_port()
        (tmp / "broker.toml").write_text(
            f'[broker]\nlisten = "127.0.0.1:{self.port}"\nadmin_listen = ""\n'
            f'[limits]\nshutdown_grace = "{grace}"\n{relay}'
        )
        (tmp / "connector.toml").write_text(
            f'[connector]\nbroker_urls = ["ws://127.0.0.1:{self.port}/_bridge/relay"]\n'
            f'local_url = "http://127.0.0.1:{self.model_port}"\nadmin_listen = ""\n'
            f'[limits]\nshutdown_grace = "{grace}"\n{relay}'
        )
        run = [PY, "-m", "trio_bridge"]
        token = subprocess.run(
            [*run, "tokens", "add", "t", "-c", str(tmp / "broker.toml")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        (tmp / "connector.token").write_text(token)
        (tmp / "connector.token").chmod(0o600)
        self.key = subprocess.run(
            [*run, "keys", "add", "k", "-c", str(tmp / "connector.toml")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        self.socks: dict[str, socket.socket] = {}
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.procs["model"] = subprocess.Popen(
            [
                PY,
                "-c",
                (
                    "import trio; from trio_bridge import TestModel; "
                    "trio.run(lambda: TestModel(token_delay=0.05)"
                    f".serve('127.0.0.1:{self.model_port}'))"
                ),
            ]
        )
        for role in ("broker", "connector"):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(tmp / f"{role}.notify"))
            sock.settimeout(0.1)
            self.socks[role] = sock
            env = {
                **os.environ,
                "NOTIFY_SOCKET": str(tmp / f"{role}.notify"),
                "WATCHDOG_USEC": "400000",
            }
            self.procs[role] = subprocess.Popen(
                [*run, role, "-c", str(tmp / f"{role}.toml")],
                env=env,
                stderr=(tmp / f"{role}.log").open("w"),
                text=True,
            )
            if role == "broker":  # up before the connector dials (no backoff in the wait)
                wait_port(self.port, 30)
        self.messages: dict[str, list[tuple[float, str]]] = {"broker": [], "connector": []}

    def collect(self, role: str, seconds: float) -> list[tuple[float, str]]:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data = self.socks[role].recv(4096).decode()
            except TimeoutError:
                continue
            for line in data.splitlines():
                self.messages[role].append((time.monotonic(), line))
        return self.messages[role]

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if (
                    httpx.get(self.url("/v1/models"), headers=self.auth, timeout=2).status_code
                    == 200
                ):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise AssertionError("bridge did not come up")

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            p.wait()
        for s in self.socks.values():
            s.close()


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Bench]:
    b = Bench(tmp_path)
    try:
        yield b
    finally:
        b.close()


def test_sd_notify_ready_watchdog_status_and_stopping(bench: Bench) -> None:
    bench.wait_ready()
    for role in ("broker", "connector"):
        msgs = bench.collect(role, 1.5)
        lines = [m for _, m in msgs]
        assert "READY=1" in lines
        beats = [t for t, m in msgs if m == "WATCHDOG=1"]
        assert len(beats) >= 4  # every WATCHDOG_USEC / 2 = 0.2 s
        gaps = [b - a for a, b in itertools.pairwise(beats)]
        assert max(gaps) < 1.5  # 0.2 s cadence; generous for a busy machine
        assert any(m.startswith("STATUS=") for m in lines)
    assert any("relays 1/1 up; LLM up" in m for _, m in bench.messages["connector"])
    bench.procs["connector"].send_signal(signal.SIGTERM)
    lines = [m for _, m in bench.collect("connector", 1.0)]
    assert "STOPPING=1" in lines
    assert bench.procs["connector"].wait(10) == 0


def test_sigterm_lets_an_in_flight_stream_finish_and_refuses_new_requests(bench: Bench) -> None:
    bench.wait_ready()
    body = {
        "model": "m",
        "stream": True,
        "messages": [{"role": "user", "content": "count to 40"}],
    }  # ~2 s at 50 ms/token
    with httpx.stream(
        "POST", bench.url("/v1/chat/completions"), json=body, headers=bench.auth, timeout=30
    ) as r:
        it = r.iter_raw()
        first = next(it)
        bench.procs["broker"].send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.get(bench.url("/v1/models"), headers=bench.auth, timeout=5)
        rest = b"".join(it)
    text = (first + rest).decode()
    assert text.endswith("data: [DONE]\n\n") and '" 40"' in text
    assert late.status_code == 503 and late.headers["retry-after"]
    assert bench.procs["broker"].wait(10) == 0


def test_past_the_grace_period_streams_are_aborted_and_the_process_exits(tmp_path: Path) -> None:
    b = Bench(tmp_path, grace="1s")
    try:
        b.wait_ready()
        body = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "count to 1000"}],
        }
        t0 = time.monotonic()
        with (
            pytest.raises(httpx.HTTPError),
            httpx.stream(  # aborted, never "complete"
                "POST", b.url("/v1/chat/completions"), json=body, headers=b.auth, timeout=30
            ) as r,
        ):
            it = r.iter_raw()
            next(it)
            b.procs["connector"].send_signal(signal.SIGTERM)
            for _ in it:
                pass
        assert time.monotonic() - t0 < 5
        assert b.procs["connector"].wait(10) == 0
    finally:
        b.close()


def test_a_stalled_reader_does_not_keep_the_broker_alive(tmp_path: Path) -> None:
    b = Bench(tmp_path, grace="1s")
    try:
        b.wait_ready()
        stalled = socket.create_connection(("127.0.0.1", b.port))
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        req = {
            "model": "m",
            "stream": True,
            "messages": [{"role": "user", "content": "count to 100000"}],
        }
        payload = json.dumps(req).encode()
        stalled.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {b.key}\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(1.0)  # it never reads a byte
        t0 = time.monotonic()
        b.procs["broker"].send_signal(signal.SIGTERM)
        assert b.procs["broker"].wait(15) == 0
        assert time.monotonic() - t0 < 1 + 6 + 2  # grace + backstop, with margin
        stalled.close()
    finally:
        b.close()


def test_the_units_documentation_points_at_a_file_that_exists() -> None:
    from urllib.parse import unquote, urlsplit

    unit = render_unit("broker", "/etc/trio-bridge/broker.toml")
    [doc] = [
        line.split("=", 1)[1] for line in unit.splitlines() if line.startswith("Documentation=")
    ]
    url = urlsplit(doc)
    assert url.scheme == "file"
    readme = Path(unquote(url.path))
    assert readme.is_file() and "trio-bridge" in readme.read_text()
