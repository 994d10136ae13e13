"""The admin endpoint of a role (``admin_listen``, loopback by default; never the public port).

``GET /healthz``  200 while the process runs.
``GET /readyz``   200 when the role can serve (broker: serving, not draining; connector: a relay
                  to at least one broker is up AND the LLM answers), else 503.
``GET /status``   JSON: connections with state and since when, in-flight, recent latency.
``GET /metrics``  Prometheus text (prometheus-client).
``GET /``         the web page (connector: live request inspector; broker: routes and
                  connectors), with its JSON under ``/api/``; see ``_ui``.

Any page in the operator's browser can send requests here, so nothing is trusted for being on
loopback (:class:`AdminGuard`, before the admin token is looked at):

- **Host** (against DNS rebinding: a site whose name resolves to 127.0.0.1 reads the answers).
  Accepted: a loopback name (``localhost``, ``*.localhost``), any IP literal (``127.0.0.1``,
  ``[::1]``, the machine's addresses: an address has no name to rebind), the name in
  ``admin_listen``, the machine's host name, and the names in ``admin_hosts``; the port is
  not compared (an SSH tunnel may use another). Anything else: 421 ``wrong_host``. Exempt:
  ``GET``/``HEAD`` of ``/healthz``, ``/readyz`` and ``/metrics`` (monitoring reaches them by
  whatever name; they carry counters, never prompts, bodies or secrets).
- **State-changing requests** (any method but ``GET``/``HEAD``, e.g. ``POST
  /api/replay/N``) need a same-origin proof: the ``X-Trio-Bridge-Admin: 1`` header (the page's
  own script sends it; a form or any cross-origin request cannot without a CORS preflight,
  which is never granted), no ``Sec-Fetch-Site`` but ``same-origin`` / ``none``, and an
  ``Origin``, when sent, that is the request's own (``http(s)://`` + its Host) or one of
  ``admin_hosts``. Anything else: 403 ``cross_site_refused``, with or without an admin token.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
from collections.abc import Callable, Iterable
from typing import Any

from trio_bridge._observe import Metrics
from trio_bridge.admin._ui import Pages
from trio_bridge.http._asgi import Receive, Scope, Send, lifespan, send_simple

_JSON = [(b"content-type", b"application/json")]
_OWN = frozenset({"/healthz", "/readyz", "/status", "/metrics"})
#: read by monitoring by whatever name it knows the machine by: no Host check
MONITORING = frozenset({"/healthz", "/readyz", "/metrics"})
SAFE_METHODS = frozenset({"GET", "HEAD"})
#: the header the admin page's own script sends with every state-changing request
ADMIN_HEADER = "X-Trio-Bridge-Admin"
_ADMIN_HEADER = ADMIN_HEADER.lower().encode()
_SAME_ORIGIN_FETCH = frozenset({b"same-origin", b"none"})
_NAME = re.compile(r"[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


def host_name(value: str) -> str | None:
    """The name in a Host value (``name``, ``name:port``, ``[v6]:port``), lower-case, without
    a trailing dot (an IPv6 address without its brackets); None if it is malformed."""
    value = value.strip().lower()
    if value.startswith("["):
        name, sep, rest = value[1:].partition("]")
        if not sep or (rest and not (rest[:1] == ":" and rest[1:].isdigit())):
            return None
        try:
            return str(ipaddress.IPv6Address(name))
        except ValueError:
            return None
    name, sep, port = value.partition(":")
    if sep and not port.isdigit():
        return None
    name = name.removesuffix(".")
    return name if _NAME.fullmatch(name) else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class AdminGuard:
    """Which Host names are ours, and whether a request carries a same-origin proof (pure;
    see the module docstring for the rules). ``names``: ``admin_listen`` and ``admin_hosts``
    (a port in them is ignored)."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.names = {n for n in map(host_name, names) if n}
        if me := host_name(socket.gethostname()):
            self.names.add(me)
        self._configured = frozenset(self.names)

    def host_allowed(self, host: bytes | None) -> bool:
        """True for a Host value naming this endpoint (None: no Host, so not a browser)."""
        if host is None:
            return True
        name = host_name(host.decode("latin-1"))
        if name is None:
            return False
        return (
            name == "localhost" or name.endswith(".localhost") or name in self.names or _is_ip(name)
        )

    def cross_site(self, headers: list[tuple[bytes, bytes]]) -> str | None:
        """Why a state-changing request lacks a same-origin proof; None if it has one."""
        host, marks, fetch_sites, origins = b"", [], [], []
        for k, v in headers:
            if k == b"host":
                host = v
            elif k == _ADMIN_HEADER:
                marks.append(v.strip())
            elif k == b"sec-fetch-site":
                fetch_sites.append(v.strip().lower())
            elif k == b"origin":
                origins.append(v.strip().lower())
        if marks != [b"1"]:
            return f"a state-changing admin request needs the header {ADMIN_HEADER}: 1"
        if any(site not in _SAME_ORIGIN_FETCH for site in fetch_sites):
            return "cross-site requests to the admin endpoint are refused (Sec-Fetch-Site)"
        for origin in origins:
            scheme, sep, rest = origin.partition(b"://")
            ours = (
                sep
                and scheme in (b"http", b"https")
                and (
                    rest == host.lower()
                    or (host_name(rest.decode("latin-1")) or "") in self._configured
                )
            )
            if not ours:
                return "cross-origin requests to the admin endpoint are refused (Origin)"
        return None

    def refusal(self, scope: Scope) -> tuple[int, str, str] | None:
        """(status, code, message) to answer an HTTP ``scope`` with, or None to serve it."""
        method, path = scope["method"], scope["path"]
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        if not (method in SAFE_METHODS and path in MONITORING):
            host = next((v for k, v in headers if k == b"host"), None)
            if not self.host_allowed(host):
                shown = (host or b"").decode("latin-1")[:100]
                return (
                    421,
                    "wrong_host",
                    f"this admin endpoint does not answer to Host {shown!r}: open it as "
                    "localhost or by its address, or add the name to admin_hosts",
                )
        if method not in SAFE_METHODS and (why := self.cross_site(headers)) is not None:
            return 403, "cross_site_refused", why
        return None


