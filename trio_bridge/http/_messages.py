"""Pure HTTP helpers: hop-by-hop filtering, API key extraction, correlation ids, error bodies."""

from __future__ import annotations

import binascii
import json
import re
from random import getrandbits as _random_bits
from urllib.parse import unquote_to_bytes

from trio_bridge._errors import ClientError

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)
KEY_HEADERS = frozenset({b"authorization", b"x-api-key", b"api-key"})
REQUEST_ID = b"x-request-id"
_SANE_ID = re.compile(rb"^[A-Za-z0-9._:\-]{1,128}$")


def _connection_tokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for k, v in headers:
        if k.lower() == b"connection":
            tokens.update(t.strip().lower() for t in v.split(b","))
    return frozenset(tokens)


def strip_hop_by_hop(headers: Headers, *, also: frozenset[bytes] = frozenset()) -> Headers:
    """Drop hop-by-hop headers, those named in ``Connection:``, and ``also`` (lower-case)."""
    drop = HOP_BY_HOP | also
    if any(k.lower() == b"connection" for k, _ in headers):
        drop |= _connection_tokens(headers)
    return [kv for kv in headers if kv[0].lower() not in drop]  # the same tuples: no copies


def header(headers: Headers, name: bytes) -> bytes | None:
    """The first value of header ``name`` (lower-case), or None."""
    for k, v in headers:
        if k.lower() == name:
            return v
    return None


def new_request_id() -> str:
    """32 random hex digits, as uuid4().hex. A correlation id, never a secret: drawn from
    ``random`` (seeded from the OS at start), not a system call per request."""
    return f"{_random_bits(128):032x}"


def request_id_from(headers: Headers) -> str:
    """A sane incoming X-Request-ID is kept; anything else gets a fresh one."""
    v = header(headers, REQUEST_ID)
    if v is not None and _SANE_ID.match(v):
        return v.decode("ascii")
    return new_request_id()


def presented_key(headers: Headers) -> str | None:
    """The API key a client presented (Authorization: Bearer, x-api-key or api-key). The
    scheme is case-insensitive and may be followed by spaces or tabs."""
    for k, v in headers:
        lk = k.lower()
        if lk == b"authorization":
            parts = v.split(None, 1)
            if len(parts) == 2 and parts[0].lower() == b"bearer" and parts[1].strip():
                return parts[1].strip().decode("latin-1")
        elif lk in (b"x-api-key", b"api-key") and v.strip():
            return v.strip().decode("latin-1")
    return None


_secret_shapes: dict[bytes, re.Pattern[bytes]] = {}


def _secret_shape(prefix: bytes) -> re.Pattern[bytes]:
    """``<prefix><8-char id>_``, not preceded by a character a secret is made of (so an API
    key that merely contains the prefix somewhere is not taken for a token)."""
    shape = _secret_shapes.get(prefix)
    if shape is None:
        shape = re.compile(rb"(?<![A-Za-z0-9_-])" + re.escape(prefix) + rb"[A-Za-z0-9]{8}_", re.I)
        _secret_shapes[prefix] = shape
    return shape


def carries_secret(headers: Headers, target: bytes, prefix: bytes) -> bool:
    """Whether a request carries a secret of ours (``prefix``: b"tbc_", the connector tokens',
    followed by an 8-character id and ``_``, in any case): in any header value (any credential
    header or scheme, a cookie, a custom header), inside Basic credentials (padded or not), or
    in the target (also percent-encoded). Such a request is refused and never relayed: a
    connector token has no business in an API call."""
    shape = _secret_shape(prefix)
    p = prefix.lower()
    for k, v in headers:
        lv = v.lower()
        if p in lv and shape.search(v):
            return True
        if k.lower() in (b"authorization", b"proxy-authorization") and lv.startswith(b"basic"):
            raw = v[5:].strip()
            try:
                if shape.search(binascii.a2b_base64(raw + b"=" * (-len(raw) % 4))):
                    return True
            except (binascii.Error, ValueError):
                pass
    lt = target.lower()
    if p in lt and shape.search(target):
        return True
    return b"%" in target and shape.search(unquote_to_bytes(target)) is not None


class ModelUnknown(ClientError):
    """The model a request body names cannot be read with certainty (answered 400)."""


