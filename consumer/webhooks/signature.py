"""Didit webhook signatures: which header is trusted, how each one is computed, the freshness window, and
two secrets at once for rotation.

Didit signs every delivery three ways with the destination's secret (docs.didit.me/integration/webhooks):

``X-Signature-V2``
    hex HMAC-SHA256 of the body *re-serialised*: parsed, whole-number floats written as integers
    (``95.0`` → ``95``), object keys sorted at every level, compact separators (``,`` and ``:``), non-ASCII
    characters left as UTF-8. It survives a proxy or framework that re-encodes the JSON, so it is checked
    first. Didit's own verifier fixtures (didit-protocol/plugin-wordpress) sign V2 with non-ASCII left as
    is; the docs' summary table calls it "ASCII-escaped", so the ``\\uXXXX`` form of the same canonical
    document is accepted too. Both are HMACs of one deterministic function of the signed content under the
    same secret: accepting the second adds no forgery (it is exactly what ``X-Signature`` covers when the
    body is sent ASCII-escaped, as Didit sends it).
``X-Signature``
    hex HMAC-SHA256 of the raw body bytes: the fallback when V2 is absent or the body is not JSON.
``X-Signature-Simple``
    HMAC of ``timestamp:session_id:status:webhook_type`` only. **Not accepted**: it leaves ``decision``,
    ``metadata`` and ``vendor_data`` unsigned, and the whole body is published to Kafka and applied.

``X-Timestamp`` (unix seconds) must be within ``window_s`` of now, either way (a clock ahead or behind).
The header itself is not under any MAC, so when the signed body carries its own ``timestamp`` that must be
inside the window too: an old body replayed with a fresh header is rejected (Didit's plugin does the same).

Rotation: the verifier holds several secrets (``IDV_WEBHOOK_SECRET`` and ``IDV_WEBHOOK_SECRET_PREVIOUS``)
and accepts a signature made with any of them. Every comparison is :func:`hmac.compare_digest`.

The ``sign_*`` functions compute what a sender puts in each header; the sandbox's sender and the tests use
them to build deliveries from the same recipe.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from consumer.errors import ConsumerError

__all__ = [
    "DEFAULT_WINDOW_S",
    "HEADER_RAW",
    "HEADER_SIMPLE",
    "HEADER_TIMESTAMP",
    "HEADER_V2",
    "REJECT_REASONS",
    "SignatureRejected",
    "Verified",
    "WebhookVerifier",
    "canonical_v2",
    "sign_raw",
    "sign_simple",
    "sign_v2",
]

HEADER_V2 = "X-Signature-V2"
HEADER_RAW = "X-Signature"
HEADER_SIMPLE = "X-Signature-Simple"
HEADER_TIMESTAMP = "X-Timestamp"
#: Didit's documented tolerance between X-Timestamp and the receiver's clock.
DEFAULT_WINDOW_S = 300.0

#: Why a delivery was refused (metric label, log field, response body): a fixed vocabulary.
REJECT_REASONS = (
    "missing_signature",
    "missing_timestamp",
    "bad_timestamp",
    "stale_timestamp",
    "bad_signature",
)


class SignatureRejected(ConsumerError):
    """The delivery is not provably Didit's, or not fresh: answered 401, never published.

    ``reason`` is one of :data:`REJECT_REASONS`; the message never contains header values or the body.
    """

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verified:
    """A delivery whose signature checked out.

    ``method`` is the header that matched; ``secret`` is the index of the secret that made it (0 = current,
    1 = previous: a delivery still signed with the previous secret shows the rotation is not finished);
    ``payload`` is the parsed body, or None when the body is not JSON (only ``X-Signature`` can then match).
    """

    method: Literal["v2", "raw"]
    secret: int
    payload: Any


# -- the recipes ---------------------------------------------------------------------------------------


def _integral_floats(value: Any) -> Any:
    # Didit's serialiser writes 95.0 as 95 before signing; a parser that kept 95.0 must do the same.
    if isinstance(value, float):
        return int(value) if value.is_integer() else value
    if isinstance(value, dict):
        return {k: _integral_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral_floats(v) for v in value]
    return value


def canonical_v2(payload: Any, *, ascii_escapes: bool = False) -> bytes:
    """The bytes X-Signature-V2 is computed over, for a parsed body.

    Raises ValueError (a lone surrogate cannot be written as UTF-8; NaN is fine, as in Python's encoder) or
    RecursionError (absurd nesting)."""
    text = json.dumps(
        _integral_floats(payload), sort_keys=True, separators=(",", ":"), ensure_ascii=ascii_escapes
    )
    return text.encode("utf-8")


def _hmac_hex(secret: bytes, data: bytes) -> str:
    return hmac.new(secret, data, hashlib.sha256).hexdigest()


def _key(secret: str | bytes) -> bytes:
    return secret.encode("utf-8") if isinstance(secret, str) else secret


def sign_v2(secret: str | bytes, payload: Any) -> str:
    """X-Signature-V2 of a payload (non-ASCII as UTF-8, the form Didit's server signs)."""
    return _hmac_hex(_key(secret), canonical_v2(payload))


def sign_raw(secret: str | bytes, body: bytes) -> str:
    """X-Signature of a raw body."""
    return _hmac_hex(_key(secret), body)


def sign_simple(secret: str | bytes, payload: Mapping[str, Any]) -> str:
    """X-Signature-Simple (computed for completeness and for the sender; never accepted here)."""
    fields = (payload.get(name, "") for name in ("timestamp", "session_id", "status", "webhook_type"))
    return _hmac_hex(_key(secret), ":".join(str(f) for f in fields).encode("utf-8"))


# -- verification --------------------------------------------------------------------------------------


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None:
        value = headers.get(name.lower())
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse(body: bytes) -> Any:
    """The parsed body, or None when it is not JSON (also for non-UTF-8 bytes and absurd nesting)."""
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        return None


def _digest(value: str) -> str | None:
    # Hex is case-insensitive. compare_digest refuses non-ASCII text (TypeError): such a header is no
    # digest at all.
    return value.lower() if value.isascii() else None


class WebhookVerifier:
    """Checks one delivery: ``verify(body, headers)`` returns :class:`Verified` or raises
    :class:`SignatureRejected`.

    ``secrets``: current first, then the previous one during a rotation (empty strings are ignored; at
    least one is required). ``window_s``: the freshness tolerance in seconds. ``clock``: unix time now.
    """

    def __init__(
        self,
        secrets: Sequence[str | bytes],
        *,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        keys = [_key(s) for s in secrets if s]
        if not keys:
            raise ValueError("a webhook verifier needs at least one secret")
        if window_s <= 0:
            raise ValueError("the timestamp window must be positive")
        self._keys = keys
        self.window_s = window_s
        self._clock = clock

    @property
    def secret_count(self) -> int:
        return len(self._keys)

    def _fresh(self, ts: float, what: str) -> None:
        if abs(self._clock() - ts) > self.window_s:
            raise SignatureRejected(
                "stale_timestamp", f"{what} is more than {self.window_s:g}s away from this clock"
            )

    def verify(self, body: bytes, headers: Mapping[str, str]) -> Verified:
        raw_ts = _header(headers, HEADER_TIMESTAMP)
        if raw_ts is None:
            raise SignatureRejected("missing_timestamp", f"no {HEADER_TIMESTAMP} header")
        if not raw_ts.isascii() or not raw_ts.isdigit() or len(raw_ts) > 12:
            raise SignatureRejected("bad_timestamp", f"{HEADER_TIMESTAMP} is not unix seconds")
        self._fresh(int(raw_ts), HEADER_TIMESTAMP)

        v2 = _header(headers, HEADER_V2)
        raw = _header(headers, HEADER_RAW)
        if v2 is None and raw is None:
            hint = f" ({HEADER_SIMPLE} alone is not accepted)" if _header(headers, HEADER_SIMPLE) else ""
            raise SignatureRejected("missing_signature", f"no {HEADER_V2} or {HEADER_RAW} header{hint}")

        payload = _parse(body)
        verified = self._match(body, payload, v2, raw)
        if verified is None:
            raise SignatureRejected("bad_signature", "no signature header matches the body under any secret")
        if isinstance(payload, dict):
            signed_ts = payload.get("timestamp")
            if isinstance(signed_ts, int | float) and not isinstance(signed_ts, bool):
                self._fresh(signed_ts, "the signed body's timestamp")
        return verified

    def _match(self, body: bytes, payload: Any, v2: str | None, raw: str | None) -> Verified | None:
        given = None if v2 is None or payload is None else _digest(v2)
        if given is not None:
            for ascii_escapes in (False, True):
                try:
                    canonical = canonical_v2(payload, ascii_escapes=ascii_escapes)
                except (ValueError, RecursionError):
                    continue
                for index, key in enumerate(self._keys):
                    if hmac.compare_digest(_hmac_hex(key, canonical), given):
                        return Verified("v2", index, payload)
        given = None if raw is None else _digest(raw)
        if given is not None:
            for index, key in enumerate(self._keys):
                if hmac.compare_digest(_hmac_hex(key, body), given):
                    return Verified("raw", index, payload)
        return None
