"""What the workflow end-to-end tests share: their requests and events, the store rows and result events they
read back, and the webhook intake running beside the daemon."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from consumer.workflows.model import Workflow
from consumer.workflows.store import open_workflow_store
from producer.envelope import Envelope
from tests.conftest import create_topic, free_port, random_topic_name
from tests.consumer.conftest import DaemonProcess, daemon_env, publish, start_daemon

_ids: list[str] = []
"""The message IDs of the batch a test published last (``publish_requests``): the rows ``rows`` reads."""


def requests(n: int, prefix: str) -> list[Envelope]:
    return [
        Envelope(f"{prefix}-{i}", "kyc_workflow", f"applicant-{prefix}-{i}", {"workflow_id": "wf-kyc"})
        for i in range(n)
    ]


async def publish_requests(bootstrap: str, topic: str, batch: list[Envelope], *, events: int = 4) -> str:
    """Remember ``batch``'s IDs for ``rows``, publish it to ``topic`` and create a fresh events topic
    (``events`` partitions); returns the events topic's name."""
    events_topic = await create_topic(bootstrap, random_topic_name("ev"), events)
    _ids[:] = [e.message_id for e in batch]
    await publish(bootstrap, topic, batch)
    return events_topic


async def send_events(bootstrap: str, topic: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True, acks="all")
    await producer.start()
    try:
        for body in events:
            headers = [("idv-provider", b"didit"), ("idv-event-type", str(body["webhook_type"]).encode())]
            await producer.send(topic, orjson.dumps(body), key=body["session_id"].encode(), headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


def webhook(wf: Workflow, status: str, ts: float, kind: str = "status.updated") -> dict[str, Any]:
    return {"session_id": wf.session_id, "status": status, "webhook_type": kind, "created_at": int(ts),
            "timestamp": ts, "workflow_id": "wf-kyc", "vendor_data": wf.subject_id,
            "metadata": {"idv_key": wf.session_key}}  # fmt: skip


async def rows(url: str) -> list[Workflow]:
    store = open_workflow_store(url)
    async with store:
        return [wf for wf in [await store.get(f"{m}") for m in _ids] if wf is not None]


def workflow_results(values: list[bytes], *, sessions: bool = False) -> list[dict[str, Any]]:
    """The workflows' decision events (revision 1 and later); with ``sessions``, their revision-0 events."""
    out = [orjson.loads(v) for v in values]
    return [
        r for r in out
        if r.get("operation") == "kyc_workflow" and (r.get("kind") == "workflow_session") == sessions
    ]  # fmt: skip


@contextmanager
def workflow_daemon(
    bootstrap: str,
    topic: str,
    group: str,
    store_url: str,
    provider_url: str,
    log_path: Path,
    *,
    events: str,
    **extra: Any,
) -> Iterator[tuple[DaemonProcess, dict[str, str]]]:
    """The daemon as a real process running workflows (provider ``didit``, events from ``events``); yields
    it and its environment (for the CLI tools), and kills it after (a no-op once it stopped cleanly)."""
    env = daemon_env(
        bootstrap, topic, group, store_url, provider_url, events_topic=events, provider="didit", **extra
    )
    proc = start_daemon(env, log_path)
    try:
        yield proc, env
    finally:
        proc.kill()


@contextmanager
def intake_running(bootstrap: str, events: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """``idv-webhooks`` as a real process publishing to ``events``: yields it and its port; stopped after."""
    from tests.consumer.test_webhooks_service import intake_env, start

    port = free_port()
    intake = start(intake_env(bootstrap, events, port))
    try:
        yield intake, port
    finally:
        intake.terminate()
        intake.communicate(timeout=30)
