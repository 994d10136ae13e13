"""Command line: ``python -m trio_bridge ROLE|COMMAND [-c bridge.toml]``.

Exit codes: 0 success; 1 a runtime failure (an endpoint did not answer in ``check``);
2 unusable configuration or usage (never worth restarting: see RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import errno
import gc
import importlib.util
import json
import logging
import math
import os
import re
import signal
import socket
import sqlite3
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio

from trio_bridge._config import Config, load_config, parse_duration, parse_hostport
from trio_bridge._errors import ConfigError, leaves, listening
from trio_bridge._observe import setup_logging, terminal_safe
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretStore, check_route_patterns
from trio_bridge.accounts._limits import KeyLimits
from trio_bridge.accounts._usagestore import check_writable, read_rows, utc_day
from trio_bridge.broker._broker import Broker
from trio_bridge.cli import _service as service
from trio_bridge.cli._testmodel import MODEL_ID, TestModel
from trio_bridge.connector._connector import Connector, probe_relay, read_secret_file
from trio_bridge.http._messages import MODEL_LISTS, model_ids

log = logging.getLogger("trio_bridge.cli")

EXIT_CONFIG = 2
#: the demo's public port (llama.cpp and Open WebUI use 8080, vLLM 8000, Ollama 11434)
DEMO_PORT = 8421


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
        for action, help in actions:
            a = ssub.add_parser(action, help=help, description=help)
            if action not in ("list", "defaults"):
                a.add_argument("name")
            a.add_argument("-c", "--config", help="path to bridge.toml")
            if store == "keys" and action in ("add", "set", "defaults"):
                _limit_options(a, expires=action != "defaults")
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
    return p


def _limit_options(a: argparse.ArgumentParser, *, expires: bool) -> None:
    g = a.add_argument_group("limits (a number, e.g. 60, 20k, 1.5M; 'none' clears it)")
    g.add_argument("--concurrency", metavar="N", help="requests in progress at once")
    g.add_argument("--rpm", metavar="N", help="requests per minute")
    g.add_argument("--tokens-per-minute", "--tpm", metavar="N", help="tokens per minute")
    g.add_argument("--tokens-per-day", "--tpd", metavar="N", help="tokens per UTC day")
    g.add_argument(
        "--models",
        metavar="GLOB",
        action="append",
        help="an allowed model (globs such as 'qwen2.5-coder*'; repeat for more; 'none': any)",
    )
    g.add_argument("--priority", metavar="N", help="weight in the fair queue (1-100; default 1)")
    if expires:
        g.add_argument("--expires", metavar="IN", help="valid for this long (30d, 12h; 'none')")


_COUNT_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kKmM]?)\s*$")


def parse_count(value: str, option: str) -> int | None:
    """``60``, ``20k``, ``1.5M`` → an int; ``none`` → None."""
    if value.strip().lower() == "none":
        return None
    m = _COUNT_RE.match(value)
    if not m or float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6}[m.group(2).lower()] < 1:
        raise ConfigError(f"{option}: expected a positive number such as 60, 20k or 1.5M, "
                          f"or 'none'; got {value!r}")  # fmt: skip
    return int(float(m.group(1)) * {"": 1, "k": 1_000, "m": 1_000_000}[m.group(2).lower()])


def _limit_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The limit options given on the command line, as SecretStore changes."""
    changes: dict[str, Any] = {}
    for attr, option in (
        ("concurrency", "--concurrency"),
        ("rpm", "--rpm"),
        ("tokens_per_minute", "--tokens-per-minute"),
        ("tokens_per_day", "--tokens-per-day"),
    ):
        value = getattr(args, attr, None)
        if value is not None:
            changes[attr] = parse_count(value, option)
    if getattr(args, "models", None):
        changes["models"] = () if args.models == ["none"] else tuple(args.models)
    if getattr(args, "priority", None) is not None:
        priority = parse_count(args.priority, "--priority") or 1
        if priority > 100:
            raise ConfigError("--priority: from 1 to 100")
        changes["priority"] = priority
    if getattr(args, "expires", None) is not None:
        if args.expires.strip().lower() == "none":
            changes["expires"] = ""
        else:
            try:
                seconds = float(parse_duration(args.expires.replace("d", "") + "h"
                                if args.expires.endswith("d") else args.expires))  # fmt: skip
            except ValueError as exc:
                raise ConfigError(f"--expires: {exc} (or days: 30d)") from None
            if args.expires.endswith("d"):
                seconds *= 24
            now = dt.datetime.now(dt.UTC).replace(microsecond=0)  # wall clock
            until = now + dt.timedelta(seconds=seconds)
            changes["expires"] = until.isoformat().replace("+00:00", "Z")
    return changes


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(getattr(args, "config", None))
        if args.command in ("keys", "tokens"):
            return _store_command(config, args)
        setup_logging(config.log.level, config.log.format)
        if args.command == "check":
            return trio.run(_check, config, args.role)
        if args.command == "status":
            return _status(config, args)
        if args.command == "usage":
            return _usage(config, args)
        grace = float(config.limits.shutdown_grace)
        if args.command == "service":
            return _service_command(config, args)
        if args.command in ("broker", "connector", "demo", "test-model"):
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
            demo = _Demo(config, args)
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


