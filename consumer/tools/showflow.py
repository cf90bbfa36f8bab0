"""The workflow part of ``idv-consumer show <message-id>``: the row, its steps' records, events, outbox.

Shown: the state (the recovery point), version, provider workflow id and session id, the decision and
AML outcomes, polls and deadlines; each step's dedupe record under its own key (hashed) with its
re-verification generations; the provider events applied to it (type, status, provider timestamp, the
Kafka position that applied it, the effect) and pending ones for its session; the result events in the
outbox (revision, kind, status, the position whose handling wrote them). Never payloads.
"""

from __future__ import annotations

from typing import Any

import orjson

from consumer.keys import key_hash
from consumer.settings import Settings
from consumer.store import DedupeStore
from consumer.timefmt import iso_or_none
from consumer.workflows.model import FINAL_STATES, Step, generation_id, step_key
from consumer.workflows.store import open_workflow_store

__all__ = ["workflow_story", "workflow_text"]


async def workflow_story(settings: Settings, records: DedupeStore, message_id: str) -> dict[str, Any] | None:
    """The workflow of ``message_id`` as JSON-ready data, or None when it has none."""
    store = open_workflow_store(settings.store_url)
    async with store:
        wf = await store.get(message_id)
        if wf is None:
            return None
        events = await store.events(message_id, wf.session_id)
        outbox = await store.results_of(message_id)
        generations: list[dict[str, Any]] = []  # replay --reverify: <message ID>#gen<N>
        while (row := await store.get(generation_id(message_id, len(generations) + 1))) is not None:
            generations.append({
                "generation": len(generations) + 1, "workflow": row.message_id, "state": row.state.value,
                "final": row.state in FINAL_STATES, "session_id": row.session_id,
                "decision_status": row.decision_status, "aml_status": row.aml_status,
            })  # fmt: skip
    steps = []
    for step in Step:
        generation = 0
        while True:
            key = step_key(settings.namespace, message_id, step, generation)
            record = await records.get(key)
            if record is None:
                if generation == 0:
                    steps.append(
                        {"step": step.value, "generation": 0, "key_hash": key_hash(key), "state": None}
                    )
                break
            outcome = record.outcome
            steps.append({
                "step": step.value, "generation": generation, "key_hash": key_hash(key),
                "state": record.state.value, "attempts": record.attempts, "owner": record.owner,
                "outcome_status": outcome.status if outcome else None,
                "provider_reference": outcome.provider_reference if outcome else None,
                "last_error": record.last_error,
            })  # fmt: skip
            generation += 1
    results = []
    for r in outbox:
        body = orjson.loads(r.body)
        results.append({"revision": r.revision, "kind": body.get("kind"), "status": body.get("status"),
                        "written_by": r.source})  # fmt: skip
    return {
        "state": wf.state.value,
        "version": wf.version,
        "provider_workflow_id": wf.provider_workflow_id,
        "steps_requested": wf.steps.split(","),
        "session_id": wf.session_id,
        "decision_status": wf.decision_status,
        "decision_source": wf.decision_source,
        "latest_status": wf.latest_status,
        "latest_provider_ts": iso_or_none(wf.latest_ts),
        "aml_status": wf.aml_status,
        "aml_reference": wf.aml_ref,
        "revision": wf.revision,
        "polls": wf.polls,
        "next_poll": iso_or_none(wf.due_at),
        "deadline": iso_or_none(wf.deadline),
        "created_at": iso_or_none(wf.created_at),
        "updated_at": iso_or_none(wf.updated_at),
        "step_records": steps,
        "generations": generations,
        "events": [
            {
                "type": e["webhook_type"],
                "status": e["status"],
                "provider_ts": iso_or_none(e["provider_ts"]),
                "applied_by": e["source"],
                "effect": e["effect"] or "pending",
                "received_at": iso_or_none(e["received_at"]),
            }
            for e in events
        ],  # fmt: skip
        "outbox": results,
    }


def workflow_text(w: dict[str, Any]) -> list[str]:
    lines = [
        f"workflow: {w['state']}  (version {w['version']}, steps {','.join(w['steps_requested'])}, "
        f"provider workflow {w['provider_workflow_id']})",
        f"  session {w['session_id'] or '-'}  decision {w['decision_status'] or '-'} "
        f"({w['decision_source'] or '-'})  latest {w['latest_status'] or '-'} "
        f"at {w['latest_provider_ts'] or '-'}",
        f"  aml {w['aml_status'] or '-'} ref {w['aml_reference'] or '-'}  revision {w['revision']}"
        f"  polls {w['polls']}  next poll {w['next_poll'] or '-'}  deadline {w['deadline']}",
    ]
    for s in w["step_records"]:
        head = f"  step {s['step']} gen {s['generation']}  key #{s['key_hash']}"
        if s["state"] is None:
            lines.append(f"{head}  not run")
            continue
        lines.append(
            f"{head}  {s['state']}  attempts {s['attempts']}"
            f"  outcome {s['outcome_status'] or '-'}  ref {s['provider_reference'] or '-'}"
        )
    lines.extend(
        f"  event {e['type']} {e['status']} at {e['provider_ts'] or '-'}  {e['effect']}  by {e['applied_by']}"
        for e in w["events"]
    )
    lines.extend(
        f"  result rev {r['revision']} {r['kind']} {r['status']}  written by {r['written_by']}"
        for r in w["outbox"]
    )
    lines.extend(
        f"  reverify gen {g['generation']} ({g['workflow']}): {g['state']}  session {g['session_id'] or '-'}"
        f"  decision {g['decision_status'] or '-'}  aml {g['aml_status'] or '-'}"
        for g in w.get("generations", ())
    )
    return lines
