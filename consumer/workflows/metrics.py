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

from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge

from consumer.workflows.model import WState

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


class WorkflowMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        transitions = Counter(
            "idv_workflow_transitions",
            "Workflow state changes written, by the state before and after.",
            ("from_state", "to_state"),
            registry=r,
        )
        # Children looked up once: a transition costs a dict lookup and an increment.
        self._transitions = {(a, b): transitions.labels(a, b) for a in _STATES for b in _STATES if a != b}
        events = Counter(
            "idv_workflow_events",
            "Provider events (webhooks, polls) by what applying them did.",
            ("result",),
            registry=r,
        )
        self._events = {result: events.labels(result) for result in EVENT_RESULTS}
        polls = Counter(
            "idv_workflow_polls",
            "Synthetic events the polling fallback published, by kind (decision, timeout, resume).",
            ("kind",),
            registry=r,
        )
        self._polls = {kind: polls.labels(kind) for kind in POLL_KINDS}
        states = Gauge("idv_workflows", "Workflow rows in the store by state (read at each poll scan).",
                       ("state",), registry=r)  # fmt: skip
        self._states = {state: states.labels(state) for state in _STATES}

    def transition(self, before: WState, after: WState) -> None:
        if before is not after:
            self._transitions[(before.value, after.value)].inc()

    def event(self, result: str) -> None:
        """One provider event applied; ``result`` is one of :data:`EVENT_RESULTS`."""
        self._events[result].inc()

    def poll(self, kind: str) -> None:
        """One synthetic event published; ``kind`` is one of :data:`POLL_KINDS`."""
        self._polls[kind].inc()

    def states(self, counts: Mapping[str, int]) -> None:
        """The store's rows by state (:meth:`WorkflowStore.counts`); a state with no row is 0."""
        for state, child in self._states.items():
            child.set(counts.get(state, 0))
