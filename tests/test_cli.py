"""The command line as users run it: real subprocesses, real sockets."""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netutil import free_port, wait_port

PY = sys.executable


def run(*args: str, cwd: Path | None = None, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "trio_bridge", *args], capture_output=True, text=True, cwd=cwd, timeout=60, **kw
    )  # type: ignore[call-overload, no-any-return]


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float = 20) -> str:
    assert proc.stdout is not None
    out = ""
    deadline = time.monotonic() + timeout
    while marker not in out:
        if time.monotonic() > deadline or proc.poll() is not None:
            raise AssertionError(f"no {marker!r} in output: {out!r}")
        out += proc.stdout.readline()
    return out


@pytest.fixture
def demo() -> Iterator[tuple[subprocess.Popen[str], str]]:
    proc = subprocess.Popen(
        [PY, "-m", "trio_bridge", "demo", "--port", "0", "--local-url", "http://127.0.0.1:9"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        yield proc, read_until(proc, "Press Ctrl-C")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_demo_prints_commands_that_work_as_printed(
    demo: tuple[subprocess.Popen[str], str],
) -> None:
    proc, out = demo
    assert "TEST MODEL" in out
    curls = [
        line.strip()
        for line in out.splitlines()
        if line.strip().startswith("curl ") and "/v1/chat/completions" in line
    ]
    assert len(curls) == 2
    plain = subprocess.run(["bash", "-c", curls[0]], capture_output=True, text=True, timeout=30)
    assert plain.returncode == 0, plain.stderr
    doc = json.loads(plain.stdout)
    assert "Say hello" in doc["choices"][0]["message"]["content"]
    streamed = subprocess.run(["bash", "-c", curls[1]], capture_output=True, text=True, timeout=30)
    events = [line for line in streamed.stdout.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]" and len(events) > 20
    # the SDK line runs as printed (the openai SDK is installed here: the demo then names the
    # interpreter that has it)
    [py] = [line.strip() for line in out.splitlines() if ' -c "from openai' in line]
    assert py.startswith(PY)
    sdk = subprocess.run(["bash", "-c", py], capture_output=True, text=True, timeout=60)
    assert sdk.returncode == 0, sdk.stderr
    assert "You said: Say hello" in sdk.stdout
    # `status --url` as printed
    [status] = [line.split("#")[0].strip() for line in out.splitlines() if "status --url" in line][
        :1
    ]
    st = subprocess.run(["bash", "-c", status], capture_output=True, text=True, timeout=30)
    assert st.returncode == 0 and "READY" in st.stdout, st.stderr
    # Ctrl-C drains: a stream in progress finishes, then the demo exits 0
    long = subprocess.Popen(
        ["bash", "-c", curls[1]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert long.stdout is not None
    assert long.stdout.readline().startswith("data: ")  # the answer has started
    proc.send_signal(signal.SIGINT)
    rest = long.communicate(timeout=30)[0]
    assert rest.rstrip().endswith("data: [DONE]"), rest[-200:]
    assert proc.wait(15) == 0


def test_a_request_during_the_demos_drain_gets_503_with_retry_after(
    demo: tuple[subprocess.Popen[str], str],
) -> None:
    """As a standalone broker does: while in-flight answers finish after Ctrl-C, a new
    request is refused at once with 503 + Retry-After (it used to hang, then get no answer)."""
    import httpx

    proc, out = demo
    base = re.search(r"Public base URL : (\S+)", out)
    key = re.search(r"API key\s+: (\S+)", out)
    broker_page = re.search(r"Broker page\s*: (\S+)", out)
    assert base and key and broker_page, out
    url, headers = base.group(1) + "/chat/completions", {"Authorization": f"Bearer {key[1]}"}
    body = {"model": "x", "stream": True, "messages": [{"role": "user", "content": "count to 40"}]}
    with (
        httpx.Client(timeout=30) as client,
        client.stream("POST", url, headers=headers, json=body) as r,
    ):
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")  # the answer has started
        proc.send_signal(signal.SIGINT)
        deadline = time.monotonic() + 10
        while httpx.get(broker_page[1] + "readyz").status_code != 503:  # the drain has begun
            assert time.monotonic() < deadline
            time.sleep(0.05)
        t0 = time.monotonic()
        refused = httpx.post(url, headers=headers, json={**body, "stream": False}, timeout=10)
        assert time.monotonic() - t0 < 2.0  # at once (it used to wait, then get nothing)
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert "shutting down" in refused.json()["error"]["message"]
        rest = list(lines)
    assert [x for x in rest if x][-1] == "data: [DONE]"  # the one in flight finished
    assert proc.wait(15) == 0


def test_the_demo_banner_names_the_admin_pages(demo: tuple[subprocess.Popen[str], str]) -> None:
    import httpx

    _, out = demo
    inspector = re.search(r"Inspector \(connector\)\s*: (http://127\.0\.0\.1:\d+/)", out)
    page = re.search(r"Broker page\s*: (http://127\.0\.0\.1:\d+/)", out)
    assert inspector and page, out
    assert "<title>trio-bridge connector</title>" in httpx.get(inspector[1]).text
    assert "<title>trio-bridge broker</title>" in httpx.get(page[1]).text


def test_check_reports_a_config_error_in_one_line_with_exit_2(tmp_path: Path) -> None:
    (tmp_path / "bridge.toml").write_text('[connector]\nmax_concurrent = "many"\n')
    r = run("check", "-c", str(tmp_path / "bridge.toml"))
    assert r.returncode == 2
    assert "connector.max_concurrent" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_check_says_whether_llm_and_broker_answer(tmp_path: Path) -> None:
    dead, dead_too = free_port(), free_port()
    (tmp_path / "bridge.toml").write_text(
        f'[connector]\nlocal_url = "http://127.0.0.1:{dead}"\n'
        f'broker_urls = ["ws://127.0.0.1:{dead_too}/_bridge/relay"]\n'
    )
    r = run("check", "-c", str(tmp_path / "bridge.toml"))
    assert r.returncode == 1
    assert "OK    config" in r.stdout
    assert re.search(r"FAIL  LLM http://127.0.0.1:\d+: not answering", r.stdout)
    assert "FAIL  connector token" in r.stdout  # no token file
    assert "broker.listen" not in r.stdout  # a connector check is about the connector only


def test_keys_add_list_revoke_never_show_secrets_again(tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[connector]\napi_keys_file = "keys.toml"\n')
    add = run("keys", "add", "alice", "-c", str(cfg))
    assert add.returncode == 0, add.stderr
    secret = add.stdout.strip()
    assert secret.startswith("tbk_")
    listed = run("keys", "list", "-c", str(cfg))
    assert "alice" in listed.stdout and secret not in listed.stdout
    assert secret not in (tmp_path / "keys.toml").read_text()
    assert run("keys", "revoke", "alice", "-c", str(cfg)).returncode == 0
    [line] = [x for x in run("keys", "list", "-c", str(cfg)).stdout.splitlines() if "alice" in x]
    assert "revoked" in line and secret not in line
    again = run("keys", "revoke", "alice", "-c", str(cfg))
    assert again.returncode == 2 and "was revoked at" in again.stderr


def test_roles_run_with_their_start_up_heap_frozen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What start-up leaves alive is out of the cyclic GC's sight before a role serves (its
    full collections would otherwise walk every module and class: 20-30 ms pauses)."""
    import gc

    from trio_bridge.cli import _cli

    frozen: list[int] = []
    monkeypatch.setattr(_cli.trio, "run", lambda *a, **k: frozen.append(gc.get_freeze_count()))
    cfg = tmp_path / "b.toml"
    cfg.write_text('[broker]\nlisten = "127.0.0.1:0"\nadmin_listen = ""\n')
    try:
        assert _cli.main(["broker", "-c", str(cfg)]) in (0, None)
    finally:
        gc.unfreeze()
    assert frozen and frozen[0] > 10_000  # modules, classes, functions


def test_broker_and_connector_processes_with_config_files(tmp_path: Path) -> None:
    """The two-machine setup of the README, on loopback, as separate processes."""
    import httpx

    from trio_bridge.testing import run_test_model  # noqa: F401  (documents the alternative)

    port = free_port()
    model_port = free_port()
    model = subprocess.Popen(
        [
            PY,
            "-c",
            "import trio; from trio_bridge import TestModel; "
            f"trio.run(lambda: TestModel(token_delay=0.01).serve('127.0.0.1:{model_port}'))",
        ]
    )
    broker_dir, conn_dir = tmp_path / "broker", tmp_path / "connector"
    broker_dir.mkdir()
    conn_dir.mkdir()
    (broker_dir / "bridge.toml").write_text(
        # admin ports 0: the defaults (9180/9181) are shared by every test run in parallel
        f'[broker]\nlisten = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:0"\n'
        '[log]\nformat = "json"\n'
    )
    (conn_dir / "bridge.toml").write_text(
        f'[connector]\nbroker_urls = ["ws://127.0.0.1:{port}/_bridge/relay"]\n'
        f'local_url = "http://127.0.0.1:{model_port}"\nadmin_listen = "127.0.0.1:0"\n'
    )
    token = run("tokens", "add", "home", "-c", str(broker_dir / "bridge.toml")).stdout.strip()
    (conn_dir / "connector.token").write_text(token + "\n")
    (conn_dir / "connector.token").chmod(0o600)
    key = run("keys", "add", "alice", "-c", str(conn_dir / "bridge.toml")).stdout.strip()
    procs = []
    try:
        for role, d in (("broker", broker_dir), ("connector", conn_dir)):
            procs.append(
                subprocess.Popen(
                    [PY, "-m", "trio_bridge", role, "-c", str(d / "bridge.toml")],
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
            if role == "broker":  # as a user would: the broker up first (else the
                # connector's first dial fails and its backoff, up to 8 s, adds to the wait)
                try:
                    wait_port(port, 30)
                except AssertionError:
                    procs[0].kill()
                    raise AssertionError(f"broker: {procs[0].communicate()[1][-3000:]}") from None
        deadline = time.monotonic() + 30
        while True:
            try:
                r = httpx.get(
                    f"http://127.0.0.1:{port}/v1/models",
                    headers={"Authorization": f"Bearer {key}"},
                    timeout=5,
                )
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "bridge did not come up"
            time.sleep(0.1)
        with httpx.stream(
            "POST",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            headers={"Authorization": f"Bearer {key}", "X-Request-ID": "trace-me-1"},
            json={
                "model": "m",
                "stream": True,
                "messages": [{"role": "user", "content": "count to 5"}],
            },
            timeout=10,
        ) as r:
            body = r.read().decode()
        assert r.headers["x-request-id"] == "trace-me-1"
        assert '"content": " 5"' in body and body.endswith("data: [DONE]\n\n")
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        logs = [p.communicate(timeout=15)[1] for p in procs]
        model.kill()
        model.wait()
    assert [p.returncode for p in procs] == [0, 0]
    # each role logged the request under the same correlation id, as JSON, without secrets
    for log in logs:
        lines = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
        mine = [x for x in lines if x.get("request_id") == "trace-me-1"]
        assert mine and mine[-1]["status"] == 200 and mine[-1]["outcome"] == "ok"
        assert key not in log and token not in log
    conn_lines = [json.loads(x) for x in logs[1].splitlines() if '"trace-me-1"' in x]
    assert conn_lines[-1]["role"] == "connector" and re.fullmatch(
        "[a-z0-9]{8}", conn_lines[-1]["key_id"]
    )
    assert os.path.exists(broker_dir / "tokens.toml")


def test_the_backstop_says_its_last_words_then_exits_0_after_grace_plus_6(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """docs/service.md: a backstop ends the process shutdown_grace + 6 s after the first
    signal; the connector's pending usage is written first, from the timer's thread."""
    from trio_bridge.cli import _cli

    timers: list[tuple[float, Any]] = []

    class Timer:
        def __init__(self, seconds: float, fn: Any) -> None:
            timers.append((seconds, fn))
            self.daemon = False

        def start(self) -> None:
            pass

    order: list[str] = []

    def exit_now(code: int) -> None:
        order.append(f"exit {code}")

    monkeypatch.setattr(_cli.threading, "Timer", Timer)
    monkeypatch.setattr(_cli.os, "_exit", exit_now)
    _cli._backstop(10 + _cli.BACKSTOP_AFTER_GRACE, lambda: order.append("usage written"))
    [(seconds, fire)] = timers
    assert seconds == 16
    fire()
    assert order == ["usage written", "exit 0"]
    docs = (Path(__file__).parent.parent / "docs" / "service.md").read_text()
    assert f"`shutdown_grace` + {_cli.BACKSTOP_AFTER_GRACE:g} s" in docs


@pytest.mark.skipif(
    sys.platform != "linux" or platform.libc_ver()[0] != "glibc" or sys.maxsize < 2**32,
    reason="glibc's allocator settings, 64-bit (musl has none; 32-bit caps the mmap threshold)",
)
def test_roles_keep_freed_buffers_instead_of_faulting_them_in_again(tmp_path: Path) -> None:
    """A role allocates and frees 256 KiB buffers for every read of an upload (a body part,
    a relay message, their copies). With glibc's default settings each such free gives the
    pages back to the kernel and the next allocation faults them in again (~70 page faults
    per buffer, a quarter of a role's CPU during a 10 MB upload, measured); the roles set
    the allocator to keep them. The same allocation pattern, counted in the role's process
    after start-up."""
    cfg = tmp_path / "b.toml"
    cfg.write_text('[broker]\nlisten = "127.0.0.1:0"\nadmin_listen = ""\n')
    code = (
        "import resource, sys\n"
        "from trio_bridge.cli import _cli\n"
        "def pattern(*a, **k):\n"
        "    src = bytearray(256 * 1024)\n"
        "    def rounds(n):\n"
        "        for _ in range(n):\n"
        "            live = [bytes(src)]\n"
        "            for _ in range(5):\n"
        "                live.append(bytes(live[-1]) + b'x')\n"
        "            del live\n"
        "    rounds(5)\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    rounds(40)\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "_cli.trio.run = pattern\n"
        "_cli.main(['broker', '-c', sys.argv[1]])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUN"))}
    out = subprocess.run(
        [sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, env=env, timeout=60
    )
    assert out.returncode == 0, out.stderr
    faults = int(out.stdout.split()[-1])
    # 240 buffers of 256 KiB: ~14 000 faults with the default settings, none once kept
    assert faults < 1000, faults
