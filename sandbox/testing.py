"""Helpers for tests and benchmarks that drive the sandbox: a fake clock, a small async harness, and a
synchronous admin client (:class:`SandboxAdmin`) with a process runner (:class:`SandboxProcess`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx

from .server import SandboxServer

__all__ = ["FakeClock", "SandboxAdmin", "SandboxHarness", "SandboxProcess"]

_ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    """A clock for ``SandboxConfig(clock=...)``: time moves only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True, slots=True)
class SandboxHarness:
    """A started :class:`SandboxServer` plus an ``httpx.AsyncClient`` that sends ``api_key``.

    The caller owns both and closes them (``async with`` on each, or an ``AsyncExitStack``).
    """

    server: SandboxServer
    client: httpx.AsyncClient

    @property
    def url(self) -> str:
        return self.server.url

    async def post(
        self,
        path: str,
        body: Any,
        key: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        raw: bytes | None = None,
    ) -> httpx.Response:
        """POST ``body`` as JSON (or ``raw`` bytes) with Idempotency-Key ``key`` (random if ``None``)."""
        all_headers = {"idempotency-key": key if key is not None else uuid.uuid4().hex}
        all_headers.update(headers or {})
        if raw is not None:
            return await self.client.post(path, content=raw, headers=all_headers)
        return await self.client.post(path, json=body, headers=all_headers)

    async def ledger(self) -> dict[str, Any]:
        """``GET /_admin/ledger``."""
        return await self._get("/_admin/ledger")

    async def key(self, key: str) -> dict[str, Any]:
        """``GET /_admin/ledger/<key>``; fails if the sandbox never saw ``key``."""
        return await self._get(f"/_admin/ledger/{key}")

    async def stats(self) -> dict[str, Any]:
        """``GET /_admin/stats``."""
        return await self._get("/_admin/stats")

    async def set_faults(self, **changes: Any) -> dict[str, Any]:
        """``POST /_admin/faults``."""
        response = await self.client.post("/_admin/faults", json=changes)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def effects(self, **filters: str) -> dict[str, Any]:
        """``GET /_admin/effects`` (filters: ``idv_key``, ``operation``, ``vendor_data``)."""
        response = await self.client.get("/_admin/effects", params=filters)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    async def sessions(self) -> list[dict[str, Any]]:
        """``didit`` profile: ``GET /_admin/sessions`` (every session and saved check, with its history)."""
        sessions: list[dict[str, Any]] = (await self._get("/_admin/sessions"))["sessions"]
        return sessions

    async def set_session_status(self, session_id: str, status: str) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/sessions/<id>/status`` (the applicant or a reviewer acts)."""
        return await self._post(f"/_admin/sessions/{session_id}/status", {"status": status})

    async def data_updated(self, session_id: str) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/sessions/<id>/data-updated`` (a ``data.updated`` webhook)."""
        return await self._post(f"/_admin/sessions/{session_id}/data-updated", {})

    async def set_webhooks(self, **changes: Any) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/webhooks`` (url, secret, max_attempts, backoff_s, timeout_s,
        faults)."""
        return await self._post("/_admin/webhooks", changes)

    async def webhooks(self) -> dict[str, Any]:
        """``didit`` profile: ``GET /_admin/webhooks`` (settings, events with their fate, deliveries)."""
        return await self._get("/_admin/webhooks")

    async def set_applicant(self, **changes: Any) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/applicant`` (delay_s, jitter_s, abandon_rate, seed)."""
        return await self._post("/_admin/applicant", changes)

    async def wait_webhooks_idle(self) -> None:
        """Wait until every webhook event so far is delivered, failed or dropped (bound it with
        ``anyio.fail_after``); the applicant's later steps are not waited for."""
        didit = self.server.app.didit
        assert didit is not None, "not the didit profile"
        await didit.webhooks.idle()

    async def _post(self, path: str, body: Any) -> dict[str, Any]:
        response = await self.client.post(path, json=body)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data

    @asynccontextmanager
    async def in_flight(self, path: str, body: Any, key: str) -> AsyncIterator[dict[str, httpx.Response]]:
        """Send one request in the background; enter once the sandbox holds ``key`` in flight.

        On exit waits for that request; its response is then under ``"response"`` in the yielded dict.
        """
        results: dict[str, httpx.Response] = {}

        async def send() -> None:
            results["response"] = await self.post(path, body, key)

        async with anyio.create_task_group() as tg:
            tg.start_soon(send)
            with anyio.fail_after(5):
                await self.wait_in_flight(1)
            yield results

    async def wait_in_flight(self, count: int) -> None:
        """Wait until exactly ``count`` requests hold their idempotency key in flight.

        Wrap the call in ``anyio.fail_after`` to bound the wait.
        """
        while True:
            if self.server.app.idempotency.in_flight == count:
                return
            await anyio.sleep(0.005)

    async def _get(self, path: str) -> dict[str, Any]:
        response = await self.client.get(path)
        response.raise_for_status()
        data: dict[str, Any] = response.json()
        return data


