"""Sans-IO: a request's and a response's head as they cross the relay, and the one rule for
what a peer may send in them (see :mod:`trio_bridge.relay._protocol`'s docstring): JSON
objects, strictly decoded; a request line of token method, printable target and id; header
names that are tokens, values without CR, LF or NUL."""

from __future__ import annotations

import json
import operator
import re
from typing import Any, NoReturn

import attrs

from trio_bridge._errors import RemoteProtocolError

Headers = list[tuple[bytes, bytes]]


@attrs.define(slots=True)
class RequestHead:
    method: str
    target: str
    headers: Headers
    request_id: str


@attrs.define(slots=True)
class ResponseHead:
    status: int
    headers: Headers


# ---- head (de)serialisation (the rule: see the module docstring) -------------------------

MAX_TARGET = 16 * 1024  # as _target.MAX_TARGET
_ID = r"[A-Za-z0-9._:\-]{1,128}"
_METHOD = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,32}"  # an RFC 9110 token
_TARGET = rf"[\x21-\x7e]{{1,{MAX_TARGET}}}"
#: method, target and id joined by spaces (none of them may hold one): one match for the three
_REQUEST_LINE = re.compile(rf"{_METHOD} {_TARGET} {_ID}\Z")
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_first, _second = operator.itemgetter(0), operator.itemgetter(1)


def _headers_to_json(headers: Headers) -> list[list[str]]:
    return [[k.decode("latin-1"), v.decode("latin-1")] for k, v in headers]


def _headers_from_json(value: Any, what: str) -> Headers:
    if type(value) is not list:
        raise RemoteProtocolError(f"{what}: headers must be a list")
    out: Headers = []
    for item in value:
        if type(item) is not list or len(item) != 2:
            raise RemoteProtocolError(f"{what}: each header must be [name, value]")
        name, val = item
        if type(name) is not str or type(val) is not str or not name:
            raise RemoteProtocolError(f"{what}: each header must be [name, value]")
        try:
            out.append((name.encode("ascii"), val.encode("latin-1")))
        except UnicodeEncodeError:
            raise RemoteProtocolError(
                f"{what}: a header name outside ASCII or a value outside latin-1"
            ) from None
    if out:  # all names, then all values, at once (half the cost of a check per header)
        if b"".join(map(_first, out)).translate(None, _TCHAR):
            raise RemoteProtocolError(f"{what}: a header name that is not a token")
        values = b"".join(map(_second, out))
        # CR, LF, NUL as ints: `b"\r" in values` raises and swallows a TypeError each time
        if 13 in values or 10 in values or 0 in values:
            raise RemoteProtocolError(f"{what}: CR, LF or NUL in a header value")
    return out


def load_json(payload: bytes, what: str) -> dict[str, Any]:
    try:
        # decoded here, strictly: json.loads would guess UTF-16/32 and let surrogates pass
        obj = json.loads(payload.decode("utf-8"))
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise RemoteProtocolError(f"{what}: invalid JSON (or nested too deep)") from None
    if type(obj) is not dict:
        raise RemoteProtocolError(f"{what}: not a JSON object")
    return obj


def printable(value: Any, limit: int = 256) -> bool:
    """Text of at most ``limit`` characters, none of them a control or format character, a
    separator other than the space, or a lone surrogate."""
    return type(value) is str and len(value) <= limit and value.isprintable()


# one encoder for every head (json.dumps with arguments builds a new one per call)
_ENCODE = json.JSONEncoder(separators=(",", ":")).encode


def encode_request_head(head: RequestHead) -> bytes:
    return _ENCODE(
        {
            "method": head.method,
            "target": head.target,
            "headers": _headers_to_json(head.headers),
            "id": head.request_id,
        }
    ).encode()


def decode_request_head(payload: bytes) -> RequestHead:
    obj = load_json(payload, "REQUEST")
    method, target, request_id = obj.get("method"), obj.get("target"), obj.get("id")
    if not (type(method) is str and type(target) is str and type(request_id) is str):
        raise RemoteProtocolError("REQUEST: method, target and id must be strings")
    if not _REQUEST_LINE.match(f"{method} {target} {request_id}"):
        _refuse_request_line(method, request_id)
    return RequestHead(
        method, target, _headers_from_json(obj.get("headers"), "REQUEST"), request_id
    )


def _refuse_request_line(method: str, request_id: str) -> NoReturn:
    """Say which of method, target and id broke the rule."""
    if not re.fullmatch(_ID, request_id):
        raise RemoteProtocolError("REQUEST: id must be 1-128 of [A-Za-z0-9._:-]")
    if not re.fullmatch(_METHOD, method):
        raise RemoteProtocolError("REQUEST: method must be an HTTP token of at most 32 characters")
    raise RemoteProtocolError(
        f"REQUEST: target must be 1-{MAX_TARGET} characters of printable ASCII"
    )


def encode_response_head(head: ResponseHead) -> bytes:
    return _ENCODE({"status": head.status, "headers": _headers_to_json(head.headers)}).encode()


def decode_response_head(payload: bytes) -> ResponseHead:
    obj = load_json(payload, "RESPONSE")
    status = obj.get("status")
    if type(status) is not int or not 100 <= status <= 999:
        raise RemoteProtocolError("RESPONSE: status must be an integer 100..999")
    return ResponseHead(status, _headers_from_json(obj.get("headers"), "RESPONSE"))
