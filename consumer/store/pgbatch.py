"""The PostgreSQL batched writer: queued transitions, which run together, and a batch's answer.

:class:`Batcher` queues each caller's transition as an :class:`Op` and runs batches of one kind, one
operation per key, on pooled connections (the rules are in :mod:`consumer.store.postgres`'s docstring);
:func:`acquired` and :func:`owned` turn the rows a batch statement returned into each caller's result (a
key missing from ``RETURNING`` lost its compare-and-set).
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from consumer.errors import LeaseLost, StoreError
from consumer.model import Claim, ClaimStatus, Record
from consumer.store.base import record_from_row
from consumer.store.pgsql import _DB_ERRORS

__all__ = ["Batcher", "Op", "acquired", "owned"]

log = logging.getLogger(__name__)

#: Runs one batch (all of one kind, sorted by key) on a connection of its own.
Execute = Callable[[str, list["Op"]], Awaitable[None]]


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


class Batcher:
    """The queue of transitions and the running batches (event-loop side only): at most
    ``max_inflight`` batches at once, each of up to ``max_batch`` operations of one kind, one per key."""

    def __init__(
        self, execute: Execute, *, max_batch: int, max_inflight: int, redact: Callable[[str], str]
    ) -> None:
        self._execute = execute
        self._redact = redact
        self.max_batch = max_batch
        self.max_inflight = max_inflight
        self._pending: collections.deque[Op] = collections.deque()
        self._running_keys: set[str] = set()
        self._batches: set[asyncio.Task[None]] = set()
        self._kick_scheduled = False
        self.batches = 0
        self.ops = 0

    def submit(self, kind: str, key: str, args: tuple[Any, ...]) -> Awaitable[Any]:
        loop = asyncio.get_running_loop()
        op = Op(kind, key, args, loop.create_future())
        self._pending.append(op)
        if not self._kick_scheduled:
            # Not at once: every operation queued in this turn of the event loop joins the same batch.
            self._kick_scheduled = True
            loop.call_soon(self._kick)
        return self._wait(op)

    async def drain(self) -> None:
        """Wait until queued and running transitions have finished (their callers are waiting)."""
        with anyio.CancelScope(shield=True):
            while self._batches or self._pending:
                if not self._batches:
                    self._kick()
                await asyncio.wait(set(self._batches))

    async def _wait(self, op: Op) -> Any:
        try:
            await op.done
        except asyncio.CancelledError:
            # As each call was shielded before batching: a cancelled caller still learns whether its
            # transition happened (its batch runs on regardless), so it can hand a claimed key back. The
            # batch resolves whichever future `op.done` is when it finishes; `finished` tells whether it
            # already has (both are only touched on the event loop's thread). The cancellation is
            # delivered again at the caller's next checkpoint (anyio's cancel scopes are level-triggered).
            if not op.finished:
                op.done = asyncio.get_running_loop().create_future()
                with anyio.CancelScope(shield=True):
                    await op.done
        if op.error is not None:
            raise op.error
        return op.result

    def _kick(self) -> None:
        """Start batches while batch slots are free and queued operations can run."""
        self._kick_scheduled = False
        while self._pending and len(self._batches) < self.max_inflight:
            ops = self._take()
            if not ops:
                return  # every queued operation waits for its key's running batch
            task = asyncio.get_running_loop().create_task(self._run_batch(ops))
            self._batches.add(task)
            task.add_done_callback(self._batches.discard)

    def _take(self) -> list[Op]:
        """Up to ``max_batch`` queued operations of the oldest runnable one's kind, one per key: a key
        with an operation in a running batch (or already in this one) keeps its next one for a later
        batch, so each key's operations run one after the other, in order."""
        batch: list[Op] = []
        keep: list[Op] = []
        kind = None
        taken = self._running_keys
        waiting: set[str] = set()  # keys with an older operation left queued: later ones wait behind it
        for op in self._pending:
            key = op.key
            if (
                len(batch) < self.max_batch
                and key not in taken
                and key not in waiting
                and kind in (None, op.kind)
            ):
                kind = op.kind
                batch.append(op)
                taken.add(key)
            else:
                keep.append(op)
                waiting.add(key)
        self._pending = collections.deque(keep)
        return batch

    async def _run_batch(self, ops: list[Op]) -> None:
        kind = ops[0].kind
        try:
            ops.sort(key=lambda op: op.key)  # rows locked in key order by every daemon: no deadlocks
            await self._execute(kind, ops)
        except _DB_ERRORS as exc:
            message = self._redact(f"PostgreSQL {kind} failed: {type(exc).__name__}: {exc}")
            for op in ops:
                if not op.finished:
                    op.error = StoreError(message)  # one per caller: each raises (and chains) its own
                    op.error.__cause__ = exc
        except BaseException as exc:  # a bug, or the loop shutting down: callers must not wait forever
            log.exception("PostgreSQL store failed a %s batch", kind)
            for op in ops:
                if not op.finished:
                    op.error = StoreError(f"PostgreSQL {kind} failed: {type(exc).__name__}")
            if not isinstance(exc, Exception):
                raise
        finally:
            self.batches += 1
            self.ops += len(ops)
            for op in ops:
                self._running_keys.discard(op.key)
                op.finished = True
                if not op.done.done():
                    op.done.set_result(None)
            self._batches.discard(asyncio.current_task())
            self._kick()
