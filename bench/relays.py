"""What idle relays cost a broker (and the side that holds them), by number of relays.

    python bench/relays.py [--counts 100,1000,5000] [--idle 20] [--broker-from DIR]
                           [--timer-per-relay]

Starts a broker (a separate process, default settings but the connection limits, ping
interval 5 s) on 127.0.0.1 and, in this process, opens N relays to it the way a connector does
(WebSocket, a real hello with a connector token, the role's one shared liveness timer, or with
``--timer-per-relay`` a pinger task each, as before), leaves them idle for ``--idle`` seconds
and reports the broker's CPU (% of a core), its RSS per relay, and this process's CPU (what
the connector side pays for keeping them). ``--broker-from``: run the broker from another
checkout (its directory), for A/B. Relays are opened in batches, every count is bounded, and
everything is closed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from run import cpu_seconds, free_port, rss_kib  # noqa: E402

from trio_bridge.http._ws import connect_websocket  # noqa: E402
from trio_bridge.relay._frames import MAX_MESSAGE  # noqa: E402
from trio_bridge.relay._protocol import Session  # noqa: E402
from trio_bridge.relay._relay import Liveness, Relay  # noqa: E402

PY = sys.executable
PING_INTERVAL = 5.0


def own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def open_relays(
    url: str, token: str, n: int, liveness: Liveness, nursery: trio.Nursery
) -> list[Relay]:
    relays: list[Relay] = []

    async def one() -> None:
        ws = await connect_websocket(
            url,
            headers=[(b"authorization", b"Bearer " + token.encode())],
            max_message=MAX_MESSAGE + 1024,
        )
        relay = Relay(
            ws, Session(opener=False), name="bench", ping_interval=PING_INTERVAL, liveness=liveness
        )
        await nursery.start(relay.run)
        relays.append(relay)

    for start in range(0, n, 200):  # batches: the broker's accept backlog stays small
        async with trio.open_nursery() as batch:
            for _ in range(min(200, n - start)):
                batch.start_soon(one)
    return relays


async def measure(
    url: str, token: str, broker_pid: int, n: int, idle: float, shared: bool
) -> dict[str, float]:
    liveness = Liveness(PING_INTERVAL) if shared else None
    async with trio.open_nursery() as nursery:
        if liveness is not None:
            nursery.start_soon(liveness.run)
        rss0 = rss_kib(broker_pid)
        with trio.fail_after(120):
            relays = await open_relays(url, token, n, liveness, nursery)
        await trio.sleep(2 * PING_INTERVAL)  # settled: every relay pinged at least once
        b0, c0, t0 = cpu_seconds(broker_pid), own_cpu(), time.monotonic()
        await trio.sleep(idle)
        b1, c1, t1 = cpu_seconds(broker_pid), own_cpu(), time.monotonic()
        rss1 = rss_kib(broker_pid)
        alive = sum(1 for r in relays if r.closed_reason is None)
        for relay in relays:
            relay.close("bench done")
        nursery.cancel_scope.cancel()
    wall = t1 - t0
    return {
        "relays": n,
        "alive": alive,
        "broker_cpu_pct": 100 * (b1 - b0) / wall,
        "holder_cpu_pct": 100 * (c1 - c0) / wall,
        "broker_kib_per_relay": (rss1 - rss0) / n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="100,1000,5000")
    ap.add_argument("--idle", type=float, default=20.0)
    ap.add_argument("--broker-from", default=str(HERE.parent), help="a checkout's directory")
    ap.add_argument("--timer-per-relay", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * max(counts) + 500
    if soft < need:  # this process and the broker (inherited) hold one socket per relay each
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    with tempfile.TemporaryDirectory(prefix="tb-relays-") as tmp:
        d = Path(tmp)
        port = free_port()
        (d / "broker.toml").write_text(
            f'[broker]\nlisten = "127.0.0.1:{port}"\nadmin_listen = ""\n'
            f"[limits]\nmax_connections_per_address = {need}\nmax_connections = {need}\n"
            f'[relay]\nping_interval = "{PING_INTERVAL}s"\n'
        )
        token = subprocess.run(
            [PY, "-m", "trio_bridge", "tokens", "add", "bench", "-c", str(d / "broker.toml")],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        env = {**os.environ, "PYTHONPATH": args.broker_from}
        with open(d / "broker.log", "wb") as log:
            broker = subprocess.Popen(
                [PY, "-m", "trio_bridge", "broker", "-c", str(d / "broker.toml")],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )  # fmt: skip
        try:
            time.sleep(1.5)
            url = f"ws://127.0.0.1:{port}/_bridge/relay"
            print("| relays | broker CPU (% of a core) | broker KiB per relay | holder CPU (%) |")
            print("|---|---|---|---|")
            for n in counts:
                shared = not args.timer_per_relay
                r = trio.run(measure, url, token, broker.pid, n, args.idle, shared)
                print(
                    f"| {n} ({int(r['alive'])} up) | {r['broker_cpu_pct']:.2f} | "
                    f"{r['broker_kib_per_relay']:.1f} | {r['holder_cpu_pct']:.2f} |",
                    flush=True,
                )
        finally:
            broker.terminate()
            broker.wait(10)


if __name__ == "__main__":
    main()
