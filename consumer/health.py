"""Operations endpoint: Prometheus metrics, liveness and readiness over HTTP/1.1.

::

    GET /metrics   the daemon's metrics, Prometheus text format
    GET /healthz   200 while the event loop runs (a blocked loop cannot answer: the probe times out)
    GET /readyz    200 or 503 with a JSON body saying why (see readiness_report)
    GET /          a read-only status page (HTML, no scripts or external assets, refreshes every 5 s)
    GET /status.json  the page's figures (Metrics.snapshot) and the readiness details

:class:`HealthServer` is an anyio task (``await tg.start(server.serve)``) serving HTTP/1.1 with
aiohttp's low-level server (``aiohttp.web.Server``): aiohttp parses the requests, limits line, header and
field sizes and closes idle keep-alive connections; this module caps the number of open connections
(beyond it a connection gets an immediate 503 and is closed), bounds a connection's lifetime (a client
trickling header bytes cannot hold one for ever) and never lets the endpoint stop the daemon: once bound,
:meth:`HealthServer.serve` only returns when cancelled, and every failure in it is logged, not raised.
Out of file descriptors (EMFILE), the event loop's accept loop logs and retries (asyncio pauses accepting
for a second; uvloop/libuv sheds the connection); message processing goes on either way. It binds
127.0.0.1 by default: metrics are not secret, but nothing outside the host needs them unless a scraper is
deployed there on purpose.

The readiness rule is :mod:`consumer.readiness`; the status page's HTML is :mod:`consumer.statuspage`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.abc
import orjson
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from consumer.errors import ConfigurationError
from consumer.lifecycle import AsyncService
from consumer.metrics import CONTENT_TYPE, Metrics
from consumer.readiness import PartitionProgress, Readiness, readiness_report
from consumer.statuspage import status_page

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "HealthServer",
    "PartitionProgress",
    "Readiness",
    "readiness_report",
    "serve_health",
    "status_page",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9400


_MAX_LINE_BYTES = 8 * 1024  # request line and each header line
_MAX_HEADERS = 64
_IDLE_TIMEOUT_S = 15.0  # an idle keep-alive connection is closed after this
_CONNECTION_LIFETIME_S = 60.0  # then a connection is closed after its current request (a scraper reconnects)
_MAX_CONNECTIONS = 64  # open connections; more get an immediate 503 and are closed
_BACKLOG = 64
_SHUTDOWN_TIMEOUT_S = 2.0  # requests still running when the server stops get this long
_JSON = "application/json"
_HTML = "text/html; charset=utf-8"
# The page needs nothing but its own inline style: no scripts, no images, no frames, no forms.
_PAGE_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)
_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - names, not binds
_ROUTES = ("/", "/status.json", "/metrics", "/healthz", "/readyz")
_REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: 28\r\ncache-control: no-store\r\nconnection: close\r\n\r\n"
    b'{"error":"too_many_clients"}'
)


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: str


def _json(status: int, data: dict[str, Any]) -> _Response:
    return _Response(status, orjson.dumps(data) + b"\n", _JSON)


class _Refuse(asyncio.Protocol):
    """A connection over the cap: one 503 and close, so its file descriptor is freed at once."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(_REFUSED)
        transport.close()


