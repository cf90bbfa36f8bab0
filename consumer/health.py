"""Operations endpoint: Prometheus metrics, liveness and readiness over HTTP/1.1.

::

    GET /metrics   the daemon's metrics, Prometheus text format
    GET /healthz   200 while the event loop runs (a blocked loop cannot answer: the probe times out)
    GET /readyz    200 or 503 with a JSON body saying why (see readiness_report)

:class:`HealthServer` is an anyio task (``await tg.start(server.serve)``) speaking HTTP/1.1 through h11,
like the sandbox provider, with keep-alive and short timeouts. It binds 127.0.0.1 by default: metrics
are not secret, but nothing outside the host needs them unless a scraper is deployed there on purpose.

Readiness is more than "the process is up". A consumer whose partition stopped moving while everything
else looks fine is the failure that hides longest (PITFALLS: quix-streams #1124), so
:func:`readiness_report` also fails when any partition holds pending work that has not progressed for
``stall_after_s``. :class:`PartitionProgress` keeps the timestamps it needs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import h11
import orjson
from anyio.abc import SocketAttribute
from anyio.streams.stapled import MultiListener

from consumer.errors import ConfigurationError
from consumer.metrics import CONTENT_TYPE, Metrics

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_HOST",
    "DEFAULT_PORT",
    "HealthServer",
    "PartitionProgress",
    "Readiness",
    "readiness_report",
]

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9400

Readiness = Callable[[], tuple[bool, dict[str, Any]]]

_READ_SIZE = 16 * 1024
_MAX_HEAD_BYTES = 16 * 1024
_IDLE_TIMEOUT_S = 15.0  # an idle keep-alive connection is closed after this
_REQUEST_TIMEOUT_S = 5.0  # a started request must arrive completely within this
_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
_JSON = b"application/json"


# -- readiness logic -----------------------------------------------------------------------------------


def readiness_report(
    assigned: int,
    broker_ok: bool,
    store_ok: bool,
    partition_progress: dict[str, tuple[float, int]],
    now: float,
    stall_after_s: float,
    *,
    require_assignment: bool = True,
) -> tuple[bool, dict[str, Any]]:
    """Decide readiness from the daemon's state; pure, so every case is a unit test.

    ``assigned`` is the number of partitions this instance owns; with ``require_assignment=False`` zero is
    fine (more instances than partitions: a standby is healthy). ``partition_progress`` maps
    ``"topic/partition"`` to ``(last_progress, pending)``: the ``time.monotonic()`` of the partition's last
    progress and the number of its messages dispatched but not done. A partition with ``pending > 0``
    whose last progress is ``stall_after_s`` or more before ``now`` is *stalled*. Idle partitions
    (``pending == 0``) never are, however old their timestamp.

    Ready iff partitions are assigned (or none are required), the broker and the store are reachable and
    no partition is stalled. The details dictionary is the JSON body of ``/readyz``.
    """
    reasons: list[str] = []
    if assigned <= 0 and require_assignment:
        reasons.append("no partitions assigned")
    if not broker_ok:
        reasons.append("Kafka broker unreachable")
    if not store_ok:
        reasons.append("dedupe store unreachable")
    stalled: dict[str, dict[str, float | int]] = {}
    for name, (last_progress, pending) in partition_progress.items():
        idle = now - last_progress
        if pending > 0 and idle >= stall_after_s:
            stalled[name] = {"pending": pending, "stalled_s": round(idle, 1)}
    reasons.extend(
        f"partition {name} stalled: {stalled[name]['pending']} pending, "
        f"no progress for {stalled[name]['stalled_s']}s"
        for name in sorted(stalled)
    )
    ready = not reasons
    details: dict[str, Any] = {
        "ready": ready,
        "assigned_partitions": assigned,
        "broker": "ok" if broker_ok else "unreachable",
        "store": "ok" if store_ok else "unreachable",
        "stalled_partitions": stalled,
        "reasons": reasons,
    }
    return ready, details


@dataclass(slots=True)
class _Progress:
    last: float
    pending: int = 0


class PartitionProgress:
    """Per-partition "last progress" timestamps for :func:`readiness_report`.

    Call :meth:`started` when a message of the partition is dispatched, :meth:`finished` when it is done
    (whatever its disposition), :meth:`remove` when the partition is revoked. Progress is a finished
    message, or work arriving at a partition that had none pending: without the second rule a partition
    idle for an hour would look stalled the moment its next message arrived.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._parts: dict[str, _Progress] = {}

    @staticmethod
    def name(topic: str, partition: int) -> str:
        return f"{topic}/{partition}"

    def started(self, topic: str, partition: int) -> None:
        key = f"{topic}/{partition}"
        entry = self._parts.get(key)
        if entry is None:
            entry = self._parts[key] = _Progress(self._clock())
        elif entry.pending == 0:
            entry.last = self._clock()
        entry.pending += 1

    def finished(self, topic: str, partition: int) -> None:
        entry = self._parts.get(f"{topic}/{partition}")
        if entry is not None:
            entry.pending = max(0, entry.pending - 1)
            entry.last = self._clock()

    def remove(self, topic: str, partition: int) -> None:
        self._parts.pop(f"{topic}/{partition}", None)

    def snapshot(self) -> dict[str, tuple[float, int]]:
        return {key: (entry.last, entry.pending) for key, entry in self._parts.items()}


# -- HTTP server ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Response:
    status: int
    body: bytes
    content_type: bytes


def _json(status: int, data: dict[str, Any]) -> _Response:
    return _Response(status, orjson.dumps(data) + b"\n", _JSON)


