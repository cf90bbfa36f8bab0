"""The idempotency layer, after the IETF ``Idempotency-Key`` HTTP header field draft.

A key is scoped by API key. The first request with a key claims it (*in flight*) before any await,
so a concurrent request with the same key sees the claim and gets 409 instead of running the side
effect a second time; the event loop is single-threaded, so claim-then-check needs no lock. When
business handling finishes, its response - errors included - is stored under the key and every
later request with the same key and the same fingerprint gets that response back, byte for byte.
A different fingerprint under the same key is a client bug (422). If handling fails unexpectedly
or is cancelled, the claim is released so the client's retry can run: nothing was stored, so
nothing can be replayed.

Keys expire ``ttl_s`` after their first request; an expired key is new again.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = [
    "MAX_KEY_LENGTH",
    "Claimed",
    "InFlight",
    "Mismatch",
    "Replay",
    "StoredResponse",
    "fingerprint",
    "IdempotencyStore",
    "parse_key",
]

MAX_KEY_LENGTH = 255


@dataclass(frozen=True, slots=True)
class StoredResponse:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


def fingerprint(method: bytes, path: str, body: bytes) -> bytes:
    """SHA-256 over method, canonical path and raw body."""
    digest = hashlib.sha256(method)
    digest.update(b" ")
    digest.update(path.encode())
    digest.update(b"\n")
    digest.update(body)
    return digest.digest()


def parse_key(raw: bytes) -> str | None:
    """The key from an ``Idempotency-Key`` header value, or ``None`` if unusable.

    The draft defines the value as a structured-field string (quoted); most clients send it bare,
    so both forms are accepted and mean the same key.
    """
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        return None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    return text or None


class _Entry:
    __slots__ = ("created_at", "fingerprint", "response")

    def __init__(self, fp: bytes, created_at: float) -> None:
        self.fingerprint = fp
        self.created_at = created_at
        self.response: StoredResponse | None = None


@dataclass(frozen=True, slots=True)
class Claimed:
    """The caller owns the key: process, then :meth:`IdempotencyStore.complete` or ``release``."""

    scope: str
    key: str
    entry: _Entry


@dataclass(frozen=True, slots=True)
class InFlight:
    pass


@dataclass(frozen=True, slots=True)
class Mismatch:
    pass


@dataclass(frozen=True, slots=True)
class Replay:
    response: StoredResponse


class IdempotencyStore:
    def __init__(self, ttl_s: float, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        # Insertion order is creation order, so expired entries are always at the front.
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._in_flight: set[_Entry] = set()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def begin(self, scope: str, key: str, fp: bytes) -> Claimed | InFlight | Mismatch | Replay:
        now = self._clock()
        self._purge(now)
        slot = (scope, key)
        entry = self._entries.get(slot)
        if entry is not None and entry.response is not None and now - entry.created_at >= self._ttl_s:
            del self._entries[slot]
            entry = None
        if entry is None:
            entry = _Entry(fp, now)
            self._entries[slot] = entry
            self._in_flight.add(entry)
            return Claimed(scope, key, entry)
        if entry.fingerprint != fp:
            return Mismatch()
        if entry.response is None:
            return InFlight()
        return Replay(entry.response)

    def complete(self, claim: Claimed, response: StoredResponse) -> None:
        # An entry removed by reset() while in flight stays detached; storing into it is harmless.
        claim.entry.response = response
        self._in_flight.discard(claim.entry)

    def release(self, claim: Claimed) -> None:
        self._in_flight.discard(claim.entry)
        slot = (claim.scope, claim.key)
        if self._entries.get(slot) is claim.entry and claim.entry.response is None:
            del self._entries[slot]

    def clear(self) -> None:
        self._entries.clear()
        self._in_flight.clear()

    def _purge(self, now: float) -> None:
        entries = self._entries
        while entries:
            slot, entry = next(iter(entries.items()))
            if entry.response is None or now - entry.created_at < self._ttl_s:
                return
            del entries[slot]
