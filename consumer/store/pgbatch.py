"""The PostgreSQL batched writer's bookkeeping: a queued transition per caller, and a batch's answer.

:class:`Op` is what a caller waits on; :func:`acquired` and :func:`owned` turn the rows a batch
statement returned into each caller's result (a key missing from ``RETURNING`` lost its compare-and-set).
"""

from __future__ import annotations

import asyncio
from typing import Any

from consumer.errors import LeaseLost
from consumer.model import Claim, ClaimStatus, Record
from consumer.store.base import record_from_row

__all__ = ["Op", "acquired", "owned"]


class Op:
    """One caller's queued transition; ``done`` resolves once its batch has finished (or failed)."""

    __slots__ = ("args", "done", "error", "finished", "key", "kind", "result")

    def __init__(self, kind: str, key: str, args: tuple[Any, ...], done: asyncio.Future[None]) -> None:
        self.kind = kind
        self.key = key
        self.args = args
        self.done = done
        self.finished = False  # the outcome is known (result or error): later failures do not touch it
        self.result: Any = None
        self.error: BaseException | None = None

    def set(self, result: Any) -> None:
        self.result, self.finished = result, True

    def lost(self) -> None:
        self.error = LeaseLost(f"record {self.key} is not in progress under this owner")
        self.finished = True


def acquired(pending: list[tuple[Op, Record]], rows: list[Any]) -> list[Op]:
    """ACQUIRED for the claims whose key a write returned; the others (lost a race) are returned."""
    found = {row["key"]: row for row in rows}
    again = []
    for op, _ in pending:
        row = found.get(op.key)
        if row is None:
            again.append(op)
        else:
            op.set(Claim(ClaimStatus.ACQUIRED, record_from_row(row)))
    return again


def owned(ops: list[Op], rows: list[Any]) -> None:
    returned = {row["key"] for row in rows}
    for op in ops:
        if op.key in returned:
            op.set(None)
        else:
            op.lost()
