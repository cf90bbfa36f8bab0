"""The webhook intake's HTTP surface (aiohttp.web): Didit's deliveries in, acknowledged Kafka records out.

::

    POST <IDV_WEBHOOK_PATH>   a delivery: checked, published, answered (table below)
    GET  /healthz             200 while the event loop runs
    GET  /readyz              200 when the events producer is connected and the service is not draining
    GET  /metrics             Prometheus text format (consumer/webhooks/metrics.py)

A delivery is checked in this order, and the first failing check answers:

====== ========================= ==========================================================================
status result                    when
====== ========================= ==========================================================================
413    ``too_large``             the body is over IDV_WEBHOOK_MAX_BODY_BYTES (declared or streamed)
415    ``unsupported_media_type`` the content type is not application/json
408    ``read_timeout``          the body did not arrive within 10 s
401    signature reasons         no/unknown signature, no or stale timestamp (consumer/webhooks/signature.py)
400    ``invalid_json``          signed, but the body is not a JSON object
200    ``ignored``               signed JSON without a ``session_id`` (an entity-level event: not ours)
503    ``not_durable``           the broker did not acknowledge the record in time: the provider retries
200    ``accepted``              the broker acknowledged the record
====== ========================= ==========================================================================

The 2xx of an accepted delivery is written only after the broker's acknowledgement (publisher.py); a crash
or a 503 before it leaves the delivery to the provider's retries. Duplicate deliveries are published as
they come: they are deduplicated where events are applied, not here.

Logs carry only the outcome, the event type (when it is a plain identifier) and a hash of the session id:
never the body, the signature headers, the secrets or the client's other headers. aiohttp's access log is
off for the same reason.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

import anyio
import orjson
from aiohttp import web

from consumer.keys import key_hash
from consumer.webhooks.metrics import CONTENT_TYPE, WebhookMetrics
from consumer.webhooks.publisher import EventNotDurable, EventPublisher, event_headers
from consumer.webhooks.signature import SignatureRejected, WebhookVerifier

log = logging.getLogger(__name__)

__all__ = ["Intake"]

#: How long the body of one request may take to arrive.
READ_TIMEOUT_S = 10.0
_EVENT_TYPE = re.compile(r"[a-z][a-z0-9_.]{0,63}")
_JSON = "application/json"


def _answer(status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(data),
        content_type=_JSON,
        headers={"Cache-Control": "no-store", **(headers or {})},
    )


def _loggable_type(value: str) -> str:
    return value if _EVENT_TYPE.fullmatch(value) else "other"


class Intake:
    """The request handlers, around one verifier, one publisher and the metrics.

    ``app()`` builds the aiohttp application; ``draining`` is set when shutdown starts (``/readyz`` then
    answers 503 so a load balancer stops sending, while requests already received finish).
    """

    def __init__(
        self,
        verifier: WebhookVerifier,
        publisher: EventPublisher,
        metrics: WebhookMetrics | None = None,
        *,
        path: str = "/webhooks/didit",
        max_body_bytes: int = 1_000_000,
        read_timeout_s: float = READ_TIMEOUT_S,
    ) -> None:
        self.verifier = verifier
        self.publisher = publisher
        self.metrics = metrics if metrics is not None else WebhookMetrics()
        self.path = path
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s
        self.draining = False

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post(self.path, self.receive)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.on_shutdown.append(self._on_shutdown)
        return app

    async def _on_shutdown(self, _app: web.Application) -> None:
        self.draining = True

    # -- the delivery --------------------------------------------------------------------------------

    async def receive(self, request: web.Request) -> web.Response:
        self.metrics.in_flight(1)
        try:
            result, response = await self._receive(request)
        finally:
            self.metrics.in_flight(-1)
        self.metrics.received(result)
        return response

    def _reject(self, status: int, result: str, detail: str) -> tuple[str, web.Response]:
        log.warning("webhook rejected: %s", detail, extra={"result": result, "http_status": status})
        response = _answer(status, {"error": result})
        if status in (408, 413):
            # The rest of the body is not read: close instead of lingering over it for the next request.
            response.force_close()
        return result, response

    async def _receive(self, request: web.Request) -> tuple[str, web.Response]:
        declared = request.content_length
        if declared is not None and declared > self.max_body_bytes:
            return self._reject(413, "too_large", f"declared body of {declared} bytes")
        if request.content_type != _JSON:
            return self._reject(415, "unsupported_media_type", "content type is not application/json")
        try:
            # A client trickling its body must not hold a handler (and, at shutdown, the drain) for ever.
            with anyio.fail_after(self.read_timeout_s):
                body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._reject(413, "too_large", f"body over {self.max_body_bytes} bytes")
        except TimeoutError:
            return self._reject(408, "read_timeout", f"body not received within {self.read_timeout_s:g}s")
        try:
            verified = self.verifier.verify(body, request.headers)
        except SignatureRejected as exc:
            return self._reject(401, exc.reason, str(exc))

        payload = verified.payload
        if not isinstance(payload, dict):
            return self._reject(400, "invalid_json", "signed body is not a JSON object")
        if verified.secret > 0:
            self.metrics.previous_secret()
        raw_type = payload.get("webhook_type")
        webhook_type = raw_type if isinstance(raw_type, str) else ""
        session_id = payload.get("session_id")
        if not isinstance(session_id, str) or not session_id:
            log.info(
                "webhook ignored: no session_id",
                extra={"result": "ignored", "event_type": _loggable_type(webhook_type)},
            )
            return "ignored", _answer(200, {"status": "ignored"})

        fields = {
            "event_type": _loggable_type(webhook_type),
            "session_hash": key_hash(session_id),
            "signature": verified.method,
        }
        started = time.monotonic()
        try:
            partition, offset = await self.publisher.publish(
                session_id.encode("utf-8"), body, event_headers(webhook_type)
            )
        except EventNotDurable as exc:
            log.error(
                "webhook not acknowledged by Kafka, answered 503: %s",
                exc,
                extra={**fields, "result": "not_durable", "cause": exc.reason},
            )
            return "not_durable", _answer(503, {"error": "not_durable"}, {"Retry-After": "5"})
        self.metrics.published(time.monotonic() - started)
        log.info(
            "webhook accepted",
            extra={**fields, "result": "accepted", "partition": partition, "offset": offset},
        )
        return "accepted", _answer(200, {"status": "accepted"})

    # -- operations ----------------------------------------------------------------------------------

    async def _healthz(self, _request: web.Request) -> web.Response:
        return _answer(200, {"status": "ok"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        reasons = []
        if self.draining:
            reasons.append("draining")
        if not self.publisher.ready:
            reasons.append("events producer not connected")
        return _answer(503 if reasons else 200, {"ready": not reasons, "reasons": reasons})

    async def _metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})
