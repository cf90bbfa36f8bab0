"""Building the workflow engine and its poller from the settings (for the daemon and the tools)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection

from prometheus_client import CollectorRegistry

from consumer.faults import FaultPoints
from consumer.provider import ProviderClient
from consumer.settings import Settings
from consumer.sinks import Sinks
from consumer.store.base import DedupeStore
from consumer.workflows.engine import WorkflowEngine
from consumer.workflows.metrics import WorkflowMetrics
from consumer.workflows.poller import Poller
from consumer.workflows.runner import StepRunner
from consumer.workflows.steps import ProviderSteps, Steps
from consumer.workflows.store import WorkflowStore, open_workflow_store

__all__ = ["build_engine", "with_events_topic"]

log = logging.getLogger(__name__)


def build_engine(
    settings: Settings,
    records: DedupeStore,
    provider: ProviderClient,
    *,
    owner: str,
    store: WorkflowStore | None = None,
    steps: Steps | None = None,
    faults: FaultPoints | None = None,
    registry: CollectorRegistry | None = None,
) -> WorkflowEngine:
    """The engine over the workflow store beside ``records`` (not yet open) and the provider's steps; its
    metrics (consumer/workflows/metrics.py) in ``registry``, the daemon's, when given."""
    runner = StepRunner(records, owner=owner, lease_s=settings.lease_s, retention_s=settings.retention_s)
    return WorkflowEngine(
        store or open_workflow_store(settings.store_url),
        runner,
        steps or ProviderSteps(provider),
        namespace=settings.namespace,
        fingerprint_key=settings.fingerprint_key,
        poll_after_s=settings.workflow_poll_after_s,
        poll_max_s=settings.workflow_poll_max_s,
        abandon_after_s=settings.workflow_abandon_after_s,
        events_topic=settings.provider_events_topic,
        faults=faults or FaultPoints(),
        metrics=WorkflowMetrics(registry),
    )


def with_events_topic(
    settings: Settings,
    engine: WorkflowEngine,
    sinks: Sinks,
    topics: list[str],
    existing: Collection[str],
    *,
    on_fatal: Callable[[BaseException], None],
) -> tuple[list[str], Poller | None]:
    """The topics to subscribe: the request topics plus the provider events topic when it exists on the
    broker, and the poller that publishes its synthetic events there (None without the topic)."""
    events = settings.provider_events_topic
    if events is None or events not in existing:
        if events is not None:
            log.info("events topic %s not found: workflows advance by their requests only", events)
        engine.events_topic = None
        return topics, None

    async def publish(key: bytes, value: bytes) -> None:
        await sinks.publish_event(events, key, value)

    poller = Poller(
        engine,
        publish,
        interval_s=settings.workflow_scan_interval_s,
        concurrency=settings.workflow_poll_concurrency,
        stall_after_s=max(60.0, 2 * settings.lease_s),
        on_fatal=on_fatal,
    )
    return ([*topics, events] if events not in topics else topics), poller
