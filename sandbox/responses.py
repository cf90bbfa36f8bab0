"""Building HTTP answers: JSON bodies with their headers, and the few fixed error shapes."""

from __future__ import annotations

import math

import orjson

from .idempotency import StoredResponse

__all__ = ["error", "json_response", "method_not_allowed", "retry_after"]

_CONTENT_TYPE = (b"content-type", b"application/json")


def json_response(
    status: int, payload: object, extra_headers: tuple[tuple[bytes, bytes], ...] = ()
) -> StoredResponse:
    body = orjson.dumps(payload)
    headers = (_CONTENT_TYPE, (b"content-length", b"%d" % len(body)), *extra_headers)
    return StoredResponse(status, headers, body)


def error(status: int, code: str, extra_headers: tuple[tuple[bytes, bytes], ...] = ()) -> StoredResponse:
    return json_response(status, {"error": code}, extra_headers)


def retry_after(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    return ((b"retry-after", b"%d" % max(1, math.ceil(seconds))),)


def method_not_allowed(*allowed: str) -> StoredResponse:
    return error(405, "method_not_allowed", ((b"allow", ", ".join(allowed).encode()),))