class SandboxAdmin:
    """Synchronous client for a running sandbox's admin API (ledger, stats, faults, reset).

    One request per call, no pooled connection: nothing to close, and safe to build per test.
    """

    def __init__(self, url: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def ledger(self) -> dict[str, Any]:
        """``GET /_admin/ledger``."""
        return self._call("GET", "/_admin/ledger")

    def key(self, key: str) -> dict[str, Any]:
        """``GET /_admin/ledger/<key>``; fails if the sandbox never saw ``key``."""
        return self._call("GET", f"/_admin/ledger/{key}")

    def side_effects(self) -> dict[str, int]:
        """Side effects per idempotency key, from the ledger."""
        return {k: v["side_effects"] for k, v in self.ledger()["keys"].items()}

    def stats(self) -> dict[str, Any]:
        """``GET /_admin/stats``."""
        return self._call("GET", "/_admin/stats")

    def effects(self, **filters: str) -> dict[str, Any]:
        """``GET /_admin/effects``: every side effect with its profile, operation, ``vendor_data`` and
        ``idv_key`` (filters: ``idv_key``, ``operation``, ``vendor_data``), and ``per_idv_key`` counts."""
        query = ("?" + urlencode(filters)) if filters else ""
        return self._call("GET", "/_admin/effects" + query)

    def effects_per_idv_key(self, operation: str | None = None) -> dict[str, int]:
        """Side effects per ``metadata.idv_key`` (of one operation if given): "exactly one per key" checks."""
        filters = {"operation": operation} if operation is not None else {}
        per_key: dict[str, int] = self.effects(**filters)["per_idv_key"]
        return per_key

    def sessions(self) -> list[dict[str, Any]]:
        """``didit`` profile: ``GET /_admin/sessions``."""
        sessions: list[dict[str, Any]] = self._call("GET", "/_admin/sessions")["sessions"]
        return sessions

    def set_session_status(self, session_id: str, status: str) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/sessions/<id>/status``."""
        return self._call("POST", f"/_admin/sessions/{session_id}/status", json={"status": status})

    def data_updated(self, session_id: str) -> dict[str, Any]:
        """``didit`` profile: ``POST /_admin/sessions/<id>/data-updated``."""
        return self._call("POST", f"/_admin/sessions/{session_id}/data-updated", json={})

    def webhooks(self, **changes: Any) -> dict[str, Any]:
        """``didit`` profile: ``GET /_admin/webhooks``, or ``POST`` it when ``changes`` are given."""
        if changes:
            return self._call("POST", "/_admin/webhooks", json=changes)
        return self._call("GET", "/_admin/webhooks")

    def applicant(self, **changes: Any) -> dict[str, Any]:
        """``didit`` profile: ``GET /_admin/applicant``, or ``POST`` it when ``changes`` are given."""
        if changes:
            return self._call("POST", "/_admin/applicant", json=changes)
        return self._call("GET", "/_admin/applicant")

    def wait_webhooks_idle(self, timeout: float = 60.0) -> dict[str, Any]:
        """Poll ``GET /_admin/webhooks`` until no event is pending; its last answer."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.webhooks()
            if state["pending"] == 0:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(f"{state['pending']} webhook event(s) still pending")
            time.sleep(0.05)

    def faults(self, **config: Any) -> dict[str, Any]:
        """``POST /_admin/faults``: change the fault settings; the new settings."""
        return self._call("POST", "/_admin/faults", json=config)

    def reset(self) -> None:
        """``POST /_admin/reset``: clear the ledger, the idempotency store and the faults."""
        self._call("POST", "/_admin/reset")

    def _call(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        response = httpx.request(method, self.url + path, json=json, timeout=self.timeout)
        response.raise_for_status()
        if not response.content:
            return {}
        data: dict[str, Any] = response.json()
        return data


class SandboxProcess(SandboxAdmin):
    """``python -m sandbox`` on a free port, its output appended to ``log_path``; :meth:`stop` ends it.

    ``args`` are extra command-line options (``"--seed", "7"``); ``env`` defaults to this process's.
    """

    def __init__(
        self,
        log_path: Path,
        api_key: str,
        *args: str,
        env: Mapping[str, str] | None = None,
        start_timeout: float = 30.0,
    ) -> None:
        ready = log_path.with_name(f"sandbox-{uuid.uuid4().hex[:8]}.url")
        cmd = [sys.executable, "-m", "sandbox", "--port", "0", "--api-key", api_key]
        cmd += ["--ready-file", str(ready), "--log-level", "warning", *args]
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 -- our own interpreter and module
                cmd,
                env=dict(os.environ if env is None else env),
                cwd=_ROOT,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
            )
        deadline = time.monotonic() + start_timeout
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("the sandbox did not start: " + log_path.read_text()[-2000:])
            time.sleep(0.02)
        super().__init__(ready.read_text().strip())

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
