"""Workflows end to end: the daemon as a real process, the real broker, the sandbox over HTTP.

Provider events are published to the events topic the way the webhook intake does (key = session id,
value = the provider's JSON body). Checked: one session and at most one AML screening per workflow at the
provider (its ledger, per step key), one final decision per workflow on the results topic, duplicates
and out-of-order events changing nothing, a late ``data.updated`` becoming revision 2, and waiting
workflows holding no offsets.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from consumer.store import open_store
from consumer.workflows.model import Workflow, WState
from consumer.workflows.store import open_workflow_store
from producer.envelope import Envelope
from tests.conftest import create_topic, random_topic_name, service_missing
from tests.consumer.conftest import (
    Sandbox,
    daemon_env,
    publish,
    read_results,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)

pytestmark = pytest.mark.anyio


def requests(n: int, prefix: str) -> list[Envelope]:
    return [
        Envelope(f"{prefix}-{i}", "kyc_workflow", f"applicant-{prefix}-{i}", {"workflow_id": "wf-kyc"})
        for i in range(n)
    ]


async def send_events(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for body in events:
            headers = [("idv-provider", b"didit"), ("idv-event-type", str(body["webhook_type"]).encode())]
            await producer.send(topic, orjson.dumps(body), key=body["session_id"].encode(), headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def webhook(wf: Workflow, status: str, ts: float, kind: str = "status.updated") -> dict[str, Any]:
    return {"session_id": wf.session_id, "status": status, "webhook_type": kind, "created_at": int(ts),
            "timestamp": ts, "workflow_id": "wf-kyc", "vendor_data": wf.subject_id,
            "metadata": {"idv_key": wf.session_key}}  # fmt: skip


async def rows(url: str) -> list[Workflow]:
    store = open_workflow_store(url)
    async with store:
        return [wf for wf in [await store.get(f"{m}") for m in _ids] if wf is not None]


_ids: list[str] = []


def workflow_results(values: list[bytes]) -> list[dict[str, Any]]:
    out = [orjson.loads(v) for v in values]
    return [r for r in out if r.get("operation") == "kyc_workflow"]


@contextlib.asynccontextmanager
async def backend_url(backend: str, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store: a SQLite file, or a schema of its own in the shared PostgreSQL (dropped after)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'wf.db'}"
        return
    url = os.environ.get("IDV_TEST_POSTGRES_URL", "")
    if not url:
        service_missing("PostgreSQL (IDV_TEST_POSTGRES_URL)", "bash scripts/postgres.sh start")
    import asyncpg

    schema = "idv_wfd_" + uuid.uuid4().hex[:12]
    admin = await asyncpg.connect(url)
    try:
        await admin.execute(f"CREATE SCHEMA {schema}")
        yield url + ("&" if "?" in url else "?") + f"search_path={schema}"
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await admin.close()


@pytest.mark.parametrize(
    ("backend", "transactional"),
    [("sqlite", False), ("sqlite", True), ("postgres", False)],
    ids=["sqlite-idempotent", "sqlite-transactional", "postgres-idempotent"],
)
async def test_workflows_end_to_end(
    kafka_bootstrap: str,
    topic: str,
    group: str,
    sb: Sandbox,
    tmp_path: Path,
    backend: str,
    transactional: bool,
) -> None:
    async with backend_url(backend, tmp_path) as store_url:
        await _end_to_end(kafka_bootstrap, topic, group, sb, tmp_path, transactional, store_url)


async def _end_to_end(
    kafka_bootstrap: str,
    topic: str,
    group: str,
    sb: Sandbox,
    tmp_path: Path,
    transactional: bool,
    store_url: str,
) -> None:
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    batch = requests(30, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, [*batch, *batch[:5]])  # five requests delivered twice
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events,
                     workflow_scan_interval_s=0.5, results_transactional=transactional)  # fmt: skip
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        waiting = await rows(store_url)
        assert len(waiting) == 30 and {w.state for w in waiting} == {WState.WAITING}
        effects = sb.side_effects()
        assert all(effects[w.session_key] == 1 for w in waiting)  # one session per workflow
        now = time.time()
        approved, declined = waiting[::2], waiting[1::2]
        bodies: list[dict[str, Any]] = []
        for wf in approved:  # out of order and duplicated
            bodies += [webhook(wf, "Approved", now + 2), webhook(wf, "In Progress", now + 1),
                       webhook(wf, "Approved", now + 2)]  # fmt: skip
        for wf in declined:
            bodies += [webhook(wf, "In Review", now + 1), webhook(wf, "Declined", now + 3)]
        await send_events(kafka_bootstrap, events, bodies)

        async def all_finished() -> bool:
            return all(w.state is WState.FINISHED for w in await rows(store_url))

        await wait_until(all_finished, "every workflow finished", timeout=60)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        effects = sb.side_effects()
        finals = {w.message_id: w for w in await rows(store_url)}
        assert all(effects.get(finals[w.message_id].aml_key) == 1 for w in approved)
        assert not any(finals[w.message_id].aml_key in effects for w in declined)  # never screened

        # A late data.updated after the final decision: revision 2, the final event unchanged.
        late = approved[0]
        await send_events(kafka_bootstrap, events, [webhook(late, "Approved", now + 50, "data.updated")] * 2)

        async def revised() -> bool:
            return any(w.revision == 2 for w in await rows(store_url))

        await wait_until(revised, "revision 2 recorded", timeout=60)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    finally:
        proc.kill()
    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_committed"))
    per_revision = Counter((r["message_id"], r["revision"]) for r in results)
    assert {mid for mid, rev in per_revision if rev == 1} == set(_ids)
    assert all(n == 1 for n in per_revision.values()), per_revision.most_common(3)
    assert [k for k in per_revision if k[1] == 2] == [(late.message_id, 2)]
    by_status = Counter(r["status"] for r in results if r["revision"] == 1)
    assert by_status == {"approved": len(approved), "declined": len(declined)}
    first = next(r for r in results if r["message_id"] == late.message_id and r["revision"] == 1)
    assert first["kind"] == "workflow_decision" and first["steps"]["aml"]["status"] == "approved"
    assert "full_name" not in orjson.dumps(results).decode()  # no personal data
    records = open_store(store_url)
    async with records:
        assert (await records.counts())["in_progress"] == 0  # nothing holds a lease
    # The operator's view of one workflow: state, steps (hashed keys), provider refs, events, outbox.
    shown = await anyio.run_process(
        [sys.executable, "-m", "consumer", "show", late.message_id, "--json"], env=env
    )
    story = orjson.loads(shown.stdout)["workflow"]
    assert story["state"] == "finished" and story["session_id"] == late.session_id
    assert [s["state"] for s in story["step_records"]] == ["completed", "completed"]
    assert late.session_key not in shown.stdout.decode()  # keys only hashed
    assert [r["revision"] for r in story["outbox"]] == [1, 2]
    effects = Counter(e["effect"] for e in story["events"])
    # Approved, data.updated applied; the stale In Progress ignored; duplicate deliveries not stored again.
    assert effects == {"applied": 2, "ignored": 1}, story["events"]
    [story_result] = [r for r in orjson.loads(shown.stdout)["results"] if r["revision"] == 2]
    assert story_result["status"] == "approved"


async def test_ten_thousand_waiting_workflows_hold_no_offsets(
    kafka_bootstrap: str, topic: str, group: str, sb: Sandbox, tmp_path: Path
) -> None:
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}?synchronous=NORMAL"
    prefix = uuid.uuid4().hex[:8]
    workflows = requests(10_000, prefix)
    other = [
        Envelope(f"{prefix}-aml-{i}", "aml_screening", f"other-{i}", {"full_name": f"Person {i}"})
        for i in range(500)
    ]
    # Other traffic interleaved with the workflow requests.
    mixed = [x for pair in zip(workflows[:500], other, strict=True) for x in pair] + workflows[500:]
    await publish(kafka_bootstrap, topic, mixed)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events,
                     max_in_flight=256, log_level="WARNING")  # fmt: skip
    proc = start_daemon(env, tmp_path / "daemon.log")
    started = time.monotonic()
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 240)
        elapsed = time.monotonic() - started
        proc.proc.send_signal(signal.SIGTERM)  # it runs (it committed): a clean stop is exit 0
        assert proc.wait(30) == 0, proc.log()[-3000:]
    finally:
        proc.kill()
    store = open_workflow_store(store_url)
    async with store:
        counts = await store.counts()
    assert counts == {"waiting": 10_000}, counts
    records = open_store(store_url)
    async with records:
        states = await records.counts()
    assert states["in_progress"] == 0 and states["completed"] == 10_500
    print(f"10,000 workflows waiting, 500 other requests, committed to the end in {elapsed:.1f}s")


@pytest.fixture
def didit() -> Iterator[Sandbox]:
    """The sandbox in its ``didit`` profile over real HTTP (sessions, decisions, AML saved as sessions)."""
    from sandbox import SandboxConfig, run_in_thread

    with run_in_thread(SandboxConfig(port=0, api_keys=("test-key",), profile="didit")) as handle:
        yield Sandbox(handle.url)


async def test_dropped_webhooks_are_completed_by_polling_the_didit_sandbox(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    """No webhook at all: the applicant finishes at the provider, the poller reads the decision endpoint,
    abandoned sessions end at their deadline; one session and one AML per approved workflow (the
    provider's effects per ``metadata.idv_key``)."""
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(12, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, batch)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, didit.url, events_topic=events,
                     workflow_scan_interval_s=0.3, workflow_poll_after_s=0.5, workflow_poll_max_s=1,
                     workflow_abandon_after_s=20)  # fmt: skip
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        waiting = await rows(store_url)
        assert len(waiting) == 12
        sessions = didit.effects_per_idv_key("create_session")
        assert sessions == {w.session_key: 1 for w in waiting}
        outcome = {}
        for i, wf in enumerate(waiting):
            if i % 3 == 2:
                continue  # the applicant never finishes: abandoned at the deadline
            status = "Approved" if i % 3 == 0 else "Declined"
            assert wf.session_id is not None
            didit.set_session_status(wf.session_id, status)
            outcome[wf.message_id] = status.lower()

        async def all_final() -> bool:
            return all(w.state in (WState.FINISHED, WState.ABANDONED) for w in await rows(store_url))

        await wait_until(all_final, "every workflow finished or abandoned", timeout=90)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    finally:
        proc.kill()
    final = {w.message_id: w for w in await rows(store_url)}
    for mid, wf in final.items():
        assert wf.state is (WState.FINISHED if mid in outcome else WState.ABANDONED)
        if mid in outcome:
            assert wf.decision_status == outcome[mid] and wf.decision_source == "poll"
    screened = didit.effects_per_idv_key("aml_screening")
    assert screened == {final[m].aml_key: 1 for m, s in outcome.items() if s == "approved"}
    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_committed"))
    assert Counter(r["message_id"] for r in results if r["revision"] == 1) == Counter(set(_ids))
    statuses = Counter(r["status"] for r in results)
    assert statuses["abandoned"] == 4 and statuses["declined"] == 4


