"""A real systemd (PID 1 in systemd-nspawn): install both roles with `service install`, then
check boot start, crash restart, watchdog restart, drain on stop, status line, config errors.

Needs root, systemd-nspawn and a minimal Debian rootfs at $TB_ROOTFS (default
/var/tmp/tb-rootfs), which `.ci/run` builds once with debootstrap and caches. Traffic stays
inside the container (--private-network: loopback only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOTFS = Path(os.environ.get("TB_ROOTFS", "/var/tmp/tb-rootfs"))
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (systemd-nspawn)"),
    pytest.mark.skipif(
        shutil.which("systemd-nspawn") is None,
        reason="systemd-nspawn missing (apt-get install systemd-container)",
    ),
    pytest.mark.skipif(
        not (ROOTFS / "usr/lib/systemd/systemd").exists(),
        reason=f"no rootfs at {ROOTFS}: .ci/run builds it with debootstrap",
    ),
]

SETUP = r"""
set -e
python3 -m venv /opt/trio-bridge
/opt/trio-bridge/bin/pip install -q --no-index --find-links /opt/wheels trio-bridge
mkdir -p /etc/trio-bridge
printf '[broker]\nlisten = "127.0.0.1:8080"\n[limits]\nshutdown_grace = "20s"\n' \
    > /etc/trio-bridge/broker.toml
printf '[connector]\nbroker_urls = ["ws://127.0.0.1:8080/_bridge/relay"]\n%s\n%s\n' \
    'local_url = "http://127.0.0.1:11434"' '[limits]
shutdown_grace = "20s"' > /etc/trio-bridge/connector.toml
/opt/trio-bridge/bin/trio-bridge tokens add box -c /etc/trio-bridge/broker.toml \
    > /etc/trio-bridge/connector.token 2>/dev/null
chmod 600 /etc/trio-bridge/connector.token
/opt/trio-bridge/bin/trio-bridge keys add tester -c /etc/trio-bridge/connector.toml \
    > /root/key 2>/dev/null
cat > /etc/systemd/system/tb-testmodel.service <<'X'
[Unit]
Description=trio-bridge test model (stands in for the LLM)
[Service]
ExecStart=/opt/trio-bridge/bin/python -c "import trio; from trio_bridge import TestModel; trio.run(lambda: TestModel(token_delay=0.05).serve('127.0.0.1:11434'))"
Restart=always
[Install]
WantedBy=multi-user.target
X
ln -sf /etc/systemd/system/tb-testmodel.service \
    /etc/systemd/system/multi-user.target.wants/tb-testmodel.service
