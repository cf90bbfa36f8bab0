"""The request and answer types passed between the transport (``server``) and the pipeline (``app``)."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .faults import Fault
from .idempotency import StoredResponse

__all__ = ["Admitted", "Drop", "Request", "Response"]

Response = StoredResponse


class Drop(enum.Enum):
    DROP = "drop"
    """Close the connection without answering."""


@dataclass(frozen=True, slots=True)
class Request:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    peer_is_loopback: bool
    meta: dict[str, object] = field(default_factory=dict)
    """Filled by the app for the transport: ``attempt`` (the ledger's :class:`Attempt`, to stamp its end)
    and ``trickle_s`` (send the answer slowly)."""

    def header(self, name: bytes, *, last: bool = False) -> bytes | None:
        """The first value of the header ``name`` (lower case, as the transport stores names), or the last
        one with ``last`` (the ``ietf`` profile reads ``Idempotency-Key`` and ``Host`` so)."""
        found = None
        for key, value in self.headers:
            if key == name:
                if not last:
                    return value
                found = value
        return found


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request past authentication, rate limit and gateway faults: business handling may run."""

    scope: str
    """The API key's non-secret id."""
    fault: Fault | None
    """A fault that acts later (``drop``, ``delay``, ``trickle``), or ``None``."""
