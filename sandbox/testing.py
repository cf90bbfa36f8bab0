"""Helpers for tests that drive the sandbox: a fake clock and a small async client for its admin API."""

from __future__ import annotations

import uuid
from typing import Any

import anyio
import httpx

from .server import SandboxServer

__all__ = ["FakeClock", "SandboxHarness"]


class FakeClock:
    """A clock for ``SandboxConfig(clock=...)``: time moves only when the test says so."""

    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class SandboxHarness:
    """A started :class:`SandboxServer` plus an ``httpx.AsyncClient`` that sends ``api_key``.

    The caller owns both and closes them (``async with`` on each, or an ``AsyncExitStack``).
    """

    def __init__(self, server: SandboxServer, client: httpx.AsyncClient) -> None:
        self.server = server
        self.client = client

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