"""


class Box:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None
        self.leader = 0

    def boot(self) -> None:
        self.proc = subprocess.Popen(
            [
                "systemd-nspawn",
                "-q",
                "-D",
                str(self.root),
                "-b",
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--console=passive",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["pgrep", "-P", str(self.proc.pid), "-x", "systemd"], capture_output=True, text=True
            )
            if r.stdout.strip():
                self.leader = int(r.stdout.split()[0])
                state = self.sh("systemctl is-system-running", check=False).strip()
                if state in ("running", "degraded"):
                    return
            time.sleep(0.1)
        raise AssertionError("container did not boot")

    def sh(self, cmd: str, check: bool = True, timeout: float = 60) -> str:
        r = subprocess.run(
            ["nsenter", "-t", str(self.leader), "-a", "bash", "-c", cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{cmd!r} failed: {r.stderr}")
        return r.stdout

    def poweroff(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.sh("systemctl poweroff", check=False)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def wait_active(self, unit: str, not_pid: str = "", timeout: float = 15) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            pid = self.sh(f"systemctl show -p MainPID --value {unit}").strip()
            if self.sh(
                f"systemctl is-active {unit}", check=False
            ).strip() == "active" and pid not in ("0", not_pid):
                return time.monotonic() - t0
            time.sleep(0.1)
        raise AssertionError(f"{unit} not active again within {timeout}s")


@pytest.fixture
def box() -> Iterator[Box]:
    tmp = Path(tempfile.mkdtemp(prefix="tb-nspawn-", dir="/var/tmp"))
    root = tmp / "rootfs"
    try:
        subprocess.run(["cp", "-a", str(ROOTFS), str(root)], check=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "wheel",
                "-q",
                "--wheel-dir",
                str(root / "opt/wheels"),
                str(REPO),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        (root / "root/setup.sh").write_text(SETUP)
        subprocess.run(
            [
                "systemd-nspawn",
                "-q",
                "-D",
                str(root),
                "--register=no",
                "--keep-unit",
                "--private-network",
                "--pipe",
                "bash",
                "/root/setup.sh",
            ],
            check=True,
            capture_output=True,
            timeout=300,
        )
        b = Box(root)
        yield b
        b.poweroff()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_real_systemd_runs_both_roles_as_services(box: Box) -> None:
    box.boot()
    for role in ("broker", "connector"):
        box.sh(
            f"/opt/trio-bridge/bin/trio-bridge service install {role} "
            f"-c /etc/trio-bridge/{role}.toml"
        )
    key = box.sh("cat /root/key").strip()
    chat = (
        "curl -sS http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: "
        f"application/json' -H 'Authorization: Bearer {key}' -d "
    )
    box.wait_active("trio-bridge-connector")
    out = box.sh(chat + """'{"model":"m","messages":[{"role":"user","content":"count to 3"}]}'""")
    assert '"1 2 3"' in out
    # the sandboxed connector keeps its usage store beside its config (written every 2 s)
    deadline = time.monotonic() + 10
    while True:
        usage = box.sh(
            "/opt/trio-bridge/bin/trio-bridge usage --format csv -c /etc/trio-bridge/connector.toml"
        )
        if usage.count("\n") >= 2 or time.monotonic() > deadline:  # a header and a row
            break
        time.sleep(0.3)
    assert usage.count("\n") >= 2, usage

    # both units come up at boot, without a manual start
    box.poweroff()
    box.boot()
    box.wait_active("trio-bridge-broker")
    box.wait_active("trio-bridge-connector")
    # the test model starts beside it: the connector may see the LLM down for a moment
    deadline = time.monotonic() + 15
    while True:
        status = box.sh("systemctl status trio-bridge-connector --no-pager", check=False)
        if 'Status: "relays 1/1 up; LLM up' in status or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    assert 'Status: "relays 1/1 up; LLM up' in status, status

    # kill -9: back within 10 s
    pid = box.sh("systemctl show -p MainPID --value trio-bridge-broker").strip()
    box.sh(f"kill -9 {pid}")
    assert box.wait_active("trio-bridge-broker", not_pid=pid) < 10

    # a wedged event loop (SIGSTOP): the watchdog restarts it within 10 s
    pid = box.sh("systemctl show -p MainPID --value trio-bridge-connector").strip()
    box.sh(f"kill -STOP {pid}")
    assert box.wait_active("trio-bridge-connector", not_pid=pid) < 10

    # systemctl stop during a stream: the stream completes, then the unit stops
    out = box.sh(
        f"(sleep 0.7; systemctl stop trio-bridge-connector) & {chat.replace('-sS', '-sSN')}"
        """'{"model":"m","stream":true,"messages":[{"role":"user","content":"count to 40"}]}'"""
        "; wait",
        timeout=60,
    )
    assert '" 40"' in out and out.endswith("data: [DONE]\n\n")
    assert box.sh("systemctl is-active trio-bridge-connector", check=False).strip() == "inactive"

    # a config error: the unit fails once, with the error in the journal, no restart loop
    box.sh("echo 'nonsense = 1' >> /etc/trio-bridge/connector.toml")
    box.sh("systemctl start trio-bridge-connector", check=False)
    time.sleep(3)
    show = box.sh(
        "systemctl show -p ActiveState -p NRestarts -p ExecMainStatus trio-bridge-connector"
    )
    assert "ActiveState=failed" in show and "NRestarts=0" in show
    assert "ExecMainStatus=2" in show
    assert "config error" in box.sh("journalctl -u trio-bridge-connector --no-pager")
