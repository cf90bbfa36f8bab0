"""The status page (``/``, ``/status.json``), ``Metrics.snapshot`` and the provider-replays metric."""

from __future__ import annotations

import uuid

import anyio
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumer.health import HealthServer, status_page
from consumer.keys import idempotency_key
from consumer.metrics import Metrics
from consumer.provider import ProviderClient, RetryPolicy
from producer.envelope import OPERATIONS, Envelope
from tests.consumer.conftest import API_KEY, publish
from tests.consumer.test_exactly_once import run_until_committed, settings_for

pytestmark = pytest.mark.anyio


def _metrics() -> Metrics:
    m = Metrics(process_metrics=False)
    m.committed("idv.requests", 1, 40)
    m.lag("idv.requests", 1, 3)
    m.committed("idv.requests", 0, 12)
    m.finished("completed", "approved")
    m.finished("completed", "approved")
    m.finished("failed", "failed")
    m.finished("duplicate", "declined")
    m.finished("invalid")
    m.dead_letter("invalid_json")
    m.dead_letter("in_doubt")
    m.circuit("half_open")
    m.set_in_flight(7)
    m.provider_replay()
    return m


def test_snapshot_reads_the_exposed_samples() -> None:
    snap = _metrics().snapshot()
    assert snap == {
        "partitions": [
            {"topic": "idv.requests", "partition": 0, "committed": 12, "lag": None},
            {"topic": "idv.requests", "partition": 1, "committed": 40, "lag": 3},
        ],
        "outcomes": {"approved": 2, "declined": 1, "failed": 1},
        "dispositions": {"completed": 2, "duplicate": 1, "failed": 1, "invalid": 1},
        "dead_letters": {"in_doubt": 1, "invalid_json": 1},
        "in_doubt": 1,
        "breaker": "half_open",
        "in_flight": 7,
        "provider_replays": 1,
    }


def test_status_page_escapes_everything() -> None:
    hostile = "<script>alert(1)</script>"
    page = status_page(
        {
            "partitions": [{"topic": hostile, "partition": 0, "committed": 1, "lag": 0}],
            "outcomes": {hostile: 1},
            "dead_letters": {'"><img src=x>': 2},
            "breaker": hostile,
            "readiness": {"ready": False, "reasons": [hostile]},
        }
    )
    assert "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page
    assert '<meta http-equiv="refresh" content="5">' in page
    assert "http://" not in page and "https://" not in page  # no external assets


async def test_routes_serve_page_and_json_with_csp() -> None:
    metrics = _metrics()
    async with HealthServer("127.0.0.1", 0, metrics, lambda: (True, {"ready": True, "reasons": []})) as srv:
        async with anyio.create_task_group() as tg:
            tg.start_soon(srv.serve)
            async with httpx.AsyncClient(base_url=srv.url) as client:
                page = await client.get("/")
                data = (await client.get("/status.json")).json()
                readyz = await client.get("/readyz")
                post = await client.post("/")
            tg.cancel_scope.cancel()
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'id="in-flight"' in page.text
    assert data["in_flight"] == 7 and data["readiness"]["ready"] is True
    assert readyz.status_code == 200
    assert post.status_code == 405


async def test_replayed_answers_are_counted() -> None:
    seen: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        headers = {"Idempotent-Replayed": "true"} if seen else {}
        seen.append(1)
        return httpx.Response(200, json={"request_id": "r1", "status": "Approved"}, headers=headers)

    metrics = Metrics(process_metrics=False)
    client = ProviderClient(
        "http://provider",
        "k",
        retry=RetryPolicy(1, 0.0, 0.0),
        transport=httpx.MockTransport(handler),
        on_replay=metrics.provider_replay,
    )
    op = OPERATIONS["aml_screening"]
    async with client:
        await client.call(op, {"full_name": "x"}, "idv_k1")
        await client.call(op, {"full_name": "x"}, "idv_k1")
    assert metrics.snapshot()["provider_replays"] == 1
    values = {
        s.name: s.value for f in text_string_to_metric_families(metrics.render().decode()) for s in f.samples
    }
    assert values["idv_provider_replays_total"] == 1


async def test_sandbox_replay_is_counted(sandbox: object) -> None:
    url = sandbox.url  # type: ignore[attr-defined]
    metrics = Metrics(process_metrics=False)
    op = OPERATIONS["aml_screening"]
    async with ProviderClient(url, API_KEY, on_replay=metrics.provider_replay) as client:
        first = await client.call(op, {"full_name": "Jane Roe"}, "idv_replay_test_key_000000000001")
        again = await client.call(op, {"full_name": "Jane Roe"}, "idv_replay_test_key_000000000001")
    assert first.outcome == again.outcome
    assert metrics.snapshot()["provider_replays"] == 1


@pytest.mark.kafka
async def test_daemon_counts_and_logs_a_replayed_answer(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The crash window after the provider call: the provider already acted on the key, so the daemon's
    call is answered from its cache; that shows as idv_provider_replays_total and a log field."""
    url = sandbox.url  # type: ignore[attr-defined]
    env = Envelope(f"msg-{uuid.uuid4()}", "aml_screening", "subject-1", {"full_name": "Jane Roe"})
    fresh = Envelope(f"msg-{uuid.uuid4()}", "aml_screening", "subject-2", {"full_name": "John Doe"})
    key = idempotency_key("idv", env.operation, env.message_id)
    async with ProviderClient(url, API_KEY) as client:  # "before the crash": the provider acted
        await client.call(OPERATIONS[env.operation], dict(env.request), key)
    await publish(kafka_bootstrap, topic, [env, fresh])
    group = "g-" + uuid.uuid4().hex[:8]
    caplog.set_level("INFO", logger="consumer.provider")
    daemon = await run_until_committed(settings_for(kafka_bootstrap, topic, group, sqlite_url, url))
    assert daemon.metrics.snapshot()["provider_replays"] == 1
    assert b"idv_provider_replays_total 1.0" in daemon.metrics.render()
    replayed = [r for r in caplog.records if getattr(r, "replayed", False)]
    assert len(replayed) == 1
