"""Idempotency keys and request fingerprints.

The key is a pure function of (namespace, operation, message ID[, generation]). It never involves the
consumer group, partition or offset, so a replay, a new consumer group or a partition moved in a rebalance
all derive the same key, and the provider's server-side idempotency recognises the request.

The fingerprint is a hash of the canonical request (operation, subject, request body with sorted keys):
the same message ID arriving with a different fingerprint is a conflict, never sent to the provider.
``created_at`` and ``correlation_id`` are left out so an upstream retry that re-stamps them is still the
same request.
"""

from __future__ import annotations

import hashlib

import orjson

from producer.envelope import Envelope

__all__ = ["fingerprint", "idempotency_key", "key_hash"]


def idempotency_key(namespace: str, operation: str, message_id: str, generation: int = 0) -> str:
    """``idv_`` + 32 hex digits (128 bits of SHA-256). Generation > 0 is a deliberate re-verification."""
    material = f"{namespace}\x1f{operation}\x1f{message_id}"
    if generation:
        material += f"\x1fgen{generation}"
    return "idv_" + hashlib.sha256(material.encode()).hexdigest()[:32]


def fingerprint(envelope: Envelope) -> str:
    canonical = orjson.dumps(
        {"operation": envelope.operation, "subject_id": envelope.subject_id, "request": envelope.request},
        option=orjson.OPT_SORT_KEYS,
    )
    return hashlib.sha256(canonical).hexdigest()


def key_hash(key: str) -> str:
    """A short, non-reversible tag for logs (the key itself is fine to log, but this keeps lines short)."""
    return hashlib.sha256(key.encode()).hexdigest()[:12]
