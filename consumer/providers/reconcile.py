"""Reconciliation: before a send that could repeat an earlier attempt, find that attempt or refuse.

Used by :meth:`consumer.provider.ProviderClient.call_envelope` for an operation whose profile has no
server-side idempotency (``Capability.dedupe != "idempotency_key"``). It runs before the first send of a
record claimed before (taken over after a crash, redelivered after a lost answer), and before every retry
once an attempt may have reached the provider. Three results, each counted in
``idv_reconciliations_total{result}``:

* ``found`` — the adapter found the earlier attempt by our reference: its answer is the outcome, and
  nothing is sent;
* ``not_found`` — the provider has no attempt under our reference: sending is safe;
* ``in_doubt`` — the profile cannot look (``lookup=False``), or the lookup kept failing past the retry
  ceiling, or could not search everything: :class:`~consumer.errors.UnreconciledAttempt` (dead-lettered
  ``in_doubt``), never a second call.

Why "not found" makes sending safe: the lookup runs after the earlier attempt's deadline, so that attempt
either acted before (and is listed under our reference) or never arrived. What is left is a request the
provider received and is still working on past our deadline; docs/guarantees.md names that window.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass

from consumer.errors import RetriesExhausted, UnreconciledAttempt
from consumer.model import Outcome
from consumer.providers.base import ProviderAdapter, Sender
from producer.envelope import Envelope, Operation

log = logging.getLogger(__name__)

__all__ = ["Reconciler"]


@dataclass(eq=False)
class Reconciler:
    """One reconciliation of ``key``'s earlier attempts (called before a send that could repeat one)."""

    adapter: ProviderAdapter
    operation: Operation
    envelope: Envelope
    key: str
    since: float
    send: Sender
    _: KW_ONLY
    on_result: Callable[[str], None] | None = None  # counts each result (idv_reconciliations_total)
    force: bool = False  # redrive --force: a profile without lookup sends anyway

    def _count(self, result: str) -> None:
        if self.on_result is not None:
            self.on_result(result)

    async def __call__(self, attempts: int) -> Outcome | None:
        """The earlier attempt's outcome, or None when sending is safe; ``attempts``: sends made so far."""
        if not self.adapter.capability(self.operation.name).lookup:
            if self.force:
                return None  # redrive --force: the operator accepted the risk of a second side effect
            self._count("in_doubt")
            log.warning("reconciliation impossible: the profile has no lookup; in doubt")
            raise UnreconciledAttempt(
                f"an earlier attempt may have reached the provider, which neither dedupes "
                f"{self.operation.name} nor can be searched for it ({self.adapter.name} profile); "
                "not sent again",
                attempts,
            )
        try:
            found = await self.adapter.lookup(self.operation, self.envelope, self.key, self.since, self.send)
        except RetriesExhausted as exc:
            self._count("in_doubt")
            raise UnreconciledAttempt(
                f"looking up an earlier attempt kept failing ({exc}); not sent again", attempts
            ) from exc
        except UnreconciledAttempt as exc:
            self._count("in_doubt")
            raise UnreconciledAttempt(f"{exc}; not sent again", attempts) from exc
        if found is None:
            self._count("not_found")
            log.info(
                "reconciliation: no earlier attempt at the provider; sending", extra={"reconciled": False}
            )
        else:
            self._count("found")
            log.info(
                "reconciliation: earlier attempt found at the provider; its answer recorded, not sent again",
                extra={"reconciled": True},
            )
        return found