@pytest.mark.parametrize(
    ("point", "at"),
    [("workflow_after_step", 25), ("workflow_after_apply", 6), ("workflow_after_outbox", 4)],
)
async def test_sigkill_in_every_workflow_window(
    kafka_bootstrap: str, topic: str, group: str, sb: Sandbox, tmp_path: Path, point: str, at: int
) -> None:
    """SIGKILL at a workflow crash point (a step recorded / an event applied / the outbox written, each
    before the next move), restart: one session and at most one AML per workflow at the provider, exactly
    one visible final decision per workflow (transactional results)."""
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(20, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, batch)
    base = dict(events_topic=events, results_transactional=True, provider_timeout_s=2, lease_s=4)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, **base)
    killed = start_daemon(daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, **base,
                                     fault_kill_at=f"{point}:{at}"), tmp_path / "killed.log")  # fmt: skip
    proc = None
    try:
        # 20 session steps come first: the 25th step is an AML step, so every kill comes with the events.
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        waiting = await rows(store_url)
        now = time.time()
        bodies: list[dict[str, Any]] = []
        for i, wf in enumerate(waiting):
            bodies.append(webhook(wf, "Approved" if i % 2 == 0 else "Declined", now + 1))
        await send_events(kafka_bootstrap, events, bodies)
        assert killed.wait(60) == -9, killed.log()[-2000:]
        proc = start_daemon(env, tmp_path / "daemon.log")

        async def all_finished() -> bool:
            return all(w.state is WState.FINISHED for w in await rows(store_url))

        await wait_until(all_finished, "every workflow finished after the restart", timeout=90)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    finally:
        killed.kill()
        if proc is not None:
            proc.kill()
    final = await rows(store_url)
    sessions = sb.side_effects()
    assert all(sessions[w.session_key] == 1 for w in final)
    approved = [w for w in final if w.decision_status == "approved"]
    assert len(approved) == 10 and all(sessions[w.aml_key] == 1 for w in approved)
    assert not any(w.aml_key in sessions for w in final if w.decision_status == "declined")
    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_committed"))
    assert Counter(r["message_id"] for r in results) == Counter(set(_ids))  # exactly one each, visible


