"""Header helpers."""

from __future__ import annotations

import json

from trio_bridge.http._messages import (
    error_response,
    presented_key,
    request_id_from,
    strip_hop_by_hop,
)


def test_hop_by_hop_and_connection_named_headers_are_dropped() -> None:
    headers = [
        (b"Connection", b"keep-alive, X-Secret-Hop"),
        (b"X-Secret-Hop", b"1"),
        (b"Transfer-Encoding", b"chunked"),
        (b"Upgrade", b"h2c"),
        (b"Content-Type", b"application/json"),
        (b"Host", b"example.com"),
    ]
    assert strip_hop_by_hop(headers, also=frozenset({b"host"})) == [
        (b"Content-Type", b"application/json")
    ]


def test_presented_key_from_each_header() -> None:
    assert presented_key([(b"Authorization", b"Bearer abc")]) == "abc"
    assert presented_key([(b"authorization", b"bearer  abc ")]) == "abc"
    assert presented_key([(b"x-api-key", b"k1")]) == "k1"
    assert presented_key([(b"api-key", b"k2")]) == "k2"
    assert presented_key([(b"Authorization", b"Basic Zm9v")]) is None
    assert presented_key([]) is None


def test_request_id_kept_when_sane_else_generated() -> None:
    assert request_id_from([(b"x-request-id", b"abc-123")]) == "abc-123"
    generated = request_id_from([(b"x-request-id", b"bad value\x00")])
    assert generated != "bad value\x00" and len(generated) == 32
    assert request_id_from([(b"x-request-id", b"x" * 500)]) != "x" * 500


def test_error_response_shape() -> None:
    status, headers, body = error_response(503, "no connector", "rid", retry_after=3)
    assert status == 503
    assert (b"retry-after", b"3") in headers
    assert (b"x-request-id", b"rid") in headers
    doc = json.loads(body)
    assert doc == {
        "error": {
            "message": "no connector",
            "type": "server_error",
            "code": "service_unavailable",
        }
    }
