"""An independent implementation of Didit's webhook signature checks, for the sandbox's tests.

Written apart from ``sandbox/signing.py`` on purpose (no ``json.dumps(sort_keys=...)``): the canonical
form of ``X-Signature-V2`` is produced by a hand-written serialiser, so a mistake in either one shows up
as a mismatch instead of being shared.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
from collections.abc import Mapping
from typing import Any

__all__ = ["canonical", "check_delivery", "hex_hmac"]

_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\f": "\\f", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def hex_hmac(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def _string(text: str) -> str:
    out = ['"']
    for char in text:
        code = ord(char)
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif code < 0x20 or 0x7F <= code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        elif code > 0xFFFF:  # a UTF-16 surrogate pair, as JSON.stringify-then-escape produces
            code -= 0x10000
            out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
        else:
            out.append(char)
    out.append('"')
    return "".join(out)


def canonical(value: Any) -> str:
    """Sorted keys, no whitespace, ASCII only, whole-number floats as integers."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        assert math.isfinite(value)
        return str(int(value)) if value == int(value) else repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ",".join(canonical(v) for v in value) + "]"
    assert isinstance(value, dict)
    return "{" + ",".join(_string(k) + ":" + canonical(value[k]) for k in sorted(value)) + "}"


def check_delivery(
    secret: str, raw: bytes, headers: Mapping[str, str], now: float, window_s: float = 300
) -> dict[str, bool]:
    """Which of the three signatures verify, and whether the timestamp is fresh."""
    body = json.loads(raw)
    fields = ("timestamp", "session_id", "status", "webhook_type")
    simple = ":".join(str(body.get(name, "")) for name in fields)
    timestamp = headers.get("X-Timestamp", "")
    return {
        "raw": hmac.compare_digest(headers.get("X-Signature", ""), hex_hmac(secret, raw)),
        "v2": hmac.compare_digest(
            headers.get("X-Signature-V2", ""), hex_hmac(secret, canonical(body).encode())
        ),
        "simple": hmac.compare_digest(
            headers.get("X-Signature-Simple", ""), hex_hmac(secret, simple.encode())
        ),
        "fresh": timestamp.isdigit() and abs(now - int(timestamp)) <= window_s,
    }
