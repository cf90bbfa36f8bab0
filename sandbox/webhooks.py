"""The ``didit`` profile's webhook sender: signed ``status.updated`` / ``data.updated`` deliveries.

Each event (a session's status change, or a ``data.updated`` asked for at ``/_admin``) is delivered by
its own task: ``POST <webhook_url>`` with the JSON body, Didit's three signature headers
(``signing``), ``X-Timestamp`` and ``User-Agent: DiditWebhook/2.0``. A delivery that gets a 5xx, 404,
408 or 429, times out or cannot connect is retried with exponential backoff up to ``max_attempts``;
any other answer is final (a 401 for a bad signature will not change on a retry). Every attempt is
re-signed with a fresh ``timestamp`` (so a late retry is not stale); ``created_at`` stays the event's.

Faults, rolled once per event (``POST /_admin/webhooks {"faults": …}``):

``drop_rate``           the event is never delivered (the receiver must poll the decision endpoint)
``duplicate_rate``      after a successful delivery the same bytes are delivered once more
``reorder_rate``        the event is held back until a later event of its session was delivered (or
                        ``reorder_hold_ms`` passed): the receiver sees them out of order (a later event
                        that finds an earlier one held is not held itself)
``delay_ms``, ``delay_jitter_ms``   a wait before the first attempt
``bad_signature_rate``  a forged copy (every signature wrong) is delivered first; the genuine one follows

The delivery log (``GET /_admin/webhooks``) never holds bodies: event identity, statuses and answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .errors import SandboxConfigError
from .faults import check_numbers
from .sessions import DECIDED, Session
from .signing import signature_headers
from .views import pick

__all__ = ["Delivery", "Event", "WebhookFaults", "WebhookSender", "WebhookSettings", "event_payload"]

log = logging.getLogger(__name__)

USER_AGENT = "DiditWebhook/2.0 +https://didit.me"
_RETRIED = frozenset({404, 408, 429})
_RATES = ("drop_rate", "duplicate_rate", "reorder_rate", "bad_signature_rate")
_DURATIONS = ("delay_ms", "delay_jitter_ms", "reorder_hold_ms")


@dataclass(frozen=True, slots=True)
class WebhookFaults:
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    bad_signature_rate: float = 0.0
    delay_ms: float = 0.0
    delay_jitter_ms: float = 0.0
    reorder_hold_ms: float = 5000.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_numbers(self, rates=_RATES, non_negative=_DURATIONS, label="webhook fault ")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise SandboxConfigError("webhook fault seed must be an integer or null")

    def merged(self, changes: Mapping[str, object]) -> WebhookFaults:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SandboxConfigError(f"unknown webhook fault setting(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]  # checked in __post_init__

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


@dataclass(frozen=True, slots=True)
class WebhookSettings:
    """Where and how events are delivered, checked here for the command line and ``/_admin`` alike
    (every error message starts with the field's name)."""

    url: str | None = None
    """Where events go; ``None`` sends none."""
    secret: str | None = field(default=None, repr=False)
    """The webhook secret key deliveries are signed with (required with ``url``)."""
    max_attempts: int = 4
    backoff_s: float = 0.5
    timeout_s: float = 5.0
    faults: WebhookFaults = field(default_factory=WebhookFaults)

    def __post_init__(self) -> None:
        url, secret = self.url, self.secret
        if url is not None and (not isinstance(url, str) or not url.startswith(("http://", "https://"))):
            raise SandboxConfigError("url must be an http:// or https:// URL or null")
        if url is not None and (not isinstance(secret, str) or not secret):
            raise SandboxConfigError("url needs a non-empty secret")
        attempts = self.max_attempts
        if not isinstance(attempts, int) or isinstance(attempts, bool) or attempts < 1:
            raise SandboxConfigError("max_attempts must be an integer >= 1")
        check_numbers(self, non_negative=("backoff_s", "timeout_s"))
        if self.timeout_s == 0:
            raise SandboxConfigError("timeout_s must be a number > 0")
        object.__setattr__(self, "backoff_s", float(self.backoff_s))
        object.__setattr__(self, "timeout_s", float(self.timeout_s))

    def merged(self, changes: Mapping[str, Any]) -> WebhookSettings:
        """A copy with ``changes`` applied (``faults`` merged into the current ones); from JSON."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise SandboxConfigError(f"unknown webhook setting(s): {', '.join(unknown)}")
        raw_faults = changes.get("faults", {})
        if not isinstance(raw_faults, dict):
            raise SandboxConfigError("faults must be an object")
        return dataclasses.replace(self, **{**changes, "faults": self.faults.merged(raw_faults)})

    def state(self) -> dict[str, object]:
        """What ``GET /_admin/webhooks`` shows of them: whether a secret is set, never the secret."""
        return {
            "url": self.url,
            "secret_set": bool(self.secret),
            **pick(self, "max_attempts", "backoff_s", "timeout_s"),
            "faults": self.faults.to_dict(),
        }


@dataclass(slots=True)
class Event:
    event_id: int
    session_id: str
    webhook_type: str
    status: str
    created_at: int
    payload: dict[str, Any]
    faults: list[str] = field(default_factory=list)
    fate: str = "pending"
    """``pending``, ``delivered`` (a 2xx), ``failed`` (a final answer or attempts used up), ``dropped``."""
    attempts: int = 0

    def to_dict(self) -> dict[str, object]:
        view = pick(self)
        del view["payload"]  # the delivery log never holds bodies
        view["faults"] = list(self.faults)
        return view


@dataclass(slots=True)
class Delivery:
    """One HTTP attempt."""

    event_id: int
    kind: str
    """``genuine`` (with retries numbered by ``attempt``), ``duplicate`` or ``forged``."""
    attempt: int
    at: float
    http_status: int | None = None
    error: str | None = None
    ended_at: float | None = None

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def event_payload(session: Session, webhook_type: str, created_at: int) -> dict[str, Any]:
    """The body of an event without its per-attempt ``timestamp`` (optional fields only when set)."""
    body: dict[str, Any] = {
        "session_id": session.session_id,
        "status": session.status,
        "webhook_type": webhook_type,
        "created_at": created_at,
    }
    for name in ("workflow_id", "vendor_data", "metadata"):
        value = getattr(session, name)
        if value is not None:
            body[name] = value
    if session.status in DECIDED or session.status == "Abandoned" or webhook_type == "data.updated":
        body["decision"] = session.decision_body()
    return body


def _forged(headers: dict[str, str]) -> dict[str, str]:
    flipped = dict(headers)
    for name in ("X-Signature", "X-Signature-V2", "X-Signature-Simple"):
        value = flipped[name]
        flipped[name] = value[:-1] + ("0" if value[-1] != "0" else "1")
    return flipped


class WebhookSender:
    def __init__(self, clock: Callable[[], float], settings: WebhookSettings | None = None) -> None:
        self._clock = clock
        self.settings = settings or WebhookSettings()
        self._rng = random.Random(self.settings.faults.seed)  # noqa: S311 - fault rolls, not cryptography
        self.events: list[Event] = []
        self.deliveries: list[Delivery] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._last_done: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Event] = {}
        self._holding: dict[str, set[int]] = {}
        self._client: aiohttp.ClientSession | None = None

    @property
    def pending(self) -> int:
        return sum(1 for e in self.events if e.fate == "pending")

    def configure(self, changes: Mapping[str, Any]) -> None:
        """``POST /_admin/webhooks``: :meth:`WebhookSettings.merged`; a new ``faults.seed`` reseeds the rolls.
        Raises :class:`SandboxConfigError`; nothing changes then."""
        self.settings = self.settings.merged(changes)
        if "seed" in changes.get("faults", {}):
            self._rng.seed(self.settings.faults.seed)

    def state(self) -> dict[str, object]:
        return {
            **self.settings.state(),
            "pending": self.pending,
            "events": [e.to_dict() for e in self.events],
            "deliveries": [d.to_dict() for d in self.deliveries],
        }

    def emit(self, session: Session, webhook_type: str) -> Event | None:
        """Queue one event for ``session`` as it is now; ``None`` when no webhook URL is configured."""
        url, secret = self.settings.url, self.settings.secret
        if url is None or secret is None:
            return None
        created_at = int(self._clock())
        event = Event(
            event_id=len(self.events) + 1,
            session_id=session.session_id,
            webhook_type=webhook_type,
            status=session.status,
            created_at=created_at,
            payload=event_payload(session, webhook_type, created_at),
        )
        rng, faults = self._rng, self.settings.faults
        for name in _RATES:
            rate = getattr(faults, name)
            if rate and rng.random() < rate:
                event.faults.append(name.removesuffix("_rate"))
        delay_s = (
            faults.delay_ms + (rng.uniform(0, faults.delay_jitter_ms) if faults.delay_jitter_ms else 0)
        ) / 1000
        self.events.append(event)
        task = asyncio.get_running_loop().create_task(self._run(event, url, secret, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return event

    async def idle(self) -> None:
        """Wait until every event so far has its fate (delivered, failed or dropped)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
        if self._client is not None:
            await self._client.close()
            self._client = None

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def reset(self) -> None:
        self.cancel()
        self.events.clear()
        self.deliveries.clear()
        self._last_done.clear()
        self._waiters.clear()
        self._holding.clear()

    # -- delivery -------------------------------------------------------------------------------

    async def _run(self, event: Event, url: str, secret: str, delay_s: float) -> None:
        try:
            if "drop" in event.faults:
                event.fate = "dropped"
                return
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            if "reorder" in event.faults:
                await self._hold(event)
            if "bad_signature" in event.faults:
                raw, headers = self._signed(event, secret)
                await self._attempt(event, url, raw, _forged(headers), "forged", 1)
            await self._deliver(event, url, secret)
        finally:
            if event.fate == "pending":
                event.fate = "failed"  # cancelled (reset or stop) before an answer
            self._finished(event)

    async def _deliver(self, event: Event, url: str, secret: str) -> None:
        max_attempts = self.settings.max_attempts
        for attempt in range(1, max_attempts + 1):
            raw, headers = self._signed(event, secret)
            event.attempts = attempt
            status = await self._attempt(event, url, raw, headers, "genuine", attempt)
            if status is not None and 200 <= status < 300:
                event.fate = "delivered"
                if "duplicate" in event.faults:
                    await self._attempt(event, url, raw, headers, "duplicate", 1)
                return
            if status is not None and status not in _RETRIED and status < 500:
                break
            if attempt < max_attempts:
                await asyncio.sleep(self.settings.backoff_s * 2 ** (attempt - 1))
        event.fate = "failed"
        log.warning(
            "webhook event %d (%s) not delivered after %d attempt(s)",
            event.event_id,
            event.webhook_type,
            event.attempts,
        )

    def _signed(self, event: Event, secret: str) -> tuple[bytes, dict[str, str]]:
        # The timestamp goes after created_at (key order matters to X-Signature only).
        items = list(event.payload.items())
        items.insert(4, ("timestamp", int(self._clock())))
        raw = json.dumps(dict(items), ensure_ascii=False).encode("utf-8")
        headers = signature_headers(secret, raw)
        headers["Content-Type"] = "application/json"
        headers["User-Agent"] = USER_AGENT
        return raw, headers

    async def _attempt(
        self, event: Event, url: str, raw: bytes, headers: dict[str, str], kind: str, attempt: int
    ) -> int | None:
        delivery = Delivery(event.event_id, kind, attempt, self._clock())
        self.deliveries.append(delivery)
        if self._client is None:
            self._client = aiohttp.ClientSession()
        try:
            async with self._client.post(
                url, data=raw, headers=headers, timeout=aiohttp.ClientTimeout(total=self.settings.timeout_s)
            ) as response:
                await response.read()
                delivery.http_status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            delivery.error = type(exc).__name__
        finally:
            delivery.ended_at = self._clock()
        log.debug(
            "webhook %s #%d %s attempt %d -> %s",
            event.webhook_type,
            event.event_id,
            kind,
            attempt,
            delivery.http_status or delivery.error,
        )
        return delivery.http_status

    # -- out-of-order delivery --------------------------------------------------------------------

    async def _hold(self, event: Event) -> None:
        """Wait until a later event of the same session is done, or ``reorder_hold_ms``.

        An event that finds an earlier one of its session held is not held itself: it is the one that
        overtakes (holding both would only delay them, in order)."""
        holding = self._holding.setdefault(event.session_id, set())
        if any(other < event.event_id for other in holding):
            return
        holding.add(event.event_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.faults.reorder_hold_ms / 1000
        try:
            while self._last_done.get(event.session_id, 0) <= event.event_id:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return
                waiter = self._waiters.setdefault(event.session_id, asyncio.Event())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.wait(), remaining)
        finally:
            holding.discard(event.event_id)
            if not holding:
                self._holding.pop(event.session_id, None)

    def _finished(self, event: Event) -> None:
        session_id = event.session_id
        self._last_done[session_id] = max(self._last_done.get(session_id, 0), event.event_id)
        waiter = self._waiters.pop(session_id, None)
        if waiter is not None:
            waiter.set()
