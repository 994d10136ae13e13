"""Instructions per request of each role, counted by callgrind: a repeatable figure for A/B work.

    python bench/instructions.py [--c 10] [--n 300] [--stream] [--ref PATH]

Wall-clock CPU figures on a shared 2-core machine move by ±25 % from run to run; callgrind
counts executed instructions, which stay within ~1 % for the same code and load whatever else
the machine is doing (small requests; streams vary by up to ±8 %, as how many chunks travel
together depends on timing: compare them over ``--pairs 2`` or more). Starts
``bench/fakellm.py`` natively and a broker and a connector under
``valgrind --tool=callgrind`` with instrumentation off, warms them up, switches counting on for
exactly ``n`` requests at concurrency ``c`` (or, with ``--stream``, ``n`` streams of 50 chunks
40 ms apart: use ``--c 4 --n 12``), and prints millions of instructions per request for each
role and both together.

``--ref PATH`` runs the same measurement a second time with another checkout of the package
first on ``PYTHONPATH`` (e.g. ``git worktree add /tmp/base main~3``), alternating, and prints
the change. Needs valgrind (``apt-get install valgrind``); under it the roles run ~50× slower,
so keep ``n`` in the hundreds. Every load loop is bounded, as in ``run.py``.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path

import trio
from run import counted_load, running_bridge

# Under callgrind the roles run ~50x slower: chunks far enough apart that each still travels
# alone (at c=4), so the figure is the per-chunk cost users see, not that of coalesced chunks.
STREAM_DELAY_MS = 40


def _total(path: str) -> int:
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


async def measure(c: int, n: int, stream: bool, pythonpath: str | None) -> dict[str, float]:
    """Millions of instructions per request of each role (one fresh pair of processes)."""
    env = {"PYTHONPATH": pythonpath} if pythonpath else {}
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "-q"]

    def under_callgrind(role: str, d: Path) -> list[str]:
        return [*vg, f"--callgrind-out-file={d}/cg.{role}.%p"]

    async with running_bridge(c, env, under_callgrind, 120) as (d, procs, port, hdrs):
        roles = ("broker", "connector")
        for role in roles:
            subprocess.run(["callgrind_control", "-i", "on", str(procs[role].pid)], check=True,
                           capture_output=True)  # fmt: skip
        done = await counted_load(port, hdrs, c, n, STREAM_DELAY_MS if stream else None)
        for role in roles:
            pid = str(procs[role].pid)
            subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)
            subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
        out: dict[str, float] = {}
        for role in roles:
            files = []
            for _ in range(1200):  # the dump is written by the role's process: up to 2 min
                if files := glob.glob(f"{d}/cg.{role}.*"):
                    break
                await trio.sleep(0.1)
            if not files:
                raise RuntimeError(f"no callgrind dump from the {role} (see {d}/{role}.log)")
            newest = max(files, key=os.path.getmtime)
            out[role] = _total(newest) / done / 1e6
        return out


def _line(label: str, r: dict[str, float]) -> str:
    total = r["broker"] + r["connector"]
    return (
        f"{label:>5}: broker {r['broker']:.3f} M  connector {r['connector']:.3f} M  "
        f"both {total:.3f} M"
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--c", type=int, default=10, help="concurrent requests (default 10)")
    ap.add_argument("--n", type=int, default=300, help="requests counted (default 300)")
    ap.add_argument("--stream", action="store_true", help="streams of 50 chunks instead")
    ap.add_argument("--ref", help="another checkout to compare with (its package dir's parent)")
    ap.add_argument("--pairs", type=int, default=2, help="alternating rounds with --ref")
    args = ap.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("needs valgrind: apt-get install valgrind")
    what = f"{'streams of 50 chunks' if args.stream else 'small requests'}, c={args.c}, n={args.n}"
    print(f"millions of instructions per request ({what})")
    if not args.ref:
        print(_line("this", await measure(args.c, args.n, args.stream, None)))
        return
    mine: list[float] = []
    ref: list[float] = []
    for _ in range(args.pairs):
        r = await measure(args.c, args.n, args.stream, str(Path(args.ref).resolve()))
        print(_line("ref", r))
        ref.append(r["broker"] + r["connector"])
        m = await measure(args.c, args.n, args.stream, None)
        print(_line("this", m))
        mine.append(m["broker"] + m["connector"])
    a, b = sorted(ref)[len(ref) // 2], sorted(mine)[len(mine) // 2]
    print(f"both roles: ref {a:.3f} M → this {b:.3f} M ({(b - a) / a * 100:+.1f} %)")


if __name__ == "__main__":
    trio.run(main)
