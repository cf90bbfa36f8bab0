"""``--profile didit``: sessions over real HTTP — create (dedupe by vendor_data), list, decision, delete."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import pytest

from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

CREATED_FIELDS = {
    "session_id",
    "session_number",
    "session_token",
    "url",
    "vendor_data",
    "metadata",
    "status",
    "workflow_id",
    "workflow_version",
    "callback",
}


@pytest.fixture
async def didit(make_sandbox: MakeSandbox) -> SandboxHarness:
    return await make_sandbox(profile="didit")


async def create(
    sandbox: SandboxHarness, vendor: str | None, idv_key: str, workflow: str = "wf-1"
) -> dict[str, Any]:
    body: dict[str, Any] = {"workflow_id": workflow, "metadata": {"idv_key": idv_key, "note": "x"}}
    if vendor is not None:
        body["vendor_data"] = vendor
    response = await sandbox.client.post("/v3/session/", json=body)
    assert response.status_code in (200, 201), response.text
    data: dict[str, Any] = response.json()
    data["_status_code"] = response.status_code
    return data


async def test_create_ignores_idempotency_key_and_has_the_documented_shape(didit: SandboxHarness) -> None:
    # No Idempotency-Key at all: the ietf profile would answer 400.
    response = await didit.client.post(
        "/v3/session/",
        json={
            "workflow_id": "wf-1",
            "vendor_data": "subj-1",
            "callback": "https://cb.invalid/x",
            "metadata": {"idv_key": "k1"},
        },
    )
    assert response.status_code == 201
    body = response.json()
    assert set(body) == CREATED_FIELDS
    uuid.UUID(body["session_id"])
    assert body["status"] == "Not Started"
    assert body["vendor_data"] == "subj-1"
    assert body["metadata"] == {"idv_key": "k1"}
    assert body["callback"] == "https://cb.invalid/x"
    assert body["url"].startswith(f"{didit.url}/session/")
    # The same Idempotency-Key on a create for another subject does not replay: it creates.
    other = await didit.post("/v3/session/", {"workflow_id": "wf-1", "vendor_data": "subj-2"}, "same-key")
    again = await didit.post("/v3/session/", {"workflow_id": "wf-1", "vendor_data": "subj-3"}, "same-key")
    assert other.status_code == again.status_code == 201
    assert other.json()["session_id"] != again.json()["session_id"]
    assert "idempotent-replayed" not in again.headers


async def test_unfinished_session_for_the_same_subject_is_returned_without_a_side_effect(
    didit: SandboxHarness,
) -> None:
    first = await create(didit, "subj-1", "key-a")
    second = await create(didit, "subj-1", "key-b")
    assert first["_status_code"] == 201
    assert second["_status_code"] == 200
    assert second["session_id"] == first["session_id"]
    assert second["metadata"] == {"idv_key": "key-a", "note": "x"}  # its own metadata, not the caller's
    other_workflow = await create(didit, "subj-1", "key-c", workflow="wf-2")
    other_subject = await create(didit, "subj-2", "key-d")
    assert other_workflow["_status_code"] == other_subject["_status_code"] == 201
    assert len({first["session_id"], other_workflow["session_id"], other_subject["session_id"]}) == 3

    effects = await didit.effects()
    assert effects["profile"] == "didit"
    assert effects["per_idv_key"] == {"key-a": 1, "key-c": 1, "key-d": 1}
    assert [(e["operation"], e["vendor_data"]) for e in effects["effects"]] == [
        ("create_session", "subj-1"),
        ("create_session", "subj-1"),
        ("create_session", "subj-2"),
    ]
    # The ledger files attempts under metadata.idv_key: key-b's attempt is there, with no side effect.
    ledger = await didit.ledger()
    assert ledger["keys"]["key-b"]["side_effects"] == 0
    attempt = ledger["keys"]["key-b"]["attempts"][0]
    assert attempt["operation"] == "create_session"
    assert attempt["reference"] == first["session_id"]
    assert attempt["status"] == 200
    assert ledger["keys"]["key-a"]["side_effects"] == 1


@pytest.mark.parametrize("status", ["Approved", "Declined", "In Review", "Abandoned", "Expired"])
async def test_a_finished_session_is_not_returned(didit: SandboxHarness, status: str) -> None:
    first = await create(didit, "subj-1", "key-a")
    await didit.set_session_status(first["session_id"], status)
    second = await create(didit, "subj-1", "key-b")
    assert second["_status_code"] == 201
    assert second["session_id"] != first["session_id"]


@pytest.mark.parametrize("status", ["In Progress", "Resubmitted", "Awaiting User"])
async def test_every_unfinished_status_is_returned(didit: SandboxHarness, status: str) -> None:
    first = await create(didit, "subj-1", "key-a")
    await didit.set_session_status(first["session_id"], status)
    second = await create(didit, "subj-1", "key-b")
    assert (second["_status_code"], second["session_id"], second["status"]) == (
        200,
        first["session_id"],
        status,
    )


async def test_without_vendor_data_every_create_creates(didit: SandboxHarness) -> None:
    first = await create(didit, None, "k1")
    second = await create(didit, None, "k2")
    assert first["_status_code"] == second["_status_code"] == 201
    assert first["session_id"] != second["session_id"]


async def test_concurrent_creates_for_one_subject_create_one_session(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(profile="didit", faults={"latency_ms": 30})
    results: list[dict[str, Any]] = []

    async def one(n: int) -> None:
        results.append(await create(sandbox, "subj-c", f"key-{n}"))

    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(one, n)
    assert sorted(r["_status_code"] for r in results) == [200] * 19 + [201]
    assert len({r["session_id"] for r in results}) == 1
    assert (await sandbox.effects())["count"] == 1


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        ({}, "workflow_id"),
        ({"workflow_id": 7}, "workflow_id"),
        ({"workflow_id": "wf", "vendor_data": 1}, "vendor_data"),
        ({"workflow_id": "wf", "metadata": "nope"}, "metadata"),
        ([1], "body"),
    ],
)
async def test_create_validation_is_400_without_side_effect(
    didit: SandboxHarness, body: object, detail: str
) -> None:
    response = await didit.client.post("/v3/session/", json=body)
    assert response.status_code == 400
    assert response.json() == {"error": "validation_error", "detail": detail}
    assert (await didit.effects())["count"] == 0


async def test_auth_comes_first_and_is_filed_under_idv_key(didit: SandboxHarness) -> None:
    response = await didit.client.post(
        "/v3/session/",
        json={"workflow_id": "wf", "metadata": {"idv_key": "k-auth"}},
        headers={"x-api-key": "wrong"},
    )
    assert response.status_code == 401
    record = await didit.key("k-auth")
    assert record["side_effects"] == 0
    assert record["attempts"][0]["status"] == 401
    assert (await didit.effects())["count"] == 0


async def test_list_filters_newest_first_and_pages(didit: SandboxHarness) -> None:
    ids = [
        (await create(didit, f"subj-{n % 2}", f"k{n}", workflow=f"wf-{n}"))["session_id"] for n in range(5)
    ]
    await didit.set_session_status(ids[4], "Approved")
    listed = await didit.client.get("/v3/sessions/", params={"vendor_data": "subj-0"})
    assert listed.status_code == 200
    body = listed.json()
    assert body["count"] == 3
    assert [r["session_id"] for r in body["results"]] == [ids[4], ids[2], ids[0]]
    row = body["results"][0]
    assert set(row) == {
        "session_id",
        "session_kind",
        "session_number",
        "status",
        "vendor_data",
        "workflow_id",
        "created_at",
    }
    assert row["session_kind"] == "user"
    assert row["status"] == "Approved"
    assert row["created_at"].endswith("Z")
    assert "metadata" not in row

    by_workflow = (
        await didit.client.get("/v3/sessions/", params={"vendor_data": "subj-0", "workflow_id": "wf-2"})
    ).json()
    assert [r["session_id"] for r in by_workflow["results"]] == [ids[2]]
    by_status = (await didit.client.get("/v3/sessions/", params={"status": "Approved"})).json()
    assert [r["session_id"] for r in by_status["results"]] == [ids[4]]

    page1 = (await didit.client.get("/v3/sessions/", params={"limit": 2})).json()
    assert page1["count"] == 5
    assert [r["session_id"] for r in page1["results"]] == [ids[4], ids[3]]
    assert page1["previous"] is None
    page2 = (await didit.client.get(page1["next"])).json()
    assert [r["session_id"] for r in page2["results"]] == [ids[2], ids[1]]
    page3 = (await didit.client.get(page2["next"])).json()
    assert [r["session_id"] for r in page3["results"]] == [ids[0]]
    assert page3["next"] is None
    assert page3["previous"] is not None

    for bad in ({"limit": "0"}, {"limit": "x"}, {"offset": "-1"}, {"status": "Done"}):
        response = await didit.client.get("/v3/sessions/", params=bad)
        assert response.status_code == 400, bad
    # Reads are not side effects.
    assert (await didit.effects())["count"] == 5


async def test_list_without_trailing_slash_is_301(didit: SandboxHarness) -> None:
    response = await didit.client.get("/v3/sessions", params={"vendor_data": "s"})
    assert response.status_code == 301
    assert response.headers["location"] == "/v3/sessions/?vendor_data=s"


async def test_decision_serves_metadata_and_404s_unknown_ids(didit: SandboxHarness) -> None:
    session = await create(didit, "subj-1", "key-a")
    response = await didit.client.get(f"/v3/session/{session['session_id']}/decision/")
    assert response.status_code == 200
    body = response.json()
    assert body["session_id"] == session["session_id"]
    assert body["metadata"] == {"idv_key": "key-a", "note": "x"}
    assert body["status"] == "Not Started"
    assert body["vendor_data"] == "subj-1"
    assert body["workflow_id"] == "wf-1"
    assert body["features"] == ["ID_VERIFICATION", "LIVENESS", "FACE_MATCH"]
    assert body["id_verifications"] is None
    assert body["aml_screenings"] is None
    await didit.set_session_status(session["session_id"], "Declined")
    decided = (await didit.client.get(f"/v3/session/{session['session_id']}/decision/")).json()
    assert decided["status"] == "Declined"
    assert decided["id_verifications"][0]["status"] == "Declined"

    missing = await didit.client.get(f"/v3/session/{uuid.uuid4()}/decision/")
    assert missing.status_code == 404
    assert missing.json() == {"error": "session_not_found"}


async def test_delete(didit: SandboxHarness) -> None:
    session = await create(didit, "subj-1", "key-a")
    path = f"/v3/session/{session['session_id']}"
    deleted = await didit.client.delete(f"{path}/delete/")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await didit.client.get(f"{path}/decision/")).status_code == 404
    assert (await didit.client.delete(f"{path}/delete/")).status_code == 404
    # With the unfinished session gone, a create for the subject creates again.
    assert (await create(didit, "subj-1", "key-b"))["_status_code"] == 201


async def test_wrong_methods_and_unknown_paths(didit: SandboxHarness) -> None:
    assert (await didit.client.get("/v3/session/")).status_code == 405
    assert (await didit.client.post("/v3/sessions/")).status_code == 405
    assert (await didit.client.post(f"/v3/session/{uuid.uuid4()}/decision/")).status_code == 405
    assert (await didit.client.get("/v3/nothing/")).status_code == 404


async def test_reset_clears_sessions_and_effects(didit: SandboxHarness) -> None:
    await create(didit, "subj-1", "key-a")
    await didit.client.post("/_admin/reset")
    assert await didit.sessions() == []
    assert (await didit.effects())["count"] == 0
    assert (await create(didit, "subj-1", "key-b"))["_status_code"] == 201


async def test_ietf_profile_is_unchanged_and_records_effects(sandbox: SandboxHarness) -> None:
    response = await sandbox.post(
        "/v3/session/", {"workflow_id": "wf", "vendor_data": "s", "metadata": {"idv_key": "m"}}, "k"
    )
    assert response.status_code == 201
    assert "decision_hint" in response.json()
    missing_key = await sandbox.client.post("/v3/session/", json={"workflow_id": "wf"})
    assert missing_key.status_code == 400
    ledger = await sandbox.ledger()
    assert set(ledger) == {"keys", "totals"}
    effects = await sandbox.effects()
    assert effects["profile"] == "ietf"
    assert [(e["profile"], e["operation"], e["vendor_data"], e["idv_key"]) for e in effects["effects"]] == [
        ("ietf", "create_session", "s", "m")
    ]
    assert (await sandbox.client.get("/_admin/sessions")).status_code == 404