class HealthServer:
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
    block. If it raises, the answer is 503.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = DEFAULT_PORT,
        metrics: Metrics | None = None,
        readiness: Readiness | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.metrics = metrics
        self.readiness = readiness
        self._port: int | None = None
        self._listener: MultiListener[anyio.abc.SocketStream] | None = None

    @property
    def port(self) -> int:
        """The bound port (useful with port 0), once bound (:meth:`bind`, ``async with``, :meth:`serve`)."""
        if self._port is None:
            raise RuntimeError("the health server is not bound yet")
        return self._port

    @property
    def url(self) -> str:
        host = self.host
        if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is reached through loopback
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    async def bind(self) -> int:
        """Open the listening socket now and return the bound port (idempotent).

        A host/port that cannot be bound raises :class:`ConfigurationError` naming ``IDV_HEALTH_PORT``.
        Binding before the task group (``async with server:`` does it) lets that error reach the CLI as
        itself; raised inside a task group it would arrive wrapped in an exception group.
        """
        if self._listener is None:
            try:
                listener = await anyio.create_tcp_listener(
                    local_host=self.host, local_port=self.requested_port
                )
            except OSError as exc:
                raise ConfigurationError(
                    f"IDV_HEALTH_PORT: cannot listen on {self.host}:{self.requested_port} "
                    f"({exc.strerror or type(exc).__name__})"
                ) from None
            self._listener = listener
            # S610 is about Django's QuerySet.extra; this is anyio's typed-attribute lookup.
            self._port = int(listener.listeners[0].extra(SocketAttribute.local_port))  # noqa: S610
        assert self._port is not None
        return self._port

    async def aclose(self) -> None:
        """Close the listening socket (a no-op when not bound). :meth:`serve` does this when it ends."""
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.aclose()

    async def __aenter__(self) -> HealthServer:
        await self.bind()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def serve(self, *, task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled (binding first if :meth:`bind` was not called); reports the bound port
        through ``task_status``, so ``port = await tg.start(server.serve)``."""
        port = await self.bind()
        listener = self._listener
        assert listener is not None
        try:
            log.info("health endpoint listening on %s", self.url)
            task_status.started(port)
            await listener.serve(self._connection)
        finally:
            with anyio.CancelScope(shield=True):
                await self.aclose()

    async def _connection(self, stream: anyio.abc.SocketStream) -> None:
        async with stream:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD_BYTES)
            try:
                await self._serve(conn, stream)
            except h11.RemoteProtocolError as exc:
                await self._send_error(conn, stream, exc.error_status_hint)
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                pass

    async def _serve(self, conn: h11.Connection, stream: anyio.abc.SocketStream) -> None:
        while True:
            request = await self._receive(conn, stream)
            if request is None:
                return
            try:
                response = self._route(request)
            except Exception:
                # The endpoint must never take the daemon down: its task group is the daemon's.
                log.exception("health endpoint failed to answer %s", bytes(request.target).decode("latin-1"))
                response = _json(500, {"error": "internal"})
            head_only = request.method == b"HEAD"
            headers = [
                (b"content-type", response.content_type),
                (b"content-length", str(len(response.body)).encode()),
                (b"cache-control", b"no-store"),
            ]
            if response.status == 405:
                headers.append((b"allow", b"GET, HEAD"))
            data = (
                conn.send(
                    h11.Response(
                        status_code=response.status,
                        headers=headers,
                        reason=_REASONS.get(response.status, b""),
                    )
                )
                or b""
            )
            if not head_only:
                data += conn.send(h11.Data(data=response.body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await stream.send(data)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    async def _receive(self, conn: h11.Connection, stream: anyio.abc.SocketStream) -> h11.Request | None:
        """The next request (a body, if any, is read and ignored); None when the connection should end.

        Between requests a keep-alive connection may sit idle for ``_IDLE_TIMEOUT_S``; once the first
        bytes of a request arrived, the whole request must arrive within ``_REQUEST_TIMEOUT_S`` (a client
        trickling header bytes cannot hold the connection forever).
        """
        request: h11.Request | None = None
        deadline: float | None = None
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                timeout = _IDLE_TIMEOUT_S if deadline is None else deadline - anyio.current_time()
                with anyio.move_on_after(max(timeout, 0.0)):
                    try:
                        data = await stream.receive(_READ_SIZE)
                    except anyio.EndOfStream:
                        return None
                    if deadline is None:
                        deadline = anyio.current_time() + _REQUEST_TIMEOUT_S
                    conn.receive_data(data)
                    continue
                return None  # timed out: close the connection
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.EndOfMessage):
                return request
            elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                return None
            # h11.Data: a request body, not needed by any endpoint here.

    def _route(self, request: h11.Request) -> _Response:
        path = bytes(request.target).partition(b"?")[0]
        if path not in (b"/metrics", b"/healthz", b"/readyz"):
            return _json(404, {"error": "not_found"})
        if request.method not in (b"GET", b"HEAD"):
            return _json(405, {"error": "method_not_allowed"})
        if path == b"/healthz":
            return _json(200, {"status": "ok"})
        if path == b"/metrics":
            if self.metrics is None:
                return _json(404, {"error": "metrics_disabled"})
            return _Response(200, self.metrics.render(), CONTENT_TYPE.encode())
        return self._ready()

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

    @staticmethod
    async def _send_error(conn: h11.Connection, stream: anyio.abc.SocketStream, status: int) -> None:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = orjson.dumps({"error": "bad_request"})
        try:
            data = (
                conn.send(
                    h11.Response(
                        status_code=status,
                        headers=[
                            (b"content-type", _JSON),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"),
                        ],
                        reason=_REASONS.get(status, b""),
                    )
                )
                or b""
            )
            data += (conn.send(h11.Data(data=body)) or b"") + (conn.send(h11.EndOfMessage()) or b"")
            await stream.send(data)
        except (h11.LocalProtocolError, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
            pass
