"""Deterministic sample requests for demos, tests and benchmarks.

All personal data is synthetic and looks it ("Sample Person 000042", document numbers starting
``TEST``, nationality ``ZZ``, callbacks on the reserved ``.invalid`` domain). The sandbox provider
decides ``Declined`` when a request string contains ``DECLINE`` and ``In Review`` for ``REVIEW``
(ignoring case), so only ``vendor_data`` ever carries those tokens, and only with ``decision_mix``.

The same arguments give the same envelopes, message IDs included: publishing the same seed twice is a
replay, which the consumer must recognise as duplicates.
"""

from __future__ import annotations

import random
import uuid
from collections import deque
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from producer.envelope import Envelope

__all__ = [
    "DECLINE_TOKEN",
    "REVIEW_TOKEN",
    "SAMPLE_OPERATIONS",
    "iter_sample_envelopes",
    "sample_envelopes",
]

# Decision tokens the sandbox looks for, not secrets.
DECLINE_TOKEN = "DECLINE"  # noqa: S105
REVIEW_TOKEN = "REVIEW"  # noqa: S105
SAMPLE_OPERATIONS = ("create_session", "id_verification", "aml_screening")

_BASE_TIME = datetime(2026, 1, 1, tzinfo=UTC)
_DECLINE_SHARE = 0.10
_REVIEW_SHARE = 0.10
# A re-sent request repeats a recent one (an upstream retry), not one from far back in the input.
_DUPLICATE_HORIZON = 1000
_DOCUMENT_TYPES = ("passport", "identity_card", "driving_license")


def _message_id(rng: random.Random, ms: int) -> str:
    # UUIDv7 layout (time-ordered like producer.ids.uuid7) with the random bits taken from the seed.
    value = (ms & ((1 << 48) - 1)) << 80
    value |= 0x7 << 76
    value |= rng.getrandbits(12) << 64
    value |= 0b10 << 62
    value |= rng.getrandbits(62)
    return str(uuid.UUID(int=value))


def _request(operation: str, n: int, rng: random.Random, vendor_data: str) -> dict[str, Any]:
    if operation == "create_session":
        return {
            "workflow_id": "synthetic-workflow-kyc",
            "vendor_data": vendor_data,
            "callback": f"https://callback.example.invalid/sessions/{n:06d}",
        }
    if operation == "id_verification":
        return {
            "document_type": rng.choice(_DOCUMENT_TYPES),
            "front_image": f"synthetic-front-image-{n:06d}",
            "back_image": f"synthetic-back-image-{n:06d}",
            "vendor_data": vendor_data,
        }
    birth = _BASE_TIME - timedelta(days=rng.randrange(18 * 365, 80 * 365))
    return {
        "full_name": f"Sample Person {n:06d}",
        "date_of_birth": birth.date().isoformat(),
        "nationality": "ZZ",
        "document_number": f"TEST{n:08d}",
        "vendor_data": vendor_data,
    }


def iter_sample_envelopes(
    count: int,
    *,
    seed: int = 0,
    duplicate_ratio: float = 0.0,
    decision_mix: bool = True,
    start: datetime | None = None,
) -> Iterator[Envelope]:
    """Yield ``count`` valid envelopes; see :func:`sample_envelopes`."""
    if count < 0:
        raise ValueError("count must not be negative")
    if not 0.0 <= duplicate_ratio < 1.0:
        raise ValueError("duplicate_ratio must be in [0, 1)")
    if start is not None and start.tzinfo is None:
        raise ValueError("start must carry a UTC offset")
    # Reproducible synthetic data; nothing here needs unpredictability.
    rng = random.Random(seed)  # noqa: S311
    duplicates = min(round(count * duplicate_ratio), max(count - 1, 0))
    # The first envelope cannot repeat an earlier one.
    duplicate_at = set(rng.sample(range(1, count), duplicates)) if duplicates else set()
    subjects = max(1, count // 4)
    base = (start or _BASE_TIME).astimezone(UTC)
    # IDs depend on the seed alone, so a run with a later ``start`` replays the same requests.
    id_base_ms = int(_BASE_TIME.timestamp() * 1000)
    recent: deque[Envelope] = deque(maxlen=_DUPLICATE_HORIZON)
    for n in range(count):
        if n in duplicate_at:
            yield rng.choice(recent)
            continue
        operation = SAMPLE_OPERATIONS[n % len(SAMPLE_OPERATIONS)]
        vendor_data = f"sample-{n:06d}"
        if decision_mix:
            roll = rng.random()
            if roll < _DECLINE_SHARE:
                vendor_data += f"-{DECLINE_TOKEN}"
            elif roll < _DECLINE_SHARE + _REVIEW_SHARE:
                vendor_data += f"-{REVIEW_TOKEN}"
        created = base + timedelta(milliseconds=n)
        envelope = Envelope(
            message_id=_message_id(rng, id_base_ms + n),
            operation=operation,
            subject_id=f"synthetic-subject-{rng.randrange(subjects):06d}",
            request=_request(operation, n, rng, vendor_data),
            created_at=created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            correlation_id=f"sample-batch-{seed}",
        )
        recent.append(envelope)
        yield envelope


def sample_envelopes(
    count: int, *, seed: int = 0, duplicate_ratio: float = 0.0, decision_mix: bool = True,
    start: datetime | None = None,
) -> list[Envelope]:  # fmt: skip
    """``count`` valid envelopes over the three operations, the same list for the same arguments.

    ``duplicate_ratio`` of them (rounded) re-emit an earlier envelope unchanged: same ``message_id``,
    same payload, as an upstream retry would. With ``decision_mix`` about 10 % of the requests carry
    ``DECLINE`` and 10 % ``REVIEW`` in ``vendor_data``. ``created_at`` counts up one millisecond per
    envelope from ``start`` (default 2026-01-01T00:00:00Z, so that the output is reproducible);
    ``start`` changes nothing else, so the same seed with a later start is a replay of the same requests.
    """
    return list(
        iter_sample_envelopes(
            count, seed=seed, duplicate_ratio=duplicate_ratio, decision_mix=decision_mix, start=start
        )
    )
