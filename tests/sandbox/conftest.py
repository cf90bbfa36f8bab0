"""Fixtures for the sandbox provider's tests: a real server on loopback and an httpx client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import httpx
import pytest

from sandbox import FaultConfig, SandboxConfig, SandboxServer
from sandbox.testing import FakeClock, SandboxHarness

API_KEY = "sandbox-tests-key"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def api_key() -> str:
    """The API key the ``sandbox`` fixtures accept and their client sends."""
    return API_KEY


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def make_sandbox() -> AsyncIterator[Callable[..., Awaitable[SandboxHarness]]]:
    """``await make_sandbox(**SandboxConfig overrides)``; ``faults`` may be a dict of FaultConfig fields."""
    async with AsyncExitStack() as stack:

        async def factory(**overrides: Any) -> SandboxHarness:
            overrides.setdefault("api_keys", (API_KEY,))
            if isinstance(overrides.get("faults"), dict):
                overrides["faults"] = FaultConfig(**overrides["faults"])
            server = await stack.enter_async_context(SandboxServer(SandboxConfig(**overrides)))
            client = httpx.AsyncClient(base_url=server.url, headers={"x-api-key": API_KEY}, timeout=10)
            await stack.enter_async_context(client)
            return SandboxHarness(server, client)

        yield factory


@pytest.fixture
async def sandbox(make_sandbox: Callable[..., Awaitable[SandboxHarness]]) -> SandboxHarness:
    return await make_sandbox()