def _status(config: Config, args: argparse.Namespace) -> int:
    if args.url:
        targets = [args.url.rstrip("/")]
    else:
        listens = {"broker": config.broker.admin_listen, "connector": config.connector.admin_listen}
        roles = (
            [args.role]
            if args.role
            else [r for r in ("connector", "broker") if config.configures(r)]
        )
        targets = [f"http://{listens[r]}" for r in roles if listens[r]]
    if args.ready:
        return _ready(targets)
    shown = 0
    for base in targets:
        try:
            r = httpx.get(base + "/status", timeout=3, trust_env=False)
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            if args.role or args.url:
                print(f"{base}: not answering ({type(exc).__name__})", file=sys.stderr)
            continue
        if r.status_code != 200:  # e.g. 401 (admin token), 421 (a name it does not answer to)
            error = doc.get("error") if isinstance(doc, dict) else None
            why = error.get("message") if isinstance(error, dict) else error
            print(f"{base}: HTTP {r.status_code}: {why or r.text[:200]}", file=sys.stderr)
            continue
        shown += 1
        print(json.dumps(doc, indent=1) if args.json else format_status(doc))
    if not shown:
        print("no role answered at " + ", ".join(targets), file=sys.stderr)
        return 1
    return 0


def _ready(targets: list[str]) -> int:
    """Exit 0 if a role answers /readyz with 200 (a container HEALTHCHECK), else 1."""
    for base in targets:
        try:
            if httpx.get(base + "/readyz", timeout=3, trust_env=False).status_code == 200:
                print(f"{base}: ready")
                return 0
            print(f"{base}: not ready", file=sys.stderr)
        except httpx.HTTPError as exc:
            print(f"{base}: not answering ({type(exc).__name__})", file=sys.stderr)
    return 1


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))  # wall clock
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_status(doc: dict[str, Any]) -> str:
    """A compact human view of a role's /status document."""
    lines = []
    recent = doc.get("recent", {})
    lat, ttfb = recent.get("latency", {}), recent.get("time_to_first_byte", {})
    why = "; ".join(doc.get("not_ready_because") or [])
    ready = "READY" if doc.get("ready") else "NOT READY" + (f" ({why})" if why else "")
    lines.append(
        f"{doc.get('role', '?')} {doc.get('name', '')} v{doc.get('version', '?')}  "
        f"{ready}  in flight {doc.get('in_flight', 0)}"
        + (f"  queued {doc['queued']}" if "queued" in doc else "")
        + f"  up {_ago(doc.get('started'))}"
    )
    lines.append(
        f"last {int(recent.get('window_s', 0) // 60)} min: {recent.get('requests', 0)} requests, "
        f"error rate {recent.get('error_rate', 0) * 100:.1f}%, latency p50/p95/p99 "
        f"{_ms(lat.get('p50_ms'))}/{_ms(lat.get('p95_ms'))}/{_ms(lat.get('p99_ms'))}, "
        f"first byte p50/p95/p99 {_ms(ttfb.get('p50_ms'))}/{_ms(ttfb.get('p95_ms'))}/"
        f"{_ms(ttfb.get('p99_ms'))}"
    )
    if "llm" in doc:
        llm = doc["llm"]
        state = "up" if llm.get("up") else f"DOWN ({llm.get('last_error', '')})"
        lines.append(f"LLM {llm.get('url')}: {state} for {_ago(llm.get('since'))}")
    for problem in doc.get("problems", []):
        lines.append(f"PROBLEM: {problem}")
    for relay in doc.get("relays", []):
        # the error that took it down, while it is down (a relay up again has none to show)
        down = relay.get("state") != "connected" and relay.get("last_error")
        err = f"  last error: {relay['last_error']}" if down else ""
        lines.append(
            f"relay {relay['broker']}: {relay['state']} for {_ago(relay.get('since'))}, "
            f"reconnects {relay.get('reconnects', 0)}, in flight {relay.get('in_flight', 0)}{err}"
        )
    for route, conns in doc.get("routes", {}).items():
        for c in conns:
            flags = ("ready" if c.get("ready") else "NOT READY") + (
                " draining" if c.get("draining") else ""
            )
            lines.append(
                f"route {route}: {c['connector']} ({flags}) in flight {c['in_flight']}/"
                f"{c['capacity']}, connected {_ago(c.get('connected_since'))}"
            )
    for key, models in doc.get("tokens", {}).items():
        for model, t in models.items():
            lines.append(
                f"tokens key {key} model {model}: prompt {t['prompt']}, "
                f"completion {t['completion']}"
            )
    # names, models and reasons come from peers: nothing reaches the terminal raw
    return "\n".join(terminal_safe(line) for line in lines)


