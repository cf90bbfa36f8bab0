"""Injected faults over real HTTP, and what the ledger says about them."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import httpx
import pytest

from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio

SESSION = {"workflow_id": "wf-1"}


async def test_script_500_500_ok_processes_once(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ("500", "500", "ok")})
    statuses = []
    for _ in range(3):
        response = await sandbox.post("/v3/session/", SESSION, "retry-me")
        statuses.append(response.status_code)
        if response.status_code == 500:
            assert response.json() == {"error": "injected"}
    assert statuses == [500, 500, 201]
    record = await sandbox.key("retry-me")
    assert record["side_effects"] == 1
    attempts = record["attempts"]
    assert [a["idempotency_key"] for a in attempts] == ["retry-me"] * 3
    assert [a["fault"] for a in attempts] == ["script:500", "script:500", None]
    assert [a["replayed"] for a in attempts] == [False, False, False]
    stats = await sandbox.stats()
    assert stats["faults"] == {"script:500": 2}
    assert stats["requests"] == 3


async def test_gateway_faults_store_nothing(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ("503",)})
    assert (await sandbox.post("/v3/session/", SESSION, "k")).status_code == 503
    # A different body under the same key is processed: the 503 was not stored.
    assert (await sandbox.post("/v3/session/", {"workflow_id": "other"}, "k")).status_code == 201


async def test_script_429_sets_retry_after(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ("429:2", "429"), "retry_after_s": 5})
    first = await sandbox.post("/v3/session/", SESSION, "k")
    assert first.status_code == 429
    assert first.headers["retry-after"] == "2"
    second = await sandbox.post("/v3/session/", SESSION, "k")
    assert second.headers["retry-after"] == "5"
    assert (await sandbox.post("/v3/session/", SESSION, "k")).status_code == 201
    assert (await sandbox.key("k"))["side_effects"] == 1


async def test_script_applies_only_after_auth(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ("500",)})
    assert (
        await sandbox.post("/v3/aml/", {"full_name": "x"}, headers={"x-api-key": "bad"})
    ).status_code == 401
    assert (await sandbox.client.get("/healthz")).status_code == 200
    assert (await sandbox.post("/v3/aml/", {"full_name": "x"})).status_code == 500


async def test_drop_after_effect_then_retry_replays(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ("drop",)})
    with pytest.raises(httpx.TransportError):
        await sandbox.post("/v3/session/", SESSION, "dropped")
    record = await sandbox.key("dropped")
    assert record["side_effects"] == 1
    attempt = record["attempts"][0]
    assert attempt["delivered"] is False
    assert attempt["fault"] == "script:drop"
    assert attempt["status"] == 201

    retry = await sandbox.post("/v3/session/", SESSION, "dropped")
    assert retry.status_code == 201
    assert retry.headers["idempotent-replayed"] == "true"
    assert retry.json()["session_number"] == 1
    record = await sandbox.key("dropped")
    assert record["side_effects"] == 1
    assert [a["idempotency_key"] for a in record["attempts"]] == ["dropped", "dropped"]
    stats = await sandbox.stats()
    assert stats["dropped_connections"] == 1
    assert stats["side_effects"] == 1


async def test_drop_before_performs_no_side_effect(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ["drop_before"]})
    with pytest.raises(httpx.TransportError):
        await sandbox.post("/v3/aml/", {"full_name": "x"}, "early")
    retry = await sandbox.post("/v3/aml/", {"full_name": "x"}, "early")
    assert retry.status_code == 200
    assert "idempotent-replayed" not in retry.headers
    record = await sandbox.key("early")
    assert record["side_effects"] == 1
    assert record["attempts"][0]["status"] is None
    assert record["attempts"][0]["delivered"] is False


async def test_random_drop_rate(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"drop_after_effect_rate": 1.0})
    for _ in range(2):
        with pytest.raises(httpx.TransportError):
            await sandbox.post("/v3/aml/", {"full_name": "x"}, "k")
    record = await sandbox.key("k")
    assert record["side_effects"] == 1
    assert [a["replayed"] for a in record["attempts"]] == [False, True]
    assert [a["fault"] for a in record["attempts"]] == ["random:drop", "random:drop"]


async def test_error_rate_and_admin_changes(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"error_rate": 1.0})
    assert (await sandbox.post("/v3/aml/", {"full_name": "x"}, "k")).status_code == 500
    response = await sandbox.client.post("/_admin/faults", json={"error_rate": 0})
    assert response.json()["error_rate"] == 0.0
    assert (await sandbox.post("/v3/aml/", {"full_name": "x"}, "k")).status_code == 200
    assert (await sandbox.stats())["faults"] == {"random:500": 1}


async def test_random_429(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"rate_429": 1.0, "retry_after_s": 3})
    response = await sandbox.post("/v3/aml/", {"full_name": "x"}, "k")
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert (await sandbox.key("k"))["attempts"][0]["fault"] == "random:429"


async def test_seeded_error_rate_is_reproducible(make_sandbox: MakeSandbox) -> None:
    runs = []
    for _ in range(2):
        sandbox = await make_sandbox(faults={"error_rate": 0.5, "seed": 1234})
        runs.append([(await sandbox.post("/v3/aml/", {"full_name": "x"})).status_code for _ in range(20)])
    assert runs[0] == runs[1]
    assert set(runs[0]) == {200, 500}


async def test_delay_script_item_holds_the_key_in_flight(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ["delay:500"]})
    async with sandbox.in_flight("/v3/session/", SESSION, "slow") as first:
        assert (await sandbox.post("/v3/session/", SESSION, "slow")).status_code == 409
    assert first["response"].status_code == 201
    assert (await sandbox.stats())["faults"] == {"script:delay": 1}


async def test_client_timeout_during_latency_then_retry(make_sandbox: MakeSandbox) -> None:
    """A client that times out and retries with the same key sees 409, then the replay: one effect."""
    sandbox = await make_sandbox(faults={"latency_ms": 400})
    with pytest.raises(httpx.ReadTimeout):
        await sandbox.client.post("/v3/session/", json=SESSION, headers={"idempotency-key": "t"}, timeout=0.1)
    assert (await sandbox.post("/v3/session/", SESSION, "t")).status_code == 409
    with anyio.fail_after(5):
        await sandbox.wait_in_flight(0)
    replay = await sandbox.post("/v3/session/", SESSION, "t")
    assert replay.headers["idempotent-replayed"] == "true"
    assert (await sandbox.key("t"))["side_effects"] == 1
