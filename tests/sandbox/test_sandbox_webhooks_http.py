"""``--profile didit``: the simulated applicant and the webhook sender, over real HTTP to an aiohttp
receiver that verifies every delivery with the independent check (``didit_webhook_check``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from sandbox import DiditConfig
from sandbox.testing import SandboxHarness
from tests.sandbox.didit_webhook_check import check_delivery

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

SECRET = "receiver-test-secret"


@dataclass
class Received:
    raw: bytes
    headers: dict[str, str]
    checks: dict[str, bool]
    at: float
    answered: int

    @property
    def body(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.raw)
        return data

    @property
    def genuine(self) -> bool:
        return self.checks["v2"] and self.checks["raw"] and self.checks["simple"] and self.checks["fresh"]


@dataclass
class Receiver:
    """Answers 401 to a delivery whose signatures or timestamp fail, else the next scripted status (200)."""

    url: str = ""
    received: list[Received] = field(default_factory=list)
    script: deque[int | float] = field(default_factory=deque)
    """Statuses to answer in order; a float is a delay in seconds before answering 200 (a timeout)."""

    async def handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        headers = dict(request.headers)
        checks = check_delivery(SECRET, raw, headers, now=time.time())
        status: int = 200
        if not (checks["v2"] or checks["raw"]) or not checks["fresh"]:
            status = 401
        elif self.script:
            item = self.script.popleft()
            if isinstance(item, float):
                await asyncio.sleep(item)
            else:
                status = item
        self.received.append(Received(raw, headers, checks, time.monotonic(), status))
        return web.Response(status=status)

    def genuine(self) -> list[Received]:
        return [r for r in self.received if r.genuine]

    def statuses(self) -> list[tuple[str, str]]:
        return [(r.body["webhook_type"], r.body["status"]) for r in self.genuine() if r.answered == 200]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    recv = Receiver()
    app = web.Application()
    app.router.add_post("/hooks/didit", recv.handle)
    async with TestServer(app, host="127.0.0.1") as server:
        recv.url = str(server.make_url("/hooks/didit"))
        yield recv


def webhook_config(receiver: Receiver, **settings: Any) -> DiditConfig:
    """The ``didit`` profile delivering to ``receiver``, signed with ``SECRET``."""
    return DiditConfig(webhook_url=receiver.url, webhook_secret=SECRET, **settings)


@pytest.fixture
async def didit(make_sandbox: MakeSandbox, receiver: Receiver) -> SandboxHarness:
    config = webhook_config(
        receiver, applicant_delay_s=0.2, webhook_backoff_s=0.05, webhook_timeout_s=1.0, seed=5
    )
    return await make_sandbox(profile="didit", didit=config)


async def create(sandbox: SandboxHarness, vendor: str, key: str, **extra: Any) -> str:
    body = {"workflow_id": "wf-1", "vendor_data": vendor, "metadata": {"idv_key": key}, **extra}
    response = await sandbox.client.post("/v3/session/", json=body)
    assert response.status_code == 201
    session_id: str = response.json()["session_id"]
    return session_id


async def settled_with(sandbox: SandboxHarness, vendor: str, status: str, **faults: Any) -> str:
    """Set the webhook ``faults``, create a session for ``vendor`` and :func:`settle` it in ``status``."""
    await sandbox.set_webhooks(faults=faults)
    session_id = await create(sandbox, vendor, "k")
    await settle(sandbox, session_id, status)
    return session_id


async def settle(sandbox: SandboxHarness, session_id: str, status: str, timeout: float = 5.0) -> None:
    """Wait until the session reached ``status`` and every webhook so far has its fate."""
    with anyio.fail_after(timeout):
        while True:
            decision = (await sandbox.client.get(f"/v3/session/{session_id}/decision/")).json()
            if decision["status"] == status:
                break
            await anyio.sleep(0.02)
        await sandbox.wait_webhooks_idle()


@pytest.mark.parametrize(
    ("token", "final"), [("", "Approved"), ("DECLINE", "Declined"), ("please review", "In Review")]
)
async def test_the_applicant_completes_a_session_and_each_transition_is_a_signed_webhook(
    didit: SandboxHarness, receiver: Receiver, token: str, final: str
) -> None:
    started = time.monotonic()
    session_id = await create(didit, f"subj {token}", "key-1")
    await settle(didit, session_id, final)
    assert time.monotonic() - started >= 0.2
    assert receiver.statuses() == [("status.updated", "In Progress"), ("status.updated", final)]
    assert all(r.genuine for r in receiver.received)
    first, last = receiver.received
    assert first.headers["User-Agent"].startswith("DiditWebhook/2.0")
    assert first.headers["Content-Type"] == "application/json"
    assert first.headers["X-Timestamp"] == str(first.body["timestamp"])
    assert "decision" not in first.body
    body = last.body
    assert body["session_id"] == session_id
    assert body["workflow_id"] == "wf-1"
    assert body["metadata"] == {"idv_key": "key-1"}
    assert isinstance(body["created_at"], int)
    assert body["decision"]["status"] == final
    assert body["decision"]["metadata"] == {"idv_key": "key-1"}
    assert body["decision"]["id_verifications"][0]["status"] == final
    # The raw body keeps whole-number floats as floats (only X-Signature-V2's canonical form shortens them).
    if final == "Approved":
        assert b'"score": 96.0' in last.raw
    sessions = await didit.sessions()
    assert [h["status"] for h in sessions[0]["history"]] == ["Not Started", "In Progress", final]


async def test_abandoned_sessions(make_sandbox: MakeSandbox, receiver: Receiver) -> None:
    config = webhook_config(receiver, applicant_delay_s=0.1, abandon_rate=1.0)
    sandbox = await make_sandbox(profile="didit", didit=config)
    session_id = await create(sandbox, "subj", "k")
    await settle(sandbox, session_id, "Abandoned")
    assert receiver.statuses() == [("status.updated", "In Progress"), ("status.updated", "Abandoned")]
    assert "decision" in receiver.received[-1].body
    # An abandoned session is finished: a new create makes a new session.
    assert await create(sandbox, "subj", "k2") != session_id


async def test_failed_deliveries_are_retried_with_backoff_until_a_2xx(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    await didit.set_applicant(delay_s=None)
    receiver.script.extend([500, 503, 404])
    session_id = await create(didit, "subj", "k")
    await didit.set_session_status(session_id, "In Progress")
    await didit.wait_webhooks_idle()
    await didit.set_session_status(session_id, "Approved")
    await didit.wait_webhooks_idle()
    first_event = [r for r in receiver.received if r.body["status"] == "In Progress"]
    assert [r.answered for r in first_event] == [500, 503, 404, 200]
    gaps = [b.at - a.at for a, b in zip(first_event, first_event[1:], strict=False)]
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.19  # 0.05 s doubled each time
    assert all(r.genuine for r in first_event)  # every attempt signed (afresh, with its own timestamp)
    events = (await didit.webhooks())["events"]
    assert [(e["status"], e["fate"], e["attempts"]) for e in events] == [
        ("In Progress", "delivered", 4),
        ("Approved", "delivered", 1),
    ]


async def test_retries_are_bounded_and_final_answers_are_not_retried(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    await didit.set_applicant(delay_s=None)
    await didit.set_webhooks(max_attempts=3)
    session_id = await create(didit, "subj", "k")
    receiver.script.extend([500, 500, 500])
    await didit.set_session_status(session_id, "In Progress")
    await didit.wait_webhooks_idle()
    receiver.script.extend([400])
    await didit.set_session_status(session_id, "Approved")
    await didit.wait_webhooks_idle()
    assert [r.answered for r in receiver.received] == [500, 500, 500, 400]
    events = (await didit.webhooks())["events"]
    assert [(e["fate"], e["attempts"]) for e in events] == [("failed", 3), ("failed", 1)]


async def test_a_timeout_is_retried(didit: SandboxHarness, receiver: Receiver) -> None:
    await didit.set_applicant(delay_s=None)
    await didit.set_webhooks(timeout_s=0.2)
    receiver.script.append(0.5)
    session_id = await create(didit, "subj", "k")
    await didit.set_session_status(session_id, "In Progress")
    with anyio.fail_after(5):
        await didit.wait_webhooks_idle()
    deliveries = (await didit.webhooks())["deliveries"]
    assert len(deliveries) == 2
    assert deliveries[0]["http_status"] is None
    assert deliveries[0]["error"] in ("ServerTimeoutError", "TimeoutError")
    assert (deliveries[1]["http_status"], deliveries[1]["error"]) == (200, None)
    assert (await didit.webhooks())["events"][0]["fate"] == "delivered"


async def test_duplicate_deliveries_are_the_same_bytes(didit: SandboxHarness, receiver: Receiver) -> None:
    await settled_with(didit, "subj", "Approved", duplicate_rate=1.0)
    assert len(receiver.received) == 4
    assert receiver.received[0].raw == receiver.received[1].raw
    assert receiver.received[0].headers["X-Signature"] == receiver.received[1].headers["X-Signature"]
    assert [d["kind"] for d in (await didit.webhooks())["deliveries"]] == ["genuine", "duplicate"] * 2


async def test_dropped_events_are_never_sent_and_polling_still_finds_the_decision(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    session_id = await settled_with(didit, "subj DECLINE", "Declined", drop_rate=1.0)
    assert receiver.received == []
    assert [e["fate"] for e in (await didit.webhooks())["events"]] == ["dropped", "dropped"]
    assert (await didit.client.get(f"/v3/session/{session_id}/decision/")).json()["status"] == "Declined"


async def test_reordered_events_arrive_after_later_ones(didit: SandboxHarness, receiver: Receiver) -> None:
    await settled_with(didit, "subj", "Approved", reorder_rate=1.0, reorder_hold_ms=300)
    assert receiver.statuses() == [("status.updated", "Approved"), ("status.updated", "In Progress")]
    assert all(r.genuine for r in receiver.received)


async def test_bad_signatures_come_first_and_the_genuine_delivery_follows(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    await settled_with(didit, "subj", "Approved", bad_signature_rate=1.0)
    assert [(r.answered, r.checks["raw"], r.checks["v2"], r.checks["simple"]) for r in receiver.received] == [
        (401, False, False, False),
        (200, True, True, True),
    ] * 2
    assert receiver.received[0].raw == receiver.received[1].raw  # the same body, forged signatures
    kinds = [(d["kind"], d["http_status"]) for d in (await didit.webhooks())["deliveries"]]
    assert kinds == [("forged", 401), ("genuine", 200)] * 2


async def test_delayed_events(didit: SandboxHarness, receiver: Receiver) -> None:
    await didit.set_applicant(delay_s=None)
    await didit.set_webhooks(faults={"delay_ms": 250})
    session_id = await create(didit, "subj", "k")
    started = time.monotonic()
    await didit.set_session_status(session_id, "In Progress")
    await didit.wait_webhooks_idle()
    assert receiver.received[0].at - started >= 0.25


async def test_manual_review_and_data_updated_after_the_decision(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    session_id = await create(didit, "subj review", "k")
    await settle(didit, session_id, "In Review")
    await didit.set_session_status(session_id, "Approved")
    updated = await didit.data_updated(session_id)
    assert updated["event_id"] == 4
    await didit.wait_webhooks_idle()
    assert receiver.statuses() == [
        ("status.updated", "In Progress"),
        ("status.updated", "In Review"),
        ("status.updated", "Approved"),
        ("data.updated", "Approved"),
    ]
    last = receiver.received[-1].body
    assert last["decision"]["status"] == "Approved"
    assert last["decision"]["id_verifications"][0]["status"] == "Approved"
    assert (await didit.client.get(f"/v3/session/{session_id}/decision/")).json()["status"] == "Approved"


async def test_a_status_changed_by_admin_stops_the_applicant(
    didit: SandboxHarness, receiver: Receiver
) -> None:
    session_id = await create(didit, "subj", "k")
    await didit.set_session_status(session_id, "Declined")
    await anyio.sleep(0.35)
    await didit.wait_webhooks_idle()
    assert receiver.statuses() == [("status.updated", "Declined")]


async def test_checks_and_sessions_without_a_url_send_nothing(
    make_sandbox: MakeSandbox, receiver: Receiver
) -> None:
    sandbox = await make_sandbox(profile="didit")
    session_id = await create(sandbox, "subj", "k")
    await sandbox.set_session_status(session_id, "Approved")
    assert (await sandbox.webhooks())["events"] == []
    await sandbox.set_webhooks(url=receiver.url, secret=SECRET)
    await sandbox.data_updated(session_id)
    aml = await sandbox.client.post("/v3/aml/", json={"full_name": "x", "vendor_data": "subj"})
    await sandbox.set_session_status(aml.json()["request_id"], "Declined")  # a saved check: no webhook
    await sandbox.wait_webhooks_idle()
    assert receiver.statuses() == [("data.updated", "Approved")]


@pytest.mark.parametrize(
    "changes",
    [
        {"url": "ftp://x"},
        {"url": "http://x", "secret": ""},
        {"max_attempts": 0},
        {"timeout_s": 0},
        {"faults": {"drop_rate": 2}},
        {"faults": {"nope": 1}},
        {"what": 1},
    ],
)
async def test_invalid_webhook_settings_are_400(didit: SandboxHarness, changes: dict[str, Any]) -> None:
    before = await didit.webhooks()
    response = await didit.client.post("/_admin/webhooks", json=changes)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_settings"
    after = await didit.webhooks()
    assert {k: after[k] for k in ("url", "max_attempts", "timeout_s", "faults")} == {
        k: before[k] for k in ("url", "max_attempts", "timeout_s", "faults")
    }


@pytest.mark.parametrize("changes", [{"delay_s": -1}, {"abandon_rate": 1.5}, {"jitter_s": None}, {"x": 1}])
async def test_invalid_applicant_settings_are_400(didit: SandboxHarness, changes: dict[str, Any]) -> None:
    response = await didit.client.post("/_admin/applicant", json=changes)
    assert response.status_code == 400


async def test_reset_cancels_pending_work(didit: SandboxHarness, receiver: Receiver) -> None:
    await create(didit, "subj", "k")
    await didit.client.post("/_admin/reset")
    await anyio.sleep(0.35)
    assert receiver.received == []
    assert (await didit.webhooks())["events"] == []


async def test_many_sessions_with_every_fault_deliver_every_undropped_event(
    make_sandbox: MakeSandbox, receiver: Receiver
) -> None:
    """60 sessions; 20 % of answers fail; duplicates, reordering, forged copies: every event not dropped
    arrives genuinely at least once, and only the dropped ones are missing."""
    config = webhook_config(
        receiver,
        applicant_delay_s=0.1,
        applicant_jitter_s=0.1,
        webhook_backoff_s=0.02,
        webhook_max_attempts=6,
        seed=3,
    )
    sandbox = await make_sandbox(profile="didit", didit=config)
    await sandbox.set_webhooks(
        faults={
            "drop_rate": 0.1,
            "duplicate_rate": 0.2,
            "reorder_rate": 0.2,
            "bad_signature_rate": 0.1,
            "reorder_hold_ms": 100,
            "seed": 9,
        }
    )
    receiver.script.extend([500, 200, 200, 200, 503] * 30)
    ids = [await create(sandbox, f"subj-{n} {'DECLINE' if n % 4 == 0 else ''}", f"k{n}") for n in range(60)]
    with anyio.fail_after(20):
        while any(s["status"] in ("Not Started", "In Progress") for s in await sandbox.sessions()):
            await anyio.sleep(0.05)
        await sandbox.wait_webhooks_idle()
    events = (await sandbox.webhooks())["events"]
    assert len(events) == 120
    assert {e["fate"] for e in events} <= {"delivered", "dropped"}
    got = {(r.body["session_id"], r.body["status"]) for r in receiver.genuine() if r.answered == 200}
    expected = {(e["session_id"], e["status"]) for e in events if e["fate"] == "delivered"}
    assert got == expected
    assert {sid for sid, _ in expected} <= set(ids)
    assert any(e["fate"] == "dropped" for e in events)
    assert any(r.answered == 401 for r in receiver.received)