def _store_command(config: Config, args: argparse.Namespace) -> int:
    """``keys …`` (API keys, on the connector) and ``tokens …`` (connector tokens, broker)."""
    store, action, name = args.command, args.action, str(getattr(args, "name", ""))
    s = _open_store(config, args)
    routes = check_route_patterns(getattr(args, "routes", None) or [])
    changes = _limit_changes(args) if store == "keys" else {}
    if action == "add":
        _store_add(s, store, name, routes, changes)
    elif action == "list":
        if store == "keys":
            _list_keys(s, config)
        else:
            _list_entries(s, store)
    elif action == "defaults":
        if changes:
            s.set_defaults(changes)
        print(f"defaults for every key in {s.path}: {_limits_text(s.defaults) or 'no limits'}")
    elif action == "set" and store == "keys":
        if not changes:
            raise ConfigError("keys set: give at least one limit option (see --help)")
        entry = s.set_limits(name, changes)
        print(
            f"{entry.name!r} (id {entry.id}): {_limits_text(s.limits_for(entry)) or 'no limits'}"
            f"{'; expires ' + entry.expires if entry.expires else ''}. A running connector "
            "applies it within a second."
        )
    elif action == "set":
        entries = s.set_routes(name, routes)
        print(
            f"{entries[0].name!r} may now serve: {entries[0].route_text}; relays on other "
            "routes are closed within a second"
        )
    elif action == "rotate":
        _store_rotate(s, store, name, args.grace)
    else:
        entry = s.revoke(name)
        print(
            f"revoked {entry.name!r} (id {entry.id}); running processes stop accepting it "
            "within a second"
        )
    return 0


def _open_store(config: Config, args: argparse.Namespace) -> SecretStore:
    """The secret store the command is about, from the config of the role it lives on."""
    store = args.command
    role = "connector" if store == "keys" else "broker"
    if config.sections and role not in config.sections:
        other = "connector tokens" if store == "keys" else "API keys"
        raise ConfigError(
            f"{config.source} has no [{role}] section: {store} live on the {role} "
            f"({other} on the other side); pass the {role}'s config file with -c"
        )
    if store == "keys":
        path, prefix = config.path(config.connector.api_keys_file), "tbk"
    else:
        path, prefix = config.path(config.broker.connector_tokens_file), "tbc"
    if args.config is None:
        print(f"# no -c given: using {path.resolve()} (the built-in default)", file=sys.stderr)
    return SecretStore(path, prefix)