def _error(message: str, code: str) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    ).encode()


class AdminApp:
    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], bool],
        status: Callable[[], dict[str, Any]],
        pages: Pages | None = None,
        *,
        hosts: Iterable[str] = (),
        detail: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        """``hosts``: the names this endpoint answers to beyond loopback names and IP
        literals (``admin_listen`` and ``admin_hosts``); ``detail``: what ``/readyz`` says
        beside ``ready`` (why not, and problems that do not stop it serving)."""
        self.metrics = metrics
        self.ready = ready
        self.detail = detail
        self.status = status
        self.pages = pages
        self.guard = AdminGuard(hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and (scope["path"] + "/").startswith("/v1/"):
            # an OpenAI client pointed at an admin address (the demo prints both kinds)
            message = (
                "this is an admin endpoint, not the API: the OpenAI-compatible API is on the "
                "broker's public port (its listen address, .../v1)"
            )
            await send_simple(send, 404, _JSON, _error(message, "not_the_api"))
            return
        if scope["type"] == "http" and (refusal := self.guard.refusal(scope)) is not None:
            status, code, message = refusal
            await send_simple(send, status, _JSON, _error(message, code))
            return
        if scope["type"] == "http" and self.pages is not None and not self.pages.allowed(scope):
            await send_simple(
                send,
                401,
                [*_JSON, (b"www-authenticate", b'Bearer realm="trio-bridge admin"')],
                b'{"error": "this admin endpoint needs its admin token"}',
            )
            return
        await self._serve(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["type"] == "websocket":
            # e.g. a connector dialing the admin port instead of the relay: say so (404)
            await receive()  # websocket.connect
            await send({"type": "websocket.http.response.start", "status": 404, "headers": _JSON})
            await send(
                {
                    "type": "websocket.http.response.body",
                    "body": b'{"error": {"message": "this is an admin endpoint; the relay '
                    b'endpoint is on the public port", "type": "invalid_request_error", '
                    b'"code": "not_found"}}',
                }
            )
            return
        if scope["type"] != "http":
            return  # noqa: ASYNC910  a scope type we do not serve: nothing to do
        path = scope["path"]
        if self.pages is not None and path not in _OWN:
            answered = await self.pages.handle(scope, receive, send)
            if answered:
                return
        if scope["method"] not in ("GET", "HEAD"):
            await send_simple(send, 405, _JSON, b'{"error": "method not allowed"}')
        elif path == "/healthz":
            await send_simple(send, 200, _JSON, b'{"status": "alive"}')
        elif path == "/readyz":
            ok = self.ready()
            body = json.dumps({"ready": ok, **(self.detail() if self.detail else {})}).encode()
            await send_simple(send, 200 if ok else 503, _JSON, body)
        elif path == "/status":
            body = json.dumps(self.status(), indent=1).encode()
            await send_simple(send, 200, _JSON, body)
        elif path == "/metrics":
            from prometheus_client import CONTENT_TYPE_LATEST

            await send_simple(
                send, 200, [(b"content-type", CONTENT_TYPE_LATEST.encode())], self.metrics.render()
            )
        else:
            await send_simple(send, 404, _JSON, b'{"error": "not found"}')
