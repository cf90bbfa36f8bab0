"""Dead letters: the ``idv-dlq-*`` headers, the stub rule, and the write to the dead-letter topic.

Dead letters carry the original key, value and headers unchanged, plus ``idv-dlq-*`` headers describing
why; the detail never contains payload contents. A dead letter that cannot be written becomes a **stub**
(no key, empty value, no original headers, every ``idv-dlq-*`` header and a detail that says why), so the
original position is still on record; if even the stub is refused, it is logged and counted, and the
partition moves on.
"""

from __future__ import annotations

import logging
from typing import Any

from aiokafka.structs import ConsumerRecord

from consumer import tracing
from consumer.dlqcrypto import DeadLetterCipher, seal_dead_letter
from consumer.model import DeadLetter
from consumer.sinks.producers import Producers, Unwritable
from consumer.timefmt import iso

log = logging.getLogger(__name__)

__all__ = ["DLQ_HEADERS", "DeadLetterWriter", "dead_letter_headers"]

H_REASON = "idv-dlq-reason"
H_DETAIL = "idv-dlq-detail"
H_TOPIC = "idv-dlq-original-topic"
H_PARTITION = "idv-dlq-original-partition"
H_OFFSET = "idv-dlq-original-offset"
H_TIMESTAMP = "idv-dlq-original-timestamp"
H_GROUP = "idv-dlq-consumer-group"
H_FIRST_FAILURE = "idv-dlq-first-failure-at"
H_ATTEMPTS = "idv-dlq-attempts"
DLQ_HEADERS = (
    H_REASON,
    H_DETAIL,
    H_TOPIC,
    H_PARTITION,
    H_OFFSET,
    H_TIMESTAMP,
    H_GROUP,
    H_FIRST_FAILURE,
    H_ATTEMPTS,
)


def dead_letter_headers(
    msg: ConsumerRecord, letter: DeadLetter, group_id: str, now: float, *, keep_original: bool = True
) -> list[tuple[str, bytes]]:
    # Any idv-dlq-* headers already present (a redriven dead letter failing again) are replaced, the rest
    # of the original headers are kept as they were, in order (a stub keeps none of them).
    original = [(k, v) for k, v in (msg.headers or ()) if k not in DLQ_HEADERS] if keep_original else []
    first = letter.first_failure_at if letter.first_failure_at is not None else now
    return [
        *original,
        (H_REASON, letter.reason.encode()),
        (H_DETAIL, letter.detail.encode("utf-8", "replace")),
        (H_TOPIC, msg.topic.encode()),
        (H_PARTITION, str(msg.partition).encode()),
        (H_OFFSET, str(msg.offset).encode()),
        (H_TIMESTAMP, str(msg.timestamp).encode()),
        (H_GROUP, group_id.encode()),
        (H_FIRST_FAILURE, iso(first).encode()),
        (H_ATTEMPTS, str(letter.attempts).encode()),
    ]


class DeadLetterWriter(Producers):
    """Writes dead letters with the non-transactional producer, acknowledged before the offset is done."""

    dlq_cipher: DeadLetterCipher | None = None  # set by the wiring when IDV_DLQ_ENCRYPTION_KEYS is set

    def __init__(self, *, dlq_topic: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dlq_topic = dlq_topic
        self.dead_letters = 0
        self.stubs = 0  # dead letters written as stubs (the original could not be written)
        self.lost = 0  # dead letters that could not be written at all (not even the stub)

    async def dead_letter(self, msg: ConsumerRecord, letter: DeadLetter, now: float) -> str:
        """Write the dead letter; returns ``"written"``, ``"stub"``, ``"lost"`` or ``"disabled"``.

        A record with neither key nor value (another client can write one; aiokafka's producer refuses
        ``key=None, value=None``) is dead-lettered with an empty value.
        """
        if self.dlq_topic is None:
            return "disabled"
        try:
            headers = tracing.inject(dead_letter_headers(msg, letter, self.group_id, now))
        except Exception as exc:  # noqa: BLE001 - odd original headers: write the stub instead
            return await self._stub(msg, letter, now, f"original headers unusable ({type(exc).__name__})")
        value = msg.value if msg.value is not None or msg.key is not None else b""
        value, headers = seal_dead_letter(self.dlq_cipher, msg, value, headers)  # no-op without keys
        try:
            await self._send("dead letter", self.dlq_topic, value, msg.key, headers)
        except Unwritable as exc:
            return await self._stub(msg, letter, now, exc.why)
        self.dead_letters += 1
        log.warning("dead-lettered: %s: %s", letter.reason, letter.detail, extra={"reason": letter.reason})
        return "written"

    async def _stub(self, msg: ConsumerRecord, letter: DeadLetter, now: float, why: str) -> str:
        assert self.dlq_topic is not None
        stub = DeadLetter(
            letter.reason,
            f"stub: {why}; {letter.detail}",
            attempts=letter.attempts,
            first_failure_at=letter.first_failure_at,
        )
        headers = tracing.inject(dead_letter_headers(msg, stub, self.group_id, now, keep_original=False))
        try:
            await self._send("dead letter", self.dlq_topic, b"", None, headers)
        except Unwritable as exc:
            self.lost += 1
            self._count("dead_letter", "lost")
            log.error(
                "dead letter lost: neither the record nor a stub could be written (%s); %s: %s",
                exc.why,
                letter.reason,
                letter.detail,
                extra={"reason": letter.reason},
            )
            return "lost"
        self.stubs += 1
        self.dead_letters += 1
        self._count("dead_letter", "stub")
        log.error(
            "dead-lettered as a stub (%s): %s: %s",
            why,
            letter.reason,
            letter.detail,
            extra={"reason": letter.reason},
        )
        return "stub"