def _store_add(
    s: SecretStore, store: str, name: str, routes: tuple[str, ...], changes: dict[str, Any]
) -> None:
    what = "API key" if store == "keys" else "connector token"
    expires = changes.pop("expires", "")
    entry, secret = s.add(
        name, routes=routes, limits=attrs.evolve(KeyLimits(), **changes), expires=expires
    )
    print(secret)
    scope = f"; it may serve: {entry.route_text}" if store == "tokens" else ""
    print(
        f"# {what} {entry.name!r} (id {entry.id}) added to {s.path}{scope}. It is shown "
        "only once: only its hash is stored.",
        file=sys.stderr,
    )
    if store == "tokens":
        print(
            "# On the connector machine, put it in the file named by connector.token_file "
            "(mode 0600) or in the TRIO_BRIDGE_TOKEN environment variable.",
            file=sys.stderr,
        )


def _store_rotate(s: SecretStore, store: str, name: str, grace_text: str) -> None:
    what = "API key" if store == "keys" else "connector token"
    try:
        grace = parse_duration(grace_text)
    except ValueError as exc:
        raise ConfigError(f"--grace: {exc}") from None
    entry, secret, until = s.rotate(name, float(grace))
    print(secret)
    print(
        f"# new {what} for {entry.name!r} (id {entry.id}) in {s.path}; the previous one "
        f"stays valid until {until}. Shown only once.",
        file=sys.stderr,
    )
    if store == "tokens":
        print(
            "# Write it to the connector's token_file: the connector re-reads that file and "
            "re-dials with the new token as soon as its relay is idle (no restart).",
            file=sys.stderr,
        )


def _limits_text(limits: KeyLimits) -> str:
    parts = []
    for attr, label in (
        ("concurrency", "concurrency"),
        ("rpm", "rpm"),
        ("tokens_per_minute", "tokens/min"),
        ("tokens_per_day", "tokens/day"),
    ):
        if (v := getattr(limits, attr)) is not None:
            parts.append(f"{label} {v}")
    if limits.models:
        parts.append("models " + ",".join(limits.models))
    if limits.priority != 1:
        parts.append(f"priority {limits.priority}")
    return ", ".join(parts)


def _list_keys(s: SecretStore, config: Config) -> None:
    """Keys with their limits (defaults applied) and today's usage from the usage store; an
    expired key is listed as such (``keys set NAME --expires …`` extends it)."""
    entries = s.entries()
    if not entries:
        print(f"(no keys in {s.path})")
        return
    today = utc_day(time.time())  # wall clock
    used: dict[str, list[int]] = {}
    if config.connector.usage_file:
        for r in read_rows(config.path(config.connector.usage_file), since_day=today):
            u = used.setdefault(r["key_id"], [0, 0])
            u[0] += r["requests"]
            u[1] += r["prompt_tokens"] + r["completion_tokens"]
    print(f"{'NAME':<20} {'ID':<9} {'EXPIRES':<21} {'TODAY':<22} LIMITS")
    now = time.time()  # wall clock
    for e in entries:
        req, tok = used.get(e.id, [0, 0])
        expires = f"{e.expires} (expired)" if e.expired(now) else (e.expires or "-")
        print(
            f"{e.name:<20} {e.id:<9} {expires:<21} "
            f"{f'{req} req, {tok} tokens':<22} {_limits_text(s.limits_for(e)) or '-'}"
        )
    if s.defaults.limited or s.defaults.models:
        print(f"(defaults: {_limits_text(s.defaults)})")


