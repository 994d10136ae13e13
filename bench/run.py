"""Benchmark: the bridge vs a direct connection to the same fast fake LLM, measured in one run.

    python bench/run.py [--quick] [--runs 3] [--out bench/results]

Starts, on 127.0.0.1, ``bench/fakellm.py`` (trio + h11), a broker and a connector (separate
processes, default settings, JSON logs at level info), then measures each figure directly and
through the bridge, interleaved round by round, and prints medians over the rounds with the
ratio bridge/direct. Writes the table as Markdown and JSON. Every load loop is bounded in count
and in time. The client is a lean h11 client with one keep-alive connection per task, so its
own cost is small and the same on both paths. ``--runs N``: N whole runs, each with a fresh
bridge, and the median of each figure over them; the table marks each figure with its target
(✓ met, ✗ not).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import trio

HERE = Path(__file__).resolve().parent
PY = sys.executable
ROLE = [PY, "-m", "trio_bridge"]
CLK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class Client:
    """One keep-alive HTTP/1.1 connection (h11)."""

    def __init__(self, port: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.port = port
        self.headers = headers
        self.stream: trio.SocketStream | None = None
        self.conn = h11.Connection(h11.CLIENT)

    async def _ensure(self) -> trio.SocketStream:
        if self.stream is None or self.conn.our_state is not h11.IDLE:
            if self.stream is not None:
                await self.stream.aclose()
            self.stream = await trio.open_tcp_stream("127.0.0.1", self.port)
            self.stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.conn = h11.Connection(h11.CLIENT)
        return self.stream

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        on_chunk: Callable[[], None] | None = None,
    ) -> tuple[int, int]:
        """Send a request, read the whole response; returns (status, body bytes)."""
        stream = await self._ensure()
        conn = self.conn
        hdrs = [(b"host", b"bench"), *self.headers, (b"content-length", str(len(body)).encode())]
        await stream.send_all(
            conn.send(h11.Request(method=method, target=target, headers=hdrs))
            + conn.send(h11.Data(data=body))
            + conn.send(h11.EndOfMessage())
        )
        status, size = 0, 0
        while True:
            ev = conn.next_event()
            if ev is h11.NEED_DATA:
                data = await stream.receive_some(65536)
                if not data:
                    raise RuntimeError("connection closed mid-response")
                conn.receive_data(data)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                size += len(ev.data)
                if on_chunk is not None:
                    on_chunk()
            elif isinstance(ev, h11.EndOfMessage):
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:  # the server closes this connection (e.g. keep-alive request cap)
                    await stream.aclose()
                    self.stream = None
                return status, size

    async def aclose(self) -> None:
        if self.stream is not None:
            await self.stream.aclose()


SMALL_BODY = json.dumps({"model": "fake", "messages": [{"role": "user", "content": "hi"}]}).encode()
STREAM_BODY = json.dumps(
    {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
).encode()


async def latency(port: int, hdrs: list[tuple[bytes, bytes]], c: int, n: int) -> list[float]:
    out: list[float] = []

    async def worker() -> None:
        cl = Client(port, hdrs)
        await cl.request("POST", "/v1/chat/completions", SMALL_BODY)  # warm the connection
        for _ in range(n // c):
            t = time.perf_counter()
            status, _ = await cl.request("POST", "/v1/chat/completions", SMALL_BODY)
            out.append((time.perf_counter() - t) * 1000)
            assert status == 200, status
        await cl.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(c):
                nursery.start_soon(worker)
    return out


async def throughput(port: int, hdrs: list[tuple[bytes, bytes]], c: int, seconds: float) -> float:
    done = 0
    deadline = trio.current_time() + seconds

    async def worker() -> None:
        nonlocal done
        cl = Client(port, hdrs)
        while trio.current_time() < deadline:
            status, _ = await cl.request("POST", "/v1/chat/completions", SMALL_BODY)
            assert status == 200
            done += 1
        await cl.aclose()

    t = trio.current_time()
    with trio.fail_after(seconds + 30):
        async with trio.open_nursery() as nursery:
            for _ in range(c):
                nursery.start_soon(worker)
    return done / (trio.current_time() - t)


async def streams(
    port: int, hdrs: list[tuple[bytes, bytes]], c: int, chunks: int, delay_ms: float
) -> dict[str, list[float]]:
    firsts: list[float] = []
    lasts: list[float] = []
    gaps: list[float] = []

    async def one() -> None:
        cl = Client(port, hdrs)
        times: list[float] = []
        t0 = time.perf_counter()
        await cl.request(
            "POST",
            f"/v1/chat/completions?n={chunks}&delay_ms={delay_ms}",
            STREAM_BODY,
            on_chunk=lambda: times.append(time.perf_counter()),
        )
        firsts.append((times[0] - t0) * 1000)
        lasts.append((times[-1] - t0) * 1000)
        gaps.append(max((b - a for a, b in itertools.pairwise(times)), default=0.0) * 1000)
        await cl.aclose()

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(c):
                nursery.start_soon(one)
    return {"first": firsts, "last": lasts, "gap": gaps}


async def many_streams(
    port: int,
    hdrs: list[tuple[bytes, bytes]],
    n: int,
    chunks: int,
    delay_ms: float,
    want: int,
) -> tuple[int, int, float]:
    """``n`` streams at once, each read to the end: (complete with ``want`` bytes, errors,
    seconds)."""
    ok = errors = 0

    async def one() -> None:
        nonlocal ok, errors
        cl = Client(port, hdrs)
        try:
            status, size = await cl.request(
                "POST", f"/v1/chat/completions?n={chunks}&delay_ms={delay_ms}", STREAM_BODY
            )
            if status == 200 and size == want:
                ok += 1
            else:
                errors += 1
        except (OSError, RuntimeError, trio.BrokenResourceError, h11.ProtocolError):
            errors += 1
        finally:
            await cl.aclose()

    t = time.perf_counter()
    with trio.move_on_after(120):
        async with trio.open_nursery() as nursery:
            for _ in range(n):
                nursery.start_soon(one)
    return ok, errors + (n - ok - errors), time.perf_counter() - t


async def upload(port: int, hdrs: list[tuple[bytes, bytes]], size: int) -> float:
    body = os.urandom(size)
    cl = Client(port, hdrs)
    t = time.perf_counter()
    status, _ = await cl.request("POST", "/upload", body)
    dt = (time.perf_counter() - t) * 1000
    assert status == 200, status
    await cl.aclose()
    return dt


async def cancel_latency(port: int, hdrs: list[tuple[bytes, bytes]], close_log: Path) -> float:
    before = close_log.read_text().count("\n") if close_log.exists() else 0
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    head = b"GET /forever HTTP/1.1\r\nhost: b\r\n" + b"".join(
        k + b": " + v + b"\r\n" for k, v in hdrs
    )
    await stream.send_all(head + b"\r\n")
    got = 0
    while got < 3000:
        got += len(await stream.receive_some(65536))
    t = time.time()
    await stream.aclose()
    with trio.fail_after(10):
        while True:
            lines = close_log.read_text().splitlines() if close_log.exists() else []
            if len(lines) > before:
                return (float(lines[-1]) - t) * 1000
            await trio.sleep(0.001)


async def idle_streams(
    port: int, hdrs: list[tuple[bytes, bytes]], n: int, pids: list[int]
) -> tuple[float, int]:
    """RSS growth (KiB, roles together) per open idle stream; returns (per stream, opened)."""
    before = sum(rss_kib(p) for p in pids)
    opened = 0
    socks: list[trio.SocketStream] = []
    head = (
        b"POST /v1/chat/completions?n=2&delay_ms=60000 HTTP/1.1\r\nhost: b\r\n"
        + b"".join(k + b": " + v + b"\r\n" for k, v in hdrs)
        + b"content-length: %d\r\n\r\n" % len(STREAM_BODY)
        + STREAM_BODY
    )
    with trio.move_on_after(60):
        for _ in range(n):
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(head)
            socks.append(s)
        for s in socks:  # wait for the first chunk of each: the stream is open end to end
            await s.receive_some(65536)
            opened += 1
    await trio.sleep(0.5)
    after = sum(rss_kib(p) for p in pids)
    for s in socks:
        await s.aclose()
    return (after - before) / max(1, opened), opened


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        cmd, stderr=log.open("wb"), stdout=subprocess.DEVNULL, env={**os.environ, **(env or {})}
    )


def stop(procs: Iterable[subprocess.Popen[bytes]], seconds: float) -> None:
    """SIGTERM to all (the roles drain), then wait; kill what is still up after ``seconds``."""
    procs = list(procs)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(seconds)
        except subprocess.TimeoutExpired:
            p.kill()


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"port {port} did not open")


async def limits_cost(
    res: dict[str, Any],
    roles: list[int],
    plain: tuple[int, list[tuple[bytes, bytes]]],
    limited: tuple[int, list[tuple[bytes, bytes]]],
    rounds: int,
    quick: bool,
) -> None:
    """Connector CPU per request (c=10) for a key without limits and one with every limit
    set (checked on each request, never reached; a model allowlist makes the connector read
    the body first), alternating so that machine noise hits both alike."""
    acc: dict[str, list[float]] = {"off": [], "on": []}
    for _ in range(max(3, rounds)):
        for name, target in (("off", plain), ("on", limited)):
            cc = cpu_seconds(roles[1])
            t = time.perf_counter()
            rps = await throughput(*target, 10, 1.0 if quick else 2.0)
            acc[name].append((cpu_seconds(roles[1]) - cc) / (rps * (time.perf_counter() - t)) * 1e6)
    res["connector cpu per request c=10, key limits off / on"] = {
        "off": med(acc["off"]),
        "on": med(acc["on"]),
        "unit": "µs",
        "rounds_off": acc["off"],
        "rounds_on": acc["on"],
    }


def med(rounds: list[float]) -> float:
    return statistics.median(rounds)


def prepare(
    d: Path, llm_port: int, pub_port: int, env: dict[str, str] | None = None, streams: int = 2000
) -> str:
    """Config files for a broker on ``pub_port`` and a connector in front of the fake LLM on
    ``llm_port`` in ``d`` (room for ``streams`` at once), with a connector token and an API
    key; returns the key."""
    (d / "broker.toml").write_text(
        f'[broker]\nlisten = "127.0.0.1:{pub_port}"\n[limits]\nmax_body = "32MiB"\n'
        # every benchmark client comes from 127.0.0.1
        f"max_connections_per_address = {max(5000, streams + 100)}\n"
        f"max_connections = {max(10000, streams + 200)}\n"
        f"max_requests = {max(1000, streams + 100)}\n"
        f"[relay]\nmax_streams = {streams}\n"
    )
    (d / "connector.toml").write_text(
        f'[connector]\nbroker_urls = ["ws://127.0.0.1:{pub_port}/_bridge/relay"]\n'
        f'local_url = "http://127.0.0.1:{llm_port}"\nmax_concurrent = {streams}\n'
        f'[limits]\nmax_body = "32MiB"\n[relay]\nmax_streams = {streams}\n'
    )

    def new_secret(store: str, config: str) -> str:
        cmd = [*ROLE, store, "add", "bench", "-c", str(d / config)]
        out = subprocess.run(
            cmd, capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
        )
        return out.stdout.strip()

    (d / "connector.token").write_text(new_secret("tokens", "broker.toml"))
    (d / "connector.token").chmod(0o600)
    return new_secret("keys", "connector.toml")


async def wait_bridge(port: int, hdrs: list[tuple[bytes, bytes]], seconds: float) -> None:
    """Until a small request through the bridge on ``port`` gets its 200."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            status, _ = await Client(port, hdrs).request("POST", "/v1/chat/completions", SMALL_BODY)
            if status == 200:
                return
        except (OSError, RuntimeError):
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("bridge did not come up")
        await trio.sleep(0.1)


