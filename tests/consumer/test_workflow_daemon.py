"""Workflows end to end: the daemon as a real process, the real broker, the sandbox over HTTP.

Provider events are published to the events topic the way the webhook intake does (key = session id,
value = the provider's JSON body). Checked: one session and at most one AML screening per workflow at the
provider (its ledger, per step key), one final decision per workflow on the results topic, duplicates
and out-of-order events changing nothing, a late ``data.updated`` becoming revision 2, and waiting
workflows holding no offsets.
"""

from __future__ import annotations

import signal
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from consumer.store import open_store
from consumer.workflows.model import WState
from consumer.workflows.store import open_workflow_store
from producer.envelope import Envelope
from tests.conftest import create_topic, random_topic_name
from tests.consumer.conftest import (
    Sandbox,
    backend_url,
    daemon_env,
    publish,
    read_results,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.workflow_e2e import (
    _ids,
    publish_requests,
    requests,
    rows,
    send_events,
    webhook,
    workflow_results,
)

pytestmark = pytest.mark.anyio


@pytest.fixture
def sb(didit: Sandbox) -> Sandbox:
    """Workflows talk to Didit: this module's sandbox is the ``didit`` one."""
    return didit


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
    async with backend_url(backend, tmp_path, "wf") as store_url:
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
    batch = requests(30, uuid.uuid4().hex[:8])
    events = await publish_requests(kafka_bootstrap, topic, batch)
    await publish(kafka_bootstrap, topic, batch[:5])  # five requests delivered twice
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events, provider="didit",
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
    values = await read_results(kafka_bootstrap, f"{topic}.results", "read_committed")
    results = workflow_results(values)
    # Revision 0 once per workflow: where the applicant verifies (the session's hosted URL).
    opened = workflow_results(values, sessions=True)
    assert Counter(r["message_id"] for r in opened) == Counter(set(_ids))
    assert all(r["session_url"].startswith("http") and r["revision"] == 0 for r in opened)
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
    assert [r["revision"] for r in story["outbox"]] == [0, 1, 2]
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
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events, provider="didit",
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


@pytest.mark.parametrize(
    ("point", "at"),
    [("workflow_after_step", 25), ("workflow_after_apply", 6), ("workflow_after_outbox", 24)],
)
async def test_sigkill_in_every_workflow_window(
    kafka_bootstrap: str, topic: str, group: str, sb: Sandbox, tmp_path: Path, point: str, at: int
) -> None:
    """SIGKILL at a workflow crash point (a step recorded / an event applied / the outbox written, each
    before the next move), restart: one session and one AML per approved workflow at the provider, exactly
    one visible final decision per workflow (transactional results).

    The kill also leaves other AML calls in flight. Didit has no idempotency key and does not dedupe
    checks: their take-over after the lease is safe only because the provider layer looks the earlier
    attempt up by ``metadata.idv_key`` before sending again (IDV_PROVIDER=didit, reconciliation)."""
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    events = await publish_requests(kafka_bootstrap, topic, requests(20, uuid.uuid4().hex[:8]))
    base = dict(events_topic=events, provider="didit", results_transactional=True, provider_timeout_s=2,
                lease_s=4)  # fmt: skip
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, **base)
    killed = start_daemon(daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, **base,
                                     fault_kill_at=f"{point}:{at}"), tmp_path / "killed.log")  # fmt: skip
    proc = None
    try:
        # The requests come first (20 session steps, 20 revision-0 outbox writes): every kill comes with
        # the events (the 25th step is an AML step, the 24th outbox write a final decision).
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
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    events = await publish_requests(kafka_bootstrap, topic, requests(10, uuid.uuid4().hex[:8]))
    env = daemon_env(kafka_bootstrap, topic, group, store_url, sb.url, events_topic=events, provider="didit",
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