def _usage(config: Config, args: argparse.Namespace) -> int:
    if config.sections and "connector" not in config.sections:
        raise ConfigError(f"{config.source} has no [connector] section: usage lives there")
    if not config.connector.usage_file:
        raise ConfigError("connector.usage_file is empty: this connector keeps no usage")
    m = re.fullmatch(r"\s*(\d+)\s*d?\s*", args.since)
    if not m:
        raise ConfigError(f"--since: expected days such as 7d, got {args.since!r}")
    since = utc_day(time.time() - int(m.group(1)) * 86400)  # wall clock
    if args.config is None:
        print(
            f"# no -c given: using {config.path(config.connector.usage_file).resolve()} "
            "(the built-in default)",
            file=sys.stderr,
        )
    keys = SecretStore(config.path(config.connector.api_keys_file), "tbk")
    names = {e.id: e.name for e in keys.entries()}
    wanted = None
    if args.key:
        wanted = {e.id for e in keys.entries() if e.name in args.key or e.id in args.key}
        wanted |= {k for k in args.key if k not in names.values()}  # ids of deleted keys
    rows = [
        {"day": r["day"], "key": names.get(r["key_id"], "(revoked)"), **r}
        for r in read_rows(config.path(config.connector.usage_file), since_day=since)
        if wanted is None or r["key_id"] in wanted
    ]
    columns = ["day", "key", "key_id", "model", "requests", "prompt_tokens",
               "completion_tokens", "estimated", "errors", "refused"]  # fmt: skip
    if args.format == "json":
        print(json.dumps([{c: r[c] for c in columns} for r in rows], indent=1))
    elif args.format == "csv":
        out = csv.writer(sys.stdout)
        out.writerow(columns)
        out.writerows([[r[c] for c in columns] for r in rows])
    else:
        print(f"{'DAY':<11} {'KEY':<20} {'MODEL':<28} {'REQUESTS':>8} {'PROMPT':>10} "
              f"{'COMPLETION':>10} {'REFUSED':>7} {'ERRORS':>6}")  # fmt: skip
        for r in rows:
            est = "*" if r["estimated"] else " "
            print(
                f"{r['day']:<11} {r['key'][:20]:<20} {r['model'][:28]:<28} {r['requests']:>8} "
                f"{r['prompt_tokens']:>10} {r['completion_tokens']:>10}{est}{r['refused']:>7} "
                f"{r['errors']:>6}"
            )
        if not rows:
            print(f"(no usage since {since})")
        else:
            if any(r["estimated"] for r in rows):
                print(
                    "* some answers carried no token counts: estimated (one completion token "
                    "per streamed event, prompt tokens = request bytes / 4)"
                )
            print(
                "REQUESTS: every request of the key; REFUSED: of those, refused by the bridge "
                "(a limit's 429, the model allowlist, a bad request); ERRORS: failed (a 5xx, "
                "an answer broken off)"
            )
    return 0


def _list_entries(s: SecretStore, store: str) -> None:
    entries = s.entries()
    if not entries:
        print(f"(no entries in {s.path})")
        return
    extra = "ROUTES" if store == "tokens" else ""
    print(f"{'NAME':<24} {'ID':<10} {'CREATED':<21} {'EXPIRES':<21} {extra}".rstrip())
    now = time.time()  # wall clock
    for e in entries:
        expires = e.expires or "-"
        if e.expired(now):
            expires += " (expired)"
        routes = e.route_text if store == "tokens" else ""
        print(f"{e.name:<24} {e.id:<10} {e.created:<21} {expires:<21} {routes}".rstrip())


class _Report:
    """Lines of a `check`: OK / WARN / FAIL, one line each; exit 1 on any FAIL."""

    def __init__(self) -> None:
        self.failed = False

    def ok(self, what: str, text: str) -> None:
        print(f"OK    {what}: {text}")

    def warn(self, what: str, text: str) -> None:
        print(f"WARN  {what}: {text}")

    def fail(self, what: str, text: str) -> None:
        print(f"FAIL  {what}: {text}")
        self.failed = True


def _roles_to_check(config: Config, role: str | None) -> list[str]:
    if role is not None:
        if config.sections and role not in config.sections:
            raise ConfigError(
                f"{config.source} has no [{role}] section: pass the {role}'s config file"
            )
        return [role]
    roles: list[str] = [r for r in ("broker", "connector") if r in config.sections]
    if not roles:
        raise ConfigError(
            f"{config.source} has neither a [broker] nor a [connector] section: say which "
            "role to check (trio-bridge check broker|connector -c FILE)"
        )
    return roles


async def _check(config: Config, role: str | None) -> int:
    roles = _roles_to_check(config, role)
    report = _Report()
    report.ok("config", f"{config.source} is valid")
    for r in roles:
        if r == "broker":
            _check_broker(config, report)
        else:
            await _check_connector(config, report)
    return 1 if report.failed else 0  # noqa: ASYNC910  every check awaited its probe


