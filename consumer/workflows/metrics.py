"""Prometheus metrics of the workflow engine: state transitions, events applied, polls, rows by state.

Registered in the daemon's registry (:attr:`consumer.metrics.Metrics.registry`, passed to
:func:`~consumer.workflows.wiring.build_engine`), so they are served on the same ``/metrics``; without one
they live in a registry of their own (tests, tools). Every label has a fixed vocabulary and every series
exists from the start at 0; nothing taken from an event (session, type, status string) becomes a label.

* ``idv_workflow_transitions_total{from_state,to_state}`` — every state change written (one
  compare-and-set each); ``to_state="abandoned"`` counts the workflows that ran out of time or were left.
* ``idv_workflow_events_total{result}`` — provider events (webhooks and the poller's synthetic ones) by
  what applying them did: ``applied`` (the row changed), ``unchanged`` (recorded, changes nothing: older,
  repeated or unknown status), ``duplicate`` (this event was applied before), ``stale`` (lost a
  compare-and-set to another writer and decided again), ``pending`` (its session is not recorded yet),
  ``invalid`` (not JSON, no session).
* ``idv_workflow_polls_total{kind}`` — what the polling fallback published: ``decision`` (a decision read),
  ``timeout`` (the abandon deadline passed), ``resume`` (a stalled workflow advanced again).
* ``idv_workflows{state}`` — workflow rows by state, read from the store at every poll scan.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from consumer.workflows.model import TRANSITIONS, WState

__all__ = ["EVENT_RESULTS", "POLL_KINDS", "WORKFLOW_METRIC_NAMES", "WorkflowMetrics"]

EVENT_RESULTS = ("applied", "unchanged", "duplicate", "stale", "pending", "invalid")
POLL_KINDS = ("decision", "timeout", "resume")
WORKFLOW_METRIC_NAMES = (
    "idv_workflow_transitions_total",
    "idv_workflow_events_total",
    "idv_workflow_polls_total",
    "idv_workflows",
)
_STATES = tuple(s.value for s in WState)
M = TypeVar("M", Counter, Gauge)


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        pairs = [(a.value, b.value) for a, b in TRANSITIONS]
        # Children looked up once, each at 0 from the start: a count is a dict lookup and an increment.
        self._transitions = self._children(
            Counter, "idv_workflow_transitions", "Workflow state changes written, by state before and after.",
            ("from_state", "to_state"), pairs,
        )  # fmt: skip
        self._events = self._children(
            Counter, "idv_workflow_events", "Provider events (webhooks, polls) by what applying them did.",
            ("result",), [(r,) for r in EVENT_RESULTS],
        )  # fmt: skip
        self._polls = self._children(
            Counter, "idv_workflow_polls", "Synthetic events the polling fallback published, by kind.",
            ("kind",), [(k,) for k in POLL_KINDS],
        )  # fmt: skip
        self._states = self._children(
            Gauge, "idv_workflows", "Workflow rows in the store by state (read at each poll scan).",
            ("state",), [(s,) for s in _STATES],
        )  # fmt: skip

    def _children(
        self, kind: type[M], name: str, doc: str, labels: tuple[str, ...], values: Iterable[tuple[str, ...]]
    ) -> dict[tuple[str, ...], M]:
        metric = kind(name, doc, labels, registry=self.registry)
        return {v: metric.labels(*v) for v in values}

    def transition(self, before: WState, after: WState) -> None:
        child = self._transitions.get((before.value, after.value))
        if child is not None:  # None: no change of state (or one the rule refuses, never written)
            child.inc()

    def event(self, result: str) -> None:
        """One provider event applied; ``result`` is one of :data:`EVENT_RESULTS`."""
        self._events[(result,)].inc()

    def poll(self, kind: str) -> None:
        """One synthetic event published; ``kind`` is one of :data:`POLL_KINDS`."""
        self._polls[(kind,)].inc()

    def states(self, counts: Mapping[str, int]) -> None:
        """The store's rows by state (:meth:`WorkflowStore.counts`); a state with no row is 0."""
        for (state,), child in self._states.items():
            child.set(counts.get(state, 0))
