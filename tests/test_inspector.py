"""The admin web pages in a real headless browser (Debian's chromium + chromedriver, driven by
Selenium): the connector's live inspector and the broker's overview. Screenshots are saved in
tests/output/ for a human to look at.

The browser is driven from a worker thread (Selenium is synchronous): the bridge runs in this
test's event loop and must keep serving the page meanwhile.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import trio
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from trio_bridge.admin._inspect import Inspector, RequestRecord, redact
from trio_bridge.broker._registry import EJECT_AFTER
from trio_bridge.testing import Lab, open_lab

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
OUTPUT = Path(__file__).parent / "output"
T = TypeVar("T")


# -- pure ---------------------------------------------------------------------------------------


def test_secret_headers_are_redacted() -> None:
    headers = [
        (b"authorization", b"Bearer tbk_x_y"),
        (b"x-api-key", b"k"),
        (b"api-key", b"k"),
        (b"cookie", b"a=b"),
        (b"content-type", b"application/json"),
    ]
    assert redact(headers) == [
        ("authorization", "[redacted]"),
        ("x-api-key", "[redacted]"),
        ("api-key", "[redacted]"),
        ("cookie", "[redacted]"),
        ("content-type", "application/json"),
    ]


def test_secrets_are_scrubbed_before_a_record_keeps_headers() -> None:
    from trio_bridge.admin._inspect import scrub

    kept = scrub([(b"authorization", b"Bearer tbk_x_y"), (b"accept", b"*/*")])
    assert kept == [(b"authorization", b"[redacted]"), (b"accept", b"*/*")]


def test_captured_bodies_are_bounded_in_size_count_and_bytes() -> None:
    ins = Inspector(capture_bodies=True, max_body_bytes=10, max_captured=2, max_captured_bytes=15)
    body, truncated = ins.capture(b"0123456789abc", None)
    assert body == b"0123456789" and truncated
    recs = []
    for i in range(3):
        rec = ins.start(f"r{i}", "POST", "/x")
        rec.request_body = b"12345678"
        ins.finish(rec)
        recs.append(rec)
    # 3 x 8 bytes, at most 2 records and 15 bytes: only the newest keeps its body
    assert [r.request_body is not None for r in recs] == [False, False, True]


def test_evicting_a_record_in_progress_leaves_the_captured_total_alone() -> None:
    """A record pushed off the list while its request is still running held bodies that were
    never counted (they count when it finishes): the total went to -2000, and then
    max_captured_bytes bounded nothing."""
    ins = Inspector(capture_bodies=True, max_records=1, max_body_bytes=4096)
    rec = ins.start("r1", "POST", "/x")
    rec.request_body, _ = ins.capture(b"x" * 2000, None)
    ins.start("r2", "POST", "/x")  # r1, in progress, leaves the list
    assert ins.captured_bytes == 0
    ins.finish(rec)  # it finishes unlisted: nobody can see its bodies, none is kept
    assert rec.request_body is None and ins.captured_bytes == 0


class CaptureAccounting(RuleBasedStateMachine):
    """Random sequences of requests starting, capturing body bytes, finishing, and being
    evicted (from the list, by later starts; from the captured set, by the bounds): the
    captured total is the sum of what the listed, finished records hold, within its bounds."""

    def __init__(self) -> None:
        super().__init__()
        self.ins = Inspector(
            capture_bodies=True,
            max_records=4,
            max_body_bytes=1000,
            max_captured=3,
            max_captured_bytes=2500,
        )
        self.running: list[RequestRecord] = []

    @rule()
    def start(self) -> None:  # past max_records, the oldest record leaves the list
        self.running.append(self.ins.start(f"r{len(self.running)}", "POST", "/x"))

    @precondition(lambda self: self.running)
    @rule(data=st.data(), size=st.integers(0, 1500), answer=st.booleans())
    def capture(self, data: st.DataObject, size: int, answer: bool) -> None:
        rec = data.draw(st.sampled_from(self.running))
        if answer:
            rec.response_body, rec.response_truncated = self.ins.capture(
                b"a" * size, rec.response_body
            )
        else:
            rec.request_body, rec.request_truncated = self.ins.capture(
                b"q" * size, rec.request_body
            )

    @precondition(lambda self: self.running)
    @rule(data=st.data())
    def finish(self, data: st.DataObject) -> None:
        rec = data.draw(st.sampled_from(self.running))
        self.running.remove(rec)
        self.ins.finish(rec)

    @invariant()
    def the_total_is_what_the_kept_records_hold(self) -> None:
        ins = self.ins
        listed = {id(r) for r in ins._records.values()}
        kept = [r for r in ins._records.values() if r not in self.running and _held(r)]
        assert ins.captured_bytes == sum(map(_held, kept))
        assert 0 <= ins.captured_bytes <= ins.max_captured_bytes
        assert len(ins._captured) <= ins.max_captured
        assert all(id(r) in listed for r in ins._captured)


def _held(rec: RequestRecord) -> int:
    return len(rec.request_body or b"") + len(rec.response_body or b"")


TestCaptureAccounting = CaptureAccounting.TestCase


async def test_an_llm_error_is_listed_as_an_error_with_the_model_asked_for() -> None:
    """A 500 from the LLM is relayed as it is (the metrics count it as an error by its
    status), and the inspector lists it as ``llm_error``, with the model the request named
    (the answer names none)."""
    from upstream import run_upstream

    async with open_lab() as lab, run_upstream() as (_, llm):
        rb = await lab.start_broker()
        rc = await lab.start_connector([rb], llm)
        async with httpx.AsyncClient() as client:
            r = await client.post(
                rb.url + "/fail",
                json={"model": "qwen-7b", "messages": []},
                headers={"Authorization": f"Bearer {lab.api_key}"},
            )
        assert r.status_code == 500 and r.json()["error"]["message"] == "model crashed"
        [row] = rc.connector.inspector.recent(10)
        assert (row["status"], row["outcome"], row["model"]) == (500, "llm_error", "qwen-7b")
        [usage] = rc.connector.usage_store.rows()  # type: ignore[union-attr]
        assert (usage["model"], usage["errors"], usage["refused"]) == ("qwen-7b", 1, 0)


# -- in a browser -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("chromium and chromedriver are not installed (apt-get install chromium "
                    "chromium-driver; .ci/run does)")  # fmt: skip
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1500,1000",
                 "--disable-dev-shm-usage"):  # fmt: skip
        opts.add_argument(flag)
    d = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    d.set_page_load_timeout(20)
    yield d
    d.quit()


async def in_browser(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(fn, *args)


def wait_for(driver: Any, css: str, seconds: float = 5.0, text: str | None = None) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def found(d: Any) -> Any:
        for e in d.find_elements(By.CSS_SELECTOR, css):
            if e.is_displayed() and (text is None or text in e.text):
                return e
        return False

    try:
        return WebDriverWait(driver, seconds, poll_frequency=0.02).until(found)
    except TimeoutException:  # say what the page showed instead (a flake is then a clue)
        seen = [
            (e.is_displayed(), e.text[:200]) for e in driver.find_elements(By.CSS_SELECTOR, css)
        ]
        page = driver.find_element(By.TAG_NAME, "body").text[-600:]
        raise AssertionError(
            f"{css!r} {'with ' + repr(text) if text else ''} not shown within {seconds} s; "
            f"elements (displayed, text): {seen!r}; the page ends: {page!r}"
        ) from None


def whole_page(driver: Any) -> str:
    """Everything the page holds: its DOM (what scripts built) and its source."""
    return str(driver.execute_script("return document.documentElement.outerHTML")) + str(
        driver.page_source
    )


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    async with open_lab() as lab:
        yield lab


async def test_the_connector_page_shows_requests_live_and_replays_them(
    lab: Lab, driver: Any
) -> None:
    from selenium.webdriver.common.by import By

    model = await lab.start_test_model(token_delay=0.01)
    rb = await lab.start_broker()
    rc = await lab.start_connector(
        [rb], model.url, connector={"name": "gpu-box"}, inspector={"capture_bodies": True}
    )
    host, port = rc.connector.admin_address or ("", 0)
    page = f"http://{host}:{port}/"
    await in_browser(driver.get, page)
    await in_browser(wait_for, driver, "body[data-ready='1']", 10)
    await in_browser(wait_for, driver, "#live.on", 5)  # the event stream is open

    auth = {"Authorization": f"Bearer {lab.api_key}", "X-Request-ID": "look-at-me-1"}
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "count to 5"}]}
    async with httpx.AsyncClient() as client:
        t0 = time.monotonic()
        r = await client.post(rb.url + "/v1/chat/completions", json=body, headers=auth)
        assert r.status_code == 200
        row = await in_browser(wait_for, driver, "tr[data-id='look-at-me-1']", 1.0)
        assert time.monotonic() - t0 < 1.0 + 0.5  # shown within a second of being sent
        await in_browser(wait_for, driver, "tr[data-id='look-at-me-1'] td.outcome-ok", 5)
        assert "lab-user" in row.text and "POST /v1/chat/completions" in row.text

        await in_browser(row.click)
        await in_browser(wait_for, driver, "#detail #d-waterfall .bar", 5)
        headers = await in_browser(driver.find_element, By.ID, "d-req-headers")
        assert "authorization" in headers.text and "[redacted]" in headers.text
        assert "count to 5" in (await in_browser(wait_for, driver, "#d-request-body")).text
        assert "data: [DONE]" in (await in_browser(wait_for, driver, "#d-response-body")).text
        OUTPUT.mkdir(exist_ok=True)
        await in_browser(driver.save_screenshot, str(OUTPUT / "connector-inspector.png"))

        # replay it from the page: a new row appears, answered by the LLM again
        before = len(model.model.requests)
        await in_browser((await in_browser(driver.find_element, By.ID, "d-replay")).click)
        await in_browser(wait_for, driver, "#d-replayed", 10, "replayed: HTTP 200")
        await in_browser(wait_for, driver, "#requests tbody tr", 5, "(replay)")
        assert len(model.model.requests) == before + 1
        assert dict(model.model.requests[-1].headers).get(b"authorization") is None

        # filters: another key's request is hidden when filtering by this key
        _, other = lab.keys.add("other-user")
        await client.get(rb.url + "/v1/models", headers={"Authorization": f"Bearer {other}"})
        await in_browser(wait_for, driver, "#requests tbody tr", 5, "other-user")
        from selenium.webdriver.support.ui import Select

        select = Select(await in_browser(driver.find_element, By.ID, "f-key"))
        await in_browser(select.select_by_value, "lab-user")
        shown = await in_browser(
            lambda: [
                t.text
                for t in driver.find_elements(By.CSS_SELECTOR, "#requests tbody tr")
                if t.is_displayed()
            ]
        )
        assert shown and all("lab-user" in t or "replay" in t for t in shown)

        # the usage chart follows (from the usage store, refreshed after answers end)
        await in_browser(wait_for, driver, "#chart-keys .row", 8, "lab-user")
        # GET /v1/models named no model: a line under the models' chart, not a 0-token bar
        await in_browser(wait_for, driver, "#chart-models [data-no-model]", 8, "named no model")
        models = (await in_browser(driver.find_element, By.ID, "chart-models")).text
        assert "unknown" not in models and "0 tok" not in models

        # an LLM error stands out: its outcome is llm_error, in red, with the model asked for
        await client.post(
            rb.url + "/v1/chat/completions",
            json={"model": "m", "messages": "not a list"},  # the test model answers 400
            headers={"Authorization": f"Bearer {lab.api_key}", "X-Request-ID": "bad-req"},
        )
        await in_browser(wait_for, driver, "tr[data-id='bad-req'] td.status-4xx", 5)
        await in_browser(driver.save_screenshot, str(OUTPUT / "connector-usage.png"))

    html = await in_browser(whole_page, driver)
    for secret in (lab.api_key, other, lab.token):
        assert secret not in html


async def test_the_broker_page_shows_routes_and_connectors(lab: Lab, driver: Any) -> None:
    from selenium.webdriver.common.by import By

    model = await lab.start_test_model(models=("big-model",))
    rb = await lab.start_broker(broker={"aliases": {"coder": ["big-model"]}})
    await lab.start_connector([rb], model.url, connector={"name": "gpu-box", "priority": 5})
    async with httpx.AsyncClient() as client:
        for _ in range(3):
            await client.get(
                rb.url + "/v1/models", headers={"Authorization": f"Bearer {lab.api_key}"}
            )
    host, port = rb.broker.admin_address or ("", 0)
    await in_browser(driver.get, f"http://{host}:{port}/")
    await in_browser(wait_for, driver, "body[data-ready='1']", 10)
    row = await in_browser(wait_for, driver, "tr[data-connector='gpu-box']", 5)
    assert "default" in row.text and "big-model" in row.text and "ready" in row.text
    route = await in_browser(wait_for, driver, "tr[data-route='default']", 5)
    assert route.text.split()[1:3] == ["0", "3"]  # nothing queued; requests in five minutes
    assert "coder" in (await in_browser(wait_for, driver, "#aliases")).text
    # the last minutes at a glance: a strip per route, a bar per 10 s
    strip = await in_browser(wait_for, driver, "#series .series-row[data-route='default']", 5)
    assert "3 requests" in strip.text and "0 errors" in strip.text
    bars = await in_browser(
        driver.find_elements, By.CSS_SELECTOR, "#series .series-row svg rect.requests"
    )
    assert bars
    OUTPUT.mkdir(exist_ok=True)
    await in_browser(driver.save_screenshot, str(OUTPUT / "broker-overview.png"))
    # a connector whose answers keep failing is shown ejected, with its failure count
    [handle] = rb.broker.registry.connectors()
    for _ in range(EJECT_AFTER):
        handle.answered(False, trio.current_time())
    await in_browser(driver.refresh)
    await in_browser(wait_for, driver, "body[data-ready='1']", 10)
    row = await in_browser(wait_for, driver, "tr[data-connector='gpu-box']", 5)
    assert "ejected" in row.text and f" / {EJECT_AFTER}" in row.text


async def test_the_broker_page_shows_errors_over_time_and_explains_empty_aliases(
    lab: Lab, driver: Any
) -> None:
    from selenium.webdriver.common.by import By
    from upstream import run_upstream

    async with run_upstream() as (_, llm):
        rb = await lab.start_broker()
        await lab.start_connector([rb], llm)
        auth = {"Authorization": f"Bearer {lab.api_key}"}
        async with httpx.AsyncClient() as client:
            for path in ("/echo", "/fail", "/fail"):
                await client.post(rb.url + path, json={"model": "m"}, headers=auth)
        host, port = rb.broker.admin_address or ("", 0)
        await in_browser(driver.get, f"http://{host}:{port}/")
        await in_browser(wait_for, driver, "body[data-ready='1']", 10)
    strip = await in_browser(wait_for, driver, "#series .series-row[data-route='default']", 5)
    assert "3 requests" in strip.text and "2 errors" in strip.text
    assert await in_browser(driver.find_elements, By.CSS_SELECTOR, "#series svg rect.errors")
    aliases = (await in_browser(wait_for, driver, "#aliases")).text
    assert "No aliases" in aliases and "[broker] aliases" in aliases
    OUTPUT.mkdir(exist_ok=True)
    await in_browser(driver.save_screenshot, str(OUTPUT / "broker-errors.png"))


async def test_an_admin_token_protects_the_pages_but_not_health(lab: Lab) -> None:
    (lab.dir / "admin.token").write_text("s3cret-admin\n")
    os.chmod(lab.dir / "admin.token", 0o600)
    model = await lab.start_test_model()
    rb = await lab.start_broker(broker={"admin_token_file": "admin.token"})
    host, port = rb.broker.admin_address or ("", 0)
    base = f"http://{host}:{port}"
    async with httpx.AsyncClient() as client:
        assert (await client.get(base + "/")).status_code == 401
        assert (await client.get(base + "/api/routes")).status_code == 401
        assert (await client.get(base + "/metrics")).status_code == 401
        assert (await client.get(base + "/healthz")).status_code == 200
        assert (await client.get(base + "/readyz")).status_code == 200
        bearer = {"Authorization": "Bearer s3cret-admin"}
        assert (await client.get(base + "/api/routes", headers=bearer)).status_code == 200
        login = await client.get(base + "/?token=s3cret-admin")
        assert login.status_code == 303 and "HttpOnly" in login.headers["set-cookie"]
        client.cookies = login.cookies
        page = await client.get(base + "/")
        assert page.status_code == 200 and "trio-bridge" in page.text
        assert (await client.get(base + "/?token=wrong")).status_code == 401
    del model
