"""The workflow engine's logic on the real stores (SQLite dedupe + workflow store), with a counting fake
of the provider steps: out-of-order and duplicate events, one AML per approval, resumption from every
recovery point, a late change after the final decision becoming a new revision."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from consumer.model import Disposition, Outcome, Record
from consumer.provider import CallResult
from consumer.store import DedupeStore, open_store
from consumer.workflows.engine import WorkflowEngine
from consumer.workflows.model import Workflow, WState
from consumer.workflows.poller import Poller
from consumer.workflows.steps import KeepAlive, StepRunner
from consumer.workflows.store import WorkflowStore, open_workflow_store
from producer.envelope import Envelope

pytestmark = pytest.mark.anyio
FP_KEY = "test-fingerprint-key-0123456789"


class FakeSteps:
    """Counts side effects per key, like the sandbox's ledger; decisions come from ``statuses``."""

    def __init__(self) -> None:
        self.sessions: dict[str, int] = {}
        self.aml: dict[str, int] = {}
        self.statuses: dict[str, str] = {}
        self.fail_aml = False

    async def create_session(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult:
        self.sessions[key] = self.sessions.get(key, 0) + 1
        return CallResult(Outcome("created", 201, "sess-" + wf.message_id), False, 1)

    async def screen_aml(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult:
        if self.fail_aml:
            raise RuntimeError("crash inside the AML step")
        self.aml[key] = self.aml.get(key, 0) + 1
        return CallResult(Outcome("approved", 200, "aml-" + wf.message_id), False, 1)

    async def session_url(self, session_id: str) -> str | None:
        return f"https://verify.example/session/{session_id}"

    async def decision(self, session_id: str) -> dict[str, Any] | None:
        status = self.statuses.get(session_id)
        return None if status is None else {"session_id": session_id, "status": status}


class Rig:
    def __init__(self, engine: WorkflowEngine, steps: FakeSteps, store: WorkflowStore) -> None:
        self.engine, self.steps, self.store = engine, steps, store
        self.offset = 0

    def record(self, topic: str, value: bytes, offset: int | None = None) -> ConsumerRecord:
        if offset is None:
            self.offset += 1
            offset = self.offset
        return ConsumerRecord(topic, 0, offset, 0, 0, b"k", value, None, 1, len(value), ())

    async def request(self, mid: str, steps: list[str] | None = None) -> Any:
        request: dict[str, Any] = {"workflow_id": "wf-kyc"}
        if steps is not None:
            request["steps"] = steps
        env = Envelope(mid, "kyc_workflow", "applicant-" + mid[:6], request)
        return await self.engine.handle_request(env, self.record("requests", b"{}"))

    async def event(self, mid: str, status: str, ts: float | None, kind: str = "status.updated",
                    offset: int | None = None) -> Any:  # fmt: skip
        body = {"session_id": "sess-" + mid, "status": status, "webhook_type": kind}
        if ts is not None:
            body["timestamp"] = ts
        return await self.engine.handle_event(self.record("events", orjson.dumps(body), offset))

    async def wf(self, mid: str) -> Workflow:
        wf = await self.store.get(mid)
        assert wf is not None
        return wf


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    url = f"sqlite:///{tmp_path / 'e.db'}"
    records: DedupeStore = open_store(url)
    store = open_workflow_store(url)
    async with records, store:
        steps = FakeSteps()
        runner = StepRunner(records, owner="me", lease_s=1.5, retention_s=3600)
        engine = WorkflowEngine(
            store, runner, steps, namespace="idv", fingerprint_key=FP_KEY, poll_after_s=60,
            poll_max_s=600, abandon_after_s=3600, events_topic="events",
        )  # fmt: skip
        yield Rig(engine, steps, store)


def bodies(handled: Any) -> list[dict[str, Any]]:
    return [orjson.loads(value) for _, value, _ in handled.raw_results]


async def test_request_creates_one_session_and_waits(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    env = Envelope(mid, "kyc_workflow", "applicant-" + mid[:6], {"workflow_id": "wf-kyc"})
    at = rig.record("requests", b"{}")
    first = await rig.engine.handle_request(env, at)
    assert first.disposition is Disposition.COMPLETED
    [opened] = bodies(first)  # revision 0: where the applicant goes
    assert (opened["kind"], opened["revision"]) == ("workflow_session", 0)
    assert opened["session_url"] == "https://verify.example/session/sess-" + mid
    wf = await rig.wf(mid)
    assert wf.state is WState.WAITING and wf.session_id == "sess-" + mid and wf.due_at is not None
    again = await rig.engine.handle_request(env, at)  # redelivery: nothing sent, the same bytes again
    assert again.raw_results == first.raw_results
    elsewhere = await rig.request(mid)  # the same request at another offset: a duplicate, nothing to publish
    assert elsewhere.disposition is Disposition.DUPLICATE and elsewhere.raw_results == []
    assert rig.steps.sessions == {wf.session_key: 1}


async def test_approved_runs_aml_once_and_emits_one_final(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    await rig.request(mid)
    # Out of order: progress arrives after the decision (older timestamp), duplicates on top.
    handled = await rig.event(mid, "Approved", 200.0, offset=10)
    finals = bodies(handled)
    assert [(b["revision"], b["status"], b["kind"]) for b in finals] == [(1, "approved", "workflow_decision")]
    assert finals[0]["steps"]["aml"]["status"] == "approved"
    for status, ts in (("In Progress", 100.0), ("Approved", 200.0), ("Not Started", 50.0)):
        late = await rig.event(mid, status, ts)
        assert late.raw_results == []
    # The same message redelivered (its offset was not committed): the same stored bytes again.
    redelivered = await rig.event(mid, "Approved", 200.0, offset=10)
    assert redelivered.raw_results == handled.raw_results
    wf = await rig.wf(mid)
    assert wf.state is WState.FINISHED and wf.revision == 1 and wf.decision_status == "approved"
    assert rig.steps.aml == {wf.aml_key: 1}


async def test_declined_never_screens(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    await rig.request(mid)
    await rig.event(mid, "In Review", 100.0)
    handled = await rig.event(mid, "Declined", 150.0)
    assert [b["status"] for b in bodies(handled)] == ["declined"]
    assert rig.steps.aml == {}
    # A terminal decision is never overwritten by a stale approval.
    assert (await rig.event(mid, "Approved", 120.0)).raw_results == []
    assert (await rig.wf(mid)).decision_status == "declined"


async def test_late_change_is_a_new_revision_and_the_final_stays(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    await rig.request(mid, ["session", "decision"])
    final = bodies(await rig.event(mid, "Approved", 100.0))
    update = await rig.event(mid, "Approved", 300.0, kind="data.updated")
    [second] = bodies(update)
    assert second["revision"] == 2 and second["kind"] == "workflow_decision_update"
    assert second["final_status"] == "approved" == final[0]["status"]
    review = bodies(await rig.event(mid, "Declined", 400.0))  # a manual review flips it
    assert [(b["revision"], b["status"], b["final_status"]) for b in review] == [(3, "declined", "approved")]
    assert (await rig.event(mid, "Approved", 300.0, kind="data.updated")).raw_results == []  # duplicate
    results = await rig.store.results_of(mid)
    assert [r.revision for r in results] == [0, 1, 2, 3]
    assert orjson.loads(results[1].body) == final[0]  # the final event is never rewritten


async def test_event_before_session_is_applied_when_the_session_is_recorded(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    early = await rig.event(mid, "Declined", 100.0)  # the webhook overtook the request's transition
    assert early.disposition is Disposition.COMPLETED and await rig.store.get(mid) is None
    handled = await rig.request(mid)
    assert [b["status"] for b in bodies(handled)] == ["declined"]
    assert (await rig.wf(mid)).state is WState.FINISHED


async def test_crash_inside_aml_resumes_from_decided(rig: Rig) -> None:
    mid = uuid.uuid4().hex
    await rig.request(mid)
    rig.steps.fail_aml = True
    with pytest.raises(RuntimeError):
        await rig.event(mid, "Approved", 100.0, offset=40)
    assert (await rig.wf(mid)).state is WState.DECIDED  # the recovery point: decided, AML pending
    rig.steps.fail_aml = False
    # The step's record stays in progress until its lease runs out (the request may be at the provider);
    # then the redelivered event resumes from `decided` and calls again with the same key.
    handled = await rig.event(mid, "Approved", 100.0, offset=40)
    assert [b["status"] for b in bodies(handled)] == ["approved"]
    wf = await rig.wf(mid)
    assert rig.steps.aml == {wf.aml_key: 1}


async def test_stalled_workflow_is_resumed_by_the_poller(rig: Rig) -> None:
    published: list[bytes] = []

    async def publish(key: bytes, value: bytes) -> None:
        published.append(value)

    mid = uuid.uuid4().hex
    await rig.request(mid)
    rig.steps.fail_aml = True
    with pytest.raises(RuntimeError):  # the daemon dead-letters this event and commits past it
        await rig.event(mid, "Approved", 100.0)
    rig.steps.fail_aml = False
    poller = Poller(rig.engine, publish, interval_s=1, concurrency=4, stall_after_s=0.0)
    await poller.scan_once()
    assert poller.resumed == 1 and orjson.loads(published[0])["webhook_type"] == "idv.resume"
    handled = await rig.engine.handle_event(rig.record("events", published[0]))
    assert [b["status"] for b in bodies(handled)] == ["approved"]
    assert (await rig.wf(mid)).state is WState.FINISHED


async def test_poller_reads_decision_and_times_out(rig: Rig) -> None:
    published: list[tuple[bytes, bytes]] = []

    async def publish(key: bytes, value: bytes) -> None:
        published.append((key, value))

    now = [1000.0]
    rig.engine.clock = lambda: now[0]
    a, b = uuid.uuid4().hex, uuid.uuid4().hex
    await rig.request(a)
    await rig.request(b)
    rig.steps.statuses["sess-" + a] = "Approved"
    poller = Poller(rig.engine, publish, interval_s=1, concurrency=4)
    assert await poller.scan_once() == 0  # nothing due yet
    now[0] += 61
    assert await poller.scan_once() == 2
    assert sorted(orjson.loads(v)["status"] for _, v in published) == ["Approved"]  # b unknown: no event
    assert (await rig.wf(b)).polls == 1 and (await rig.wf(b)).due_at == now[0] + 120  # backoff doubles
    handled = await rig.engine.handle_event(rig.record("events", published[0][1]))
    assert [x["steps"]["decision"]["source"] for x in bodies(handled)] == ["poll"]
    now[0] += 3600
    await poller.scan_once()
    timeout = orjson.loads(published[-1][1])
    assert timeout["webhook_type"] == "idv.timeout" and timeout["status"] == "Abandoned"
    handled = await rig.engine.handle_event(rig.record("events", published[-1][1]))
    assert [x["status"] for x in bodies(handled)] == ["abandoned"]
    assert (await rig.wf(b)).state is WState.ABANDONED


async def test_result_events_match_the_published_schema(rig: Rig) -> None:
    from jsonschema import Draft7Validator

    from producer.contract import workflow_result_schema

    schema = workflow_result_schema()
    Draft7Validator.check_schema(schema)
    validator = Draft7Validator(schema)
    for example in schema["examples"]:
        validator.validate(example)
    events = []
    for status, steps in (("Approved", None), ("Declined", None), ("Approved", ["session", "decision"])):
        mid = uuid.uuid4().hex
        for opened in bodies(await rig.request(mid, steps)):
            validator.validate(opened)
        events += bodies(await rig.event(mid, status, 100.0))
        events += bodies(await rig.event(mid, status, 200.0, kind="data.updated"))
    assert [e["revision"] for e in events] == [1, 2] * 3
    for event in events:
        validator.validate(event)


async def test_a_retried_delivery_is_the_same_event(rig: Rig) -> None:
    """Didit signs each retry afresh with a new ``timestamp``; ``created_at`` is the event's: a retried
    ``data.updated`` is not a second change."""
    mid = uuid.uuid4().hex
    await rig.request(mid, ["session", "decision"])
    await rig.event(mid, "Approved", 100.0)
    sent = []
    for delivery_ts in (300.0, 311.0, 342.0):
        body = {"session_id": "sess-" + mid, "status": "Approved", "webhook_type": "data.updated",
                "created_at": 290, "timestamp": delivery_ts}  # fmt: skip
        sent.append(await rig.engine.handle_event(rig.record("events", orjson.dumps(body))))
    assert [len(h.raw_results) for h in sent] == [1, 0, 0]
    assert [r.revision for r in await rig.store.results_of(mid)] == [0, 1, 2]
