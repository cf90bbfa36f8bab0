"""The polling fallback: a due-timer scan over waiting workflows in the store.

Every ``IDV_WORKFLOW_SCAN_INTERVAL_S`` the poller reads waiting workflows whose ``due_at`` has passed
(oldest first, a bounded batch) and, at most ``IDV_WORKFLOW_POLL_CONCURRENCY`` at a time:

1. moves ``due_at`` on (backoff: ``IDV_WORKFLOW_POLL_AFTER_S`` doubling up to ``IDV_WORKFLOW_POLL_MAX_S``)
   with a compare-and-set — of several daemons scanning one store, exactly one polls a workflow;
2. reads the session's decision (``GET /v3/session/{id}/decision/``), or, past the workflow's deadline
   (``IDV_WORKFLOW_ABANDON_AFTER_S`` after creation), declares it abandoned (expired if it was in review);
3. publishes what it found as a synthetic event (``webhook_type`` ``idv.poll`` / ``idv.timeout``, only
   the session id and status) to the events topic, keyed by session id.

It also *resumes* workflows that were decided (or screened) but not finished and have not changed for
``stall_after_s`` (the message advancing them was set aside after a step kept failing, or its handler died
and a later message committed past it): a synthetic ``idv.resume`` event, which changes nothing by itself,
makes the consumer advance the workflow from its recovery point.

The poller changes nothing but ``due_at`` (and, for a resume, ``updated_at``): the event goes through
the same consumer path as a webhook
(deduplicated on apply, committed only after its effect is durable, its result events published in the
same transaction in transactional mode). A crash between the CAS and the publish loses one poll; the next
one is due after the backoff.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import KW_ONLY, dataclass, field

import anyio
import orjson

from consumer.errors import ProviderAuthError
from consumer.workflows.engine import WorkflowEngine
from consumer.workflows.model import Workflow
from consumer.workflows.rules import Change
from consumer.workflows.store import WriteStatus

log = logging.getLogger(__name__)

__all__ = ["Poller"]

Publish = Callable[[bytes, bytes], Awaitable[None]]  # (key, value) onto the events topic


@dataclass(eq=False)
class Poller:
    """The due-timer scan (see the module docstring); ``polls``, ``timeouts`` and ``resumed`` count what it
    published since it started."""

    engine: WorkflowEngine
    publish: Publish
    _: KW_ONLY
    interval_s: float
    concurrency: int
    batch: int = 500
    stall_after_s: float = 300.0
    on_fatal: Callable[[BaseException], None] | None = None
    polls: int = field(default=0, init=False)
    timeouts: int = field(default=0, init=False)
    resumed: int = field(default=0, init=False)

    async def run_forever(self) -> None:
        while True:
            try:
                await self.scan_once()
            except ProviderAuthError as exc:
                if self.on_fatal is not None:
                    self.on_fatal(exc)
                return
            except Exception as exc:  # noqa: BLE001 - a scan failing (store away) must not stop the daemon
                log.warning(
                    "workflow poll scan failed (%s); next scan in %.1fs", type(exc).__name__, self.interval_s
                )
            await anyio.sleep(self.interval_s)

    async def scan_once(self) -> int:
        """One scan; returns how many workflows it polled."""
        store = self.engine.store
        now = self.engine.clock()
        self.engine.metrics.states(await store.counts())
        for wf in await store.stalled(now - self.stall_after_s, self.batch):
            await self._resume(wf, now)
        due = await store.due(now, self.batch)
        if not due:
            return 0
        limiter = anyio.Semaphore(self.concurrency)
        count = 0

        async def one(wf: Workflow) -> None:
            nonlocal count
            async with limiter:
                if await self._poll(wf):
                    count += 1

        async with anyio.create_task_group() as tg:
            for wf in due:
                tg.start_soon(one, wf)
        return count

    async def _resume(self, wf: Workflow, now: float) -> None:
        touched = wf.evolve(version=wf.version + 1, updated_at=now)
        if await self.engine.store.write(wf, Change(touched)) is not WriteStatus.OK:
            return
        assert wf.session_id is not None
        body = orjson.dumps({"session_id": wf.session_id, "webhook_type": "idv.resume", "status": None})
        await self.publish(wf.session_id.encode(), body)
        self.resumed += 1
        self.engine.metrics.poll("resume")
        log.warning("resuming a workflow stalled at %s", wf.state.value)

    async def _poll(self, wf: Workflow) -> bool:
        now = self.engine.clock()
        moved = wf.evolve(
            version=wf.version + 1, polls=wf.polls + 1, due_at=now + self.engine.backoff(wf.polls + 1),
            updated_at=now,
        )  # fmt: skip
        if await self.engine.store.write(wf, Change(moved)) is not WriteStatus.OK:
            return False  # another scanner (or an event) got there first
        body = await self.engine.poll_body(moved)
        if body is None:
            return True
        assert wf.session_id is not None
        await self.publish(wf.session_id.encode(), body)
        timeout = b'"idv.timeout"' in body
        self.timeouts += timeout
        self.polls += 1
        self.engine.metrics.poll("timeout" if timeout else "decision")
        return True