@asynccontextmanager
async def running_bridge(
    c: int,
    env: dict[str, str],
    wrap: Callable[[str, Path], list[str]] = lambda role, d: [],
    seconds: float = 30,
    streams: int = 2000,
) -> AsyncIterator[tuple[Path, dict[str, subprocess.Popen[bytes]], int, list[tuple[bytes, bytes]]]]:
    """The fake LLM, a broker and a connector (each role's command prefixed by ``wrap(role,
    dir)``, e.g. valgrind) in a fresh directory, up and warmed with 100 requests at ``c``:
    (directory, processes, public port, auth headers). Stopped (and the directory removed,
    unless KEEP is set) on exit."""
    d = Path(tempfile.mkdtemp(prefix="tb-bench-"))
    llm_port, pub_port = free_port(), free_port()
    key = prepare(d, llm_port, pub_port, env, streams)
    procs = {
        "llm": start([PY, str(HERE / "fakellm.py"), str(llm_port)], d / "llm.log"),
        "broker": start(
            [*wrap("broker", d), *ROLE, "broker", "-c", str(d / "broker.toml")],
            d / "broker.log",
            env,
        ),
    }
    try:
        wait_port(llm_port)
        wait_port(pub_port, seconds)
        procs["connector"] = start(
            [*wrap("connector", d), *ROLE, "connector", "-c", str(d / "connector.toml")],
            d / "connector.log",
            env,
        )
        hdrs = [(b"authorization", b"Bearer " + key.encode())]
        await wait_bridge(pub_port, hdrs, seconds)
        await latency(pub_port, hdrs, c, 100)  # warm: connections, caches, first-use imports
        yield d, procs, pub_port, hdrs
    finally:
        stop(procs.values(), 30)
        if not os.environ.get("KEEP"):
            shutil.rmtree(d, ignore_errors=True)


