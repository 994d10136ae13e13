"""``check``: one line per setting a role needs (OK / WARN / FAIL), before it runs."""

from __future__ import annotations

import errno
import logging
import os
import socket
import sqlite3
import ssl
from typing import Any

import httpx
import trio

from trio_bridge._config import Config, parse_hostport
from trio_bridge._errors import ConfigError, leaves
from trio_bridge._version import __version__
from trio_bridge.accounts._keys import SecretStore
from trio_bridge.accounts._usagestore import check_writable
from trio_bridge.cli._status import admin_headers, ago
from trio_bridge.connector._connector import probe_relay, read_secret_file
from trio_bridge.connector._llm import A_BROKER
from trio_bridge.http._messages import MODEL_LISTS, model_ids

log = logging.getLogger("trio_bridge.cli")


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


async def run_check(config: Config, role: str | None) -> int:
    roles = _roles_to_check(config, role)
    report = _Report()
    report.ok("config", f"{config.source} is valid")
    for r in roles:
        running = await _ask_running(config, r, report)
        if r == "broker":
            _check_broker(config, report, running)
        else:
            await _check_connector(config, report)
        if running is not None:
            _report_running(report, r, running)
    return 1 if report.failed else 0  # noqa: ASYNC910  every check awaited its probe


async def _ask_running(config: Config, role: str, report: _Report) -> dict[str, Any] | None:
    """The /status of this role if it runs already (asked on its admin port), else None."""
    listen = config.broker.admin_listen if role == "broker" else config.connector.admin_listen
    if not listen:
        return None  # noqa: ASYNC910  no admin port: nothing to ask
    base = f"http://{listen}"
    try:
        headers = admin_headers(config, role)
    except ConfigError as exc:
        report.fail(f"{role}.admin_token_file", str(exc))
        headers = {}
    async with httpx.AsyncClient(timeout=3, trust_env=False, headers=headers) as client:
        try:
            r = await client.get(base + "/status")
        except httpx.HTTPError:
            return None  # not running (or not answering): the checks below say what they find
    try:
        doc = r.json()
    except ValueError:
        doc = None
    if r.status_code == 401:
        report.warn(
            f"running {role}",
            f"{base} answers 401: give this command the admin token (admin_token_file in "
            "the config, or TRIO_BRIDGE_ADMIN_TOKEN) to ask it how it is",
        )
        return None
    if r.status_code != 200 or not isinstance(doc, dict) or doc.get("role") != role:
        return None  # something else listens there: the listen check says the port is taken
    return doc


def _report_running(report: _Report, role: str, doc: dict[str, Any]) -> None:
    """What the running role says of itself: one line for its state, one per reason it is not
    ready (FAIL) and per problem it has (WARN)."""
    since = doc.get("started")
    up = f", up {ago(since)}" if since else ""
    version = doc.get("version")
    if doc.get("ready"):
        report.ok(f"running {role}", f"ready (v{version}{up})")
    for why in doc.get("not_ready_because") or (["not ready"] if not doc.get("ready") else []):
        report.fail(f"running {role}", f"NOT READY: {why}")
    for problem in doc.get("problems", []):
        report.warn(f"running {role}", problem)
    if version and version != __version__:
        report.warn(
            f"running {role}",
            f"it runs v{version}, this is v{__version__}: restart it to run this version",
        )


def _check_listen(
    report: _Report, option: str, value: str, running: dict[str, Any] | None = None
) -> None:
    host, port = parse_hostport(value)
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as exc:
        why = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE and running is not None:
            report.ok(option, f"{value} is served by the running {running['role']}")
            return
        if exc.errno == errno.EADDRINUSE:
            why = (
                "address already in use by another program (a running broker would have "
                "answered on its admin port; give it one with admin_listen) or change it"
            )
        report.fail(option, f"cannot listen on {value}: {why}")
    else:
        report.ok(option, f"{value} is free to listen on")


def _check_broker(config: Config, report: _Report, running: dict[str, Any] | None) -> None:
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
    _check_listen(report, "broker.listen", bc.listen, running)
    if bc.admin_listen:
        _check_listen(report, "broker.admin_listen", bc.admin_listen, running)
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


