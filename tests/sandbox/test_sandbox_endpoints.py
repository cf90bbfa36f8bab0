"""Business endpoints: response shapes, deterministic decisions, validation, routing."""

from __future__ import annotations

import uuid

import pytest

from sandbox.testing import SandboxHarness

pytestmark = pytest.mark.anyio

ID_BODY = {"document_type": "passport", "front_image": "aGVsbG8=", "document_number": "X1234567"}


@pytest.mark.parametrize(
    ("token", "decision"),
    [("", "Approved"), ("please DECLINE", "Declined"), ("needs review", "In Review")],
)
async def test_decisions_per_endpoint(sandbox: SandboxHarness, token: str, decision: str) -> None:
    session = await sandbox.post("/v3/session/", {"workflow_id": "wf", "vendor_data": f"user-1 {token}"})
    assert session.status_code == 201
    assert session.json()["decision_hint"] == decision

    idv = await sandbox.post("/v3/id-verification/", {**ID_BODY, "document_type": f"passport {token}"})
    assert idv.status_code == 200
    assert idv.json()["id_verification"]["status"] == decision
    assert bool(idv.json()["id_verification"]["warnings"]) == (decision != "Approved")

    aml = await sandbox.post("/v3/aml/", {"full_name": f"Ada {token}"})
    assert aml.status_code == 200
    assert aml.json()["aml"]["status"] == decision
    assert (aml.json()["aml"]["total_hits"] > 0) == (decision != "Approved")


async def test_session_shape(sandbox: SandboxHarness) -> None:
    first = (await sandbox.post("/v3/session/", {"workflow_id": "wf-9", "vendor_data": "user-42"})).json()
    second = (await sandbox.post("/v3/session/", {"workflow_id": "wf-9"})).json()
    assert set(first) >= {"session_id", "session_number", "workflow_id", "status", "url", "vendor_data"}
    uuid.UUID(first["session_id"])
    assert first["workflow_id"] == "wf-9"
    assert first["status"] == "Not Started"
    assert first["vendor_data"] == "user-42"
    assert first["url"] == f"{sandbox.url}/session/{first['session_id']}"
    assert second["vendor_data"] is None
    assert second["session_number"] == first["session_number"] + 1
    assert second["session_id"] != first["session_id"]


async def test_id_verification_never_echoes_images_or_numbers(sandbox: SandboxHarness) -> None:
    response = await sandbox.post("/v3/id-verification/", ID_BODY)
    body = response.json()
    uuid.UUID(body["request_id"])
    assert body["id_verification"]["document_type"] == "passport"
    assert b"aGVsbG8=" not in response.content
    assert b"X1234567" not in response.content


async def test_aml_never_echoes_names(sandbox: SandboxHarness) -> None:
    response = await sandbox.post("/v3/aml/", {"full_name": "Grace Hopper", "date_of_birth": "1906-12-09"})
    assert response.status_code == 200
    body = response.json()
    assert set(body["aml"]) == {"status", "total_hits", "score"}
    assert isinstance(body["aml"]["score"], float)
    assert b"Grace" not in response.content
    assert b"1906" not in response.content


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/v3/session/", {}, "workflow_id"),
        ("/v3/session/", {"workflow_id": 5}, "workflow_id"),
        ("/v3/id-verification/", {"front_image": "x"}, "document_type"),
        ("/v3/id-verification/", {"document_type": "passport", "front_image": None}, "front_image"),
        ("/v3/aml/", {"full_name": ["a"]}, "full_name"),
        ("/v3/aml/", ["not", "an", "object"], "body"),
        ("/v3/aml/", "text", "body"),
    ],
)
async def test_validation_errors(sandbox: SandboxHarness, path: str, body: object, detail: str) -> None:
    response = await sandbox.post(path, body)
    assert response.status_code == 422
    assert response.json() == {"error": "validation_error", "detail": detail}
    stats = await sandbox.stats()
    assert stats["side_effects"] == 0
    assert stats["validation_422"] == 1


async def test_invalid_json_is_a_validation_error(sandbox: SandboxHarness) -> None:
    response = await sandbox.post("/v3/aml/", None, raw=b"{not json")
    assert response.status_code == 422
    assert response.json() == {"error": "validation_error", "detail": "body"}


async def test_unknown_path_and_wrong_method(sandbox: SandboxHarness) -> None:
    assert (await sandbox.client.post("/v3/unknown/", json={})).status_code == 404
    assert (await sandbox.client.get("/")).status_code == 404
    response = await sandbox.client.get("/v3/session/")
    assert response.status_code == 405
    assert response.headers["allow"] == "POST"
    assert (await sandbox.client.post("/healthz")).status_code == 405
    stats = await sandbox.stats()
    assert stats["requests"] == 0
