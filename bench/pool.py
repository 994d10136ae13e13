"""What the pool's shared store (connector.store, issue 27) adds to a request.

    python bench/pool.py [--n 400] [--rounds 5]

Starts a redis-server (Debian's package) on a free loopback port, one test model, and two
broker + connector pairs in one process on loopback: one connector counts limits in its own
memory (the keys file, as without a store), the other in the store; the key has an rpm, a
tokens-per-minute and a daily limit, so every window is checked. Then, in ``rounds``
interleaved rounds, ``n`` sequential small requests to each; prints p50 and p99 of each
round, their medians, and the difference (what the store adds). It also times the admission
alone (``Limiter.admit`` against one ``EVALSHA`` of the admission script), which is the whole
of what a request waits for: the end of a request is written off its path.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from netutil import free_port

from trio_bridge.accounts._limits import KeyLimits, Limiter
from trio_bridge.accounts._poolclient import store_client
from trio_bridge.accounts._poolkeys import fetch_keys, put_keys
from trio_bridge.testing import open_lab

LIMITS = KeyLimits(rpm=1_000_000, tokens_per_minute=10**9, tokens_per_day=10**12)
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


async def main(n: int, rounds: int) -> None:
    if shutil.which("redis-server") is None:
        sys.exit("redis-server missing (apt-get install redis-server)")
    port = free_port()
    tmp = Path(tempfile.mkdtemp(prefix="tb-pool-bench-"))
    redis = await trio.lowlevel.open_process(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:
        await trio.sleep(0.3)
        async with open_lab() as lab:
            _, key = lab.keys.add("bench", limits=LIMITS)
            config = lab.config(connector={"store": url})
            client = store_client(config)
            async with client:
                _, version = await fetch_keys(client)
                await put_keys(client, lab.keys.path.read_bytes(), version)
            model = await lab.start_test_model(token_delay=0)
            b_file, b_pool = await lab.start_broker(), await lab.start_broker()
            await lab.start_connector([b_file], model.url, connector={"name": "file"})
            rc = await lab.start_connector(
                [b_pool], model.url, connector={"name": "pool", "store": url}
            )
            pool = rc.connector.pool
            assert pool is not None and pool.up, pool and pool.problems()
            headers = {"Authorization": f"Bearer {key}"}
            results: dict[str, list[tuple[float, float]]] = {"file": [], "pool": []}
            async with lab.client() as http:
                for base in (b_file.url, b_pool.url):  # warm up
                    for _ in range(50):
                        await http.post(base + "/v1/chat/completions", json=BODY, headers=headers)
                for r in range(rounds):
                    for mode, base in (("file", b_file.url), ("pool", b_pool.url))[
                        :: 1 if r % 2 else -1
                    ]:
                        times = []
                        for _ in range(n):
                            t = time.perf_counter()
                            resp = await http.post(
                                base + "/v1/chat/completions", json=BODY, headers=headers
                            )
                            times.append(time.perf_counter() - t)
                            assert resp.status_code == 200, resp.text
                        results[mode].append((pct(times, 0.5), pct(times, 0.99)))
            # the admission alone
            local, admit_local, admit_pool = Limiter(), [], []
            for _ in range(2000):
                t = time.perf_counter()
                local.admit("k", LIMITS, trio.current_time(), wall=time.time())
                admit_local.append(time.perf_counter() - t)
                local.finish("k", 0, trio.current_time(), wall=time.time())
            for _ in range(2000):
                t = time.perf_counter()
                await pool.admit("bench-admit", LIMITS)
                admit_pool.append(time.perf_counter() - t)
                pool.finish("bench-admit", 0, shared=True)
    finally:
        redis.kill()
        await redis.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    ms = 1000.0
    print(f"{n} sequential requests x {rounds} rounds per mode, loopback, one process")
    print(f"{'mode':<6} {'p50 per round (ms)':<44} {'median p50':>10} {'median p99':>10}")
    med = {}
    for mode, rs in results.items():
        p50s, p99s = [a * ms for a, _ in rs], [b * ms for _, b in rs]
        med[mode] = (statistics.median(p50s), statistics.median(p99s))
        print(f"{mode:<6} {' '.join(f'{x:.3f}' for x in p50s):<44} "
              f"{med[mode][0]:>10.3f} {med[mode][1]:>10.3f}")  # fmt: skip
    print(f"added by the store: p50 {med['pool'][0] - med['file'][0]:+.3f} ms, "
          f"p99 {med['pool'][1] - med['file'][1]:+.3f} ms")  # fmt: skip
    print(f"admission alone (2000): Limiter.admit p50 {pct(admit_local, 0.5) * ms:.4f} ms; "
          f"store p50 {pct(admit_pool, 0.5) * ms:.3f} ms, "
          f"p99 {pct(admit_pool, 0.99) * ms:.3f} ms")  # fmt: skip
    print(f"(pid {os.getpid()}; redis-server on 127.0.0.1:{port})")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    trio.run(main, a.n, a.rounds)