async def test_replay_resumes_workflows_from_their_recovery_point(
    kafka_bootstrap: str, topic: str, group: str, sb: Sandbox, tmp_path: Path
) -> None:
    """The daemon dies after a session step was recorded but before the workflow moved on; the replay
    tool (not the daemon) then resumes every workflow from where it stopped: all waiting, one session
    each, none created twice."""
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(10, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, batch)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events,
                     provider_timeout_s=2, lease_s=4)  # fmt: skip
    killed = start_daemon({**env, "IDV_FAULT_KILL_AT": "workflow_after_step:3"}, tmp_path / "killed.log")
    try:
        assert killed.wait(60) == -9, killed.log()[-2000:]
    finally:
        killed.kill()
    assert (
        any(w.state is not WState.WAITING for w in await rows(store_url)) or len(await rows(store_url)) < 10
    )
    result = await anyio.run_process(
        [sys.executable, "-m", "consumer", "replay", "--json"], env=env, check=False
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    final = await rows(store_url)
    assert len(final) == 10 and {w.state for w in final} == {WState.WAITING}
    effects = sb.side_effects()
    assert all(effects[w.session_key] == 1 for w in final)


async def test_signed_webhooks_through_the_intake_decide_workflows(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    """The whole path over HTTP: the daemon creates sessions at the didit sandbox, the applicant finishes
    them there, Didit's signed webhooks (some twice, one with a bad signature) go to ``idv-webhooks``,
    which publishes them to the events topic the daemon consumes. Polling is far off: webhooks decide."""
    import httpx

    from tests.consumer.test_webhooks_intake import delivery
    from tests.consumer.test_webhooks_service import free_port, intake_env, wait_ready
    from tests.consumer.test_webhooks_service import start as start_intake

    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(8, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, batch)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, didit.url, events_topic=events)
    proc = start_daemon(env, tmp_path / "daemon.log")
    port = free_port()
    intake = start_intake(intake_env(kafka_bootstrap, events, port))
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        waiting = await rows(store_url)
        assert len(waiting) == 8
        statuses = {}
        async with httpx.AsyncClient(timeout=10) as client:
            await wait_ready(client, intake, port)
            url = f"http://127.0.0.1:{port}/webhooks/didit"
            for i, wf in enumerate(waiting):
                assert wf.session_id is not None
                status = "Approved" if i % 2 == 0 else "Declined"
                statuses[wf.message_id] = status.lower()
                didit.set_session_status(wf.session_id, status)  # the applicant finished
                body, headers = delivery(session_id=wf.session_id, status=status, vendor_data=wf.subject_id)
                forged, bad = delivery(session_id=wf.session_id, status="Approved", secret="not-the-secret")
                assert (await client.post(url, content=forged, headers=bad)).status_code == 401
                for _ in range(2):  # Didit retries: duplicate deliveries
                    assert (await client.post(url, content=body, headers=headers)).status_code == 200

        async def all_finished() -> bool:
            return all(w.state is WState.FINISHED for w in await rows(store_url))

        await wait_until(all_finished, "every workflow decided by its webhook", timeout=60)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    finally:
        proc.kill()
        intake.terminate()
        intake.communicate(timeout=30)
    final = {w.message_id: w for w in await rows(store_url)}
    assert {m: w.decision_status for m, w in final.items()} == statuses  # never the forged approval
    assert all(w.decision_source == "webhook" and w.polls == 0 for w in final.values())
    screened = didit.effects_per_idv_key("aml_screening")
    assert screened == {final[m].aml_key: 1 for m, s in statuses.items() if s == "approved"}
    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_committed"))
    assert Counter(r["message_id"] for r in results) == Counter(set(_ids))


async def test_simulated_applicants_and_faulty_webhooks(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    """The sandbox's applicant finishes (or abandons) each session and its sender delivers signed webhooks
    to ``idv-webhooks`` with drops, duplicates, reordering and forged copies. Every workflow ends: the
    dropped decisions by polling; one session each, one AML per approval, none for declines, one final
    decision each; a reviewer's later data change is revision 2."""
    from tests.consumer.test_webhooks_intake import SECRET
    from tests.consumer.test_webhooks_service import free_port, intake_env
    from tests.consumer.test_webhooks_service import start as start_intake

    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 4)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    prefix = uuid.uuid4().hex[:8]
    batch = [
        Envelope(f"{prefix}-{i}", "kyc_workflow", f"applicant-{'DECLINE-' if i % 3 == 0 else ''}{prefix}-{i}",
                 {"workflow_id": "wf-kyc"})
        for i in range(60)
    ]  # fmt: skip
    _ids[:] = [e.message_id for e in batch]
    port = free_port()
    intake = start_intake(intake_env(kafka_bootstrap, events, port))
    didit.applicant(delay_s=1.0, jitter_s=1.0, abandon_rate=0.1, seed=7)
    faults = {"drop_rate": 0.2, "duplicate_rate": 0.3, "reorder_rate": 0.3, "bad_signature_rate": 0.1,
              "reorder_hold_ms": 1000, "seed": 7}  # fmt: skip
    didit.webhooks(url=f"http://127.0.0.1:{port}/webhooks/didit", secret=SECRET, backoff_s=0.2, faults=faults)
    await publish(kafka_bootstrap, topic, batch)
    env = daemon_env(kafka_bootstrap, topic, group, store_url, didit.url, events_topic=events,
                     workflow_scan_interval_s=0.5, workflow_poll_after_s=4, workflow_poll_max_s=4,
                     workflow_abandon_after_s=120)  # fmt: skip
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:

        async def all_final() -> bool:
            found = await rows(store_url)
            return len(found) == 60 and all(w.state in (WState.FINISHED, WState.ABANDONED) for w in found)

        await wait_until(all_final, "every workflow finished or abandoned", timeout=120)
        late = next(w for w in await rows(store_url) if w.decision_status == "approved")
        assert late.session_id is not None
        didit.data_updated(late.session_id)

        async def revised() -> bool:
            return any(w.revision == 2 for w in await rows(store_url))

        await wait_until(revised, "the reviewer's change as revision 2", timeout=60)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)
        proc.stop_cleanly()
    finally:
        proc.kill()
        intake.terminate()
        intake.communicate(timeout=30)
    final = {w.message_id: w for w in await rows(store_url)}
    fates = Counter(e["fate"] for e in didit.webhooks()["events"])
    assert fates["dropped"] > 0, fates
    assert any(w.decision_source == "poll" for w in final.values())  # dropped ones, completed by polling
    assert didit.effects_per_idv_key("create_session") == {w.session_key: 1 for w in final.values()}
    approved = [w for w in final.values() if w.decision_status == "approved"]
    declined = [w for w in final.values() if w.decision_status == "declined"]
    assert (
        approved
        and declined
        and len(approved) + len(declined) + sum(w.state is WState.ABANDONED for w in final.values()) == 60
    )
    assert didit.effects_per_idv_key("aml_screening") == {w.aml_key: 1 for w in approved}
    results = workflow_results(await read_results(kafka_bootstrap, f"{topic}.results", "read_committed"))
    per_revision = Counter((r["message_id"], r["revision"]) for r in results)
    assert {m for m, rev in per_revision if rev == 1} == set(_ids)
    assert all(n == 1 for n in per_revision.values()), per_revision.most_common(3)
    assert (late.message_id, 2) in per_revision
