"""A measurement prototype: ``ProviderClient`` calling aiohttp directly, without the httpx layer.

Not used by the daemon. ``bench/daemon_entry.py`` installs it when ``IDV_PROVIDER_TRANSPORT=aiohttp-native``
and ``bench/http_clients.py`` measures it, to price proposed change 1 in docs/performance.md before anyone
writes it for real.

It replaces only ``ProviderClient._post`` (the one method ``call()`` sends through) and answers with the
three attributes ``call()`` reads (``status_code``, ``content``, ``headers.get``). Connection failures
and timeouts are raised as ``httpx.TransportError``, so ``call()``'s retry and classification logic runs
unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import aiohttp
import httpx


class NativeResponse:
    __slots__ = ("content", "headers", "status_code")

    def __init__(self, status_code: int, content: bytes, headers: Mapping[str, str]) -> None:
        self.status_code = status_code
        self.content = content
        self.headers = headers


class NativeAiohttpClient:
    def __init__(self, base_url: str, *, timeout_s: float, max_connections: int, headers: dict[str, str]):
        self._base_url = base_url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._limit = max_connections
        self._headers = headers
        self._session: aiohttp.ClientSession | None = None
        self._urls: dict[str, str] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: a ClientSession needs the running loop.
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=self._limit),
            cookie_jar=aiohttp.DummyCookieJar(),
            timeout=self._timeout,
            headers=self._headers,
        )
        return self._session

    async def post(self, path: str, *, content: bytes, headers: dict[str, str]) -> NativeResponse:
        session = self._session or self._open()
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._base_url + path
        try:
            async with session.post(url, data=content, headers=headers) as r:
                return NativeResponse(r.status, await r.read(), r.headers)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise httpx.TransportError(f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def install(client: Any, *, timeout_s: float, max_connections: int) -> None:
    """Swap the httpx transport of a :class:`consumer.provider.ProviderClient` for bare aiohttp."""
    native = NativeAiohttpClient(
        client.base_url, timeout_s=timeout_s, max_connections=max_connections, headers={}
    )

    async def post(path: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> NativeResponse:
        return await native.post(path, content=body, headers={k.decode(): v.decode() for k, v in headers})

    transport = client._transport

    async def aclose() -> None:
        await native.aclose()
        await transport.aclose()

    client._post = post
    client.aclose = aclose
