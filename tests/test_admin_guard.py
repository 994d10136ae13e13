"""The admin endpoints trust no page in the operator's browser: a wrong Host (DNS rebinding) is
refused, and a state-changing request needs a same-origin proof (an Origin that is ours, no
cross-site Sec-Fetch-Site, and the header only the admin page's own script sends)."""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from trio_bridge._config import load_config
from trio_bridge._errors import ConfigError
from trio_bridge.admin._admin import ADMIN_HEADER, AdminGuard
from trio_bridge.testing import Lab, open_lab

CHAT = "/v1/chat/completions"
PAGE_PROOF = {ADMIN_HEADER: "1", "Sec-Fetch-Site": "same-origin"}


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


async def connector_admin(lab: Lab, **connector: object) -> tuple[str, int]:
    model = await lab.start_test_model()
    rb = await lab.start_broker()
    rc = await lab.start_connector(
        [rb], model.url, connector=dict(connector), inspector={"capture_bodies": True}
    )
    async with httpx.AsyncClient() as client:
        r = await client.post(
            rb.url + CHAT,
            json={"model": "m", "messages": [{"role": "user", "content": "count to 2"}]},
            headers={"Authorization": f"Bearer {lab.api_key}"},
        )
        assert r.status_code == 200
    host, port = rc.connector.admin_address or ("", 0)
    return host, port


def assert_openai_error(r: httpx.Response, status: int, code: str) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error"
    assert error["message"]


# -- pure ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:9181",
        "localhost:9181",
        "LOCALHOST:9181",
        "localhost.:9181",
        "[::1]:9181",
        "10.1.2.3:9181",  # any IP literal: no name, nothing to rebind
        "[fe80::1]:9181",
        "127.0.0.1",
        "bridge.internal:9181",  # configured
        "bridge.internal",
        "gpu-box:9181",  # the listen address's name
        None,  # no Host at all (HTTP/1.0): not a browser
    ],
)
def test_hosts_that_are_ours(host: str | None) -> None:
    guard = AdminGuard(["gpu-box:9181", "Bridge.Internal"])
    assert guard.host_allowed(None if host is None else host.encode())


@pytest.mark.parametrize(
    "host",
    [
        "evil.example:9181",
        "evil.example",
        "localhost.evil.example:9181",
        "127.0.0.1.nip.io:9181",
        "bridge.internal.evil.example",
        "",
        "[::1",
        "a b",
    ],
)
def test_hosts_that_are_not(host: str) -> None:
    guard = AdminGuard(["gpu-box:9181", "bridge.internal"])
    assert not guard.host_allowed(host.encode())


