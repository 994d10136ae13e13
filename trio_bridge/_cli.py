"""Command line: ``python -m trio_bridge ROLE|COMMAND [-c bridge.toml]``.

Exit codes: 0 success; 1 a runtime failure (an endpoint did not answer in ``check``);
2 unusable configuration or usage (never worth restarting: see RestartPreventExitStatus).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
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

from . import _service as service
from ._broker import Broker
from ._config import Config, load_config, parse_duration, parse_hostport
from ._connector import Connector
from ._errors import ConfigError
from ._keys import SecretStore, check_route_patterns
from ._observe import setup_logging
from ._testmodel import MODEL_ID, TestModel
from ._version import __version__

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
    demo.add_argument("--port", type=int, default=8080, help="public port (0: any free port)")
    demo.add_argument("--local-url", help="LLM to use (default: connector.local_url)")
    demo.add_argument(
        "--test-model", action="store_true", help="always use the built-in test model"
    )
    cmd("check", "validate the config and probe the LLM and the broker")
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
        for action, help in actions:
            a = ssub.add_parser(action, help=help, description=help)
            if action != "list":
                a.add_argument("name")
            a.add_argument("-c", "--config", help="path to bridge.toml")
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


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
        if args.command in ("keys", "tokens"):
            return _store_command(config, args)
        setup_logging(
            config.log.level, "text" if args.command in ("demo", "check") else config.log.format
        )
        if args.command == "check":
            return trio.run(_check, config)
        if args.command == "status":
            return _status(config, args)
        grace = float(config.limits.shutdown_grace)
        if args.command == "service":
            return _service_command(config, args)
        if args.command == "broker":
            broker = Broker(config)
            trio.run(_run_until_signal, lambda: broker.serve(), broker.drain, grace)
        elif args.command == "connector":
            connector = Connector(config)
            trio.run(_run_until_signal, connector.run, connector.drain, grace)
        elif args.command == "demo":
            trio.run(_run_until_signal, lambda: _demo(config, args))
    except ConfigError as exc:
        print(f"trio-bridge: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        pass
    return 0


async def _run_until_signal(
    fn: Callable[[], Awaitable[Any]],
    graceful: Callable[[], Awaitable[Any]] | None = None,
    grace: float = 0.0,
) -> None:
    """Run ``fn`` until it returns or SIGINT/SIGTERM arrives.

    The first signal starts ``graceful`` (a drain that makes ``fn`` return) if given, else
    cancels at once; a second signal, or ``grace`` + 10 s after the first, cancels everything.
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
                    _backstop(grace + 6)
                    nursery.start_soon(graceful)
                nursery.cancel_scope.cancel()

        nursery.start_soon(watch)
        await fn()
        nursery.cancel_scope.cancel()


def _backstop(seconds: float) -> None:
    """End the process after ``seconds`` even if the event loop cannot (a peer that stopped
    reading can hold hypercorn's shielded send forever)."""

    def hard_stop() -> None:
        log.error("shutdown did not finish in %.0fs: hard stop", seconds)
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
        roles = [args.role] if args.role else ["connector", "broker"]
        targets = [f"http://{listens[r]}" for r in roles if listens[r]]
    shown = 0
    for base in targets:
        try:
            r = httpx.get(base + "/status", timeout=3, trust_env=False)
            doc = r.json()
        except (httpx.HTTPError, ValueError) as exc:
            if args.role or args.url:
                print(f"{base}: not answering ({type(exc).__name__})", file=sys.stderr)
            continue
        shown += 1
        print(json.dumps(doc, indent=1) if args.json else format_status(doc))
    if not shown:
        print("no role answered at " + ", ".join(targets), file=sys.stderr)
        return 1
    return 0


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


