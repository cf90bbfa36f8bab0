"""What an event or a finished step does to a workflow (pure functions), and the result events' bytes.

:func:`on_event` decides what one provider event changes: ordered by the provider's timestamp, and by
status precedence when a timestamp is missing (polls); a terminal decision is never overwritten; after
the final decision a real change (``data.updated``, or a status that moved, e.g. a manual review) becomes
a new result revision. :func:`finalize` writes the final decision (revision 1). The result bodies are
built here from the row alone, stored with the transition, and published as stored: a redelivery
publishes the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from consumer.keys import key_hash
from consumer.timefmt import iso_or_none
from consumer.workflows.model import FINAL_STATES, OPEN_STATES, Event, Workflow, WState, precedence

__all__ = [
    "RESULT_KIND_FINAL",
    "RESULT_KIND_SESSION",
    "RESULT_KIND_UPDATE",
    "Change",
    "Result",
    "finalize",
    "on_event",
    "revision_result",
    "session_result",
]

RESULT_KIND_FINAL = "workflow_decision"
RESULT_KIND_UPDATE = "workflow_decision_update"
RESULT_KIND_SESSION = "workflow_session"
RESULT_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Result:
    """One result event of a workflow, as stored (outbox) and published."""

    message_id: str
    revision: int
    source: str  # topic/partition@offset of the message whose handling wrote it
    key: bytes
    body: bytes


@dataclass(frozen=True, slots=True)
class Change:
    """A decided transition: the new row and the result events written with it."""

    new: Workflow
    results: tuple[Result, ...] = ()
    effect: str = "applied"


def _newer(ev: Event, wf: Workflow) -> bool:
    """Whether ``ev`` is later than what the row knows (timestamps first, precedence without them)."""
    if ev.provider_ts is not None and wf.latest_ts is not None:
        if ev.provider_ts != wf.latest_ts:
            return ev.provider_ts > wf.latest_ts
    return precedence(ev.status) > precedence(wf.latest_status)


def _final_status(wf: Workflow) -> str:
    if wf.state in (WState.ABANDONED, WState.EXPIRED, WState.FAILED):
        return wf.state.value
    if wf.decision_status == "approved" and wf.wants_aml:
        # AML screening decides: a hit needs review, a declined screening declines the applicant.
        return {"approved": "approved", "declined": "declined"}.get(wf.aml_status or "", "review")
    return wf.decision_status or "unknown"


def _generation(wf: Workflow) -> dict[str, int]:
    """``generation`` N for a re-verification's events (absent for the request's own: bytes unchanged)."""
    return {"generation": wf.generation} if wf.generation else {}


def result_body(wf: Workflow, revision: int, reason: str) -> bytes:
    """The result event of ``wf`` at ``revision``: step outcomes and provider references, no personal
    data (the keys are shown hashed)."""
    aml = None
    if wf.wants_aml and wf.decision_status == "approved":
        aml = {"status": wf.aml_status, "request_id": wf.aml_ref, "key_hash": key_hash(wf.aml_key)}
    return orjson.dumps(
        {
            "schema_version": RESULT_SCHEMA_VERSION,
            "kind": RESULT_KIND_FINAL if revision == 1 else RESULT_KIND_UPDATE,
            "message_id": wf.request_id,
            **_generation(wf),
            "operation": "kyc_workflow",
            "revision": revision,
            "subject_id": wf.subject_id,
            "workflow_id": wf.provider_workflow_id,
            "status": _final_status(wf) if revision == 1 else (wf.latest_status or "unknown"),
            "final_status": _final_status(wf),
            "reason": reason,
            "steps": {
                "session": {"session_id": wf.session_id, "key_hash": key_hash(wf.session_key)},
                "decision": {
                    "status": wf.decision_status,
                    "source": wf.decision_source,
                    "latest_status": wf.latest_status,
                    "provider_timestamp": iso_or_none(wf.latest_ts),
                },
                "aml": aml,
            },
            "polls": wf.polls,
            "first_seen_at": iso_or_none(wf.created_at),
        }
    )


def session_result(wf: Workflow, url: str | None, source: str) -> Result:
    """Revision 0: the session exists and where the applicant verifies. Not a decision: the upstream
    service sends the applicant to ``session_url`` (a link to the provider's hosted flow; no personal data,
    but whoever has it can act in that session: handle it like the session itself)."""
    body = orjson.dumps(
        {
            "schema_version": RESULT_SCHEMA_VERSION,
            "kind": RESULT_KIND_SESSION,
            "message_id": wf.request_id,
            **_generation(wf),
            "operation": "kyc_workflow",
            "revision": 0,
            "subject_id": wf.subject_id,
            "workflow_id": wf.provider_workflow_id,
            "session_id": wf.session_id,
            "session_url": url,
            "key_hash": key_hash(wf.session_key),
            "first_seen_at": iso_or_none(wf.created_at),
        }
    )
    return Result(wf.message_id, 0, source, wf.subject_id.encode(), body)


def revision_result(wf: Workflow, revision: int, source: str, reason: str) -> Result:
    """The result event of ``wf``'s ``revision`` (its key is the subject, as the request's)."""
    return Result(wf.message_id, revision, source, wf.subject_id.encode(), result_body(wf, revision, reason))


def finalize(wf: Workflow, now: float, source: str) -> Change:
    """decided/aml_done → finished with revision 1; a change seen meanwhile becomes revision 2 at once."""
    done = wf.evolve(state=WState.FINISHED, version=wf.version + 1, revision=1, due_at=None, updated_at=now)
    results = [revision_result(done, 1, source, "decided")]
    if done.latest_status != done.decision_status:
        done = done.evolve(revision=2)
        results.append(revision_result(done, 2, source, "changed_before_final"))
    return Change(done, tuple(results))


def on_event(wf: Workflow, ev: Event, now: float, source: str) -> Change | None:
    """What ``ev`` does to ``wf``; None when it changes nothing (stale, duplicate status, unknown)."""
    if ev.status == "unknown":
        return None
    bumped = wf.evolve(version=wf.version + 1, updated_at=now)
    if wf.state in OPEN_STATES:
        if not _newer(ev, wf) and ev.webhook_type != "idv.timeout":
            return None
        seen = bumped.evolve(latest_status=ev.status, latest_ts=ev.provider_ts or wf.latest_ts)
        source_kind = "poll" if ev.webhook_type in ("idv.poll", "idv.timeout") else "webhook"
        if ev.status in ("approved", "declined"):
            return Change(seen.evolve(state=WState.DECIDED, decision_status=ev.status,
                                      decision_source=source_kind, due_at=None))  # fmt: skip
        if ev.status in ("abandoned", "expired"):
            end = seen.evolve(state=WState(ev.status), revision=1, due_at=None)
            return Change(end, (revision_result(end, 1, source, ev.webhook_type),))
        if wf.state is WState.STARTED:
            return None  # recorded as pending: applied once the session is recorded
        return Change(seen)  # progress or review: still waiting, the newer status is remembered
    # After the decision: a terminal decision stays; a real later change is a new revision.
    changed = ev.webhook_type == "data.updated" or ev.status != wf.latest_status
    if not changed or not (ev.provider_ts is None or wf.latest_ts is None or ev.provider_ts > wf.latest_ts):
        return None
    if ev.webhook_type in ("idv.poll", "idv.timeout"):
        return None  # polling stops at the decision; later changes come by webhook
    seen = bumped.evolve(latest_status=ev.status, latest_ts=ev.provider_ts or wf.latest_ts)
    if wf.state not in FINAL_STATES:
        return Change(seen)  # finalize() turns it into revision 2 right after revision 1
    revised = seen.evolve(revision=wf.revision + 1)
    return Change(revised, (revision_result(revised, revised.revision, source, ev.webhook_type),))
