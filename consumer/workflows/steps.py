"""The provider steps of a workflow and how each runs exactly once: claim its key, call, record.

:class:`Steps` is what the engine needs from the provider (a protocol, so the engine's logic is tested
without the provider client); :class:`ProviderSteps` is the real one over :class:`ProviderClient`.

:class:`StepRunner` runs a mutating step under the dedupe store's lease rules, exactly like the pipeline
runs a request: the step's own idempotency key (:func:`~consumer.workflows.model.step_key`) is claimed
first, the provider is called only by the lease holder (the lease renewed while it waits), the outcome
is completed in the store before the workflow row moves on. A step whose record is already COMPLETED or
FAILED is answered from the store and never sent again (a crash after the record but before the
workflow's transition). The same key goes out on every attempt, in ``metadata.idv_key``; Didit's session
creation also returns the unfinished session of the same ``vendor_data`` and workflow instead of a new one.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol
from urllib.parse import quote

import anyio
import httpx
import orjson

from consumer.errors import (
    ConsumerError,
    LeaseLost,
    ProviderAuthError,
    ProviderConfigError,
    ProviderInDoubt,
    RetriesExhausted,
    StoreError,
)
from consumer.model import ClaimStatus, Outcome, Record, State
from consumer.provider import CallProgress, CallResult, ProviderClient
from consumer.store.base import DedupeStore
from consumer.workflows.model import Workflow
from producer.envelope import Envelope, get_operation
from producer.errors import VerificationError

log = logging.getLogger(__name__)

__all__ = ["ProviderSteps", "StepFailed", "StepRunner", "Steps"]

KeepAlive = Callable[[], Awaitable[None]]


class StepFailed(ConsumerError):
    """A step could not be completed now (retries exhausted, lease lost); its record keeps the key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


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

    def __init__(self, provider: ProviderClient, *, attempts: int = 4) -> None:
        self.provider = provider
        self.attempts = attempts

    async def _mutate(
        self, operation: str, wf: Workflow, request: dict[str, Any], key: str, keep_alive: KeepAlive,
        claimed: Record | None,
    ) -> CallResult:  # fmt: skip
        """Through the provider layer's ``call_envelope`` when it has one (the profile's body, dedupe and
        reconciliation: an earlier attempt is looked up by ``metadata.idv_key`` before sending again),
        else the plain call with the key in ``metadata.idv_key``."""
        op = get_operation(operation)
        call_envelope = getattr(self.provider, "call_envelope", None)
        if call_envelope is not None:
            envelope = Envelope(wf.request_id, operation, wf.subject_id, request)
            result: CallResult = await call_envelope(
                op, envelope, key,
                earlier_claims=claimed is not None and claimed.attempts > 1,
                since=claimed.created_at if claimed is not None else 0.0,
                keep_alive=keep_alive, progress=CallProgress(),
            )  # fmt: skip
            return result
        body = {**request, "vendor_data": wf.subject_id, "metadata": {"idv_key": key}}
        return await self.provider.call(op, body, key, keep_alive=keep_alive, progress=CallProgress())

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
        read = getattr(self.provider, "_get", None)  # the provider layer's retried read, when present
        if read is not None:
            try:
                status, raw = await read(path, None, None, 20.0)
            except RetriesExhausted as exc:
                raise StepFailed("retries_exhausted", "the session's decision could not be read") from exc
            except ProviderConfigError:
                # This provider has no decision endpoint (an IETF-style API): nothing to read, not a reason
                # to stop the daemon. Workflows there are decided by their events only.
                log.warning("the provider has no session decision endpoint; decision not read")
                return None
            return _decision_body(status, raw)
        p = self.provider
        headers = [h for h in p._base_headers if h[0] != b"content-type"]
        delay = 0.2
        for attempt in range(1, self.attempts + 1):
            request = httpx.Request("GET", p.base_url + path, headers=headers)
            try:
                with anyio.fail_after(p.timeout_s):
                    response = await p._exchange(request)
            except (httpx.TransportError, TimeoutError):
                response = None
            if response is not None:
                if response.status_code in (401, 403):
                    raise ProviderAuthError(response.status_code)
                if response.status_code < 500 and response.status_code != 429:
                    return _decision_body(response.status_code, response.content)
            if attempt < self.attempts:
                await anyio.sleep(delay)
                delay *= 2
        raise StepFailed("retries_exhausted", f"decision of a session unreadable after {self.attempts} tries")


