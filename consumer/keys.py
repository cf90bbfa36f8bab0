"""Idempotency keys and request fingerprints.

The key is a pure function of (namespace, operation, message ID[, generation]). It never involves the
consumer group, partition or offset, so a replay, a new consumer group or a partition moved in a rebalance
all derive the same key, and the provider's server-side idempotency recognises the request.

The fingerprint is a hash of the canonical request (operation, subject, request body with sorted keys):
the same message ID arriving with a different fingerprint is a conflict, never sent to the provider.
``created_at`` and ``correlation_id`` are left out so an upstream retry that re-stamps them is still the
same request.

The request holds personal data (names, birth dates, nationalities), and a plain hash of it is reversed by
dictionary in seconds. So fingerprints are keyed: HMAC-SHA256 with ``IDV_FINGERPRINT_KEY``. A stored
fingerprint names its scheme: ``h1:<64 hex>`` is HMAC-SHA256 v1; a bare 64-hex string is the legacy plain
SHA-256 written by earlier builds. A message is compared with a stored record *in that record's scheme*
(:meth:`Fingerprinter.matches`, or the store's ``legacy_fingerprints``), so records written before the key
was introduced keep deduplicating until retention removes them.
"""

from __future__ import annotations

import hashlib
import hmac

import orjson

from producer.envelope import Envelope

__all__ = ["HMAC_V1", "Fingerprinter", "fingerprint", "idempotency_key", "key_hash"]

#: Scheme prefix of HMAC-SHA256 (v1) fingerprints; a fingerprint without a prefix is legacy plain SHA-256.
HMAC_V1 = "h1:"


def idempotency_key(namespace: str, operation: str, message_id: str, generation: int = 0) -> str:
    """``idv_`` + 32 hex digits (128 bits of SHA-256). Generation > 0 is a deliberate re-verification."""
    material = f"{namespace}\x1f{operation}\x1f{message_id}"
    if generation:
        material += f"\x1fgen{generation}"
    return "idv_" + hashlib.sha256(material.encode()).hexdigest()[:32]


def _canonical(envelope: Envelope) -> bytes:
    return orjson.dumps(
        {"operation": envelope.operation, "subject_id": envelope.subject_id, "request": envelope.request},
        option=orjson.OPT_SORT_KEYS,
    )


def _key_bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def fingerprint(envelope: Envelope, key: str | bytes | None = None) -> str:
    """``h1:`` + HMAC-SHA256(key, canonical request); without ``key``, the legacy unkeyed SHA-256 (bare
    hex), kept only to recognise records written by earlier builds."""
    canonical = _canonical(envelope)
    if key is None:
        return hashlib.sha256(canonical).hexdigest()
    return HMAC_V1 + hmac.new(_key_bytes(key), canonical, hashlib.sha256).hexdigest()


class Fingerprinter:
    """Fingerprints with one key: the current scheme for new records, every known scheme for comparing.

    ``Fingerprinter(None)`` writes legacy (unkeyed) fingerprints: for tools and benchmarks only; the
    daemon always has a key (settings refuse to start without one).
    """

    __slots__ = ("_key",)

    def __init__(self, key: str | bytes | None) -> None:
        self._key = _key_bytes(key) if key is not None else None

    def __call__(self, envelope: Envelope) -> str:
        return fingerprint(envelope, self._key)

    def with_legacy(self, envelope: Envelope) -> tuple[str, tuple[str, ...]]:
        """(fingerprint in the current scheme, the same request's fingerprints in older schemes): what
        :meth:`DedupeStore.claim` takes as ``fingerprint`` and ``legacy_fingerprints``."""
        canonical = _canonical(envelope)
        legacy = hashlib.sha256(canonical).hexdigest()
        if self._key is None:
            return legacy, ()
        return HMAC_V1 + hmac.new(self._key, canonical, hashlib.sha256).hexdigest(), (legacy,)

    def matches(self, stored: str, envelope: Envelope) -> bool:
        """Whether ``envelope`` is the request a record with fingerprint ``stored`` was made from, computed
        in the stored fingerprint's scheme. An unknown scheme (a newer build's) never matches."""
        if stored.startswith(HMAC_V1):
            if self._key is None:
                return False
            return hmac.compare_digest(stored, fingerprint(envelope, self._key))
        if len(stored) == 64 and ":" not in stored:
            return hmac.compare_digest(stored, fingerprint(envelope))
        return False


def key_hash(key: str) -> str:
    """A short, non-reversible tag for logs (the key itself is fine to log, but this keeps lines short)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
