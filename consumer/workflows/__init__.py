"""Verification workflows: one ``kyc_workflow`` request → session → decision → AML → one final event.

Modules by role: :mod:`~consumer.workflows.model` (states, the transition rule, per-step keys),
:mod:`~consumer.workflows.rules` (what an event does; result bytes), :mod:`~consumer.workflows.store`
(+ ``sqlite``, ``postgres``: rows, applied events, result outbox), :mod:`~consumer.workflows.steps`
(what each provider step sends and reads), :mod:`~consumer.workflows.runner` (one step exactly once under
its key's lease), :mod:`~consumer.workflows.engine` (requests and events),
:mod:`~consumer.workflows.poller` (the polling fallback and abandon deadline). See docs/workflows.md.
"""

from __future__ import annotations

from consumer.workflows.model import WORKFLOW_OPERATION, Event, Step, Workflow, WState, step_key
from consumer.workflows.store import WorkflowStore, WriteStatus, open_workflow_store

__all__ = [
    "WORKFLOW_OPERATION",
    "Event",
    "Step",
    "WState",
    "Workflow",
    "WorkflowStore",
    "WriteStatus",
    "open_workflow_store",
    "step_key",
]
