"""An httpx transport on aiohttp's connection pool, for the provider client's exchanges.

:class:`~consumer.provider.ProviderClient` speaks httpx (``httpx.Request`` in, ``httpx.Response`` out,
``httpx`` timeouts and exceptions) and sends through an ``httpx.AsyncBaseTransport``. httpx's own pool
(httpcore) scans every pooled connection on every request and degrades past ~16 concurrent requests on
one client (httpx #3215, httpcore #924); aiohttp's pool stays flat to 256 in flight. This transport keeps
the httpx API and uses aiohttp underneath, like the ``httpx-aiohttp`` package (the same speed within the
noise, docs/performance.md), but maps each aiohttp failure to the matching httpx exception (that package
reports a connection closed after the request arrived as ``ConnectTimeout``), and, because the
provider's answers are small and never streamed:

* the whole answer is read inside the transport and handed over as ``content`` (no async byte-stream
  wrapper around aiohttp's reader, no per-chunk iteration);
* no cookie jar (the provider sets none that matter, and a jar would keep state between messages);
* one ``aiohttp.ClientTimeout`` per distinct httpx timeout, built once.

Timeouts map as httpx defines them: ``connect`` → socket connect, ``read`` → gap between reads,
``pool`` → connection set-up including the wait for a free pooled connection; the extra ``total`` key
(the provider client's attempt deadline) → aiohttp's total timeout, raised as ``httpx.ReadTimeout``.
Failures are raised as the httpx exceptions callers already handle: ``httpx.ConnectError``,
``httpx.ConnectTimeout``, ``httpx.ReadTimeout``, ``httpx.ReadError``, ``httpx.RemoteProtocolError``
(all ``httpx.TransportError``).
"""

from __future__ import annotations

import ssl

import aiohttp
import httpx

from producer.errors import VerificationError

__all__ = ["AiohttpTransport"]

_TimeoutKey = tuple[float | None, float | None, float | None, float | None]


class AiohttpTransport(httpx.AsyncBaseTransport):
    # The timeout extension's "total" becomes aiohttp's total timeout: the provider client need not wrap
    # each exchange in its own deadline (one timer and cancel scope less per request).
    enforces_total_deadline = True

    def __init__(
        self,
        *,
        max_connections: int = 100,
        keepalive_expiry: float = 5.0,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._limit = max_connections
        self._keepalive = keepalive_expiry
        self._verify = verify
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[_TimeoutKey, aiohttp.ClientTimeout] = {}

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        connector = aiohttp.TCPConnector(
            limit=self._limit, keepalive_timeout=self._keepalive, ssl=self._verify
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            # httpx.Request already carries every header it needs (Host, Content-Length, the caller's);
            # aiohttp would otherwise add its own User-Agent, Accept and Accept-Encoding.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
            # The body is handed to httpx as received; httpx.Response decodes a Content-Encoding itself.
            auto_decompress=False,
        )
        return self._session

    def _timeout(self, request: httpx.Request) -> aiohttp.ClientTimeout:
        spec = request.extensions.get("timeout") or {}
        key: _TimeoutKey = (spec.get("connect"), spec.get("read"), spec.get("pool"), spec.get("total"))
        timeout = self._timeouts.get(key)
        if timeout is None:
            # total: the whole exchange, so an answer trickled a byte at a time cannot outlive the lease
            # (with total=None only the gaps between reads were bounded; PITFALLS).
            timeout = self._timeouts[key] = aiohttp.ClientTimeout(
                total=key[3], sock_connect=key[0], sock_read=key[1], connect=key[2]
            )
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        session = self._session or self._open()
        # A bytes body (the JSON calls) is passed as bytes; a streaming one (a multipart upload,
        # consumer/multipart.py) as the async iterable it is: aiohttp streams it, and with the request's
        # Content-Length header it sends that length instead of chunked encoding.
        stream = request.stream
        # (A ByteStream iterates as its one bytes object; the provider client passes its JSON bodies so.)
        data = (b"".join(stream) or None) if isinstance(stream, httpx.ByteStream) else stream
        try:
            async with session.request(
                request.method,
                str(request.url),
                data=data,
                headers=request.headers,
                allow_redirects=False,
                timeout=self._timeout(request),
            ) as answer:
                content = await answer.read()
                status, headers = answer.status, answer.raw_headers
        except aiohttp.ConnectionTimeoutError as exc:  # connecting, or waiting for a pooled connection
            raise httpx.ConnectTimeout(f"{type(exc).__name__}: {exc}", request=request) from exc
        except TimeoutError as exc:  # SocketTimeoutError: no byte from the provider for `read` seconds
            raise httpx.ReadTimeout(f"{type(exc).__name__}: {exc}", request=request) from exc
        except aiohttp.ClientConnectorError as exc:
            raise httpx.ConnectError(f"{type(exc).__name__}: {exc}", request=request) from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}", request=request) from exc
        except aiohttp.ClientError as exc:
            # aiohttp wraps an error raised by a streaming body (a document that changed or broke off while
            # being sent): that error is the cause, not the connection.
            if isinstance(exc.__cause__, VerificationError):
                raise exc.__cause__ from None
            raise httpx.ReadError(f"{type(exc).__name__}: {exc}", request=request) from exc
        return httpx.Response(
            status,
            headers=headers,
            content=content,
            request=request,
            extensions={"http_version": b"HTTP/1.1"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()