def _decision_body(status: int, raw: bytes) -> dict[str, Any] | None:
    if status != 200:
        return None  # 404: the provider does not know the session (or has no decision endpoint)
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return parsed if isinstance(parsed, dict) else None


class StepRunner:
    """One step under its own key and the dedupe store's lease (see the module docstring)."""

    def __init__(self, records: DedupeStore, *, owner: str, lease_s: float, retention_s: float) -> None:
        self.records = records
        self.owner = owner
        self.lease_s = lease_s
        self.retention_s = retention_s

    async def run(
        self,
        key: str,
        wf: Workflow,
        step: str,
        call: Callable[[KeepAlive, Record], Awaitable[CallResult]],
    ) -> Outcome:
        operation = f"kyc_workflow/{step}"
        # The step's record fingerprints the workflow's request and the step (never personal data).
        fp = "wf1:" + hashlib.sha256(f"{wf.fingerprint}\x1f{step}".encode()).hexdigest()
        while True:
            claim = await self._store(
                self.records.claim,
                key=key, message_id=wf.request_id, operation=operation, fingerprint=fp,
                owner=self.owner, lease_s=self.lease_s, retention_s=self.retention_s,
            )  # fmt: skip
            record: Record = claim.record
            if claim.status is ClaimStatus.DONE and record.outcome is not None:
                return record.outcome
            if claim.status is ClaimStatus.CONFLICT:
                raise StepFailed("idempotency_conflict", "the step's key holds another request")
            if claim.status is ClaimStatus.ACQUIRED:
                break
            await anyio.sleep(max(0.05, min(1.0, (record.lease_until or 0.0) - self.records.clock())))

        async def renew() -> None:
            await self._store(self.records.renew, key, self.owner, self.lease_s)

        try:
            result = await call(renew, record)
        except RetriesExhausted as exc:
            # Not released: an attempt may still be at the provider. The lease runs out on its own.
            raise StepFailed("retries_exhausted", str(exc)) from exc
        except LeaseLost as exc:
            raise StepFailed("retries_exhausted", "lease lost during the step") from exc
        except ProviderInDoubt as exc:
            # An earlier attempt may have acted and could not be found: an operator decides (dead letter
            # in_doubt); the key is kept, never sent again automatically.
            raise StepFailed("in_doubt", str(exc)) from exc
        except BaseException:
            # Cancelled, a rejected API key, a bug: the request may be at the provider, so the key is
            # kept until its lease runs out (then the next claimant calls again with the same key).
            raise
        try:
            stored = await self._store(
                self.records.complete, key, self.owner, result.outcome, failed=result.terminal_failure
            )
        except LeaseLost as exc:
            raise StepFailed(
                "retries_exhausted", "lease lost before the step's outcome was recorded"
            ) from exc
        done: Record = stored
        assert done.state in (State.COMPLETED, State.FAILED) and done.outcome is not None
        return done.outcome

    async def _store(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> Any:
        delay = 0.05
        while True:
            try:
                return await fn(*args, **kwargs)
            except VerificationError as exc:
                if not exc.retriable:
                    raise
                log.warning("dedupe store failed during a workflow step (%s); retrying", exc)
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _release(self, key: str, error: str) -> None:
        try:
            await self.records.release(key, self.owner, error)
        except (LeaseLost, StoreError) as exc:
            log.warning("could not release a workflow step's lease (%s); it will expire", exc)
