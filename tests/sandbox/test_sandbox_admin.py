"""The admin API under ``/_admin/`` and ``/healthz``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from urllib.parse import quote

import httpx
import orjson
import pytest

from sandbox import DEFAULT_API_KEY, SandboxApp, SandboxConfig, api_key_id
from sandbox.app import Request, Response
from sandbox.server import _is_loopback
from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio


async def test_healthz(sandbox: SandboxHarness) -> None:
    async with httpx.AsyncClient(base_url=sandbox.url) as client:
        response = await client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_ledger_shape(sandbox: SandboxHarness, api_key: str) -> None:
    await sandbox.post("/v3/aml/", {"full_name": "x"}, "k-1")
    await sandbox.post("/v3/aml/", {"full_name": "x"}, "k-1")
    ledger = await sandbox.ledger()
    assert set(ledger) == {"keys", "totals"}
    entry = ledger["keys"]["k-1"]
    assert entry["side_effects"] == 1
    assert entry["side_effects_by_api_key"] == {api_key_id(api_key): 1}
    assert entry["first_seen"] <= entry["last_seen"]
    attempt = entry["attempts"][0]
    assert set(attempt) == {
        "at",
        "path",
        "status",
        "replayed",
        "fault",
        "idempotency_key",
        "api_key_id",
        "side_effect",
        "delivered",
        "ended_at",
    }
    assert attempt["path"] == "/v3/aml/"
    assert attempt["api_key_id"] == api_key_id(api_key)
    totals = ledger["totals"]
    assert totals["requests"] == 2
    assert totals["side_effects"] == 1
    assert totals["replays"] == 1
    assert totals["keys"] == 1
    assert totals["in_flight"] == 0
    assert totals == await sandbox.stats()
    # The API key itself never appears in the ledger.
    assert api_key.encode() not in orjson.dumps(ledger)


async def test_ledger_entry_for_one_key(sandbox: SandboxHarness) -> None:
    key = "order/42 #1"
    await sandbox.post("/v3/aml/", {"full_name": "x"}, key)
    response = await sandbox.client.get(f"/_admin/ledger/{quote(key, safe='')}")
    assert response.status_code == 200
    body = response.json()
    assert body["key"] == key
    assert body["side_effects"] == 1
    missing = await sandbox.client.get("/_admin/ledger/nope")
    assert missing.status_code == 404
    assert missing.json() == {"error": "unknown_key"}


async def test_stats_totals(sandbox: SandboxHarness) -> None:
    stats = await sandbox.stats()
    assert stats == {
        "requests": 0,
        "side_effects": 0,
        "validation_422": 0,
        "dropped_connections": 0,
        "unauthorized_401": 0,
        "out_of_credit_403": 0,
        "rate_limited_429": 0,
        "missing_key_400": 0,
        "invalid_key_400": 0,
        "conflicts_409": 0,
        "reuse_422": 0,
        "replays": 0,
        "internal_errors_500": 0,
        "faults": {},
        "keys": 0,
        "in_flight": 0,
    }


async def test_faults_get_and_merge(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"latency_ms": 5})
    current = (await sandbox.client.get("/_admin/faults")).json()
    assert current["latency_ms"] == 5.0
    assert current["script"] == []
    response = await sandbox.client.post("/_admin/faults", json={"script": ["500", "ok"], "seed": 1})
    assert response.status_code == 200
    merged = response.json()
    assert merged["latency_ms"] == 5.0
    assert merged["script"] == ["500", "ok"]
    await sandbox.post("/v3/aml/", {"full_name": "x"})
    assert (await sandbox.client.get("/_admin/faults")).json()["script"] == ["ok"]


@pytest.mark.parametrize(
    "body",
    [b"{", b"[]", b'{"error_rate": 2}', b'{"script": ["teapot"]}', b'{"unknown": 1}'],
)
async def test_invalid_faults_are_400(sandbox: SandboxHarness, body: bytes) -> None:
    response = await sandbox.client.post("/_admin/faults", content=body)
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_faults"
    assert (await sandbox.client.get("/_admin/faults")).json()["error_rate"] == 0.0


async def test_reset_clears_everything(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(faults={"script": ["500", "500"]})
    await sandbox.post("/v3/session/", {"workflow_id": "w"}, "k")
    assert (await sandbox.client.post("/_admin/reset")).json() == {"reset": True}
    assert (await sandbox.ledger())["keys"] == {}
    assert (await sandbox.stats())["requests"] == 0
    assert (await sandbox.client.get("/_admin/faults")).json()["script"] == []
    # The idempotency store is empty too: the same key with another body is new.
    response = await sandbox.post("/v3/session/", {"workflow_id": "other"}, "k")
    assert response.status_code == 201
    assert response.json()["session_number"] == 1


async def test_admin_methods_and_unknown_routes(sandbox: SandboxHarness) -> None:
    assert (await sandbox.client.get("/_admin/reset")).status_code == 405
    assert (await sandbox.client.post("/_admin/ledger")).status_code == 405
    assert (await sandbox.client.post("/_admin/ledger/k")).status_code == 405
    assert (await sandbox.client.post("/_admin/stats")).status_code == 405
    assert (await sandbox.client.delete("/_admin/faults")).status_code == 405
    assert (await sandbox.client.get("/_admin/nothing")).status_code == 404
    assert (await sandbox.client.get("/_admin")).status_code == 404


async def test_admin_is_refused_to_remote_peers() -> None:
    app = SandboxApp(SandboxConfig())
    for method, target in [
        (b"GET", b"/_admin/ledger"),
        (b"POST", b"/_admin/reset"),
        (b"GET", b"/_admin/stats"),
    ]:
        response = await app.handle(Request(method, target, [], b"", peer_is_loopback=False))
        assert isinstance(response, Response)
        assert response.status == 403
    health = await app.handle(Request(b"GET", b"/healthz", [], b"", peer_is_loopback=False))
    assert isinstance(health, Response)
    assert health.status == 200
    # Business endpoints do not care where the peer is.
    response = await app.handle(
        Request(
            b"POST",
            b"/v3/aml/",
            [(b"x-api-key", DEFAULT_API_KEY.encode()), (b"idempotency-key", b"k")],
            b'{"full_name":"x"}',
            peer_is_loopback=False,
        )
    )
    assert isinstance(response, Response)
    assert response.status == 200


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (("127.0.0.1", 5000), True),
        (("127.8.9.10", 5000), True),
        (("::1", 5000, 0, 0), True),
        (("::ffff:127.0.0.1", 5000, 0, 0), True),
        (("10.0.0.1", 5000), False),
        (("192.168.1.20", 5000), False),
        (("::ffff:10.0.0.1", 5000, 0, 0), False),
        (("fe80::1%eth0", 5000, 0, 2), False),
        (None, False),
        ("/tmp/socket", False),
        (("not-an-ip", 1), False),
    ],
)
def test_is_loopback(peer: object, expected: bool) -> None:
    assert _is_loopback(peer) is expected
