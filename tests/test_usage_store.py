"""Usage counts never hold up the connector (issue 29 item 4, issue 25 items 1-2): reads come
from a bounded in-memory summary, a slow or failed flush stalls nothing and loses nothing, a
client cannot grow the store with model names, and ``/_bridge/usage`` is one more request of
its key (its limits apply) that shows that key alone."""

from __future__ import annotations

import itertools
import logging
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio.testing
from conftest import clock_held, memory_upstream, usage_summary_read

from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._usagestore import (
    MAX_UNLISTED_MODELS,
    OTHER,
    UsageStore,
    connect,
    read_rows,
    utc_day,
)
from trio_bridge.testing import Lab, MemoryNetwork, open_lab

CHAT = "/v1/chat/completions"
#: the columns of a row an older release wrote
OLD_COLUMNS = "day, key_id, model, requests, prompt_tokens, completion_tokens, estimated, errors"
PY = sys.executable


def chat(prompt: str = "count to 3", model: str = "m", stream: bool = False) -> dict[str, object]:
    return {"model": model, "stream": stream, "messages": [{"role": "user", "content": prompt}]}


def record(store: UsageStore, key: str = "k1", model: str = "m", now: float | None = None) -> None:
    store.record(
        key,
        model,
        prompt=3,
        completion=4,
        estimated=False,
        error=False,
        now=time.time() if now is None else now,
    )


@pytest.fixture
async def lab() -> AsyncIterator[Lab]:
    """A lab in memory, for tests on the autojump clock."""
    async with open_lab(network=MemoryNetwork()) as lab:
        yield lab


@pytest.fixture
async def tcp_lab() -> AsyncIterator[Lab]:
    """A lab on loopback sockets and the real clock, for a test that measures the loop."""
    async with open_lab() as lab:
        yield lab


class LoopWatch:
    """The longest the event loop went without running a task that sleeps 1 ms at a time."""

    def __init__(self) -> None:
        self.worst = 0.0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            t0 = time.perf_counter()
            await trio.sleep(0.001)
            self.worst = max(self.worst, time.perf_counter() - t0)


# -- the store alone ----------------------------------------------------------------------------


async def test_reads_do_not_wait_for_a_flush_stuck_in_sqlite(tmp_path: Path) -> None:
    """The flush thread holds the connection (SQLite waiting up to 10 s for another writer):
    rows(), tokens_on() and record() on the event loop answer at once meanwhile."""
    store = UsageStore(tmp_path / "usage.sqlite3")
    await store.load()
    record(store)
    stuck, release = threading.Event(), threading.Event()
    write = store._write

    def stuck_write(batch: dict[tuple[str, str, str], list[int]]) -> None:
        with store._lock:  # as SQLite's busy wait does: the lock held, nothing written yet
            stuck.set()
            release.wait(10)
        write(batch)

    store._write = stuck_write  # type: ignore[method-assign]
    watch = LoopWatch()
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        nursery.start_soon(store.flush)
        await trio.to_thread.run_sync(stuck.wait, 5)
        t0 = time.perf_counter()
        for _ in range(100):
            [row] = store.rows(key_ids=["k1"])
            assert row["requests"] == 1
            assert store.tokens_on(utc_day(time.time())) == {"k1": 7}
        record(store, "k2")
        assert time.perf_counter() - t0 < 0.5
        await trio.sleep(0.3)  # the loop keeps turning while the write is stuck
        assert watch.worst < 0.2, watch.worst
        release.set()
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert {r["key_id"] for r in read_rows(tmp_path / "usage.sqlite3")} == {"k1"}
    store.close()


