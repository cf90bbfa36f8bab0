"""HTTP/1.1 transport: ``asyncio`` streams plus ``h11``, with keep-alive.

No framework sits between the socket and the pipeline, so the server can do what frameworks hide:
close a connection after the side effect happened but before the response was sent (``drop``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from http import HTTPStatus

import h11

from .app import Drop, Request, Response, SandboxApp, json_response
from .config import SandboxConfig
from .faults import FaultInjector
from .ledger import Attempt, Ledger

__all__ = ["SandboxServer"]

log = logging.getLogger(__name__)

_READ_SIZE = 64 * 1024
_MAX_HEADER_BYTES = 64 * 1024
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


class _BodyTooLarge(Exception):
    pass


def _is_loopback(peer: object) -> bool:
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        address = ipaddress.ip_address(peer[0].partition("%")[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


class SandboxServer:
    """The sandbox provider on a real socket.

    ::

        async with SandboxServer(SandboxConfig(api_keys=("k",))) as server:
            httpx.post(f"{server.url}/v3/session/", ...)
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self.app = SandboxApp(self.config)
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._port: int | None = None
        self.connections_accepted = 0
        """Connections accepted since construction (lets tests check keep-alive reuse)."""

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the sandbox server is not started")
        return self._port

    @property
    def url(self) -> str:
        host = self.config.host
        if host in ("", "0.0.0.0"):  # noqa: S104 - a wildcard bind is reached through loopback
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    @property
    def ledger(self) -> Ledger:
        return self.app.ledger

    @property
    def faults(self) -> FaultInjector:
        return self.app.faults

    def reset(self) -> None:
        """Clear the ledger, the idempotency store and the faults (as ``POST /_admin/reset``)."""
        self.app.reset()

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("the sandbox server is already started")
        self._server = await asyncio.start_server(
            self._serve_connection, self.config.host, self.config.port, backlog=1024
        )
        self._port = self._server.sockets[0].getsockname()[1]
        self.app.base_url = self.url
        log.info("sandbox provider listening on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close every connection; requests in flight are abandoned."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await self.app.aclose()
        await server.wait_closed()
        log.info("sandbox provider stopped")

    async def __aenter__(self) -> SandboxServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_accepted += 1
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEADER_BYTES)
        try:
            await self._serve(conn, reader, writer)
        except h11.RemoteProtocolError as exc:
            self._reject(conn, writer, exc.error_status_hint, "bad_request")
        except _BodyTooLarge:
            self._reject(conn, writer, 413, "body_too_large")
        except (ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels these tasks. Ending them normally matters: asyncio 3.11's
            # StreamReaderProtocol calls task.exception() on them, which raises for a cancelled task.
            pass
        finally:
            writer.close()
            # Suppressing cancellation here too, for the same reason as above (stop() may cancel a
            # connection that is already closing).
            with contextlib.suppress(ConnectionError, TimeoutError, asyncio.CancelledError):
                await writer.wait_closed()
            self._connections.discard(task)

    async def _serve(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        loopback = _is_loopback(writer.get_extra_info("peername"))
        debug = log.isEnabledFor(logging.DEBUG)
        while True:
            request = await self._receive(conn, reader, writer, loopback)
            if request is None:
                return
            started = time.perf_counter()
            try:
                response = await self.app.handle(request)
            except Exception:
                log.exception("unhandled error serving %s", request.method.decode("latin-1"))
                response = json_response(500, {"error": "internal"})
            if debug:
                log.debug(
                    "%s %s -> %s in %.1f ms",
                    request.method.decode("latin-1"),
                    request.target.partition(b"?")[0].decode("latin-1"),
                    "dropped" if response is Drop.DROP else response.status,
                    (time.perf_counter() - started) * 1000,
                )
            attempt = request.meta.get("attempt")
            if response is Drop.DROP:
                writer.transport.abort()
                self._ended(attempt)
                return
            trickle_s = request.meta.get("trickle_s")
            try:
                if isinstance(trickle_s, float) and trickle_s > 0:
                    if not await self._trickle(conn, reader, writer, response, trickle_s):
                        return  # the client went away mid-answer
                else:
                    writer.write(_serialize(conn, response))
                    await writer.drain()
            finally:
                self._ended(attempt)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()

    def _ended(self, attempt: object) -> None:
        if isinstance(attempt, Attempt):
            attempt.ended_at = self.config.clock()

    @staticmethod
    async def _trickle(
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        response: Response,
        seconds: float,
    ) -> bool:
        """Send the head, then the body in up to 20 pieces spread over ``seconds``; False (and the
        connection aborted) as soon as the client is gone."""
        writer.write(
            conn.send(
                h11.Response(
                    status_code=response.status,
                    headers=list(response.headers),
                    reason=_REASONS.get(response.status, b""),
                )
            )
            or b""
        )
        await writer.drain()
        body = response.body
        pieces = max(1, min(20, len(body)))
        step = -(-len(body) // pieces)
        gap = seconds / pieces
        for start in range(0, len(body), step):
            waited = 0.0
            while waited < gap:  # short naps, so a client that gave up is noticed within ~10 ms
                if reader.at_eof() or writer.is_closing():
                    writer.transport.abort()
                    return False
                nap = min(0.01, gap - waited)
                await asyncio.sleep(nap)
                waited += nap
            writer.write(conn.send(h11.Data(data=body[start : start + step])) or b"")
            await writer.drain()
        writer.write(conn.send(h11.EndOfMessage()) or b"")
        await writer.drain()
        return True

    async def _receive(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, loopback: bool
    ) -> Request | None:
        head: h11.Request | None = None
        chunks: list[bytes] = []
        size = 0
        limit = self.config.body_limit
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                conn.receive_data(await reader.read(_READ_SIZE))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > limit:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return Request(
                    method=bytes(head.method),
                    target=bytes(head.target),
                    headers=list(head.headers),
                    body=b"".join(chunks),
                    peer_is_loopback=loopback,
                )
            else:
                return None

    @staticmethod
    def _reject(conn: h11.Connection, writer: asyncio.StreamWriter, status: int, error: str) -> None:
        if conn.our_state is not h11.SEND_RESPONSE and conn.our_state is not h11.IDLE:
            return
        response = json_response(status, {"error": error}, ((b"connection", b"close"),))
        try:
            writer.write(_serialize(conn, response))
        except (h11.LocalProtocolError, ConnectionError):
            pass


def _serialize(conn: h11.Connection, response: Response) -> bytes:
    head = conn.send(
        h11.Response(
            status_code=response.status,
            headers=list(response.headers),
            reason=_REASONS.get(response.status, b""),
        )
    )
    body = conn.send(h11.Data(data=response.body))
    end = conn.send(h11.EndOfMessage())
    return (head or b"") + (body or b"") + (end or b"")