def _check_listen(report: _Report, option: str, value: str) -> None:
    host, port = parse_hostport(value)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use (is it already running? or change it)"
        report.fail(option, f"cannot listen on {value}: {why}")
    else:
        report.ok(option, f"{value} is free to listen on")


def _check_broker(config: Config, report: _Report) -> None:
    bc = config.broker
    path = config.path(bc.connector_tokens_file)
    try:
        tokens = SecretStore(path, "tbc")
    except ConfigError as exc:
        report.fail("broker.connector_tokens_file", str(exc))
    else:
        active = tokens.active_ids()
        if not active:
            report.warn(
                "broker.connector_tokens_file",
                f"{path}: no connector tokens yet: trio-bridge tokens add NAME "
                f"--route ROUTE -c {config.source}",
            )
        for e in tokens.entries():
            if e.id in active:
                report.ok("connector token", f"{e.name} (id {e.id}) may serve: {e.route_text}")
    _check_listen(report, "broker.listen", bc.listen)
    if bc.admin_listen:
        _check_listen(report, "broker.admin_listen", bc.admin_listen)
    for name in ("tls_cert", "tls_key"):
        value = getattr(bc, name)
        if value and not config.path(value).is_file():
            report.fail(f"broker.{name}", f"{config.path(value)}: no such file")
    host, _ = parse_hostport(bc.listen)
    if host not in ("127.0.0.1", "::1", "localhost") and not (bc.behind_tls_proxy or bc.tls_cert):
        report.warn(
            "broker.listen",
            f"{bc.listen} without TLS: API keys would cross the network in clear. Put "
            "Caddy or nginx in front (conf/) and set broker.behind_tls_proxy = true, or "
            "listen on 127.0.0.1.",
        )


async def _check_connector(config: Config, report: _Report) -> None:
    cc = config.connector
    path = config.path(cc.api_keys_file)
    try:
        n = len(SecretStore(path, "tbk").active_ids())
    except ConfigError as exc:
        report.fail("connector.api_keys_file", str(exc))
    else:
        if n:
            report.ok("connector.api_keys_file", f"{path}: {n} API key{'s' * (n != 1)}")
        else:
            report.warn(
                "connector.api_keys_file",
                f"{path}: no API keys yet (every request will get 401): trio-bridge keys add "
                f"NAME -c {config.source}",
            )
    if cc.usage_file:  # a real write (the file itself is not created: see check_writable)
        usage = config.path(cc.usage_file)
        try:
            with trio.fail_after(15):
                done = await trio.to_thread.run_sync(check_writable, usage, abandon_on_cancel=True)
        except (sqlite3.Error, OSError, trio.TooSlowError) as exc:
            why = "no answer in 15 s" if isinstance(exc, trio.TooSlowError) else str(exc)
            report.fail("connector.usage_file", f"{usage}: cannot write: {why}")
        else:
            report.ok("connector.usage_file", f"{usage}: {done}")
    token: str | None = None
    try:
        token = os.environ.get("TRIO_BRIDGE_TOKEN") or read_secret_file(
            config.path(cc.token_file), "connector.token_file"
        )
    except ConfigError as exc:
        report.fail("connector token", str(exc))
    else:
        source = "TRIO_BRIDGE_TOKEN" if os.environ.get("TRIO_BRIDGE_TOKEN") else "token_file"
        report.ok("connector token", f"read from {source}")
    await _check_llm(config, report)
    ca = config.path(cc.broker_ca_file) if cc.broker_ca_file else None
    if ca is not None and not ca.is_file():
        report.fail("connector.broker_ca_file", f"{ca}: no such file")
        return
    ssl_context = ssl.create_default_context(cafile=str(ca) if ca else None)
    for url in cc.broker_urls:
        if token is None:
            report.fail(f"broker {url}", "not tried: no connector token")
            continue
        timeout = float(config.limits.connect_timeout)
        ok, text = False, f"no relay answer within {timeout:g}s (is this the broker's address?)"
        if url.startswith("wss://"):
            text = (
                f"no relay answer within {timeout:g}s (is this the broker's address? wss:// "
                "needs TLS there: a broker without TLS takes ws://)"
            )
        with trio.move_on_after(timeout):
            ok, text = await probe_relay(url, token, route=cc.route, ssl_context=ssl_context)
        (report.ok if ok else report.fail)(f"broker {url}", text)


