"""``ietf`` profile: passive liveness and face match over real HTTP, under the same Idempotency-Key rules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

LIVENESS = {"user_image": "local:sha256-aa", "vendor_data": "subj-1", "metadata": {"idv_key": "key-1"}}
FACE_MATCH = {"user_image": "local:sha256-aa", "ref_image": "local:sha256-bb", "vendor_data": "subj-1"}
BODIES = {"/v3/passive-liveness/": LIVENESS, "/v3/face-match/": FACE_MATCH}
# path, a valid body, the answer's field, the ledger's operation
CHECKS = [
    pytest.param("/v3/passive-liveness/", LIVENESS, "liveness", "passive_liveness", id="passive-liveness"),
    pytest.param("/v3/face-match/", FACE_MATCH, "face_match", "face_match", id="face-match"),
]


@pytest.mark.parametrize(("path", "body", "field", "operation"), CHECKS)
async def test_a_check_is_one_side_effect_and_its_retry_a_byte_identical_replay(
    sandbox: SandboxHarness, path: str, body: dict[str, Any], field: str, operation: str
) -> None:
    first = await sandbox.post(path, body, "check-1")
    assert first.status_code == 200
    answer = first.json()
    assert set(answer) == {"request_id", field}
    assert answer[field] == {"status": "Approved", "score": 96.0}
    assert b"sha256-aa" not in first.content
    again = await sandbox.post(path, body, "check-1")
    assert again.status_code == 200
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    record = await sandbox.key("check-1")
    assert record["side_effects"] == 1
    assert [a["replayed"] for a in record["attempts"]] == [False, True]
    (effect,) = (await sandbox.effects(operation=operation))["effects"]
    assert effect["profile"] == "ietf"
    assert effect["reference"] == answer["request_id"]
    assert effect["vendor_data"] == "subj-1"


async def test_the_outcome_follows_the_input(sandbox: SandboxHarness) -> None:
    declined = await sandbox.post("/v3/face-match/", {**FACE_MATCH, "vendor_data": "subj DECLINE"})
    assert declined.json()["face_match"] == {"status": "Declined", "score": 12.25}
    review = await sandbox.post("/v3/passive-liveness/", {**LIVENESS, "vendor_data": "please REVIEW"})
    assert review.json()["liveness"] == {"status": "In Review", "score": 61.5}
    effects = await sandbox.effects()
    assert effects["per_idv_key"] == {"key-1": 1}
    assert [e["operation"] for e in effects["effects"]] == ["face_match", "passive_liveness"]


@pytest.mark.parametrize(("path", "body", "field", "operation"), CHECKS)
async def test_missing_key_and_key_reuse(
    sandbox: SandboxHarness, path: str, body: dict[str, Any], field: str, operation: str
) -> None:
    missing = await sandbox.client.post(path, json=body)
    assert missing.status_code == 400
    assert missing.json() == {"error": "idempotency_key_missing"}
    assert (await sandbox.post(path, body, "reused")).status_code == 200
    reused = await sandbox.post(path, {**body, "vendor_data": "subj-2"}, "reused")
    assert reused.status_code == 422
    assert reused.json() == {"error": "idempotency_key_reused"}
    # A key used for one check is not free for the other check either.
    ((other, other_body),) = [(p, b) for p, b in BODIES.items() if p != path]
    assert (await sandbox.post(other, other_body, "reused")).status_code == 422
    assert (await sandbox.key("reused"))["side_effects"] == 1
    assert len((await sandbox.effects(operation=operation))["effects"]) == 1


@pytest.mark.parametrize(
    ("path", "body", "detail"),
    [
        ("/v3/passive-liveness/", {"vendor_data": "s"}, "user_image"),
        ("/v3/face-match/", {"user_image": "local:a"}, "ref_image"),
        ("/v3/face-match/", {"ref_image": "local:b"}, "user_image"),
    ],
)
async def test_a_validation_error_is_stored_and_replayed(
    sandbox: SandboxHarness, path: str, body: dict[str, Any], detail: str
) -> None:
    first = await sandbox.post(path, body, "bad")
    assert first.status_code == 422
    assert first.json() == {"error": "validation_error", "detail": detail}
    again = await sandbox.post(path, body, "bad")
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    assert (await sandbox.key("bad"))["side_effects"] == 0
    assert (await sandbox.effects())["count"] == 0


@pytest.mark.parametrize(("path", "body", "field", "operation"), CHECKS)
async def test_a_concurrent_retry_is_409_and_a_dropped_answer_is_replayed(
    make_sandbox: MakeSandbox, path: str, body: dict[str, Any], field: str, operation: str
) -> None:
    sandbox = await make_sandbox(faults={"latency_ms": 600})
    async with sandbox.in_flight(path, body, "slow") as results:
        second = await sandbox.post(path, body, "slow")
        assert second.status_code == 409
        assert second.json() == {"error": "idempotency_request_in_flight"}
    assert results["response"].status_code == 200

    await sandbox.set_faults(latency_ms=0, script=["drop"])
    with pytest.raises(httpx.TransportError):  # the connection closes without an answer
        await sandbox.post(path, body, "dropped")
    retry = await sandbox.post(path, body, "dropped")
    assert retry.status_code == 200
    assert retry.headers["idempotent-replayed"] == "true"
    record = await sandbox.key("dropped")
    assert record["side_effects"] == 1
    assert [a["delivered"] for a in record["attempts"]] == [False, True]
    assert len((await sandbox.effects(operation=operation))["effects"]) == 2
