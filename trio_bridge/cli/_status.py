"""``status``: a running role's /status, readable; ``status --ready`` for a HEALTHCHECK."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
import urllib.parse
from typing import Any

import httpx

from trio_bridge._config import Config
from trio_bridge._observe import terminal_safe
from trio_bridge.accounts._keys import admin_token

log = logging.getLogger("trio_bridge.cli")


def admin_headers(config: Config, role: str | None) -> dict[str, str]:
    """The Authorization a role's admin port wants, from its config (none if it has no
    ``admin_token_file`` and TRIO_BRIDGE_ADMIN_TOKEN is unset)."""
    section = config.broker if role == "broker" else config.connector
    token = admin_token(config, section.admin_token_file) if role else None
    return {"authorization": f"Bearer {token}"} if token else {}


def status_command(config: Config, args: argparse.Namespace) -> int:
    if args.url:
        # the config's admin token goes only to that role's own admin address, never to
        # whatever URL was typed (it would cross the network to another host in clear)
        base = args.url.rstrip("/")
        own = {"broker": config.broker.admin_listen, "connector": config.connector.admin_listen}
        ours = args.role and urllib.parse.urlsplit(base).netloc == own[args.role]
        targets = [(base, admin_headers(config, args.role) if ours else {})]
    else:
        listens = {"broker": config.broker.admin_listen, "connector": config.connector.admin_listen}
        roles = (
            [args.role]
            if args.role
            else [r for r in ("connector", "broker") if config.configures(r)]
        )
        targets = [(f"http://{listens[r]}", admin_headers(config, r)) for r in roles if listens[r]]
    if args.ready:
        return _ready([base for base, _ in targets])
    shown = 0
    for base, headers in targets:
        try:
            r = httpx.get(base + "/status", timeout=3, trust_env=False, headers=headers)
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
        print("no role answered at " + ", ".join(b for b, _ in targets), file=sys.stderr)
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


def ago(ts: float | None) -> str:
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
        + f"  up {ago(doc.get('started'))}"
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
        lines.append(f"LLM {llm.get('url')}: {state} for {ago(llm.get('since'))}")
    for problem in doc.get("problems", []):
        lines.append(f"PROBLEM: {problem}")
    for relay in doc.get("relays", []):
        # the error that took it down, while it is down (a relay up again has none to show)
        down = relay.get("state") != "connected" and relay.get("last_error")
        err = f"  last error: {relay['last_error']}" if down else ""
        lines.append(
            f"relay {relay['broker']}: {relay['state']} for {ago(relay.get('since'))}, "
            f"reconnects {relay.get('reconnects', 0)}, in flight {relay.get('in_flight', 0)}{err}"
        )
    for route, conns in doc.get("routes", {}).items():
        for c in conns:
            flags = ("ready" if c.get("ready") else "NOT READY") + (
                " draining" if c.get("draining") else ""
            )
            if c.get("ejected_for_s"):  # its recent answers failed: no new request for now
                flags += f", ejected ({math.ceil(c['ejected_for_s'])} s more)"
            failed = f", answers {c['answers']}, failed {c['failed']}" if c.get("failed") else ""
            lines.append(
                f"route {route}: {c['connector']} ({flags}) in flight {c['in_flight']}/"
                f"{c['capacity']}, connected {ago(c.get('connected_since'))}{failed}"
            )
    for key, models in doc.get("tokens", {}).items():
        for model, t in models.items():
            lines.append(
                f"tokens key {key} model {model}: prompt {t['prompt']}, "
                f"completion {t['completion']}"
            )
    # names, models and reasons come from peers: nothing reaches the terminal raw
    return "\n".join(terminal_safe(line) for line in lines)
