"""Workflow metrics on the daemon's /metrics: a real daemon process, the real broker, the sandbox over HTTP.

Counted: state transitions, provider events by what applying them did (applied, unchanged, duplicate,
pending, invalid), the poller's synthetic events (decision reads, timeouts) and workflow rows by state.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from aiokafka import AIOKafkaProducer

from consumer.workflows.model import WState
from tests.conftest import create_topic, random_topic_name
from tests.consumer.conftest import (
    DaemonProcess,
    Sandbox,
    daemon_env,
    publish,
    start_daemon,
    wait_committed_to_end,
    wait_until,
)
from tests.consumer.test_observability import health_url, sample
from tests.consumer.test_workflow_daemon import _ids, requests, rows, send_events, webhook

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


async def metrics_text(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        return (await client.get("/metrics")).text


async def start(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path, n: int, **settings: Any
) -> tuple[str, str, DaemonProcess]:
    """``n`` workflow requests published and a daemon on them with its own events topic and SQLite store:
    (events topic, store URL, the daemon)."""
    events = await create_topic(kafka_bootstrap, random_topic_name("ev"), 2)
    store_url = f"sqlite:///{tmp_path / 'wf.db'}"
    batch = requests(n, uuid.uuid4().hex[:8])
    _ids[:] = [e.message_id for e in batch]
    await publish(kafka_bootstrap, topic, batch)
    env = daemon_env(
        kafka_bootstrap, topic, group, store_url, didit.url, events_topic=events, provider="didit", **settings
    )
    return events, store_url, start_daemon(env, tmp_path / "daemon.log")


async def test_workflow_metrics_count_transitions_events_and_states(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    events, store_url, proc = await start(kafka_bootstrap, topic, group, didit, tmp_path, 6,
                                          workflow_scan_interval_s=0.3)  # fmt: skip
    try:
        url = health_url(proc.log_path)
        served = await metrics_text(url)
        assert "idv_workflows{" in served, "no workflow metrics: the daemon gives build_engine no registry"
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        waiting = sorted(await rows(store_url), key=lambda w: w.message_id)
        assert len(waiting) == 6 and {w.state for w in waiting} == {WState.WAITING}
        now = time.time()
        approved, declined, left = waiting[:3], waiting[3:5], waiting[5]
        bodies = [webhook(wf, "Approved", now + 2) for wf in approved] * 2  # each delivered twice
        bodies += [webhook(wf, "Declined", now + 3) for wf in declined]
        bodies += [webhook(wf, "In Progress", now + 1) for wf in declined]  # older: changes nothing
        bodies += [webhook(left, "Abandoned", now + 2)]
        bodies += [{"session_id": "never-created", "status": "Approved", "webhook_type": "status.updated"}]
        await send_events(kafka_bootstrap, events, bodies)
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait(events, b"not json", key=b"x")
        finally:
            await producer.stop()

        async def settled() -> bool:
            return {w.state for w in await rows(store_url)} == {WState.FINISHED, WState.ABANDONED}

        await wait_until(settled, "every workflow finished or abandoned", timeout=60)
        await wait_committed_to_end(kafka_bootstrap, group, events, 60)

        async def scanned() -> bool:  # the state gauge is read at the poller's next scan
            return sample(await metrics_text(url), "idv_workflows", state="finished") == 5

        await wait_until(scanned, "the state gauge read after the last transition", timeout=30)
        text = await metrics_text(url)
        proc.stop_cleanly()
    finally:
        proc.kill()

    def moved(a: str, b: str) -> float:
        return sample(text, "idv_workflow_transitions_total", from_state=a, to_state=b)

    assert moved("started", "session_created") == 6
    assert moved("session_created", "waiting") == 6
    assert moved("waiting", "decided") == 5
    assert moved("decided", "aml_done") == 3  # approved: screened
    assert moved("aml_done", "finished") == 3
    assert moved("decided", "finished") == 2  # declined: never screened
    assert moved("waiting", "abandoned") == 1
    assert sample(text, "idv_workflow_transitions_total") == 26

    def events_counted(result: str) -> float:
        return sample(text, "idv_workflow_events_total", result=result)

    assert events_counted("applied") == 6
    assert events_counted("duplicate") == 3
    assert events_counted("unchanged") == 2
    assert events_counted("pending") == 1
    assert events_counted("invalid") == 1
    assert sample(text, "idv_workflow_polls_total") == 0  # nothing was due: webhooks decided everything
    assert 'idv_workflow_polls_total{kind="timeout"} 0.0' in text  # every series exists from the start
    assert sample(text, "idv_workflows", state="abandoned") == 1
    assert sample(text, "idv_workflows", state="waiting") == 0


async def test_workflow_metrics_count_polls_and_timeouts(
    kafka_bootstrap: str, topic: str, group: str, didit: Sandbox, tmp_path: Path
) -> None:
    # Polled from 0.5 s on (the sandbox's applicant never finishes), abandoned 3 s after creation.
    _, store_url, proc = await start(
        kafka_bootstrap, topic, group, didit, tmp_path, 2, workflow_scan_interval_s=0.2,
        workflow_poll_after_s=0.5, workflow_poll_max_s=0.5, workflow_abandon_after_s=3,
    )  # fmt: skip
    try:
        url = health_url(proc.log_path)

        async def abandoned() -> bool:
            found = await rows(store_url)
            return len(found) == 2 and {w.state for w in found} == {WState.ABANDONED}

        await wait_until(abandoned, "both workflows abandoned", timeout=60)
        await anyio.sleep(1.0)  # one more scan: the gauge, and no poll of an abandoned workflow
        text = await metrics_text(url)
        proc.stop_cleanly()
    finally:
        proc.kill()
    assert sample(text, "idv_workflow_polls_total", kind="decision") >= 2  # each read at least once
    assert sample(text, "idv_workflow_polls_total", kind="timeout") >= 2
    assert sample(text, "idv_workflow_transitions_total", from_state="waiting", to_state="abandoned") == 2
    assert sample(text, "idv_workflows", state="abandoned") == 2
    assert sample(text, "idv_workflows", state="waiting") == 0


def test_workflow_metric_names_are_the_documented_ones() -> None:
    from consumer.workflows.metrics import WORKFLOW_METRIC_NAMES, WorkflowMetrics

    families = WorkflowMetrics().registry.collect()
    exposed = {m.name + ("_total" if m.type == "counter" else "") for m in families}
    assert exposed == set(WORKFLOW_METRIC_NAMES)
    docs = Path(__file__).resolve().parents[2] / "docs"
    for page in ("operations.md", "workflows.md"):
        text = (docs / page).read_text(encoding="utf-8")
        assert [n for n in WORKFLOW_METRIC_NAMES if f"`{n}`" not in text] == [], page
