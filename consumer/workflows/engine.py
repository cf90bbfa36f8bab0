"""The workflow engine: a ``kyc_workflow`` request or a provider event in, the workflow moved on, the
result events of this message out.

**Why the request's offset may be committed while the applicant is still busy.** Handling a request
creates the row (``started``), runs the session step (its own key, under a lease), and records
``session_created`` then ``waiting`` — each a compare-and-set. Only then does :meth:`handle_request`
return, so only then is the offset marked done. Waiting is a row in the store, not a worker, a lease or
an uncommitted offset: 10,000 waiting workflows cost 10,000 rows.

**Why an event's effect is durable before its offset is committed.** :meth:`handle_event` applies the
event to its workflow in one store transaction (event marked applied + compare-and-set + result events
in the outbox), then advances the workflow from its recovery point (AML on approval, under the AML
step's own key; then ``finished`` with the final decision) and returns the result events *written while
handling this message* (the outbox rows tagged with its position). The daemon publishes them before the
offset is done, or in the transaction that commits it. A redelivery of the same message finds the event
applied, resumes from the recovery point and publishes the same stored bytes again: exactly once with
transactional results (the first transaction never became visible), identical otherwise.

An event for a session not recorded yet (the webhook overtook the request's own transition) is kept as
*pending* and applied by whichever of the two handlers sees the other's write second.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import KW_ONLY, InitVar, dataclass, field
from typing import Any

import orjson
from aiokafka.structs import ConsumerRecord

from consumer.errors import ProviderAuthError
from consumer.faults import FaultPoints
from consumer.keys import Fingerprinter
from consumer.model import DeadLetter, Disposition, Handled, conflict
from consumer.workflows import rules
from consumer.workflows.metrics import WorkflowMetrics
from consumer.workflows.model import (
    Event,
    Step,
    Workflow,
    WState,
    event_from_webhook,
    generation_id,
    step_key,
)
from consumer.workflows.runner import StepFailed, StepRunner
from consumer.workflows.steps import Steps
from consumer.workflows.store import WorkflowStore, WriteStatus
from producer.envelope import Envelope

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_STEPS", "WorkflowEngine", "position"]

DEFAULT_STEPS = ("session", "decision", "aml")
_MAX_ROUNDS = 64  # compare-and-set retries and transitions of one advance (a loop guard, never reached)


def position(msg: ConsumerRecord) -> str:
    return f"{msg.topic}/{msg.partition}@{msg.offset}"


def _steps_of(request: Any) -> str | None:
    steps = request.get("steps", list(DEFAULT_STEPS))
    if not isinstance(steps, list) or not all(isinstance(x, str) for x in steps):
        return None
    if not set(steps) <= set(DEFAULT_STEPS) or steps[:1] != ["session"]:
        return None
    return ",".join(steps)


@dataclass(eq=False)
class WorkflowEngine:
    """``kyc_workflow`` requests and provider events in, workflow transitions and result events out; its
    clock is the store's (tests may replace it)."""

    store: WorkflowStore
    runner: StepRunner
    steps: Steps
    _: KW_ONLY
    namespace: str
    fingerprint_key: InitVar[str | bytes | None]
    poll_after_s: float
    poll_max_s: float
    abandon_after_s: float
    events_topic: str | None
    faults: FaultPoints = field(default_factory=FaultPoints)
    metrics: WorkflowMetrics = field(default_factory=WorkflowMetrics)
    fingerprints: Fingerprinter = field(init=False)
    clock: Callable[[], float] = field(init=False)

    def __post_init__(self, fingerprint_key: str | bytes | None) -> None:
        self.fingerprints = Fingerprinter(fingerprint_key)
        self.clock = self.store.clock

    def backoff(self, polls: int) -> float:
        """Seconds until the next poll after ``polls`` polls: poll_after_s, doubling, capped."""
        return float(min(self.poll_max_s, self.poll_after_s * 2 ** min(polls, 30)))

    # -- requests --------------------------------------------------------------------------------------

    async def handle_request(self, envelope: Envelope, msg: ConsumerRecord) -> Handled:
        steps = _steps_of(envelope.request)
        if steps is None:
            letter = DeadLetter("invalid_envelope", "request.steps must list session[, decision[, aml]]")
            return Handled(Disposition.INVALID, letter)
        return await self._start(envelope, msg, steps, 0)

    async def reverify(self, envelope: Envelope, msg: ConsumerRecord, generation: int) -> Handled:
        """Run the workflow of ``envelope`` again under key generation ``generation`` ≥ 1 (``replay
        --reverify``): its own row ``<message ID>#gen<N>``, a new key for every step, its own result events
        (marked with the generation). The request's own row and final decision are not touched. A row of
        that generation that exists already is resumed from its recovery point, never started twice."""
        assert generation >= 1
        steps = _steps_of(envelope.request)
        if steps is None:
            letter = DeadLetter("invalid_envelope", "request.steps must list session[, decision[, aml]]")
            return Handled(Disposition.INVALID, letter)
        return await self._start(envelope, msg, steps, generation)

    def new_row(self, envelope: Envelope, steps: str, generation: int) -> Workflow:
        now = self.clock()
        mid = envelope.message_id
        return Workflow(
            message_id=generation_id(mid, generation), subject_id=envelope.subject_id,
            provider_workflow_id=str(envelope.request["workflow_id"]), steps=steps,
            fingerprint=self.fingerprints(envelope), state=WState.STARTED, version=1, session_id=None,
            session_key=step_key(self.namespace, mid, Step.SESSION, generation),
            aml_key=step_key(self.namespace, mid, Step.AML, generation),
            decision_status=None, decision_source=None, latest_status=None, latest_ts=None,
            aml_status=None, aml_ref=None, revision=0, polls=0, due_at=None,
            deadline=now + self.abandon_after_s, created_at=now, updated_at=now,
        )  # fmt: skip

    async def _start(self, envelope: Envelope, msg: ConsumerRecord, steps: str, generation: int) -> Handled:
        wf = await self.store.get(generation_id(envelope.message_id, generation))
        fresh = wf is None
        if wf is None:
            wf = await self.store.create(self.new_row(envelope, steps, generation))
        if not self.fingerprints.matches(wf.fingerprint, envelope):
            log.warning("idempotency conflict: workflow message ID reused with a different payload")
            return conflict(
                "message ID already used for another workflow request (fingerprint differs); not sent",
                wf.created_at,
            )
        # A generation's results get a source of their own: the request's position holds its revision 0.
        source = position(msg) + (f"#gen{generation}" if generation else "")
        return await self._advance_and_collect(wf, source, fresh=fresh)

    # -- events ----------------------------------------------------------------------------------------

    async def handle_event(self, msg: ConsumerRecord) -> Handled:
        try:
            body = orjson.loads(msg.value or b"")
        except orjson.JSONDecodeError:
            self.metrics.event("invalid")
            return Handled(Disposition.INVALID, DeadLetter("invalid_json", "provider event is not JSON"))
        event = event_from_webhook(body, msg.value or b"") if isinstance(body, dict) else None
        if event is None:
            self.metrics.event("invalid")
            letter = DeadLetter("invalid_envelope", "provider event without a session_id")
            return Handled(Disposition.INVALID, letter)
        source = position(msg)
        wf = await self.apply(event, source)
        self.faults.hit("workflow_after_apply")
        if wf is None:
            return Handled(Disposition.COMPLETED)  # pending until its session is recorded
        return await self._advance_and_collect(wf, source, fresh=False)

    async def apply(self, event: Event, source: str, wf: Workflow | None = None) -> Workflow | None:
        """Apply ``event`` once to its workflow; returns the row after it (None: kept pending)."""
        for _ in range(_MAX_ROUNDS):
            if wf is None:
                wf = await self.store.by_session(event.session_id)
            if wf is None:
                await self.store.add_pending(event, source)
                # Written first, read second: a request handler recording this session right now either
                # sees the pending row, or recorded the session before this read (then we apply it).
                wf = await self.store.by_session(event.session_id)
                if wf is None:
                    log.info("provider event for a session not recorded (yet): kept pending")
                    self.metrics.event("pending")
                    return None
            change = rules.on_event(wf, event, self.clock(), source)
            status = await self.store.write(wf, change, event, source)
            if status is WriteStatus.OK:
                if change is None:
                    self.metrics.event("unchanged")
                    return wf
                log.info("workflow event applied: %s → %s", event.status, change.new.state.value)
                self.metrics.event("applied")
                self.metrics.transition(wf.state, change.new.state)
                return change.new
            if status is WriteStatus.DUPLICATE:
                log.info("provider event already applied: duplicate skipped")
                self.metrics.event("duplicate")
                return await self.store.get(wf.message_id)
            self.metrics.event("stale")
            wf = await self.store.get(wf.message_id)  # STALE: decide again on the current row
        raise RuntimeError("workflow event could not be applied (compare-and-set kept losing)")

    # -- advancing -------------------------------------------------------------------------------------

    async def _advance_and_collect(self, wf: Workflow, source: str, *, fresh: bool) -> Handled:
        try:
            await self.advance(wf, source)
        except StepFailed as exc:
            log.error("workflow step could not finish: %s", exc.reason)
            reason = exc.reason if exc.reason in ("idempotency_conflict", "retries_exhausted") else "in_doubt"
            return Handled(Disposition.SET_ASIDE, DeadLetter(reason, str(exc)))
        results = await self.store.results_at(source)
        if results:
            self.faults.hit("workflow_after_outbox")
        handled = Handled(Disposition.COMPLETED if fresh or results else Disposition.DUPLICATE)
        handled.raw_results = [(r.key, r.body, r.message_id) for r in results]
        return handled

    async def advance(self, wf: Workflow, source: str) -> Workflow:
        """Run the workflow from its recovery point until it waits or is finished."""
        for _ in range(_MAX_ROUNDS):
            nxt = await self._step(wf, source)
            if nxt is None:
                return wf
            wf = nxt
        raise RuntimeError("workflow did not settle")

    async def _write(self, wf: Workflow, change: rules.Change) -> Workflow:
        status = await self.store.write(wf, change)
        if status is WriteStatus.OK:
            self.metrics.transition(wf.state, change.new.state)
            return change.new
        current = await self.store.get(wf.message_id)  # lost a race: decide again from the stored row
        assert current is not None
        return current

    async def _step(self, wf: Workflow, source: str) -> Workflow | None:
        now = self.clock()
        bump: dict[str, Any] = {"version": wf.version + 1, "updated_at": now}
        if wf.state is WState.STARTED:
            outcome = await self.runner.run(
                wf.session_key, wf, Step.SESSION,
                lambda alive, claimed: self.steps.create_session(wf, wf.session_key, alive, claimed),
            )  # fmt: skip
            self.faults.hit("workflow_after_step")
            if outcome.status == "failed" or not outcome.provider_reference:
                failed = wf.evolve(state=WState.FAILED, revision=1, latest_status="failed", **bump)
                result = rules.revision_result(failed, 1, source, outcome.detail or "session_refused")
                return await self._write(wf, rules.Change(failed, (result,)))
            created = wf.evolve(state=WState.SESSION_CREATED, session_id=outcome.provider_reference,
                                latest_status="created", **bump)  # fmt: skip
            return await self._write(wf, rules.Change(created))
        if wf.state is WState.SESSION_CREATED:
            assert wf.session_id is not None
            # Revision 0 (where the applicant goes) first, in the outbox with the session's own transition
            # to waiting; read before anything else can move the row on.
            url = await self.steps.session_url(wf.session_id)
            for event in await self.store.pending(wf.session_id):
                after = await self.apply(event, source, wf)
                wf = after if after is not None else wf
            if wf.state is not WState.SESSION_CREATED:
                return wf
            bump = {"version": wf.version + 1, "updated_at": now}
            waiting = wf.evolve(state=WState.WAITING, due_at=now + self.poll_after_s, **bump)
            return await self._write(wf, rules.Change(waiting, (rules.session_result(wf, url, source),)))
        if wf.state is WState.DECIDED:
            if wf.decision_status == "approved" and wf.wants_aml and wf.aml_status is None:
                outcome = await self.runner.run(
                    wf.aml_key, wf, Step.AML,
                    lambda keep_alive, claimed: self.steps.screen_aml(wf, wf.aml_key, keep_alive, claimed),
                )  # fmt: skip
                self.faults.hit("workflow_after_step")
                # Events may have moved the row meanwhile: then the compare-and-set loses and _write
                # returns the stored row to decide again from.
                bump = {"version": wf.version + 1, "updated_at": self.clock()}
                aml = wf.evolve(state=WState.AML_DONE, aml_status=outcome.status,
                                aml_ref=outcome.provider_reference or outcome.detail, **bump)  # fmt: skip
                return await self._write(wf, rules.Change(aml))
            return await self._write(wf, rules.finalize(wf, now, source))
        if wf.state is WState.AML_DONE:
            return await self._write(wf, rules.finalize(wf, now, source))
        return None  # waiting, or final

    # -- polling fallback (consumer.workflows.poller) -------------------------------------------------

    async def poll_body(self, wf: Workflow) -> bytes | None:
        """The synthetic event for a due workflow: its deadline passed → timeout; else the decision
        endpoint's current status. None when the provider does not know the session."""
        assert wf.session_id is not None
        if self.clock() >= wf.deadline:
            status = "Expired" if wf.latest_status == "review" else "Abandoned"
            return orjson.dumps(
                {"session_id": wf.session_id, "status": status, "webhook_type": "idv.timeout"}
            )
        try:
            decision = await self.steps.decision(wf.session_id)
        except ProviderAuthError:
            raise
        except StepFailed:
            return None
        if decision is None:
            return None
        found = decision.get("status")
        return orjson.dumps({"session_id": wf.session_id, "status": found, "webhook_type": "idv.poll"})
