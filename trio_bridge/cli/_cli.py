"""Command line: ``python -m trio_bridge ROLE|COMMAND [-c bridge.toml]``.

Exit codes: 0 success; 1 a runtime failure (an endpoint did not answer in ``check``);
2 unusable configuration or usage (never worth restarting: see RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import math
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

from trio_bridge._config import Config, load_config
from trio_bridge._errors import ConfigError, leaves, listening
from trio_bridge._observe import setup_logging
from trio_bridge._version import __version__
from trio_bridge.broker._broker import Broker
from trio_bridge.cli import _service as service
from trio_bridge.cli._check import run_check
from trio_bridge.cli._demo import DEMO_PORT, Demo
from trio_bridge.cli._status import status_command
from trio_bridge.cli._stores import limit_options, store_command, usage_command
from trio_bridge.cli._testmodel import MODEL_ID, TestModel
from trio_bridge.cli._users import add_users_parser, users_command
from trio_bridge.connector._connector import Connector

log = logging.getLogger("trio_bridge.cli")

EXIT_CONFIG = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="trio-bridge",
        description="Offer a local LLM's OpenAI-compatible API through a public broker.",
    )
    p.add_argument("--version", action="version", version=f"trio-bridge {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("-c", "--config", help="path to bridge.toml (default: built-in defaults)")
        return sp

    cmd("broker", "run the public broker (public port + relay endpoint)")
    cmd("connector", "run the connector beside the LLM")
    demo = cmd("demo", "broker + connector on loopback, with the test model if no LLM answers")
    demo.add_argument(
        "--port", type=int, default=DEMO_PORT, help=f"public port (default {DEMO_PORT}; 0: any)"
    )
    demo.add_argument("--local-url", help="LLM to use (default: connector.local_url)")
    demo.add_argument(
        "--test-model", action="store_true", help="always use the built-in test model"
    )
    ck = cmd(
        "check",
        "validate a role's config and probe what it needs: the broker its ports and tokens; "
        "the connector its token (a real relay handshake with each broker) and its LLM",
    )
    ck.add_argument(
        "role",
        nargs="?",
        choices=("broker", "connector"),
        help="the role to check (default: the roles whose [section] the config file has)",
    )
    us = cmd("usage", "usage per key, model and day, from the connector's usage store")
    us.add_argument("--key", action="append", help="only this key (name or id; repeat for more)")
    us.add_argument("--since", default="7d", help="how far back (e.g. 7d, 30d, 0d = today)")
    us.add_argument("--format", choices=("table", "csv", "json"), default="table")
    tm = sub.add_parser(
        "test-model",
        help="run only the built-in OpenAI-compatible test model (not a real LLM)",
        description="Serve the built-in test model: /v1/models, /v1/chat/completions (JSON and "
        "SSE), /v1/completions, /v1/embeddings, Ollama's /api/chat. Deterministic: it echoes the "
        "last user message, or answers 'count to N' with 1 2 ... N.",
    )
    tm.add_argument("--listen", default="127.0.0.1:8099", help="host:port (default %(default)s)")
    tm.add_argument(
        "--token-delay", type=float, default=0.05, help="seconds between streamed tokens"
    )
    sv = sub.add_parser(
        "service",
        help="install, remove or print a systemd unit / launchd plist",
        description="Install, remove or print the service definition of a role.",
    )
    sv.add_argument("action", choices=("install", "uninstall", "print"))
    sv.add_argument("role", choices=("broker", "connector"))
    sv.add_argument("-c", "--config", help="the role's bridge.toml (absolute path recommended)")
    sv.add_argument(
        "--user", action="store_true", help="a per-user service (systemctl --user / LaunchAgent)"
    )
    sv.add_argument(
        "--root", help="write under this directory and run no service manager (packaging, tests)"
    )
    st = cmd("status", "show a running role's state (from its admin endpoint)")
    st.add_argument(
        "--role",
        choices=("broker", "connector"),
        help="which role's admin_listen to ask (default: whichever answers)",
    )
    st.add_argument("--url", help="admin base URL, e.g. http://127.0.0.1:9181")
    st.add_argument("--json", action="store_true", help="print the raw JSON")
    st.add_argument(
        "--ready",
        action="store_true",
        help="only ask /readyz: exit 0 if the role is ready to serve, else 1 (health checks)",
    )
    for store, what in (
        ("keys", "users' API keys (connector side)"),
        ("tokens", "connector tokens (broker side)"),
    ):
        sp = sub.add_parser(store, help=f"manage {what}", description=f"Manage {what}.")
        ssub = sp.add_subparsers(dest="action", required=True, metavar="ACTION")
        actions = [
            ("add", "create one and print it once"),
            ("list", "show names, ids and creation times"),
            ("revoke", "remove one (by name or id)"),
            ("rotate", "print a new secret; the old one stays valid for --grace"),
        ]
        if store == "tokens":
            actions.append(("set", "change which routes a token may serve"))
        else:
            actions.append(("set", "change a key's limits or expiry ('none' clears a limit)"))
            actions.append(("defaults", "limits for every key that does not set its own"))
            actions.append(("import", "move a keys file and its usage into connector.store"))
        for action, help in actions:
            a = ssub.add_parser(action, help=help, description=help)
            if action == "import":
                a.add_argument("file", nargs="?", help="keys file (default: api_keys_file)")
                a.add_argument("--usage", help="usage file (default: usage_file; '' for none)")
            elif action not in ("list", "defaults"):
                a.add_argument("name")
            a.add_argument("-c", "--config", help="path to bridge.toml")
            if store == "keys" and action in ("add", "set", "defaults"):
                limit_options(a, expires=action != "defaults")
            if store == "tokens" and action in ("add", "set"):
                a.add_argument(
                    "--route",
                    action="append",
                    dest="routes",
                    metavar="ROUTE",
                    required=action == "set",
                    help="a route this connector token may serve (repeat for more; globs "
                    "such as 'team-*'; '*' for every route). Default: the default route only",
                )
            if action == "rotate":
                a.add_argument(
                    "--grace",
                    default="24h",
                    help="how long the old secret stays valid (default 24h; 0 ends it now)",
                )
    add_users_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None))
        if args.command in ("keys", "tokens"):
            return store_command(config, args)
        if args.command == "users":
            return users_command(config, args)
        setup_logging(config.log.level, config.log.format)
        if args.command == "check":
            return trio.run(run_check, config, args.role)
        if args.command == "status":
            return status_command(config, args)
        if args.command == "usage":
            return usage_command(config, args)
        grace = float(config.limits.shutdown_grace)
        if args.command == "service":
            return _service_command(config, args)
        if args.command in ("broker", "connector", "demo", "test-model"):
            _keep_freed_buffers()
            _freeze_startup_heap()
        if args.command in ("broker", "connector", "demo"):
            # whatever a role creates is for its own user alone (usage counts, SQLite's side
            # files); the stores also make their files private themselves
            os.umask(0o077)
        if args.command in ("broker", "connector") and args.config is None:
            print(
                f"trio-bridge: no -c given: the {args.command} runs on built-in defaults "
                f"(files in {Path.cwd()}); pass its config file with -c",
                file=sys.stderr,
            )
        if args.command == "broker":
            broker = Broker(config)
            trio.run(_run_until_signal, lambda: broker.serve(), broker.drain, grace)
        elif args.command == "connector":
            connector = Connector(config)
            trio.run(_run_until_signal, connector.run, connector.drain, grace, connector.last_words)
        elif args.command == "demo":
            demo = Demo(config, args)
            trio.run(_run_until_signal, demo.run, demo.drain, grace, demo.last_words)
        elif args.command == "test-model":
            trio.run(_run_until_signal, lambda: _test_model(args))
    except ConfigError as exc:
        print(f"trio-bridge: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except BaseExceptionGroup as group:
        # a ConfigError raised in a task (e.g. a port in use) arrives inside nursery groups
        errors = leaves(group)
        if not all(isinstance(e, ConfigError | KeyboardInterrupt) for e in errors):
            raise
        for e in errors:
            if isinstance(e, ConfigError):
                print(f"trio-bridge: config error: {e}", file=sys.stderr)
                return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


async def _test_model(args: argparse.Namespace) -> None:
    model = TestModel(token_delay=args.token_delay)
    with listening("--listen", args.listen):
        async with trio.open_nursery() as nursery:
            host, port = await nursery.start(model.serve, args.listen)
            print(
                f"built-in TEST MODEL (not a real LLM) serving at http://{host}:{port}/v1 "
                f"(model {MODEL_ID!r}); Ctrl-C to stop",
                flush=True,
            )


#: glibc's mallopt() parameters and the values the roles set
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_TRIM_THRESHOLD = 16 * 1024 * 1024
_MMAP_THRESHOLD = 4 * 1024 * 1024


def _keep_freed_buffers() -> bool:
    """Let glibc's allocator keep freed memory for the next allocation (Linux).

    A role allocates and frees buffers of up to 256 KiB for each read of an upload (a body
    part, a relay message, their copies). With glibc's defaults such a buffer goes back to
    the kernel when freed (mapped on its own above the mmap threshold, or the heap's top
    trimmed once a little more than that is free), and the next one faults its pages in
    again: ~700-2 600 page faults per role and 10 MB upload (bench/run.py's upload, counted
    in /proc/PID/stat), a fifth of a role's CPU for it. Buffers below 4 MiB come from the
    heap, and up to 16 MiB of freed heap is kept. An operator's own
    ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` / ``GLIBC_TUNABLES=glibc.malloc.…``
    win. True if both were set.
    """
    if (
        not sys.platform.startswith("linux")
        or any(k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"))
        or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "")
    ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs on (not musl's)
    except (OSError, AttributeError):  # pragma: no cover - a C library without mallopt
        return False
    mmap_set = bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD))  # 0: refused (32-bit: > 512 KiB)
    trim_set = bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
    return mmap_set and trim_set


def _freeze_startup_heap() -> None:
    """Take what start-up left alive (modules, classes, functions: most of the heap) out of
    the cyclic garbage collector's sight, so that its full collections walk only what the
    roles create. Without this a full collection paused a role for 22-31 ms every few
    thousand requests (measured at 10 concurrent requests), which set the latency tail."""
    gc.collect()
    gc.freeze()


async def _run_until_signal(
    fn: Callable[[], Awaitable[Any]],
    graceful: Callable[[], Awaitable[Any]] | None = None,
    grace: float = 0.0,
    last_words: Callable[[], object] | None = None,
) -> None:
    """Run ``fn`` until it returns or SIGINT/SIGTERM arrives.

    The first signal starts ``graceful`` (a drain that makes ``fn`` return) if given, else
    cancels at once; a second signal, or ``grace`` + 3 s after the first, cancels everything;
    ``grace`` + 6 s after the first, the backstop ends the process (exit status 0, as for any
    stop that was asked for) after ``last_words`` (the connector writes its pending usage).
    """
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for signum in signals:
                    name = signal.Signals(signum).name
                    if graceful is None or nursery.cancel_scope.deadline != math.inf:
                        log.info("received %s; stopping now", name)
                        break
                    log.info("received %s; draining (again to stop now)", name)
                    nursery.cancel_scope.deadline = trio.current_time() + grace + 3
                    _backstop(grace + BACKSTOP_AFTER_GRACE, last_words)
                    nursery.start_soon(graceful)
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await fn()
        nursery.cancel_scope.cancel()


#: the backstop ends the process this long after shutdown_grace (docs/service.md)
BACKSTOP_AFTER_GRACE = 6.0


def _backstop(seconds: float, last_words: Callable[[], object] | None = None) -> None:
    """End the process after ``seconds`` even if the event loop cannot (a peer that stopped
    reading can hold hypercorn's shielded send forever); ``last_words`` first (from the timer's
    thread: it must not need the event loop)."""

    def hard_stop() -> None:
        log.error("shutdown did not finish in %.0fs: hard stop", seconds)
        if last_words is not None:
            try:
                last_words()
            except Exception:
                log.exception("before the hard stop")
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, hard_stop)
    timer.daemon = True
    timer.start()


def _service_command(config: Config, args: argparse.Namespace) -> int:
    if args.config is None and args.action != "uninstall":
        raise ConfigError("service: -c/--config is required (the unit runs with that file)")
    root = Path(args.root) if args.root else None
    grace = float(config.limits.shutdown_grace)
    if args.action == "print":
        sys.stdout.write(
            service.render(
                args.role, str(Path(args.config).resolve()), user=args.user, shutdown_grace=grace
            ).decode()
        )
        return 0
    try:
        if args.action == "install":
            path = service.install(
                args.role, args.config, user=args.user, root=root, shutdown_grace=grace
            )
            print(f"installed {path}")
        else:
            path = service.uninstall(args.role, user=args.user, root=root)
            print(f"removed {path}")
    except (OSError, subprocess.CalledProcessError) as exc:
        print(f"trio-bridge: service {args.action} failed: {exc}", file=sys.stderr)
        return 1
    return 0


__all__ = ["main"]