def test_admin_hosts_is_a_checked_config_key(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(
        '[connector]\nadmin_hosts = ["bridge.internal", "10.0.0.5"]\n'
        '[broker]\nadmin_hosts = ["admin.example.com"]\n'
    )
    config = load_config(tmp_path / "c.toml")
    assert config.connector.admin_hosts == ["bridge.internal", "10.0.0.5"]
    assert config.broker.admin_hosts == ["admin.example.com"]
    (tmp_path / "bad.toml").write_text('[connector]\nadmin_hosts = ["http://x/"]\n')
    with pytest.raises(ConfigError, match="admin_hosts"):
        load_config(tmp_path / "bad.toml")


def test_the_pages_own_script_sends_the_admin_header() -> None:
    """The replay button's POST carries the header (the browser test runs it for real where
    chromium is installed)."""
    js = (
        Path(__file__).parent.parent / "trio_bridge" / "admin" / "ui" / "connector.js"
    ).read_text()
    replay = js[js.index("async function replay") :]
    replay = replay[: replay.index("\n}\n")]
    assert f'"{ADMIN_HEADER}": "1"' in replay and 'method: "POST"' in replay


# -- DNS rebinding ------------------------------------------------------------------------------


async def test_a_dns_rebinding_host_cannot_read_the_inspector(lab: Lab) -> None:
    host, port = await connector_admin(lab)
    base = f"http://{host}:{port}"
    evil = {"Host": f"rebind.evil.example:{port}"}
    async with httpx.AsyncClient() as client:
        for path in ("/", "/api/requests", "/api/requests/1", "/api/usage", "/status", "/ui/x"):
            assert_openai_error(await client.get(base + path, headers=evil), 421, "wrong_host")
        # the same requests with our own name are answered
        ok = await client.get(base + "/api/requests", headers={"Host": f"localhost:{port}"})
        assert ok.status_code == 200 and ok.json()["requests"]


async def test_a_dns_rebinding_host_cannot_read_the_broker_page(lab: Lab) -> None:
    rb = await lab.start_broker()
    host, port = rb.broker.admin_address or ("", 0)
    async with httpx.AsyncClient() as client:
        r = await client.get(
            f"http://{host}:{port}/api/routes", headers={"Host": "rebind.evil.example"}
        )
        assert_openai_error(r, 421, "wrong_host")
        assert (await client.get(f"http://{host}:{port}/api/routes")).status_code == 200


async def test_monitoring_answers_whatever_name_the_machine_is_scraped_by(lab: Lab) -> None:
    """/healthz, /readyz and /metrics carry no prompts: Prometheus and health checks reach
    them by any name (no admin_hosts needed)."""
    host, port = await connector_admin(lab)
    base = f"http://{host}:{port}"
    named = {"Host": f"gpu-box.monitoring.example:{port}"}
    async with httpx.AsyncClient() as client:
        assert (await client.get(base + "/healthz", headers=named)).status_code == 200
        assert (await client.get(base + "/readyz", headers=named)).status_code == 200
        metrics = await client.get(base + "/metrics", headers=named)
        assert metrics.status_code == 200 and "trio_bridge_requests" in metrics.text


async def test_a_configured_admin_host_is_accepted(lab: Lab) -> None:
    host, port = await connector_admin(lab, admin_hosts=["bridge.internal"])
    base = f"http://{host}:{port}"
    ours = {"Host": f"bridge.internal:{port}"}
    async with httpx.AsyncClient() as client:
        assert (await client.get(base + "/", headers=ours)).status_code == 200
        assert (await client.get(base + "/api/requests", headers=ours)).status_code == 200
        replay = await client.post(
            base + "/api/replay/1",
            headers={**ours, **PAGE_PROOF, "Origin": f"http://bridge.internal:{port}"},
        )
        assert replay.status_code == 200 and replay.json()["status"] == 200
        other = {"Host": f"other.internal:{port}"}
        assert_openai_error(await client.get(base + "/", headers=other), 421, "wrong_host")


# -- cross-site requests ------------------------------------------------------------------------


async def test_a_cross_site_post_cannot_replay(lab: Lab) -> None:
    host, port = await connector_admin(lab)
    base = f"http://{host}:{port}"
    own_origin = f"http://{host}:{port}"
    refused = [
        {},  # a plain form post from anywhere: no header, no Origin
        {"Origin": "http://evil.example"},  # a form post from another site
        {ADMIN_HEADER: "1", "Origin": "http://evil.example"},
        {ADMIN_HEADER: "1", "Origin": "null"},  # a sandboxed frame
        {ADMIN_HEADER: "1", "Sec-Fetch-Site": "cross-site"},
        {ADMIN_HEADER: "1", "Sec-Fetch-Site": "same-site", "Origin": "http://127.0.0.1:1"},
        {"Origin": own_origin, "Sec-Fetch-Site": "same-origin"},  # our origin, no header
        {ADMIN_HEADER: "0", "Origin": own_origin},
    ]
    async with httpx.AsyncClient() as client:
        for headers in refused:
            r = await client.post(base + "/api/replay/1", headers=headers)
            assert_openai_error(r, 403, "cross_site_refused")
        for method in ("PUT", "DELETE", "PATCH"):
            r = await client.request(method, base + "/api/replay/1")
            assert_openai_error(r, 403, "cross_site_refused")
        # the page's own request (same origin, with its header) replays
        r = await client.post(base + "/api/replay/1", headers={**PAGE_PROOF, "Origin": own_origin})
        assert r.status_code == 200 and r.json()["status"] == 200
        # so does a script on the machine (curl: no Origin, no Sec-Fetch-Site), with the header
        r = await client.post(base + "/api/replay/1", headers={ADMIN_HEADER: "1"})
        assert r.status_code == 200


async def test_an_admin_token_does_not_make_a_cross_site_post_acceptable(lab: Lab) -> None:
    (lab.dir / "admin.token").write_text("s3cret-admin\n")
    os.chmod(lab.dir / "admin.token", 0o600)
    host, port = await connector_admin(lab, admin_token_file="admin.token")
    base = f"http://{host}:{port}"
    async with httpx.AsyncClient() as client:
        login = await client.get(base + "/?token=s3cret-admin")
        assert login.status_code == 303
        client.cookies = login.cookies  # the operator is logged in; a page of evil.example posts
        r = await client.post(
            base + "/api/replay/1",
            headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert_openai_error(r, 403, "cross_site_refused")
        bearer = {"Authorization": "Bearer s3cret-admin"}
        r = await client.post(base + "/api/replay/1", headers={**bearer, "Origin": "null"})
        assert_openai_error(r, 403, "cross_site_refused")
        # the page itself (cookie, same origin, its header) may
        own = {**PAGE_PROOF, "Origin": f"http://{host}:{port}"}
        r = await client.post(base + "/api/replay/1", headers=own)
        assert r.status_code == 200
        # and without the token, the proof alone is not enough
        client.cookies.clear()
        r = await client.post(base + "/api/replay/1", headers=own)
        assert r.status_code == 401


async def test_status_says_why_the_admin_endpoint_refused(lab: Lab) -> None:
    (lab.dir / "admin.token").write_text("s3cret-admin\n")
    os.chmod(lab.dir / "admin.token", 0o600)
    rb = await lab.start_broker(broker={"admin_token_file": "admin.token"})
    host, port = rb.broker.admin_address or ("", 0)
    done = await trio.run_process(
        [sys.executable, "-m", "trio_bridge", "status", "--url", f"http://{host}:{port}"],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert done.returncode == 1 and done.stdout == b""
    assert b"HTTP 401: this admin endpoint needs its admin token" in done.stderr


async def test_an_api_client_pointed_at_an_admin_port_is_told_where_the_api_is(lab: Lab) -> None:
    """The demo prints admin addresses beside the API's: an SDK pointed at the wrong one gets
    an OpenAI-shaped 404 that says so, not a hint to add the admin header."""
    host, port = await connector_admin(lab)
    async with httpx.AsyncClient() as client:
        for method in ("GET", "POST"):
            r = await client.request(
                method, f"http://{host}:{port}/v1/chat/completions", json={"model": "m"}
            )
            assert_openai_error(r, 404, "not_the_api")
            assert "public port" in r.json()["error"]["message"]
