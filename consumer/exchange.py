"""One HTTP exchange with the provider: transport, per-path URLs, base headers, the total attempt deadline.

:class:`ProviderExchange` is what :class:`consumer.provider.ProviderClient` sends through (the client adds
when and how often). Requests go straight to the transport (httpx's public transport API) rather than
through an ``httpx.AsyncClient``: the client's per-request URL merging, cookie jar (urllib's cookiejar on
every answer), auth and redirect machinery cost ~40 % of the daemon's HTTP CPU and none of it is wanted
here (one fixed host, header auth, no redirects, no cookies).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Self

import anyio
import httpx

from consumer.providers.calls import make_transport

if TYPE_CHECKING:
    from consumer.multipart import MultipartBody

__all__ = ["ProviderExchange"]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class ProviderExchange:
    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        timeout_s: float,
        max_connections: int,
        transport: httpx.AsyncBaseTransport | None,
        transport_kind: str,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        if transport is not None and transport_kind != "httpx":
            raise ValueError("pass either transport or transport_kind, not both")
        # An explicit transport (tests: httpx.MockTransport) is used as given; else transport_kind picks one.
        self.transport_kind = transport_kind
        if transport is None:
            transport = make_transport(transport_kind, limits)
        self._transport = transport
        # consumer.http's aiohttp transport enforces the total deadline itself (aiohttp's total timeout);
        # the others get an anyio.fail_after around the whole exchange (httpx's timeouts are per phase).
        self._deadline_outside = not getattr(transport, "enforces_total_deadline", False)
        # httpx-aiohttp reports a connection closed after the request arrived as ConnectTimeout (PITFALLS):
        # there a "connect" failure does not prove that nothing reached the provider.
        self._not_sent = (
            (httpx.ConnectError, httpx.PoolTimeout)
            if transport_kind == "httpx-aiohttp"
            else (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
        )
        # Per phase for httpx; "total" is read by consumer.http's aiohttp transport.
        self._timeout = {**httpx.Timeout(timeout_s).as_dict(), "total": timeout_s}
        self._urls: dict[str, httpx.URL] = {}
        # Every path is on the one base URL: one Host header for all (see _send).
        self._host = (b"Host", httpx.URL(self.base_url).netloc)
        self._base_headers: tuple[tuple[bytes, bytes], ...] = (
            (b"user-agent", b"idv-exactly-once/0.1"),
            (b"x-api-key", api_key.encode()),
        )

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._transport.aclose()

    def _url(self, path: str) -> httpx.URL:
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = httpx.URL(self.base_url + path)
        return url

    async def _send(
        self, method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes | MultipartBody
    ) -> httpx.Response:
        url = self._url(path)
        if isinstance(body, bytes):
            # The headers httpx would add for content=body (Host; Content-Length for a body, or 0 on a
            # POST/PUT/PATCH), given up front with the body as its stream: httpx then skips its own
            # header pass, which scans the header list a few times per request (~7 % of the daemon's CPU
            # at thousands of calls in flight, docs/performance.md).
            auto = [self._host]
            if body or method in _BODY_METHODS:
                auto.append((b"Content-Length", str(len(body)).encode("ascii")))
            request = httpx.Request(
                method, url, headers=auto + headers, stream=httpx.ByteStream(body),
                extensions={"timeout": self._timeout},
            )
        else:
            # A MultipartBody is an async iterable that streams again on every attempt; its Content-Length
            # is among the adapter's headers, so httpx does not chunk it.
            request = httpx.Request(
                method, url, headers=headers, content=body, extensions={"timeout": self._timeout}
            )
        if not self._deadline_outside:
            return await self._exchange(request)
        try:
            with anyio.fail_after(self.timeout_s):
                return await self._exchange(request)
        except TimeoutError:
            raise httpx.ReadTimeout(
                f"no complete answer within the attempt deadline ({self.timeout_s:g}s)", request=request
            ) from None

    async def _exchange(self, request: httpx.Request) -> httpx.Response:
        response = await self._transport.handle_async_request(request)
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response
