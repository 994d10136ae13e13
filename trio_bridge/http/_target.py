"""What a request may be: one rule for the method and the target, shared by both roles (pure).

The broker applies it before routing (so a client learns at once), the connector again before it
builds the LLM's URL (it does not trust the broker). The rule, for a target of a request that is
relayed:

- **origin-form only** (RFC 9112 §3.2.1): ``/`` followed by a path and an optional ``?query``.
  Absolute-form (``http://…``), authority-form (``host:port``), anything that does not start
  with ``/`` (``@host/x``), a path that starts with ``//`` (a network-path reference to any
  URL parser) and ``#`` anywhere are refused. ``OPTIONS *`` is the broker's to
  answer and is never relayed.
- **the path's characters** are RFC 3986 ``pchar`` and ``/``: letters, digits, ``-._~``,
  ``!$&'()*+,;=:@`` and ``%`` followed by two hex digits. Not ``\\``, quotes, ``<>[]{}|^```
  or a stray ``%``.
- **no dot segment**: no path segment is ``.`` or ``..``, neither raw nor once percent-decoded
  (``%2e%2E``), nor any part of a decoded segment split at ``/`` or ``\\`` (``..%2f..``):
  whatever a server does with them, a path can never climb above the LLM's base path.
- no percent-encoded control character (``%00``–``%1f``, ``%7f``) in the path.
- **the query** is printable ASCII without ``#``; it is passed on as it came.
- at most :data:`MAX_TARGET` bytes.

Methods: an HTTP token (RFC 9110 ``tchar``, at most 32 characters); ``TRACE`` and ``CONNECT``
are never relayed (a proxy's verbs, not an API's). The connector further limits methods to the
configured list (:data:`DEFAULT_METHODS`).

`LLMBase.url_for` joins a checked target to the LLM's base URL with the URL's own parts
(scheme, host and port are never taken from the target), so the only address the connector
ever connects to is ``local_url``'s.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

import httpx

from trio_bridge._errors import ClientError

MAX_TARGET = 16 * 1024
DEFAULT_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
NEVER_RELAYED = frozenset({"TRACE", "CONNECT"})

_METHOD = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}\Z")
_PATH = re.compile(r"(?:/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@]|%[0-9A-Fa-f]{2})*)+\Z")
_QUERY = re.compile(r"[\x21-\x22\x24-\x7e]*\Z")  # printable ASCII, no '#'
_ENCODED_CTL = re.compile(r"%(?:[01][0-9A-Fa-f]|7[Ff])")
_SPLIT_DECODED = re.compile(r"[/\\]")


class BadTarget(ClientError):
    """A method or target the rule above refuses; ``str()`` says why (safe to show)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def check_method(method: str, allowed: tuple[str, ...] | frozenset[str] | None = None) -> None:
    """Raise :class:`BadTarget` (405 for a verb that is not relayed, 400 for a malformed one)
    unless ``method`` may be relayed (and is in ``allowed``, when given)."""
    if not _METHOD.match(method):
        raise BadTarget("invalid request method")
    if method in NEVER_RELAYED or (allowed is not None and method not in allowed):
        raise BadTarget(f"method {method} is not allowed here", 405)


def check_target(target: str) -> tuple[str, str]:
    """(path, ``?query`` or "") of an origin-form target that passes the rule above; else
    :class:`BadTarget` with the reason."""
    if not target.startswith("/") or target.startswith("//"):
        raise BadTarget(
            "invalid request target: only origin-form targets (/path?query) are relayed"
        )
    if len(target) > MAX_TARGET:
        raise BadTarget("request target too long", 414)
    path, qsep, query = target.partition("?")
    if not _PATH.match(path):
        raise BadTarget("invalid request target: the path has a character that is not allowed")
    if not _QUERY.match(query):
        raise BadTarget("invalid request target: the query has a character that is not allowed")
    if "%" in path and _ENCODED_CTL.search(path):
        raise BadTarget("invalid request target: an encoded control character in the path")
    for segment in path.split("/"):
        if ("." in segment or "%" in segment) and _dot_segment(segment):
            raise BadTarget("invalid request target: dot segments (. or ..) are not allowed")
    return path, qsep + query


def _dot_segment(segment: str) -> bool:
    if segment in (".", ".."):
        return True
    if "%" not in segment:
        return False
    decoded = unquote(segment, errors="replace")
    return any(part in (".", "..") for part in _SPLIT_DECODED.split(decoded))


class LLMBase:
    """Where the LLM is: ``local_url``'s scheme, host and port, and its path (the prefix every
    relayed path goes under; "" for none)."""

    __slots__ = ("prefix", "url")

    def __init__(self, local_url: str) -> None:
        url = httpx.URL(local_url)
        self.prefix = url.raw_path.split(b"?", 1)[0].decode("ascii").rstrip("/")
        self.url = url.copy_with(raw_path=b"/", fragment=None)

    def url_for(self, target: str) -> httpx.URL:
        """The URL for ``target`` (checked by :func:`check_target`; else :class:`BadTarget`):
        this base's scheme, host and port; its prefix followed by the target's path; the
        target's query."""
        path, query = check_target(target)
        url = self.url.copy_with(raw_path=(self.prefix + path + query).encode("ascii"))
        # the parts that say where to connect are the base's, whatever the target held
        if (url.scheme, url.host, url.port) != (self.url.scheme, self.url.host, self.url.port):
            raise BadTarget("invalid request target")  # pragma: no cover (unreachable)
        return url
