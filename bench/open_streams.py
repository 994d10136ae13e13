"""Many streams open at once through one broker and one connector: none may fail, and what
each costs while it waits.

    python bench/open_streams.py [--n 10000] [--hold 20]

Starts ``bench/fakellm.py``, a broker and a connector as ``run.py`` does (room for ``n``
streams: ``max_concurrent``, ``max_streams``, ``max_connections``), opens ``n`` client
connections, each a streaming chat request whose answer is one chunk at once, a second chunk
``hold`` seconds later (plus the time it took to open them all) and ``[DONE]``; waits until
every stream has its first chunk (open end to end: client → broker → relay → connector →
LLM), measures the roles' RSS and idle CPU for ``hold`` seconds, then reads every stream to its
end. Prints: streams complete / failed, RSS per open stream (broker + connector, and each),
CPU of the roles while the streams waited, and the time to open them. Bounded in count and
time; loopback only. Needs ``ulimit -n`` above ``n`` + a few hundred in each process (the
client, broker, connector and fake LLM each hold ``n`` sockets).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import trio
from run import STREAM_BODY, cpu_seconds, rss_kib, running_bridge


async def bench(n: int, hold: float) -> dict[str, object]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = n + 500
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    res: dict[str, object] = {"streams": n}
    async with running_bridge(1, {}, streams=n + 100, seconds=60) as (_d, procs, port, hdrs):
        roles = {name: procs[name].pid for name in ("broker", "connector")}
        before = {name: rss_kib(pid) for name, pid in roles.items()}
        # the second chunk comes late enough that every stream is open before any ends
        delay_ms = int((hold + 10 + n / 250) * 1000)
        head = (
            f"POST /v1/chat/completions?n=2&delay_ms={delay_ms} HTTP/1.1\r\nhost: b\r\n".encode()
            + b"".join(k + b": " + v + b"\r\n" for k, v in hdrs)
            + b"content-length: %d\r\n\r\n" % len(STREAM_BODY)
            + STREAM_BODY
        )
        socks: list[trio.SocketStream] = []
        got = [b""] * n
        failed = 0
        t = time.perf_counter()
        with trio.move_on_after(120) as opening:
            for _ in range(n):
                s = await trio.open_tcp_stream("127.0.0.1", port)
                await s.send_all(head)
                socks.append(s)

            async def first_chunk(i: int, s: trio.SocketStream) -> None:
                while b"data:" not in got[i]:
                    data = await s.receive_some(65536)
                    if not data:
                        return
                    got[i] += data

            async with trio.open_nursery() as nursery:
                for i, s in enumerate(socks):
                    nursery.start_soon(first_chunk, i, s)
        open_s = time.perf_counter() - t
        opened = sum(1 for g in got if b"data:" in g)
        res["opened"] = opened
        res["open_seconds"] = round(open_s, 1)
        res["open_timed_out"] = opening.cancelled_caught
        await trio.sleep(1)
        after = {name: rss_kib(pid) for name, pid in roles.items()}
        cpu0 = {name: cpu_seconds(pid) for name, pid in roles.items()}
        await trio.sleep(hold)
        cpu1 = {name: cpu_seconds(pid) for name, pid in roles.items()}
        for name in roles:
            res[f"{name} RSS per open stream (KiB)"] = round(
                (after[name] - before[name]) / max(1, opened), 1
            )
            res[f"{name} CPU while they wait (% of a core)"] = round(
                (cpu1[name] - cpu0[name]) / hold * 100, 2
            )
        res["RSS per open stream, both roles (KiB)"] = round(
            sum(after[x] - before[x] for x in roles) / max(1, opened), 1
        )

        async def to_the_end(i: int, s: trio.SocketStream) -> None:
            nonlocal failed
            try:
                while b"[DONE]" not in got[i][-64:]:
                    data = await s.receive_some(65536)
                    if not data:
                        break
                    got[i] += data
            except (OSError, trio.BrokenResourceError):
                pass
            if not got[i].startswith(b"HTTP/1.1 200") or b"[DONE]" not in got[i]:
                failed += 1
            await s.aclose()

        with trio.move_on_after(delay_ms / 1000 + 120):
            async with trio.open_nursery() as nursery:
                for i, s in enumerate(socks):
                    nursery.start_soon(to_the_end, i, s)
        res["complete"] = sum(1 for g in got if g.startswith(b"HTTP/1.1 200") and b"[DONE]" in g)
        res["failed"] = n - res["complete"]  # type: ignore[operator]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="streams open at once")
    ap.add_argument("--hold", type=float, default=20.0, help="seconds they wait, all open")
    args = ap.parse_args()
    print(json.dumps(trio.run(bench, args.n, args.hold), indent=1))


if __name__ == "__main__":
    main()