def declared_model(body: bytes, content_encoding: bytes | None) -> str | None:
    """The ``"model"`` a request body names, read strictly, for a key with a model allowlist
    (fail closed). None for an empty body (nothing to run: e.g. GET /v1/models). Anything
    that leaves a doubt about which model the LLM would run raises :class:`ModelUnknown`
    with the reason: a compressed body, a byte order mark (RFC 8259 lets a parser skip it,
    so some servers would read the body and others not), anything but UTF-8, not JSON,
    nesting beyond the parser's depth, not an object, no ``"model"`` or not a string, or
    ``"model"`` twice, in any case (parsers differ on which one wins, and some match keys
    case-insensitively)."""
    if content_encoding is not None and content_encoding.strip().lower() not in (b"", b"identity"):
        raise ModelUnknown(
            "this API key may only use some models, and a compressed request body cannot be "
            "checked: send it without Content-Encoding"
        )
    if not body:
        return None
    if body[:3] == b"\xef\xbb\xbf" or body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise ModelUnknown(
            "the request body starts with a byte order mark: send UTF-8 JSON without one"
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ModelUnknown("the request body is not valid UTF-8") from None
    twice = False

    def pairs(items: list[tuple[str, object]]) -> dict[str, object]:
        # Go's encoding/json (Ollama) matches keys case-insensitively, the last one winning:
        # "MODEL" or "Model" beside "model" would choose the model there
        nonlocal twice
        if sum(1 for k, _ in items if len(k) == 5 and k.casefold() == "model") > 1:
            twice = True
        return dict(items)

    try:
        doc = json.loads(text, object_pairs_hook=pairs)
    except RecursionError:
        raise ModelUnknown("the request body is nested too deeply") from None
    except ValueError:
        raise ModelUnknown("the request body is not valid JSON") from None
    if not isinstance(doc, dict):
        raise ModelUnknown("the request body must be a JSON object")
    if twice:
        raise ModelUnknown('the request body names "model" more than once')
    model = doc.get("model")
    if not isinstance(model, str):
        raise ModelUnknown(
            'this API key may only use some models: the request must name one in "model"'
        )
    return model


def error_body(message: str, type_: str, code: str) -> bytes:
    """An OpenAI-shaped error document."""
    return json.dumps({"error": {"message": message, "type": type_, "code": code}}).encode()


# status → (type, code) for errors the bridge itself makes
ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "bad_request"),
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("invalid_request_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    431: ("invalid_request_error", "headers_too_large"),
    429: ("requests", "rate_limit_exceeded"),  # what OpenAI sends for rate limits
    500: ("server_error", "internal_error"),
    502: ("server_error", "upstream_unavailable"),
    503: ("server_error", "service_unavailable"),
    504: ("server_error", "upstream_timeout"),
}


def error_response(
    status: int,
    message: str,
    request_id: str,
    *,
    retry_after: int | None = None,
    code: str | None = None,
) -> tuple[int, Headers, bytes]:
    """(status, headers, body) of a bridge-made error in the OpenAI shape (``code``: another
    than the status's usual one)."""
    type_, usual = ERRORS.get(status, ("server_error", "error"))
    code = code or usual
    body = error_body(message, type_, code)
    headers: Headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (REQUEST_ID, request_id.encode()),
    ]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="trio-bridge"'))
    return status, headers, body


def request_model(body: bytes) -> str | None:
    """The top-level ``"model"`` of a JSON request body, or None."""
    if body.lstrip()[:1] != b"{":
        return None
    try:
        model = json.loads(body).get("model")
    except (ValueError, UnicodeDecodeError, AttributeError, RecursionError):
        return None
    return model if isinstance(model, str) else None


def with_model(body: bytes, model: str | None) -> bytes:
    """A JSON request body with its top-level ``"model"`` replaced (an alias resolved). The
    body is re-serialised; unchanged if it is not a JSON object or ``model`` is None."""
    if model is None:
        return body
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return body
    if not isinstance(doc, dict):
        return body
    doc["model"] = model
    return json.dumps(doc, ensure_ascii=False).encode()


#: where an LLM server lists its models: OpenAI's shape first, then Ollama's
MODEL_LISTS = {"/v1/models": ("data", "id"), "/api/tags": ("models", "name")}


def model_ids(path: str, status: int, body: bytes) -> list[str] | None:
    """The model ids in an answer to one of :data:`MODEL_LISTS`, or None if it is not one."""
    field, key = MODEL_LISTS[path]
    if status != 200:
        return None
    try:
        items = json.loads(body)[field]
    except (ValueError, UnicodeDecodeError, KeyError, TypeError, RecursionError):
        return None
    if not isinstance(items, list):
        return None
    return [str(m[key]) for m in items if isinstance(m, dict) and key in m]
