"""Where handled messages go besides the store: the dead-letter topic and the results topic.

Both are written **before** the message's offset is marked done (or, transactional, in the transaction
that commits it), with an idempotent producer and ``acks=all``. One module per role:

* :mod:`consumer.sinks.producers` — the send with retry, the never-heals rule (:class:`Unwritable`),
  producer replacement after a broken sequence;
* :mod:`consumer.sinks.deadletters` — ``idv-dlq-*`` headers, the stub rule, the dead-letter write;
* :mod:`consumer.sinks.results` — result events, the per-partition buffer and the results transaction.

:class:`Sinks` is the one object callers hold; :func:`consumer.delivery.deliver` decides what to write.
"""

from __future__ import annotations

from typing import Any

from consumer.model import DLQ_REASONS, DeadLetter
from consumer.sinks.deadletters import (
    DLQ_HEADERS,
    H_ATTEMPTS,
    H_DETAIL,
    H_FIRST_FAILURE,
    H_GROUP,
    H_OFFSET,
    H_PARTITION,
    H_REASON,
    H_TIMESTAMP,
    H_TOPIC,
    dead_letter_headers,
)
from consumer.sinks.producers import Unwritable, is_retriable
from consumer.sinks.results import RESULT_SCHEMA_VERSION, Fenced, ResultWriter, result_event

__all__ = [
    "DLQ_HEADERS",
    "DLQ_REASONS",
    "H_ATTEMPTS",
    "H_DETAIL",
    "H_FIRST_FAILURE",
    "H_GROUP",
    "H_OFFSET",
    "H_PARTITION",
    "H_REASON",
    "H_TIMESTAMP",
    "H_TOPIC",
    "RESULT_SCHEMA_VERSION",
    "DeadLetter",
    "Fenced",
    "Sinks",
    "Unwritable",
    "dead_letter_headers",
    "is_retriable",
    "result_event",
]


class Sinks(ResultWriter):
    """The producers for dead letters and results (idempotent, ``acks=all``).

    Transactional mode (``transactional_id``): result events go through the transactional producer, in
    the transaction that also commits their offsets. Dead letters go through a **second, idempotent,
    non-transactional producer** and are acknowledged before the message's offset is marked done, exactly
    as without transactions. A transactional producer refuses sends outside a transaction
    (``IllegalOperation``), and putting dead letters inside the transaction would keep whole original
    payloads in memory until the commit interval. The price: a dead letter written just before a
    transaction that then aborts is written again when the message is redelivered (dead letters are
    at-least-once in both modes; the DLQ tooling takes the newest per original position).
    """

    def __init__(
        self,
        *,
        bootstrap: str,
        dlq_topic: str | None,
        results_topic: str | None,
        group_id: str,
        producer_kwargs: dict[str, Any] | None = None,
        max_request_size: int = 16 * 1024 * 1024,
        transactional_id: str | None = None,
    ) -> None:
        super().__init__(
            bootstrap=bootstrap,
            dlq_topic=dlq_topic,
            results_topic=results_topic,
            group_id=group_id,
            producer_kwargs=producer_kwargs,
            max_request_size=max_request_size,
            transactional_id=transactional_id,
        )