async def test_a_failed_flush_is_logged_counted_kept_and_retried_with_backoff(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """(Real time: the writes run in worker threads, which an autojump clock would not wait
    for.)"""
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    store = UsageStore(tmp_path / "usage.sqlite3", flush_interval=0.05, registry=registry)
    record(store)
    attempts: list[float] = []
    write = store._write

    def failing_write(batch: dict[tuple[str, str, str], list[int]]) -> None:
        attempts.append(time.monotonic())
        if len(attempts) <= 4:
            raise sqlite3.OperationalError("database is locked")
        write(batch)

    store._write = failing_write  # type: ignore[method-assign]
    caplog.set_level(logging.WARNING, logger="trio_bridge.usage")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.run)
        with trio.fail_after(10):
            while not attempts:
                await trio.sleep(0.01)
        assert read_rows(tmp_path / "usage.sqlite3") == []
        record(store)  # counted meanwhile: written with the kept batch
        with trio.fail_after(10):
            while not read_rows(tmp_path / "usage.sqlite3"):
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert len(attempts) == 5
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert all(gap >= 0.05 * 0.9 for gap in gaps)  # retried no faster than flush_interval
    [row] = read_rows(tmp_path / "usage.sqlite3")
    assert row["requests"] == 2 and row["completion_tokens"] == 8
    lines = [r.getMessage() for r in caplog.records if "usage" in r.getMessage()]
    assert len(lines) == 4 and all("OperationalError: database is locked" in x for x in lines)
    count = registry.get_sample_value("trio_bridge_usage_flush_failures_total")
    assert count == 4
    store.close()


