"""Time-ordered message IDs (UUID version 7, RFC 9562).

Python 3.11's :mod:`uuid` has no ``uuid7``. IDs sort by creation time, which keeps B-tree inserts in the
dedupe store local; the 74 random bits make collisions between producers negligible.
"""

from __future__ import annotations

import os
import threading
import time
import uuid

__all__ = ["new_message_id", "uuid7"]

_lock = threading.Lock()
_last_ms = 0
_seq = 0


def uuid7() -> uuid.UUID:
    """A UUIDv7; IDs made in this process are strictly increasing (12-bit counter within a millisecond)."""
    global _last_ms, _seq
    with _lock:
        ms = time.time_ns() // 1_000_000
        if ms <= _last_ms:
            _seq += 1
            if _seq > 0xFFF:  # counter overflow: borrow the next millisecond
                _last_ms += 1
                _seq = 0
            ms = _last_ms
        else:
            _last_ms = ms
            _seq = int.from_bytes(os.urandom(2), "big") & 0x3FF  # leave headroom for the counter
        seq = _seq
    rand = int.from_bytes(os.urandom(8), "big") & ((1 << 62) - 1)
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= seq << 64
    value |= 0b10 << 62
    value |= rand
    return uuid.UUID(int=value)


def new_message_id() -> str:
    return str(uuid7())