class _CappedServer(web.Server):
    """aiohttp's low-level server with a cap on open connections and a lifetime per connection.

    The count is aiohttp's own (connections set up and not yet closed), so connections accepted in one
    burst may exceed the cap by that burst, at most the listen backlog.
    """

    def __init__(self, handler: Any, *, max_connections: int, lifetime_s: float, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.lifetime_s = lifetime_s
        self.refused = 0
        self._timers: dict[RequestHandler, asyncio.TimerHandle] = {}

    def __call__(self) -> Any:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "health endpoint: %d connections open, refusing more (%d refused so far)",
                    len(self.connections),
                    self.refused,
                )
            return _Refuse()
        return super().__call__()

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        super().connection_made(handler, transport)
        self._timers[handler] = self._loop.call_later(self.lifetime_s, self._expire, handler)

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        timer = self._timers.pop(handler, None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(handler, exc)

    def _expire(self, handler: RequestHandler) -> None:
        # Graceful first (after the request being answered, if any), then for good.
        handler.close()
        self._timers[handler] = self._loop.call_later(_SHUTDOWN_TIMEOUT_S, handler.force_close)


async def serve_health(
    host: str, port: int, metrics: Metrics, readiness: Readiness, tg: anyio.abc.TaskGroup
) -> HealthServer | None:
    """The daemon's endpoint: bound here (a bind error is raised bare, for the CLI's one line), then
    served in ``tg``; None when ``port`` is negative (turned off)."""
    if port < 0:
        return None
    health = HealthServer(host, port, metrics, readiness)
    await health.bind()
    tg.start_soon(health.serve)
    log.info("health and metrics on %s", health.url, extra={"health_url": health.url})
    return health


def _bind_error(host: str, port: int, exc: OSError) -> ConfigurationError:
    # asyncio words it "error while attempting to bind on address ...": name the errno's own message.
    reason = os.strerror(exc.errno) if exc.errno else (exc.strerror or type(exc).__name__)
    return ConfigurationError(f"IDV_HEALTH_PORT: cannot listen on {host}:{port} ({reason})")


class HealthServer(AsyncService):
    """``/metrics``, ``/healthz`` and ``/readyz`` on ``host:port``; port 0 picks a free port.

    ::

        async with HealthServer("127.0.0.1", 9400, metrics, readiness) as server:  # binds: errors here
            async with anyio.create_task_group() as tg:
                tg.start_soon(server.serve)
                ...
                tg.cancel_scope.cancel()            # stops the server and closes its connections

    or, without the ``async with``, ``port = await tg.start(server.serve)`` (a bind error then arrives
    inside the task group's exception group).

    ``readiness`` is called on every ``/readyz`` request, in the event loop: it must be cheap and must not
    block. If it raises, the answer is 503. Needs the asyncio backend (uvloop included): aiohttp is
    asyncio-only.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        metrics: Metrics | None = None,
        readiness: Readiness | None = None,
        *,
        max_connections: int = _MAX_CONNECTIONS,
        idle_timeout_s: float = _IDLE_TIMEOUT_S,
        connection_lifetime_s: float = _CONNECTION_LIFETIME_S,
        backlog: int = _BACKLOG,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.readiness = readiness
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.connection_lifetime_s = connection_lifetime_s
        self.backlog = backlog
        self._port: int | None = None
        self._server: _CappedServer | None = None
        self._listener: asyncio.AbstractServer | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0), once bound (:meth:`bind`, ``async with``, :meth:`serve`)."""
        if self._port is None:
            raise RuntimeError("the health server is not bound yet")
        return self._port

    @property
    def url(self) -> str:
        """Where to reach the endpoint from this host (a wildcard bind is reached through loopback)."""
        host = _LOOPBACK.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def refused(self) -> int:
        """Connections refused because the cap was reached."""
        return self._server.refused if self._server is not None else 0

    async def bind(self) -> int:
        """Open the listening socket now and return the bound port (idempotent). Connections are accepted
        (and answered) from here on.

        A host/port that cannot be bound raises :class:`ConfigurationError` naming ``IDV_HEALTH_PORT``.
        Binding before the task group (``async with server:`` does it) lets that error reach the CLI as
        itself; raised inside a task group it would arrive wrapped in an exception group.
        """
        if self._listener is None:
            server = _CappedServer(
                self._handle,
                max_connections=self.max_connections,
                lifetime_s=self.connection_lifetime_s,
                keepalive_timeout=self.idle_timeout_s,
                max_line_size=_MAX_LINE_BYTES,
                max_field_size=_MAX_LINE_BYTES,
                max_headers=_MAX_HEADERS,
                access_log=None,
            )
            try:
                listener = await asyncio.get_running_loop().create_server(
                    server, self.host or None, self.requested_port, backlog=self.backlog
                )
            except OSError as exc:
                raise _bind_error(self.host, self.requested_port, exc) from None
            self._server, self._listener = server, listener
            self._port = int(listener.sockets[0].getsockname()[1])
        assert self._port is not None
        return self._port

    async def aclose(self) -> None:
        """Stop listening and close the connections (a no-op when not bound). :meth:`serve` does this when
        it ends. Never raises: a failure is logged."""
        listener, self._listener = self._listener, None
        server, self._server = self._server, None
        if listener is None or server is None:
            return
        try:
            listener.close()
            server.pre_shutdown()
            with anyio.move_on_after(_SHUTDOWN_TIMEOUT_S * 2):
                await server.shutdown(_SHUTDOWN_TIMEOUT_S)
            for handler in server.connections:
                handler.force_close()
        except Exception:
            log.exception("health endpoint: error while closing")

    async def start(self) -> None:
        await self.bind()

    async def stop(self) -> None:
        await self.aclose()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (binding first if :meth:`bind` was not called); reports the bound port
        through ``task_status``, so ``port = await tg.start(server.serve)``.

        Only the bind can raise. Afterwards aiohttp answers requests in tasks of its own and this task
        just waits, so nothing that happens to a connection or a request (malformed input, a failing
        handler, EMFILE on accept) reaches the caller's task group: the daemon keeps processing messages.
        """
        port = await self.bind()
        try:
            log.info("health endpoint listening on %s", self.url)
            task_status.started(port)
            await anyio.sleep_forever()
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        try:
            response = self._route(request.method, request.path)
        except Exception:
            # The endpoint must never take the daemon down, nor answer with aiohttp's own error page.
            log.exception("health endpoint failed to answer %s", request.path)
            response = _json(500, {"error": "internal"})
        headers = {"Content-Type": response.content_type, "Cache-Control": "no-store"}
        if response.content_type == _HTML:
            headers["Content-Security-Policy"] = _PAGE_CSP
            headers["X-Content-Type-Options"] = "nosniff"
        if response.status == 405:
            headers["Allow"] = "GET, HEAD"
        return web.Response(status=response.status, body=response.body, headers=headers)

    def _route(self, method: str, path: str) -> _Response:
        if path not in _ROUTES:
            return _json(404, {"error": "not_found"})
        if method not in ("GET", "HEAD"):
            return _json(405, {"error": "method_not_allowed"})
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        if path == "/metrics":
            if self.metrics is None:
                return _json(404, {"error": "metrics_disabled"})
            return _Response(200, self.metrics.render(), CONTENT_TYPE)
        if path in ("/", "/status.json"):
            if self.metrics is None:
                return _json(404, {"error": "metrics_disabled"})
            status = self._status()
            if path == "/":
                return _Response(200, status_page(status).encode(), _HTML)
            return _json(200, status)
        return self._ready()

    def _status(self) -> dict[str, Any]:
        assert self.metrics is not None
        out = self.metrics.snapshot()
        ready = self._ready()
        try:
            out["readiness"] = orjson.loads(ready.body)
        except orjson.JSONDecodeError:
            out["readiness"] = {"ready": ready.status == 200}
        return out

    def _ready(self) -> _Response:
        if self.readiness is None:
            return _json(200, {"ready": True})
        try:
            ready, details = self.readiness()
        except Exception as exc:  # a broken probe means "not ready", never a dead endpoint
            log.warning("readiness check raised %s", type(exc).__name__, exc_info=True)
            return _json(503, {"ready": False, "reasons": [f"readiness check failed: {type(exc).__name__}"]})
        try:
            return _json(200 if ready else 503, details)
        except TypeError:
            return _json(503, {"ready": False, "reasons": ["readiness details are not JSON-serialisable"]})
