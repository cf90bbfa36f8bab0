"""The request pipeline over real HTTP: auth, rate limit and idempotency, read back from the ledger."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import httpx
import pytest

from sandbox import api_key_id
from sandbox.testing import FakeClock, SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

SESSION = {"workflow_id": "wf-1"}
AML = {"full_name": "Ada Lovelace"}


async def test_missing_idempotency_key_is_400(sandbox: SandboxHarness) -> None:
    response = await sandbox.client.post("/v3/aml/", json=AML)
    assert response.status_code == 400
    assert response.json() == {"error": "idempotency_key_missing"}
    stats = await sandbox.stats()
    assert stats["missing_key_400"] == 1
    assert stats["side_effects"] == 0


async def test_key_length_limit(sandbox: SandboxHarness) -> None:
    assert (await sandbox.post("/v3/aml/", AML, "k" * 255)).status_code == 200
    response = await sandbox.post("/v3/aml/", AML, "k" * 256)
    assert response.status_code == 400
    assert response.json()["error"] == "idempotency_key_invalid"
    assert (await sandbox.stats())["invalid_key_400"] == 1


@pytest.mark.parametrize(
    ("headers", "status", "error"),
    [
        ({"x-api-key": "wrong"}, 401, "unauthorized"),
        ({"x-api-key": ""}, 401, "unauthorized"),
        ({"x-api-key": "broke-key"}, 403, "insufficient_credits"),
    ],
)
async def test_auth_fails_before_the_idempotency_layer(
    make_sandbox: MakeSandbox, headers: dict[str, str], status: int, error: str
) -> None:
    sandbox = await make_sandbox(out_of_credit_keys=("broke-key",))
    response = await sandbox.post("/v3/session/", SESSION, "key-1", headers=headers)
    assert response.status_code == status
    assert response.json() == {"error": error}
    # Nothing was stored under the key: a different body with a valid API key is processed, not a 422.
    response = await sandbox.post("/v3/session/", {"workflow_id": "other"}, "key-1")
    assert response.status_code == 201
    record = await sandbox.key("key-1")
    assert record["side_effects"] == 1
    assert [a["status"] for a in record["attempts"]] == [status, 201]
    assert [a["side_effect"] for a in record["attempts"]] == [False, True]


async def test_api_key_header_absent_entirely(sandbox: SandboxHarness) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as client:
        response = await client.post("/v3/aml/", json=AML, headers={"idempotency-key": "a"})
    assert response.status_code == 401
    record = await sandbox.key("a")
    assert record["attempts"][0]["api_key_id"] is None


async def test_rate_limit_answers_before_the_idempotency_layer(
    make_sandbox: MakeSandbox, clock: FakeClock
) -> None:
    sandbox = await make_sandbox(rate_limit_per_min=1, clock=clock)
    assert (await sandbox.post("/v3/aml/", AML, "a")).status_code == 200
    limited = await sandbox.post("/v3/aml/", AML, "b")
    assert limited.status_code == 429
    assert limited.json() == {"error": "rate_limited"}
    retry_after = int(limited.headers["retry-after"])
    assert 1 <= retry_after <= 60
    clock.advance(30)
    assert int((await sandbox.post("/v3/aml/", AML, "b")).headers["retry-after"]) == 30
    clock.advance(30)
    # The 429s stored nothing: the same key now runs with a different body.
    response = await sandbox.post("/v3/aml/", {"full_name": "someone else"}, "b")
    assert response.status_code == 200
    assert "idempotent-replayed" not in response.headers
    record = await sandbox.key("b")
    assert [a["status"] for a in record["attempts"]] == [429, 429, 200]
    assert record["side_effects"] == 1
    assert (await sandbox.stats())["rate_limited_429"] == 2


async def test_rate_limit_is_per_api_key(make_sandbox: MakeSandbox, clock: FakeClock, api_key: str) -> None:
    sandbox = await make_sandbox(api_keys=(api_key, "second"), rate_limit_per_min=1, clock=clock)
    assert (await sandbox.post("/v3/aml/", AML)).status_code == 200
    assert (await sandbox.post("/v3/aml/", AML)).status_code == 429
    assert (await sandbox.post("/v3/aml/", AML, headers={"x-api-key": "second"})).status_code == 200


async def test_key_reuse_with_a_different_body_is_422(sandbox: SandboxHarness) -> None:
    first = await sandbox.post("/v3/session/", SESSION, "reused")
    assert first.status_code == 201
    second = await sandbox.post("/v3/session/", {"workflow_id": "wf-2"}, "reused")
    assert second.status_code == 422
    assert second.json() == {"error": "idempotency_key_reused"}
    third = await sandbox.post("/v3/aml/", AML, "reused")
    assert third.status_code == 422
    record = await sandbox.key("reused")
    assert record["side_effects"] == 1
    assert (await sandbox.stats())["reuse_422"] == 2


async def test_concurrent_request_with_the_same_key_is_409(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"latency_ms": 600})
    async with sandbox.in_flight("/v3/session/", SESSION, "slow") as results:
        assert (await sandbox.stats())["in_flight"] == 1
        second = await sandbox.post("/v3/session/", SESSION, "slow")
        assert second.status_code == 409
        assert second.json() == {"error": "idempotency_request_in_flight"}
        assert int(second.headers["retry-after"]) >= 1

    assert results["response"].status_code == 201
    third = await sandbox.post("/v3/session/", SESSION, "slow")
    assert third.status_code == 201
    assert third.headers["idempotent-replayed"] == "true"
    assert third.content == results["response"].content
    record = await sandbox.key("slow")
    assert record["side_effects"] == 1
    assert sorted(a["status"] for a in record["attempts"]) == [201, 201, 409]
    assert (await sandbox.stats())["conflicts_409"] == 1


async def test_replay_of_a_success_is_byte_identical(sandbox: SandboxHarness) -> None:
    first = await sandbox.post("/v3/session/", SESSION, "same")
    assert first.status_code == 201
    assert "idempotent-replayed" not in first.headers
    for _ in range(3):
        again = await sandbox.post("/v3/session/", SESSION, "same")
        assert again.status_code == 201
        assert again.content == first.content
        assert again.headers["idempotent-replayed"] == "true"
        assert again.headers["content-type"] == first.headers["content-type"]
    record = await sandbox.key("same")
    assert record["side_effects"] == 1
    assert [a["replayed"] for a in record["attempts"]] == [False, True, True, True]
    stats = await sandbox.stats()
    assert stats["replays"] == 3
    assert stats["side_effects"] == 1


async def test_replay_of_a_validation_error(sandbox: SandboxHarness) -> None:
    first = await sandbox.post("/v3/id-verification/", {"document_type": "passport"}, "bad")
    assert first.status_code == 422
    assert first.json() == {"error": "validation_error", "detail": "front_image"}
    again = await sandbox.post("/v3/id-verification/", {"document_type": "passport"}, "bad")
    assert again.status_code == 422
    assert again.content == first.content
    assert again.headers["idempotent-replayed"] == "true"
    record = await sandbox.key("bad")
    assert record["side_effects"] == 0
    stats = await sandbox.stats()
    assert stats["validation_422"] == 1
    assert stats["replays"] == 1


async def test_trailing_slash_and_quoted_key_are_the_same_request(sandbox: SandboxHarness) -> None:
    body = b'{"full_name":"x"}'
    first = await sandbox.post("/v3/aml", None, "k1", raw=body)
    assert first.status_code == 200
    again = await sandbox.post("/v3/aml/", None, '"k1"', raw=body)
    assert again.headers["idempotent-replayed"] == "true"
    assert again.content == first.content
    record = await sandbox.key("k1")
    assert [a["idempotency_key"] for a in record["attempts"]] == ["k1", '"k1"']
    assert [a["path"] for a in record["attempts"]] == ["/v3/aml", "/v3/aml/"]


async def test_keys_are_scoped_per_api_key(make_sandbox: MakeSandbox, api_key: str) -> None:
    sandbox = await make_sandbox(api_keys=(api_key, "second"))
    first = await sandbox.post("/v3/aml/", AML, "shared")
    second = await sandbox.post("/v3/aml/", {"full_name": "other"}, "shared", headers={"x-api-key": "second"})
    assert first.status_code == second.status_code == 200
    assert "idempotent-replayed" not in second.headers
    record = await sandbox.key("shared")
    assert record["side_effects"] == 2
    assert record["side_effects_by_api_key"] == {api_key_id(api_key): 1, api_key_id("second"): 1}


async def test_key_expiry_with_an_injected_clock(make_sandbox: MakeSandbox, clock: FakeClock) -> None:
    sandbox = await make_sandbox(idempotency_ttl_s=3600, clock=clock)
    first = await sandbox.post("/v3/session/", SESSION, "exp")
    clock.advance(3599)
    assert (await sandbox.post("/v3/session/", SESSION, "exp")).headers["idempotent-replayed"] == "true"
    clock.advance(1)
    after = await sandbox.post("/v3/session/", {"workflow_id": "new"}, "exp")
    assert after.status_code == 201
    assert "idempotent-replayed" not in after.headers
    assert after.json()["session_id"] != first.json()["session_id"]
    record = await sandbox.key("exp")
    assert record["side_effects"] == 2
    assert record["first_seen"] == clock.now - 3600
    assert record["last_seen"] == clock.now