async def counted_load(
    port: int, hdrs: list[tuple[bytes, bytes]], c: int, n: int, stream_delay_ms: float | None
) -> int:
    """``n`` small requests at concurrency ``c`` or, with ``stream_delay_ms``, ``n`` streams
    of 50 chunks that far apart (rounds of ``c``); how many were done."""
    if stream_delay_ms is None:
        return len(await latency(port, hdrs, c, n))
    rounds = max(1, n // c)
    for _ in range(rounds):
        await streams(port, hdrs, c, 50, stream_delay_ms)
    return rounds * c


async def bench(args: argparse.Namespace, d: Path) -> dict[str, Any]:
    llm_port, pub_port = free_port(), free_port()
    close_log = d / "closes.log"
    key = prepare(d, llm_port, pub_port)
    run = ROLE
    # a key whose limits are all checked on every request but never reached
    limited_key = subprocess.run(
        [*run, "keys", "add", "bench-limited", "-c", str(d / "connector.toml"),
         "--concurrency", "100k", "--rpm", "100M", "--tpm", "1000M", "--tpd", "1000M",
         "--models", "*"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    procs = {
        "llm": start(
            [PY, str(HERE / "fakellm.py"), str(llm_port)],
            d / "llm.log",
            {"FAKELLM_CLOSE_LOG": str(close_log)},
        ),
        "broker": start([*run, "broker", "-c", str(d / "broker.toml")], d / "broker.log"),
    }
    wait_port(llm_port)
    wait_port(pub_port)
    procs["connector"] = start(
        [*run, "connector", "-c", str(d / "connector.toml")], d / "connector.log"
    )
    try:
        bridged_hdrs = [(b"authorization", b"Bearer " + key.encode())]
        direct = (llm_port, [])
        bridge = (pub_port, bridged_hdrs)
        await wait_bridge(pub_port, bridged_hdrs, 15)

        q = args.quick
        rounds = 3 if q else 7
        res: dict[str, Any] = {}
        roles = [procs["broker"].pid, procs["connector"].pid]

        def record(name: str, d_vals: list[float], b_vals: list[float], unit: str) -> None:
            res[name] = {
                "direct": med(d_vals),
                "bridge": med(b_vals),
                "unit": unit,
                "rounds_direct": d_vals,
                "rounds_bridge": b_vals,
            }

        limited = (pub_port, [(b"authorization", b"Bearer " + limited_key.encode())])
        if args.limits_only:
            await limits_cost(res, roles, bridge, limited, rounds, q)
            return res
        # 0. memory per idle open stream, first: later phases (the 10 MB upload) leave freed
        # heap behind that new streams would reuse, hiding their cost
        per, opened = await idle_streams(*bridge, 200 if q else 1000, roles)
        res["RSS per idle open stream (both roles)"] = {
            "bridge": per,
            "unit": "KiB",
            "streams": opened,
        }
        # 1. small request latency
        for c, n in ((1, 300 if q else 1000), (10, 1000 if q else 3000)):
            dv: dict[str, list[float]] = {"p50": [], "p99": []}
            bv: dict[str, list[float]] = {"p50": [], "p99": []}
            for _ in range(rounds):
                for target, acc in ((direct, dv), (bridge, bv)):
                    lat = await latency(*target, c, n)
                    acc["p50"].append(pct(lat, 50))
                    acc["p99"].append(pct(lat, 99))
            record(f"latency c={c} p50", dv["p50"], bv["p50"], "ms")
            record(f"latency c={c} p99", dv["p99"], bv["p99"], "ms")
        # 2. streams
        for c in (10, 100):
            acc_d: dict[str, list[float]] = {"f50": [], "f99": [], "last": [], "gap": []}
            acc_b: dict[str, list[float]] = {"f50": [], "f99": [], "last": [], "gap": []}
            for _ in range(max(2, rounds // 2)):
                for target, acc in ((direct, acc_d), (bridge, acc_b)):
                    r = await streams(*target, c, 50, 20)
                    acc["f50"].append(pct(r["first"], 50))
                    acc["f99"].append(pct(r["first"], 99))
                    acc["last"].append(pct(r["last"], 50))
                    acc["gap"].append(pct(r["gap"], 99))
            record(f"stream c={c} first event p50", acc_d["f50"], acc_b["f50"], "ms")
            record(f"stream c={c} first event p99", acc_d["f99"], acc_b["f99"], "ms")
            record(f"stream c={c} last byte p50", acc_d["last"], acc_b["last"], "ms")
            record(f"stream c={c} largest gap p99", acc_d["gap"], acc_b["gap"], "ms")
        # 3. throughput, with CPU per request of each role
        for c in (10, 64):
            dv2: list[float] = []
            bv2: list[float] = []
            cpu_b: list[float] = []
            cpu_c: list[float] = []
            cpu_l: list[float] = []  # the fake LLM's own, direct: one trio + h11 HTTP hop
            for _ in range(max(2, rounds // 2)):
                cl, t = cpu_seconds(procs["llm"].pid), time.perf_counter()
                rps = await throughput(*direct, c, 1.0 if q else 3.0)
                dv2.append(rps)
                cpu_l.append(
                    (cpu_seconds(procs["llm"].pid) - cl) / (rps * (time.perf_counter() - t)) * 1e6
                )
                cb, cc = cpu_seconds(roles[0]), cpu_seconds(roles[1])
                t = time.perf_counter()
                rps = await throughput(*bridge, c, 1.0 if q else 3.0)
                n_req = rps * (time.perf_counter() - t)
                bv2.append(rps)
                cpu_b.append((cpu_seconds(roles[0]) - cb) / n_req * 1e6)
                cpu_c.append((cpu_seconds(roles[1]) - cc) / n_req * 1e6)
            record(f"throughput c={c}", dv2, bv2, "req/s")
            res[f"cpu per request c={c}"] = {
                "broker": med(cpu_b),
                "connector": med(cpu_c),
                "fake LLM": med(cpu_l),
                "unit": "µs",
            }
        await limits_cost(res, roles, bridge, limited, rounds, q)
        # 4. upload: one each first (the first grows each process's heap for its buffers),
        # then enough rounds for a median (each is ~50 ms; two were too few to say anything)
        await upload(*direct, 10 * 1024 * 1024)
        await upload(*bridge, 10 * 1024 * 1024)
        ud, ub = [], []
        for _ in range(5 if q else 9):
            ud.append(await upload(*direct, 10 * 1024 * 1024))
            ub.append(await upload(*bridge, 10 * 1024 * 1024))
        record("10 MB upload", ud, ub, "ms")
        # 5. cancel latency (bridge only: direct is the baseline of 0)
        cl = [await cancel_latency(*bridge, close_log) for _ in range(5)]
        res["cancel: client gone -> upstream closed"] = {
            "bridge": med(cl),
            "unit": "ms",
            "rounds_bridge": cl,
        }
        # 7. many concurrent streams through one connector, all run to the end; CPU per stream
        n_many = 300 if q else 1000
        cb, cc = cpu_seconds(roles[0]), cpu_seconds(roles[1])
        probe = Client(*direct)
        _, want = await probe.request("POST", "/v1/chat/completions?n=50&delay_ms=0", STREAM_BODY)
        await probe.aclose()
        ok, errors, seconds = await many_streams(*bridge, n_many, 50, 20, want)
        res[f"{n_many} concurrent streams (50 chunks each)"] = {
            "bridge": ok,
            "unit": "completed",
            "errors": errors,
            "seconds": seconds,
        }
        res["cpu per stream of 50 chunks"] = {
            "broker": (cpu_seconds(roles[0]) - cb) / n_many * 1e6,
            "connector": (cpu_seconds(roles[1]) - cc) / n_many * 1e6,
            "unit": "µs",
        }
        return res
    finally:
        stop(procs.values(), 10)


#: the targets of the figures (what the README's table shows beside them): (kind, value)
#: added: bridge - direct at most; ratio: bridge / direct at most; ratio_min: at least;
#: sum: broker + connector at most; most: the bridge's figure at most; no_errors
TARGETS: dict[str, tuple[str, float]] = {
    "latency c=1 p50": ("added", 1.0),
    "latency c=10 p99": ("added", 5.0),
    "stream c=100 first event p99": ("ratio", 3.0),
    "stream c=100 largest gap p99": ("added", 2.0),
    "throughput c=64": ("ratio_min", 0.25),
    "cpu per request c=10": ("sum", 500.0),
    "10 MB upload": ("ratio", 2.0),
    "RSS per idle open stream (both roles)": ("most", 32.0),
}


def _target(name: str, r: dict[str, Any]) -> str:
    """The target of figure ``name`` and whether ``r`` meets it (✓ / ✗), or ""."""
    if name.endswith("concurrent streams (50 chunks each)"):
        return "no errors " + ("✓" if r["errors"] == 0 else "✗")
    if name not in TARGETS:
        return ""
    kind, v = TARGETS[name]
    if kind == "added":
        return f"≤ +{v:g} {r['unit']} " + ("✓" if r["bridge"] - r["direct"] <= v else "✗")
    if kind == "ratio":
        return f"≤ {v:g}× " + ("✓" if r["bridge"] / r["direct"] <= v else "✗")
    if kind == "ratio_min":
        return f"≥ {v:g}× " + ("✓" if r["bridge"] / r["direct"] >= v else "✗")
    if kind == "sum":
        return f"≤ {v:g} µs " + ("✓" if r["broker"] + r["connector"] <= v else "✗")
    return f"≤ {v:g} {r['unit']} " + ("✓" if r["bridge"] <= v else "✗")


def table(res: dict[str, Any]) -> str:
    rows = [
        "| figure | direct | bridge | bridge − direct | ratio | target |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in res.items():
        unit, target = r["unit"], _target(name, r)
        if "direct" in r:
            d, b = r["direct"], r["bridge"]
            rows.append(
                f"| {name} ({unit}) | {d:.3f} | {b:.3f} | {b - d:+.3f} | {b / d:.2f}× | {target} |"
            )
        elif "broker" in r:
            # direct: the fake LLM's own CPU per request (one HTTP hop on trio + h11, no
            # features), for scale: the bridge's path has four such hops
            llm = f"fake LLM {r['fake LLM']:.0f}" if "fake LLM" in r else ""
            rows.append(
                f"| {name} ({unit}) | {llm} | broker {r['broker']:.0f} + connector "
                f"{r['connector']:.0f} = {r['broker'] + r['connector']:.0f} | | | {target} |"
            )
        elif "on" in r:
            rows.append(
                f"| {name} ({unit}) | | off {r['off']:.0f}, on {r['on']:.0f} "
                f"({r['on'] - r['off']:+.0f}) | | | |"
            )
        elif unit == "completed":
            rows.append(
                f"| {name} | | {r['bridge']:.0f} complete, {r['errors']:.0f} errors in "
                f"{r['seconds']:.1f} s | | | {target} |"
            )
        else:
            rows.append(f"| {name} ({unit}) | | {r['bridge']:.3f} | | | {target} |")
    return "\n".join(rows)


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of each figure's numbers over whole runs (each its own fresh bridge)."""
    out: dict[str, Any] = {}
    for name, first in runs[0].items():
        fig: dict[str, Any] = {"unit": first["unit"], "runs": len(runs)}
        for field, value in first.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                fig[field] = med([r[name][field] for r in runs if name in r])
        out[name] = fig
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds: under a minute")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument(
        "--limits-only", action="store_true", help="only the cost of per-key limits (on vs off)"
    )
    ap.add_argument(
        "--runs", type=int, default=1, help="whole runs (a fresh bridge each): the medians"
    )
    args = ap.parse_args()
    t = time.monotonic()
    runs = []
    for _ in range(max(1, args.runs)):
        with tempfile.TemporaryDirectory(prefix="tb-bench-") as tmp:
            runs.append(trio.run(bench, args, Path(tmp)))
    res = combine(runs) if len(runs) > 1 else runs[0]
    md = table(res)
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "quick": args.quick,
        "runs": len(runs),
        "seconds": round(time.monotonic() - t),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    print(md)
    print(f"\n{meta}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.md").write_text(md + "\n")
    (out / f"bench-{stamp}.json").write_text(json.dumps({"meta": meta, "results": res}, indent=1))


if __name__ == "__main__":
    main()