async def _check_llm(config: Config, report: _Report) -> None:
    """The LLM answers its health probe, and looks like an LLM API (it lists models)."""
    cc = config.connector
    base = cc.local_url.rstrip("/")
    headers = {}
    try:
        key = os.environ.get("TRIO_BRIDGE_UPSTREAM_KEY") or (
            read_secret_file(config.path(cc.upstream_api_key_file), "upstream_api_key_file")
            if cc.upstream_api_key_file
            else None
        )
    except ConfigError as exc:
        report.fail("connector.upstream_api_key_file", str(exc))
        key = None
    if key:
        headers["authorization"] = f"Bearer {key}"
    async with httpx.AsyncClient(
        timeout=float(config.limits.connect_timeout), trust_env=False, headers=headers
    ) as client:
        try:
            health = await client.get(base + cc.health_path)
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            report.fail(f"LLM {base}", f"not answering ({why})")
            return
        if health.status_code >= 500:
            report.fail(f"LLM {base}", f"{cc.health_path} answered HTTP {health.status_code}")
            return
        models = await _list_models(client, base)
    if models is None:
        report.fail(
            f"LLM {base}",
            f"an HTTP server answers ({cc.health_path}: HTTP {health.status_code}) but it does "
            "not look like an LLM API: neither /v1/models nor /api/tags lists models "
            "(wrong port? an API key it wants: upstream_api_key_file?)",
        )
    else:
        shown = ", ".join(models[:5]) + (f" (+{len(models) - 5} more)" if len(models) > 5 else "")
        report.ok(f"LLM {base}", f"answers; models: {shown or '(none listed)'}")


async def _list_models(client: httpx.AsyncClient, base: str) -> list[str] | None:
    """Model ids from OpenAI's /v1/models or Ollama's /api/tags; None if neither answers."""
    for path in MODEL_LISTS:
        try:
            r = await client.get(base + path)
        except httpx.HTTPError:
            continue
        if (ids := model_ids(path, r.status_code, r.content)) is not None:
            return ids  # noqa: ASYNC910  each turn awaits a GET
    return None  # noqa: ASYNC910  each turn awaits a GET


async def _first_model(url: str) -> str | None:
    async with httpx.AsyncClient(timeout=1.5, trust_env=False) as client:
        ids = await _list_models(client, url.rstrip("/"))
    return ids[0] if ids else None


