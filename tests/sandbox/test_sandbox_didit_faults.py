"""``--profile didit``: injected faults over real HTTP, above all "act, then drop the connection"."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio


def session_body(subject: str, key: str) -> dict[str, object]:
    return {"workflow_id": "wf-1", "vendor_data": subject, "metadata": {"idv_key": key}}


async def test_drop_after_create_then_the_retry_gets_the_same_session(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"script": ("drop",)})
    with pytest.raises(httpx.RemoteProtocolError):
        await sandbox.client.post("/v3/session/", json=session_body("subj-1", "key-1"))
    # The session exists although the client never heard of it...
    listed = (await sandbox.client.get("/v3/sessions/", params={"vendor_data": "subj-1"})).json()
    assert listed["count"] == 1
    session_id = listed["results"][0]["session_id"]
    decision = (await sandbox.client.get(f"/v3/session/{session_id}/decision/")).json()
    assert decision["metadata"] == {"idv_key": "key-1"}
    # ...and a blind retry is answered with it (Didit's own dedupe), with no second side effect.
    retry = await sandbox.client.post("/v3/session/", json=session_body("subj-1", "key-1"))
    assert (retry.status_code, retry.json()["session_id"]) == (200, session_id)
    record = await sandbox.key("key-1")
    assert record["side_effects"] == 1
    assert [(a["status"], a["delivered"], a["fault"]) for a in record["attempts"]] == [
        (201, False, "script:drop"),
        (200, True, None),
    ]
    assert (await sandbox.stats())["dropped_connections"] == 1


async def test_drop_after_a_check_leaves_a_findable_check_and_a_blind_retry_pays_twice(
    make_sandbox: MakeSandbox,
) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"script": ("drop",)})
    fields = {"vendor_data": "subj-2", "metadata": json.dumps({"idv_key": "key-2"})}
    files = {"user_image": ("me.jpg", b"\xff\xd8" + b"x" * 10_000, "image/jpeg")}
    with pytest.raises(httpx.RemoteProtocolError):
        await sandbox.client.post("/v3/passive-liveness/", data=fields, files=files)
    listed = (await sandbox.client.get("/v3/sessions/", params={"vendor_data": "subj-2"})).json()
    assert listed["count"] == 1
    found = (await sandbox.client.get(f"/v3/session/{listed['results'][0]['session_id']}/decision/")).json()
    assert found["metadata"]["idv_key"] == "key-2"
    assert found["liveness_checks"][0]["status"] == "Approved"
    await sandbox.client.post("/v3/passive-liveness/", data=fields, files=files)
    assert (await sandbox.effects())["per_idv_key"] == {"key-2": 2}


@pytest.mark.parametrize("item", ["500", "503", "429:3", "drop_before"])
async def test_gateway_faults_do_nothing(make_sandbox: MakeSandbox, item: str) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"script": (item,)})
    if item == "drop_before":
        with pytest.raises(httpx.RemoteProtocolError):
            await sandbox.client.post("/v3/session/", json=session_body("subj-3", "key-3"))
    else:
        response = await sandbox.client.post("/v3/session/", json=session_body("subj-3", "key-3"))
        assert response.status_code == int(item.partition(":")[0])
        if item.startswith("429"):
            assert response.headers["retry-after"] == "3"
    assert await sandbox.sessions() == []
    assert (await sandbox.effects())["count"] == 0
    record = await sandbox.key("key-3")
    assert record["side_effects"] == 0
    retry = await sandbox.client.post("/v3/session/", json=session_body("subj-3", "key-3"))
    assert retry.status_code == 201


async def test_rate_limit_and_out_of_credit(make_sandbox: MakeSandbox, api_key: str) -> None:
    sandbox = await make_sandbox(profile="didit", rate_limit_per_min=1, out_of_credit_keys=("broke",))
    assert (await sandbox.client.post("/v3/session/", json=session_body("s", "k1"))).status_code == 201
    limited = await sandbox.client.post("/v3/session/", json=session_body("s2", "k2"))
    assert limited.status_code == 429
    assert "retry-after" in limited.headers
    broke = await sandbox.client.post(
        "/v3/session/", json=session_body("s3", "k3"), headers={"x-api-key": "broke"}
    )
    assert broke.status_code == 403
    assert broke.json() == {"error": "insufficient_credits"}
    assert (await sandbox.effects())["count"] == 1


async def test_reads_take_faults_only_when_asked(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"script": ("500",)})
    assert (await sandbox.client.get("/v3/sessions/")).status_code == 200  # not consumed by a read
    assert (await sandbox.client.post("/v3/session/", json=session_body("s", "k"))).status_code == 500
    await sandbox.set_faults(read_faults=True, script=["503", "drop"])
    assert (await sandbox.client.get("/v3/sessions/")).status_code == 503
    with pytest.raises(httpx.RemoteProtocolError):
        await sandbox.client.get("/v3/sessions/")
    assert (await sandbox.client.get("/v3/sessions/")).status_code == 200


async def test_delay_holds_the_request(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"script": ("delay:150",)})
    started = anyio.current_time()
    response = await sandbox.client.post("/v3/session/", json=session_body("s", "k"))
    assert response.status_code == 201
    assert anyio.current_time() - started >= 0.15


async def test_many_creates_with_duplicates_and_random_drops_make_one_session_per_subject(
    make_sandbox: MakeSandbox,
) -> None:
    """300 requests, each subject sent 1-3 times, 20 % dropped after the effect, every failure retried."""
    sandbox = await make_sandbox(
        profile="didit", faults={"drop_after_effect_rate": 0.2, "error_rate": 0.05, "seed": 11}
    )
    subjects = [f"subj-{n}" for n in range(150)]
    requests = [s for n, s in enumerate(subjects) for _ in range(1 + n % 3)]
    answers: dict[str, set[str]] = {}

    async def send(subject: str) -> None:
        while True:
            try:
                response = await sandbox.client.post(
                    "/v3/session/", json=session_body(subject, f"key-{subject}")
                )
            except httpx.RemoteProtocolError:
                continue
            if response.status_code in (200, 201):
                answers.setdefault(subject, set()).add(response.json()["session_id"])
                return

    limiter = anyio.CapacityLimiter(20)

    async def bounded(subject: str) -> None:
        async with limiter:
            await send(subject)

    async with anyio.create_task_group() as tg:
        for subject in requests:
            tg.start_soon(bounded, subject)
    per_key = (await sandbox.effects())["per_idv_key"]
    assert per_key == {f"key-{s}": 1 for s in subjects}
    assert all(len(ids) == 1 for ids in answers.values())
    stats = await sandbox.stats()
    assert stats["dropped_connections"] > 20
    assert stats["faults"]["random:500"] > 0