def _ago(ts: float | None) -> str:
    if not ts:
        return "-"
    s = max(0, int(time.time() - ts))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_status(doc: dict[str, Any]) -> str:
    """A compact human view of a role's /status document."""
    lines = []
    recent = doc.get("recent", {})
    lat, ttfb = recent.get("latency", {}), recent.get("time_to_first_byte", {})
    lines.append(
        f"{doc.get('role', '?')} {doc.get('name', '')} v{doc.get('version', '?')}  "
        f"{'READY' if doc.get('ready') else 'NOT READY'}  in flight {doc.get('in_flight', 0)}"
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
    for relay in doc.get("relays", []):
        err = f"  last error: {relay['last_error']}" if relay.get("last_error") else ""
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
    return "\n".join(lines)


def _store_command(config: Config, args: argparse.Namespace) -> int:
    store, action, name = args.command, args.action, str(getattr(args, "name", ""))
    if store == "keys":
        path, prefix = config.path(config.connector.api_keys_file), "tbk"
    else:
        path, prefix = config.path(config.broker.connector_tokens_file), "tbc"
    s = SecretStore(path, prefix)
    what = "API key" if store == "keys" else "connector token"
    routes = check_route_patterns(getattr(args, "routes", None) or [])
    if action == "add":
        entry, secret = s.add(name, routes=routes)
        print(secret)
        scope = f"; it may serve: {entry.route_text}" if store == "tokens" else ""
        print(
            f"# {what} {entry.name!r} (id {entry.id}) added to {path}{scope}. It is shown "
            "only once: only its hash is stored.",
            file=sys.stderr,
        )
        if store == "tokens":
            print(
                "# On the connector machine, put it in the file named by connector.token_file "
                "(mode 0600) or in the TRIO_BRIDGE_TOKEN environment variable.",
                file=sys.stderr,
            )
    elif action == "list":
        _list_entries(s, store)
    elif action == "set":
        entries = s.set_routes(name, routes)
        print(
            f"{entries[0].name!r} may now serve: {entries[0].route_text}; relays on other "
            "routes are closed within a second"
        )
    elif action == "rotate":
        try:
            grace = parse_duration(args.grace)
        except ValueError as exc:
            raise ConfigError(f"--grace: {exc}") from None
        entry, secret, until = s.rotate(name, float(grace))
        print(secret)
        print(
            f"# new {what} for {entry.name!r} (id {entry.id}) in {path}; the previous one "
            f"stays valid until {until}. Shown only once.",
            file=sys.stderr,
        )
        if store == "tokens":
            print(
                "# Write it to the connector's token_file: the connector re-reads that file and "
                "re-dials with the new token as soon as its relay is idle (no restart).",
                file=sys.stderr,
            )
    else:
        entry = s.revoke(name)
        print(
            f"revoked {entry.name!r} (id {entry.id}); running processes stop accepting it "
            "within a second"
        )
    return 0


def _list_entries(s: SecretStore, store: str) -> None:
    entries = s.entries()
    if not entries:
        print(f"(no entries in {s.path})")
        return
    extra = "ROUTES" if store == "tokens" else ""
    print(f"{'NAME':<24} {'ID':<10} {'CREATED':<21} {'EXPIRES':<21} {extra}".rstrip())
    now = time.time()
    for e in entries:
        expires = e.expires or "-"
        if e.expired(now):
            expires += " (expired)"
        routes = e.route_text if store == "tokens" else ""
        print(f"{e.name:<24} {e.id:<10} {e.created:<21} {expires:<21} {routes}".rstrip())


async def _probe(url: str) -> str | None:
    """None if an HTTP server answers at ``url``, else the reason."""
    try:
        async with httpx.AsyncClient(timeout=2.0, trust_env=False) as client:
            await client.get(url)
        return None
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _check(config: Config) -> int:
    ok = True
    print("config: OK")
    for what, path in (
        ("broker.connector_tokens_file", config.path(config.broker.connector_tokens_file)),
        ("connector.api_keys_file", config.path(config.connector.api_keys_file)),
    ):
        try:
            n = len(SecretStore(path, "tbk"))
            print(f"{what}: {path}: {n} entr{'y' if n == 1 else 'ies'}")
        except ConfigError as exc:
            print(f"{what}: {exc}")
            return EXIT_CONFIG
    host, _ = parse_hostport(config.broker.listen)
    bc = config.broker
    if host not in ("127.0.0.1", "::1", "localhost") and not (bc.behind_tls_proxy or bc.tls_cert):
        print(
            f"WARNING: the broker listens on {config.broker.listen} without TLS: API keys "
            "would cross the network in clear. Put Caddy or nginx in front (conf/) and set "
            "broker.behind_tls_proxy = true, or listen on 127.0.0.1."
        )
    local = config.connector.local_url.rstrip("/") + "/v1/models"
    err = await _probe(local)
    print(
        f"LLM at {config.connector.local_url}: "
        + ("answers" if err is None else f"NOT answering ({err})")
    )
    ok &= err is None
    for url in config.connector.broker_urls:
        http_url = "http" + url[2:] if url.startswith("ws") else url
        err = await _probe(http_url)
        print(f"broker at {url}: " + ("answers" if err is None else f"NOT answering ({err})"))
        ok &= err is None
    return 0 if ok else 1


async def _first_model(url: str) -> str | None:
    try:
        async with httpx.AsyncClient(timeout=1.5, trust_env=False) as client:
            r = await client.get(url.rstrip("/") + "/v1/models")
            data = r.json().get("data") or []
            return str(data[0]["id"]) if r.status_code == 200 and data else None
    except (httpx.HTTPError, ValueError, KeyError, TypeError, AttributeError):
        return None


async def _demo(config: Config, args: argparse.Namespace) -> None:
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
            host, _ = parse_hostport(config.broker.listen)
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
            broker = Broker(config, tokens)
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
            connector = Connector(config, keys=keys, token=token)
            nursery.start_soon(connector.run)
            with trio.fail_after(10):
                await connector.connected.wait()
            admins = [broker.admin_address, connector.admin_address]
            _print_demo(f"http://{bhost}:{bport}", api_key, model_id, label, admins)


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
    hdrs = f"-H 'Authorization: Bearer {key}' -H 'Content-Type: application/json'"
    admin_text = ", ".join(
        f"{role} http://{a[0]}:{a[1]}/status"
        for role, a in zip(("broker", "connector"), admins, strict=True)
        if a is not None
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

  python -c "{py}"

Health and metrics: {admin_text}

Press Ctrl-C to stop.
""",
        flush=True,
    )


__all__ = ["main"]