async def _check_store(config: Config, report: _Report) -> None:
    """The pool's store answers (a real round trip, with the password and TLS the connector
    uses) and holds its keys."""
    from trio_bridge._config import redact_url
    from trio_bridge.accounts._poolclient import store_client, store_errors, why_failed
    from trio_bridge.accounts._poolkeys import fetch_keys

    where = redact_url(config.connector.store)
    try:
        client = store_client(config)
    except ConfigError as exc:
        report.fail("connector.store", str(exc))
        return  # noqa: ASYNC910  a config error: nothing to ask
    errors: tuple[type[BaseException], ...] = (*store_errors(), BaseExceptionGroup)
    try:
        with trio.fail_after(5):
            async with client:
                await client.ping()
                document, _version = await fetch_keys(client)
    except errors as exc:  # coredis's client raises inside an exception group
        found = leaves(exc)
        if not all(isinstance(e, errors) for e in found):
            raise
        why = (
            "no answer in 5 s" if isinstance(found[0], trio.TooSlowError) else why_failed(found[0])
        )
        report.fail("connector.store", f"{where}: {why}")
        return  # noqa: ASYNC910  the round trip raised (it awaited)
    if document is None:
        report.warn(
            "connector.store",
            f"{where} answers but holds no API keys yet: trio-bridge keys add NAME (or keys "
            f"import) -c {config.source}",
        )
    else:
        report.ok("connector.store", f"{where} answers and holds the pool's API keys")


async def _check_connector(config: Config, report: _Report) -> None:
    cc = config.connector
    path = config.path(cc.api_keys_file)
    try:
        n = 0 if cc.store else len(SecretStore(path, "tbk").active_ids())
    except ConfigError as exc:
        report.fail("connector.api_keys_file", str(exc))
    else:
        if cc.store:  # the keys live in the pool's store
            await _check_store(config, report)
        elif n:
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
    # the connector's own probes wait this long (LLMWatch): check and status agree
    connect = float(config.limits.connect_timeout)
    wait = connect + 5
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(wait, connect=connect), trust_env=False, headers=headers
    ) as client:
        try:
            health = await client.get(base + cc.health_path)
        except httpx.TimeoutException:
            report.fail(
                f"LLM {base}",
                f"no answer to {cc.health_path} within {wait:g} s (the connector waits as long "
                "and reports the LLM down meanwhile)",
            )
            return
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            report.fail(f"LLM {base}", f"not answering ({why})")
            return
        if health.status_code >= 500:
            report.fail(f"LLM {base}", f"{cc.health_path} answered HTTP {health.status_code}")
            return
        try:
            with trio.fail_after(wait):  # both list paths together within the wait named
                models = await _list_models(client, base)
        except (httpx.TimeoutException, trio.TooSlowError):
            report.warn(
                f"LLM {base}",
                f"answers {cc.health_path} (HTTP {health.status_code}) but its model list did "
                f"not answer within {wait:g} s (a model still loading? an overloaded LLM?); "
                "the connector waits as long and serves it meanwhile",
            )
            return
        if models is None:
            try:
                relay = await client.get(base + "/_bridge/relay")
            except httpx.HTTPError:
                pass
            else:
                if relay.status_code == 400 and b"the relay endpoint" in relay.content[:200]:
                    report.fail(f"LLM {base}", A_BROKER)
                    return
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
    """Model ids from OpenAI's /v1/models or Ollama's /api/tags; None if neither lists
    models; TimeoutException if neither did and one of them timed out."""
    timed_out: httpx.TimeoutException | None = None
    for path in MODEL_LISTS:
        try:
            r = await client.get(base + path)
        except httpx.TimeoutException as exc:
            timed_out = exc
            continue
        except httpx.HTTPError:
            continue
        if (ids := model_ids(path, r.status_code, r.content)) is not None:
            return ids  # noqa: ASYNC910  each turn awaits a GET
    if timed_out is not None:
        raise timed_out
    return None  # noqa: ASYNC910  each turn awaits a GET


async def first_model(url: str) -> str | None:
    async with httpx.AsyncClient(timeout=1.5, trust_env=False) as client:
        try:
            ids = await _list_models(client, url.rstrip("/"))
        except httpx.TimeoutException:
            return None
    return ids[0] if ids else None
