"""Workflows against the sandbox's ``didit`` profile: polling when no webhook comes, signed webhooks
through ``idv-webhooks`` over HTTP, and the simulated applicant with a faulty webhook sender (drops,
duplicates, reordering, forged copies). The daemon, the intake and the broker are real."""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import pytest

from consumer.workflows.model import WState
from producer.envelope import Envelope
from tests.consumer.conftest import (
    Sandbox,
    read_results,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.workflow_e2e import (
    _ids,
    intake_running,
    publish_requests,
    requests,
    rows,
    workflow_daemon,
    workflow_results,
)

pytestmark = pytest.mark.anyio


async def test_dropped_webhooks_are_completed_by_polling_the_didit_sandbox(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    """No webhook at all: the applicant finishes at the provider, the poller reads the decision endpoint,
    abandoned sessions end at their deadline; one session and one AML per approved workflow (the
    provider's effects per ``metadata.idv_key``)."""
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    events = await publish_requests(kafka_bootstrap, topic, requests(12, uuid.uuid4().hex[:8]))
    with workflow_daemon(kafka_bootstrap, topic, group, store_url, didit.url, tmp_path / "daemon.log",
                         events=events, workflow_scan_interval_s=0.3, workflow_poll_after_s=0.5,
                         workflow_poll_max_s=1, workflow_abandon_after_s=20) as (proc, _):  # fmt: skip
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


async def test_signed_webhooks_through_the_intake_decide_workflows(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    """The whole path over HTTP: the daemon creates sessions at the didit sandbox, the applicant finishes
    them there, Didit's signed webhooks (some twice, one with a bad signature) go to ``idv-webhooks``,
    which publishes them to the events topic the daemon consumes. Polling is far off: webhooks decide."""
    import httpx

    from tests.consumer.test_webhooks_intake import delivery
    from tests.consumer.test_webhooks_service import wait_ready

    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    events = await publish_requests(kafka_bootstrap, topic, requests(8, uuid.uuid4().hex[:8]))
    with (
        workflow_daemon(
            kafka_bootstrap, topic, group, store_url, didit.url, tmp_path / "daemon.log", events=events
        ) as (proc, _),
        intake_running(kafka_bootstrap, events) as (intake, port),
    ):
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

    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    prefix = uuid.uuid4().hex[:8]
    batch = [
        Envelope(f"{prefix}-{i}", "kyc_workflow", f"applicant-{'DECLINE-' if i % 3 == 0 else ''}{prefix}-{i}",
                 {"workflow_id": "wf-kyc"})
        for i in range(60)
    ]  # fmt: skip
    events = await publish_requests(kafka_bootstrap, topic, batch)  # nothing reads them before the daemon
    with intake_running(kafka_bootstrap, events) as (_, port):
        didit.applicant(delay_s=1.0, jitter_s=1.0, abandon_rate=0.1, seed=7)
        faults = {"drop_rate": 0.2, "duplicate_rate": 0.3, "reorder_rate": 0.3, "bad_signature_rate": 0.1,
                  "reorder_hold_ms": 1000, "seed": 7}  # fmt: skip
        didit.webhooks(
            url=f"http://127.0.0.1:{port}/webhooks/didit", secret=SECRET, backoff_s=0.2, faults=faults
        )
        with workflow_daemon(kafka_bootstrap, topic, group, store_url, didit.url, tmp_path / "daemon.log",
                             events=events, workflow_scan_interval_s=0.5, workflow_poll_after_s=4,
                             workflow_poll_max_s=4, workflow_abandon_after_s=120) as (proc, _):  # fmt: skip

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
