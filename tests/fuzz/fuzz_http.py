"""Coverage-guided fuzzing of what the public HTTP server lets through to a connector (atheris).

Any bytes are taken as a request head by the server's own parser, then judged by the broker's
own rules (method, routing, target). Invariants:

- parsing either gives a request or raises the server's head error, never anything else;
- a request the broker would relay has an origin-form target that no URL parser reads as
  naming a host, with no dot segment (raw, percent-decoded, or with ``\\`` read as ``/``);
- the connector's URL for it has local_url's scheme, host and port, under local_url's path.

    pip install atheris
    python tests/fuzz/fuzz_http.py -runs=50000           # what CI runs (a few seconds)
    python tests/fuzz/fuzz_http.py -max_total_time=3600  # a longer hunt
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from urllib.parse import unquote, urlsplit

import atheris

with atheris.instrument_imports():
    from trio_bridge.broker._rules import route_of
    from trio_bridge.http._server import _HeadError, _parse_head
    from trio_bridge.http._target import BadTarget, LLMBase, check_method, check_target

ROUTE_DOMAIN = "llm.example"
LLM = LLMBase("http://127.0.0.1:11434/base")


METHODS = [b"GET", b"POST", b"OPTIONS", b"TRACE", b"CONNECT", b"DELETE", b"G\xffT"]
HOSTS = [b"x", b"a.llm.example", b"evil.llm.example:80", b"[::1]:1", b"llm.example"]


def head_from(data: bytes) -> bytes:
    """Most inputs are a target (and a choice of method and Host) put in a well-formed head,
    so the fuzzer spends its time past the HTTP parser; some are a whole raw head."""
    if not data or data[0] == 0:
        return data[1:]
    method = METHODS[data[0] % len(METHODS)]
    host = HOSTS[(data[0] >> 3) % len(HOSTS)]
    return method + b" " + data[1:] + b" HTTP/1.1\r\nHost: " + host + b"\r\n\r\n"


def one_input(data: bytes) -> None:
    try:
        _, event = _parse_head(head_from(data))
    except _HeadError:
        return
    req = SimpleNamespace(target=event.target, headers=list(event.headers))
    try:
        check_method(event.method.decode("ascii"))
        _, target = route_of(req, ROUTE_DOMAIN)  # type: ignore[arg-type]
        check_target(target)
    except BadTarget:
        return
    # relayed: what it may be
    assert target.startswith("/") and not target.startswith("//"), target
    parts = urlsplit(target)
    assert not parts.scheme and not parts.netloc and not parts.fragment, target
    for path in (parts.path, unquote(parts.path), unquote(parts.path).replace("\\", "/")):
        assert all(seg not in (".", "..") for seg in path.split("/")), target
    url = LLM.url_for(target)
    assert (url.scheme, url.host, url.port) == ("http", "127.0.0.1", 11434), target
    assert url.raw_path.startswith(b"/base/"), target


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