class _Demo:
    """Broker + connector (+ the test model when no LLM answers) in one process on loopback.
    Ctrl-C drains like the roles do: in-flight answers finish, then everything stops."""

    def __init__(self, config: Config, args: argparse.Namespace) -> None:
        self.config = config
        self.args = args
        self.broker: Broker | None = None
        self.connector: Connector | None = None
        self._done = trio.Event()

    def last_words(self) -> None:
        if self.connector is not None:
            self.connector.last_words()

    async def drain(self) -> None:
        """What a standalone broker and connector do on their first signal, together: the
        broker refuses new requests at once (503 + ``Retry-After``, ``/readyz`` 503), the
        connector tells it it is going (GOAWAY), answers in flight finish for up to
        ``shutdown_grace``; then the demo stops."""
        grace = float(self.config.limits.shutdown_grace)
        async with trio.open_nursery() as nursery:
            if self.broker is not None:
                nursery.start_soon(self.broker.drain, grace)
            if self.connector is not None:
                nursery.start_soon(self.connector.drain, grace)
        self._done.set()

    async def run(self) -> None:
        config, args = self.config, self.args
        local_url = args.local_url or config.connector.local_url
        model_id = None if args.test_model else await _first_model(local_url)
        with tempfile.TemporaryDirectory(prefix="trio-bridge-demo-") as tmp:
            async with trio.open_nursery() as nursery:
                if model_id is None:
                    model = TestModel(token_delay=0.05)
                    host, port = await nursery.start(model.serve)
                    local_url, model_id = f"http://{host}:{port}", MODEL_ID
                    label = (
                        f"built-in TEST MODEL (not a real LLM; no LLM answered at "
                        f"{args.local_url or config.connector.local_url})"
                    )
                else:
                    label = f"the LLM at {local_url}"
                config = attrs.evolve(
                    config,
                    base_dir=tmp,
                    broker=attrs.evolve(
                        config.broker,
                        listen=f"127.0.0.1:{args.port}",
                        admin_listen="127.0.0.1:0",
                        connector_tokens_file="tokens.toml",
                    ),
                )
                tokens = SecretStore(Path(tmp) / "tokens.toml", "tbc")
                _, token = tokens.add("demo-connector")
                keys = SecretStore(Path(tmp) / "keys.toml", "tbk")
                _, api_key = keys.add("demo-user")
                self.broker = broker = Broker(config, tokens)
                with listening("--port", f"127.0.0.1:{args.port}"):
                    bhost, bport = await nursery.start(broker.serve)
                config = attrs.evolve(
                    config,
                    connector=attrs.evolve(
                        config.connector,
                        broker_urls=[f"ws://{bhost}:{bport}{config.broker.relay_path}"],
                        local_url=local_url,
                        name="demo-connector",
                        admin_listen="127.0.0.1:0",
                        api_keys_file="keys.toml",
                    ),
                )
                self.connector = connector = Connector(config, keys=keys, token=token)
                nursery.start_soon(connector.run)
                with trio.fail_after(10):
                    await connector.connected.wait()
                admins = [broker.admin_address, connector.admin_address]
                _print_demo(f"http://{bhost}:{bport}", api_key, model_id, label, admins)
                await self._done.wait()
                nursery.cancel_scope.cancel()


def _print_demo(
    base: str, key: str, model: str, label: str, admins: list[tuple[str, int] | None]
) -> None:
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "Say hello"}]})
    stream_body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "count to 20"}]}
    )
    py = (
        f"from openai import OpenAI; c = OpenAI(base_url='{base}/v1', api_key='{key}'); "
        f"print(c.chat.completions.create(model='{model}', messages=[{{'role': 'user', "
        f"'content': 'Say hello'}}]).choices[0].message.content)"
    )
    if importlib.util.find_spec("openai") is not None:
        sdk = f'  {sys.executable} -c "{py}"'
    else:
        sdk = f'  # with the openai SDK (pip install openai):\n  python3 -c "{py}"'
    hdrs = f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json'"
    # the same program the user started, so the line works as printed
    me = (
        "trio-bridge"
        if Path(sys.argv[0]).name == "trio-bridge"
        else f"{sys.executable} -m trio_bridge"
    )
    admin_lines = "\n".join(
        f"  {me} status --url http://{a[0]}:{a[1]}     # {role}: state, latency, errors"
        f"\n  curl -s http://{a[0]}:{a[1]}/metrics | grep ^trio_bridge_requests"
        for role, a in zip(("broker", "connector"), admins, strict=True)
        if a is not None
    )
    # the admin ports are chosen at random (two demos, or a demo beside real roles, must not
    # collide): name the pages here, the one place that knows them
    broker_admin, connector_admin = admins
    pages = ""
    if connector_admin is not None:
        pages += (
            f"  Inspector (connector) : http://{connector_admin[0]}:{connector_admin[1]}/"
            "   requests live, usage, LLM and relay timeline\n"
        )
    if broker_admin is not None:
        pages += (
            f"  Broker page           : http://{broker_admin[0]}:{broker_admin[1]}/"
            "   routes, connectors, requests and errors over time\n"
        )
    print(
        f"""
trio-bridge demo is running: broker + connector on loopback, serving {label}.

  Public base URL : {base}/v1
  API key         : {key}
  Model           : {model}

Try it (paste into another terminal):

  curl -sS {base}/v1/chat/completions {hdrs} -d '{body}'

  curl -sSN {base}/v1/chat/completions {hdrs} -d '{stream_body}'

{sdk}

Open in a browser:
{pages}
Health and metrics:
{admin_lines}

Press Ctrl-C to stop (in-flight answers finish first; twice to stop at once).
""",
        flush=True,
    )


__all__ = ["main"]
