"""The provider steps of a workflow: what each step sends and reads (Didit v3 endpoints).

:class:`Steps` is what the engine needs from the provider (a protocol, so the engine's logic is tested
without the provider client); :class:`ProviderSteps` is the real one over :class:`ProviderClient`. Each
mutating step runs exactly once under :class:`~consumer.workflows.runner.StepRunner` (re-exported here).
The same key goes out on every attempt, in ``metadata.idv_key``; Didit's session creation also returns the
unfinished session of the same ``vendor_data`` and workflow instead of a new one.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol
from urllib.parse import quote

import orjson

from consumer.errors import ProviderConfigError, RetriesExhausted
from consumer.model import Record
from consumer.provider import CallProgress, CallResult, ProviderClient
from consumer.workflows.model import Workflow
from consumer.workflows.runner import KeepAlive, StepFailed, StepRunner
from producer.envelope import Envelope, get_operation

log = logging.getLogger(__name__)

__all__ = ["KeepAlive", "ProviderSteps", "StepFailed", "StepRunner", "Steps"]


class Steps(Protocol):
    """``claimed`` is the step's dedupe record as claimed: ``attempts > 1`` means an earlier attempt may
    have reached the provider (a take-over), ``created_at`` is when the step was first claimed."""

    async def create_session(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult: ...

    async def screen_aml(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult: ...

    async def decision(self, session_id: str) -> dict[str, Any] | None:
        """The session's decision body (``GET /v3/session/{id}/decision/``); None when unknown (404)."""
        ...

    async def session_url(self, session_id: str) -> str | None:
        """Where the applicant verifies (the session's ``session_url``); None when it cannot be read."""
        ...


def aml_fields(decision: dict[str, Any] | None) -> dict[str, Any]:
    """The screening's subject from the decision's ID verification (read at call time, never stored)."""
    ids = (decision or {}).get("id_verifications") or (decision or {}).get("id_verification") or []
    first: dict[str, Any] = ids[0] if isinstance(ids, list) and ids else ids if isinstance(ids, dict) else {}
    name = first.get("full_name") or " ".join(
        str(first[k]) for k in ("first_name", "last_name") if first.get(k)
    )
    fields: dict[str, Any] = {"full_name": name or "unknown", "entity_type": "person"}
    for field in ("date_of_birth", "nationality", "document_number"):
        if first.get(field):
            fields[field] = first[field]
    return fields


class ProviderSteps:
    """The steps over the provider client (``IDV_PROVIDER_URL``): Didit v3 endpoints."""

    def __init__(self, provider: ProviderClient) -> None:
        self.provider = provider

    async def _mutate(
        self, operation: str, wf: Workflow, request: dict[str, Any], key: str, keep_alive: KeepAlive,
        claimed: Record | None,
    ) -> CallResult:  # fmt: skip
        """Through the provider layer's ``call_envelope``: the profile's body, dedupe and reconciliation (an
        earlier attempt is looked up by ``metadata.idv_key`` before sending again)."""
        envelope = Envelope(wf.request_id, operation, wf.subject_id, request)
        return await self.provider.call_envelope(
            get_operation(operation), envelope, key,
            earlier_claims=claimed is not None and claimed.attempts > 1,
            since=claimed.created_at if claimed is not None else 0.0,
            keep_alive=keep_alive, progress=CallProgress(),
        )  # fmt: skip

    async def create_session(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult:
        request = {"workflow_id": wf.provider_workflow_id}
        return await self._mutate("create_session", wf, request, key, keep_alive, claimed)

    async def screen_aml(
        self, wf: Workflow, key: str, keep_alive: KeepAlive, claimed: Record | None = None
    ) -> CallResult:
        decision = await self.decision(wf.session_id or "")
        return await self._mutate("aml_screening", wf, aml_fields(decision), key, keep_alive, claimed)

    async def session_url(self, session_id: str) -> str | None:
        try:
            body = await self.decision(session_id)
        except StepFailed:
            return None
        url = (body or {}).get("session_url") or (body or {}).get("url")
        return url if isinstance(url, str) and url.startswith(("http://", "https://")) else None

    async def decision(self, session_id: str) -> dict[str, Any] | None:
        """Read-only, so simply retried; 404 is None; 401/403 stop the daemon like any call."""
        path = f"/v3/session/{quote(session_id, safe='')}/decision/"
        try:
            status, raw = await self.provider._get(path, None, None, 20.0)
        except RetriesExhausted as exc:
            raise StepFailed("retries_exhausted", "the session's decision could not be read") from exc
        except ProviderConfigError:
            # This provider has no decision endpoint (an IETF-style API): nothing to read, not a reason
            # to stop the daemon. Workflows there are decided by their events only.
            log.warning("the provider has no session decision endpoint; decision not read")
            return None
        return _decision_body(status, raw)


def _decision_body(status: int, raw: bytes) -> dict[str, Any] | None:
    if status != 200:
        return None  # 404: the provider does not know the session (or has no decision endpoint)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None
