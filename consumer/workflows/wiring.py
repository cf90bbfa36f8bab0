"""Building the workflow engine and its poller from the settings (for the daemon and the tools)."""

from __future__ import annotations

from consumer.faults import FaultPoints
from consumer.provider import ProviderClient
from consumer.settings import Settings
from consumer.store.base import DedupeStore
from consumer.workflows.engine import WorkflowEngine
from consumer.workflows.steps import ProviderSteps, StepRunner, Steps
from consumer.workflows.store import WorkflowStore, open_workflow_store

__all__ = ["build_engine"]


def build_engine(
    settings: Settings,
    records: DedupeStore,
    provider: ProviderClient,
    *,
    owner: str,
    store: WorkflowStore | None = None,
    steps: Steps | None = None,
    faults: FaultPoints | None = None,
) -> WorkflowEngine:
    """The engine over the workflow store beside ``records`` (not yet open) and the provider's steps."""
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
        faults=faults,
    )
