"""Didit's webhook signatures, as its webhook documentation describes them (HMAC-SHA256, hex digests).

Three headers, so that a receiver can verify whatever its framework leaves of the request:

``X-Signature``
    over the raw body bytes exactly as sent;
``X-Signature-V2``
    over the body parsed and serialised again canonically: whole-number floats written as integers
    (``96.0`` -> ``96``), object keys sorted at every level, compact separators, every non-ASCII
    character as a ``\\uXXXX`` escape. A framework that re-serialises the JSON cannot change this form;
``X-Signature-Simple``
    over ``"<timestamp>:<session_id>:<status>:<webhook_type>"`` taken from the body's fields.

``X-Timestamp`` carries the body's ``timestamp`` (unix seconds); receivers reject a delivery more than
300 s away from their clock. The sandbox sender uses these functions; its tests verify with an
independent implementation, and ``tests/sandbox/webhook_vectors.json`` fixes known answers.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

__all__ = ["canonical_v2", "shorten_floats", "sign", "signature_headers", "simple_message"]


def shorten_floats(value: Any) -> Any:
    """A copy of parsed JSON with every float that is a whole number turned into an int."""
    if isinstance(value, dict):
        return {key: shorten_floats(item) for key, item in value.items()}
    if isinstance(value, list):
        return [shorten_floats(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def canonical_v2(body: Any) -> bytes:
    """The bytes ``X-Signature-V2`` signs, from the parsed body."""
    text = json.dumps(shorten_floats(body), sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return text.encode("ascii")


def simple_message(body: dict[str, Any]) -> bytes:
    """The bytes ``X-Signature-Simple`` signs."""
    parts = (
        body.get("timestamp", ""),
        body.get("session_id", ""),
        body.get("status", ""),
        body.get("webhook_type", ""),
    )
    return ":".join(str(part) for part in parts).encode("utf-8")


def sign(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode("utf-8"), message, hashlib.sha256).hexdigest()


def signature_headers(secret: str, raw_body: bytes) -> dict[str, str]:
    """The signature headers of one delivery of ``raw_body`` (a JSON object)."""
    body = json.loads(raw_body)
    return {
        "X-Signature": sign(secret, raw_body),
        "X-Signature-V2": sign(secret, canonical_v2(body)),
        "X-Signature-Simple": sign(secret, simple_message(body)),
        "X-Timestamp": str(body.get("timestamp", "")),
    }