async def test_a_failed_flush_at_shutdown_does_not_raise(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")
    record(store)

    def failing_write(batch: dict[tuple[str, str, str], list[int]]) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    store._write = failing_write  # type: ignore[method-assign]
    assert await store.flush() is False
    assert store.rows()[0]["requests"] == 1  # still counted in memory
    store.close()


def test_the_hard_stop_writes_what_is_pending_from_its_own_thread(tmp_path: Path) -> None:
    """The backstop's last act runs on a timer thread while the event loop may be stuck: the
    rows not yet flushed reach the file without trio; a flush holding the file makes it give
    up after its timeout instead of hanging the exit."""
    store = UsageStore(tmp_path / "usage.sqlite3")
    record(store)
    record(store, key="k2")
    done: list[bool] = []
    thread = threading.Thread(target=lambda: done.append(store.write_now(timeout=1)))
    thread.start()
    thread.join(5)
    assert done == [True]
    assert sorted(r["key_id"] for r in read_rows(store.path)) == ["k1", "k2"]
    record(store, key="k3")
    with store._lock:  # a flush in progress, stuck in SQLite
        assert store.write_now(timeout=0.05) is False
    assert store.write_now(timeout=1) is True
    store.close()


def test_kept_batches_are_bounded(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3", max_pending_rows=10)
    for i in range(30):
        record(store, key=f"k{i}")
    store._requeue(dict(store._pending))  # as a failed flush puts its batch back
    assert len(store._pending) <= 10
    store.close()


def test_ten_thousand_model_names_make_a_bounded_number_of_rows(tmp_path: Path) -> None:
    known = ("llama3:8b", "qwen2.5-coder:7b")
    store = UsageStore(tmp_path / "usage.sqlite3", models=lambda: known)
    for i in range(10_000):
        record(store, model=f"echoed-{i}")
    record(store, model="llama3:8b")
    record(store, model="qwen2.5-coder")  # Ollama answers for name:latest too
    trio.run(store.flush)
    rows = read_rows(tmp_path / "usage.sqlite3")
    assert {r["model"] for r in rows} == {"llama3:8b", OTHER}
    assert sum(r["requests"] for r in rows) == 10_002  # every request still counted
    store.close()


def test_without_a_model_list_the_first_names_are_kept_then_other(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3", models=lambda: None)
    for i in range(10_000):
        record(store, model=f"echoed-{i}")
    trio.run(store.flush)
    rows = read_rows(tmp_path / "usage.sqlite3")
    assert len(rows) == MAX_UNLISTED_MODELS + 1
    assert sum(r["requests"] for r in rows) == 10_000
    store.close()


async def test_the_summary_is_loaded_once_off_the_loop_and_folds_old_junk(
    tmp_path: Path,
) -> None:
    """An older release wrote a row per echoed model name: the summary keeps a bounded number
    per key and day (the biggest), the rest summed as "other"."""
    path = tmp_path / "usage.sqlite3"
    db = connect(path)
    today = utc_day(time.time())
    db.executemany(
        f"INSERT INTO usage ({OLD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [(today, "k1", f"junk-{i}", 1 + (i == 7), 1, 1, 0, 0) for i in range(3000)],
    )
    db.close()
    store = UsageStore(path)
    loaded_in: list[str] = []
    read = store._read_window

    def spy(since: str) -> Any:
        loaded_in.append(threading.current_thread().name)
        return read(since)

    store._read_window = spy  # type: ignore[method-assign]
    await store.load()
    await store.load()  # once
    assert len(loaded_in) == 1 and loaded_in[0] != threading.current_thread().name
    rows = store.rows(key_ids=["k1"])
    assert len(rows) <= 51
    assert sum(r["requests"] for r in rows) == 3001
    assert any(r["model"] == "junk-7" for r in rows)  # the biggest are kept by name
    store.close()


# -- through the connector (in memory, on the autojump clock) -----------------------------------
#
# The store reads and writes its file in worker threads, which the autojump clock does not wait
# for (it jumps on to the next deadline meanwhile): these tests read the summary first, the
# clock held (usage_summary_read), and wait for a write on a thread's event, not a deadline.


async def start(lab: Lab, clock: trio.testing.MockClock, **connector: object) -> tuple[Any, str]:
    model = await lab.start_test_model(token_delay=0.001)
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url, connector=dict(connector))
    await usage_summary_read(rc.connector, clock)
    return rc, rb.url


async def test_a_failing_usage_file_never_stops_the_connector(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    rc, url = await start(lab, autojump_clock, usage_flush_interval="100ms")
    store = rc.connector.usage_store
    assert store is not None
    write, broken = store._write, True
    failed, written = threading.Event(), threading.Event()

    def flaky(batch: dict[tuple[str, str, str], list[int]]) -> None:
        if broken:
            failed.set()
            raise sqlite3.OperationalError("database or disk is full")
        write(batch)
        written.set()

    async def flushed(done: threading.Event) -> bool:
        """Flush until ``done`` is set (the connector's own flush may hold the batch when
        ours runs), the clock held: the autojump clock would race through the connector's
        timers while a worker thread writes."""
        with clock_held(autojump_clock):
            for _ in range(100):
                await store.flush()
                if await trio.to_thread.run_sync(done.wait, 0.1):
                    return True
        return False

    store._write = flaky  # type: ignore[method-assign]
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        for _ in range(3):  # the connector's own flushes fail meanwhile, every 100 ms
            assert (await client.post(url + CHAT, json=chat(), headers=auth)).status_code == 200
            await trio.sleep(0.3)
        assert await flushed(failed)
        failures = rc.connector.metrics.registry.get_sample_value(
            "trio_bridge_usage_flush_failures_total"
        )
        assert failures is not None and failures >= 1
        assert read_rows(store.path) == []
        # said where an operator looks: status / readyz problems, and `check` tests a write
        [problem] = rc.connector.status()["problems"]
        assert problem.startswith("usage store: OperationalError: database or disk is full")
        # served while its usage cannot be written
        assert (await client.post(url + CHAT, json=chat(), headers=auth)).status_code == 200
        broken = False
        assert await flushed(written)
        await trio.sleep(1)  # the connector's own flushes go on, and succeed
        assert (await client.post(url + CHAT, json=chat(), headers=auth)).status_code == 200
        assert rc.connector.status()["problems"] == []  # written again: the problem is gone
    assert sum(r["requests"] for r in read_rows(store.path)) >= 3


async def test_echoed_model_names_do_not_grow_the_store(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """The test model lists one model and answers for any name (like llama.cpp)."""
    rc, url = await start(lab, autojump_clock)
    auth = {"Authorization": f"Bearer {lab.api_key}"}
    async with lab.client() as client:
        for i in range(60):
            r = await client.post(url + CHAT, json=chat(model=f"made-up-{i}"), headers=auth)
            assert r.status_code == 200
        r = await client.post(url + CHAT, json=chat(model="trio-bridge-test-model"), headers=auth)
    store = rc.connector.usage_store
    assert {row["model"] for row in store.rows()} == {"trio-bridge-test-model", OTHER}
    assert sum(row["requests"] for row in store.rows()) == 61  # each one still counted


async def test_usage_of_one_key_never_shows_another(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    a_entry, a = lab.keys.add("alice")
    _, b = lab.keys.add("bob")
    rc, url = await start(lab, autojump_clock)
    async with lab.client() as client:
        for key, n in ((a, 2), (b, 5)):
            for _ in range(n):
                r = await client.post(
                    url + CHAT, json=chat(), headers={"Authorization": f"Bearer {key}"}
                )
                assert r.status_code == 200
        r = await client.get(url + "/_bridge/usage", headers={"Authorization": f"Bearer {a}"})
    doc = r.json()
    assert doc["key"]["name"] == "alice"
    assert doc["today"]["requests"] == 2 and doc["last_30_days"]["requests"] == 2
    assert sum(row["requests"] for row in doc["by_day"]) == 2
    assert "bob" not in r.text and all("key_id" not in row for row in doc["by_day"])
    del rc, a_entry


async def test_usage_is_a_request_of_its_key_and_its_limits_apply(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    _, one = lab.keys.add("one-at-a-time", limits=KeyLimits(concurrency=1))
    _, few = lab.keys.add("few", limits=KeyLimits(rpm=2))
    model = await lab.start_test_model(token_delay=0.05)
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url)
    await usage_summary_read(rc.connector, autojump_clock)
    async with lab.client() as client:
        auth = {"Authorization": f"Bearer {one}"}
        async with client.stream(
            "POST", rb.url + CHAT, json=chat("count to 20", stream=True), headers=auth
        ) as streaming:
            assert streaming.status_code == 200
            r = await client.get(rb.url + "/_bridge/usage", headers=auth)  # in parallel
            assert r.status_code == 429 and r.json()["error"]["message"].startswith(
                "this API key has 1 requests in progress"
            )
            async for _ in streaming.aiter_bytes():
                pass
        with trio.fail_after(5):  # the stream's end reaches the connector's counters
            while (
                r := await client.get(rb.url + "/_bridge/usage", headers=auth)
            ).status_code != 200:
                await trio.sleep(0.05)
        assert r.json()["now"]["in_flight"] == 1  # this one
        auth = {"Authorization": f"Bearer {few}"}
        statuses = [
            (await client.get(rb.url + "/_bridge/usage", headers=auth)).status_code
            for _ in range(3)
        ]
        assert statuses == [200, 200, 429]


@pytest.mark.slow  # measures the loop's stalls in real time: alone, not beside 4 workers
async def test_usage_with_many_old_rows_answers_without_stalling_the_connector(
    tcp_lab: Lab,
) -> None:
    """100 000 rows of junk model names from an older release, ten parallel calls: each answer
    is built from the key's bounded summary, and the loop keeps turning (reading the rows of
    the file took ~0.5 s per call here, on the loop)."""
    me = next(e.id for e in tcp_lab.keys.entries() if e.name == "lab-user")
    db = connect(tcp_lab.dir / "usage.sqlite3")
    now = time.time()
    db.executemany(
        f"INSERT INTO usage ({OLD_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (utc_day(now - (i % 30) * 86400), me if i % 2 else "other1", f"junk-{i}", 1, 1, 1, 0, 0)
            for i in range(100_000)
        ],
    )
    db.close()
    model = await tcp_lab.start_test_model(token_delay=0.001)
    rb = await tcp_lab.start_broker()
    rc = await tcp_lab.start_connector([rb], model.url)
    url = rb.url
    store = rc.connector.usage_store
    with trio.fail_after(10):
        await store.load()
    auth = {"Authorization": f"Bearer {tcp_lab.api_key}"}
    watch = LoopWatch()
    answers: list[httpx.Response] = []
    async with httpx.AsyncClient(timeout=30) as client, trio.open_nursery() as nursery:
        await nursery.start(watch.run)

        async def one() -> None:
            answers.append(await client.get(url + "/_bridge/usage", headers=auth))

        async with trio.open_nursery() as calls:
            for _ in range(10):
                calls.start_soon(one)
        nursery.cancel_scope.cancel()
    assert [r.status_code for r in answers] == [200] * 10
    doc = answers[0].json()
    assert doc["last_30_days"]["requests"] == 50_000
    assert len(doc["by_day"]) <= 31 * 51
    assert watch.worst < 0.4, watch.worst  # generous: two shared cores


# -- check --------------------------------------------------------------------------------------


def run_check(tmp_path: Path) -> subprocess.CompletedProcess[str]:
    (tmp_path / "c.toml").write_text(
        '[connector]\nbroker_urls = ["ws://127.0.0.1:1/_bridge/relay"]\n'
        'local_url = "http://127.0.0.1:2"\n'
    )
    return subprocess.run(
        [PY, "-m", "trio_bridge", "check", "-c", str(tmp_path / "c.toml")],
        capture_output=True,
        text=True,
        timeout=60,
    )


def usage_line(out: str) -> str:
    return next(line for line in out.splitlines() if "connector.usage_file" in line)


def test_check_writes_to_the_usage_file(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")
    record(store)
    trio.run(store.flush)
    store.close()
    line = usage_line(run_check(tmp_path).stdout)
    assert line.startswith("OK") and "test write" in line
    assert [r["key_id"] for r in read_rows(tmp_path / "usage.sqlite3")] == ["k1"]  # unchanged


def test_check_fails_on_a_usage_file_sqlite_cannot_write(tmp_path: Path) -> None:
    (tmp_path / "usage.sqlite3").write_bytes(b"not a database" * 100)  # writable, but useless
    line = usage_line(run_check(tmp_path).stdout)
    assert line.startswith("FAIL") and "not a database" in line


def test_check_tries_a_missing_usage_files_directory_without_creating_the_file(
    tmp_path: Path,
) -> None:
    line = usage_line(run_check(tmp_path).stdout)
    assert line.startswith("OK") and "test write" in line
    assert not (tmp_path / "usage.sqlite3").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.toml"]


async def test_a_summary_that_cannot_be_read_leaves_flushing_alone(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")

    def unreadable(since: str) -> Any:
        raise sqlite3.DatabaseError("database disk image is malformed")

    store._read_window = unreadable  # type: ignore[method-assign]
    record(store)
    assert await store.flush() is True
    assert store.loaded and store.rows()[0]["requests"] == 1
    assert read_rows(tmp_path / "usage.sqlite3")[0]["requests"] == 1
    store.close()


# -- what usage counts: every request of a key, refusals and errors apart -------------------------


async def test_a_request_refused_by_a_limit_is_in_usage_as_a_refused_request(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """A 429 (here: over the key's concurrency, refused before its body is read) is a request
    of its key, counted as refused (the bridge said no), not as an error (nothing failed):
    ``usage``, ``/_bridge/usage`` and the metrics agree on that."""
    _, key = lab.keys.add("one-at-a-time", limits=KeyLimits(concurrency=1))
    model = await lab.start_test_model(token_delay=0.02)
    rb = await lab.start_broker()
    rc = await lab.start_connector([rb], model.url)
    await usage_summary_read(rc.connector, autojump_clock)
    auth = {"Authorization": f"Bearer {key}"}
    async with lab.client() as client:
        async with client.stream(
            "POST", rb.url + CHAT, json=chat("count to 20", stream=True), headers=auth
        ) as streaming:
            r = await client.post(rb.url + CHAT, json=chat(), headers=auth)
            assert r.status_code == 429
            async for _ in streaming.aiter_bytes():
                pass
        with trio.fail_after(5):  # the stream's end reaches the key's counters
            while (
                r := await client.get(rb.url + "/_bridge/usage", headers=auth)
            ).status_code != 200:
                await trio.sleep(0.05)
    today = r.json()["today"]
    assert (today["requests"], today["refused"], today["errors"]) == (2, 1, 0)
    rows = rc.connector.usage_store.rows()
    assert sum(row["refused"] for row in rows) == 1
    assert sum(row["requests"] for row in rows) == 2


async def test_an_answer_the_llm_breaks_off_counts_as_an_error(
    lab: Lab, autojump_clock: trio.testing.MockClock
) -> None:
    """Errors in usage follow the metrics' rule: a 5xx, or an answer that broke off (the
    status was 200)."""
    async with memory_upstream(lab.network) as (_, llm):
        rb = await lab.start_broker()
        rc = await lab.start_connector([rb], llm)
        auth = {"Authorization": f"Bearer {lab.api_key}"}
        async with lab.client() as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.post(rb.url + "/die", json=chat(), headers=auth)
            with trio.fail_after(5):
                while not rc.connector.usage_store.rows():
                    await trio.sleep(0.02)
    [row] = rc.connector.usage_store.rows()
    assert (row["requests"], row["errors"], row["refused"]) == (1, 1, 0)


def test_a_usage_file_of_an_older_release_gains_the_refused_column(tmp_path: Path) -> None:
    path = tmp_path / "usage.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE usage (day TEXT NOT NULL, key_id TEXT NOT NULL, model TEXT NOT NULL, "
        "requests INTEGER NOT NULL DEFAULT 0, prompt_tokens INTEGER NOT NULL DEFAULT 0, "
        "completion_tokens INTEGER NOT NULL DEFAULT 0, estimated INTEGER NOT NULL DEFAULT 0, "
        "errors INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (day, key_id, model)) WITHOUT ROWID"
    )
    today = utc_day(time.time())
    db.execute("INSERT INTO usage VALUES (?, 'k1', 'm', 5, 1, 2, 0, 1)", (today,))
    db.commit()
    db.close()
    assert read_rows(path)[0]["refused"] == 0  # read as it is (the CLI opens it read-only)
    store = UsageStore(path)
    store.record("k1", "m", prompt=0, completion=0, estimated=False, error=False, refused=True,
                 now=time.time())  # fmt: skip
    trio.run(store.flush)
    store.close()
    [row] = read_rows(path)
    assert (row["requests"], row["errors"], row["refused"]) == (6, 1, 1)


def test_the_usage_command_shows_refused_requests(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text('[connector]\nusage_file = "usage.sqlite3"\n')
    store = UsageStore(tmp_path / "usage.sqlite3")
    store.record("k1", "m", prompt=3, completion=4, estimated=False, error=False, now=time.time())
    store.record("k1", "m", prompt=0, completion=0, estimated=False, error=False, refused=True,
                 now=time.time())  # fmt: skip
    trio.run(store.flush)
    store.close()
    out = subprocess.run(
        [PY, "-m", "trio_bridge", "usage", "-c", str(tmp_path / "c.toml")],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    header, row = out.splitlines()[:2]
    assert header.split()[-2:] == ["REFUSED", "ERRORS"]
    assert row.split()[-4:] == ["3", "4", "1", "0"]


def test_a_model_name_that_is_not_printable_is_counted_as_other(tmp_path: Path) -> None:
    store = UsageStore(tmp_path / "usage.sqlite3")
    for name in ("\ud800", "a\x1b[31m", "ok-model"):
        assert store.model_name(name) == (name if name == "ok-model" else "other")
