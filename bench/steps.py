"""Task steps and I/O waits per request in each role, counted by a trio instrument.

    python bench/steps.py [--c 10] [--n 1000] [--stream]

Each task step is one trip through trio's scheduler (a task switch); each I/O wait one
``epoll_wait``. Starts ``bench/fakellm.py``, a broker and a connector as in ``run.py``, with a
``sitecustomize`` on their ``PYTHONPATH`` that adds the instrument to ``trio.run`` and counts
between two signals (SIGUSR1: start, SIGUSR2: write the counts), warms up, counts ``n``
requests at concurrency ``c`` (or ``n`` streams of 50 chunks 5 ms apart with ``--stream``), and
prints the steps per request of each role and of its busiest tasks. The counts are the same
from run to run for the same code and load, unlike CPU time on a shared machine. Every load
loop is bounded, as in ``run.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

import trio
from run import counted_load, running_bridge

_SITECUSTOMIZE = """
import collections, json, os, signal
import trio, trio.abc

class _Steps(trio.abc.Instrument):
    def __init__(self):
        self.tasks = collections.Counter()
        self.io_waits = 0
        self.on = False

    def before_task_step(self, task):
        if self.on:
            self.tasks[task.name] += 1

    def before_io_wait(self, timeout):
        if self.on:
            self.io_waits += 1

_steps = _Steps()

def _start(*_):
    _steps.tasks.clear()
    _steps.io_waits = 0
    _steps.on = True

def _dump(*_):
    _steps.on = False
    with open(os.environ["TB_STEPS_OUT"] + "." + str(os.getpid()), "w") as f:
        json.dump({"io_waits": _steps.io_waits, "tasks": _steps.tasks.most_common()}, f)

signal.signal(signal.SIGUSR1, _start)
signal.signal(signal.SIGUSR2, _dump)
_run = trio.run

def _run_with_steps(*args, **kwargs):
    kwargs["instruments"] = [*kwargs.get("instruments", ()), _steps]
    return _run(*args, **kwargs)

trio.run = _run_with_steps
"""


async def measure(c: int, n: int, stream: bool) -> None:
    site = Path(tempfile.mkdtemp(prefix="tb-steps-site-"))
    (site / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    out_prefix = site / "steps"
    env = {"PYTHONPATH": str(site), "TB_STEPS_OUT": str(out_prefix)}
    try:
        async with running_bridge(c, env) as (_d, procs, port, hdrs):
            roles = ("broker", "connector")
            for role in roles:
                os.kill(procs[role].pid, signal.SIGUSR1)
            await trio.sleep(0.2)
            done = await counted_load(port, hdrs, c, n, 5 if stream else None)
            for role in roles:
                os.kill(procs[role].pid, signal.SIGUSR2)
            what = "stream of 50 chunks" if stream else "request"
            for role in roles:
                out = Path(f"{out_prefix}.{procs[role].pid}")
                for _ in range(100):  # written by the role's process: up to 10 s
                    if out.exists() and out.stat().st_size:
                        break
                    await trio.sleep(0.1)
                counts = json.loads(out.read_text())
                total = sum(v for _, v in counts["tasks"])
                print(f"{role}: {total / done:.2f} task steps and "
                      f"{counts['io_waits'] / done:.2f} I/O waits per {what}")  # fmt: skip
                for name, v in counts["tasks"][:6]:
                    print(f"  {v / done:8.2f}  {name}")
    finally:
        shutil.rmtree(site, ignore_errors=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--c", type=int, default=10, help="concurrent requests (default 10)")
    ap.add_argument("--n", type=int, default=1000, help="requests counted (default 1000)")
    ap.add_argument("--stream", action="store_true", help="streams of 50 chunks instead")
    args = ap.parse_args()
    await measure(args.c, args.n, args.stream)


if __name__ == "__main__":
    trio.run(main)
