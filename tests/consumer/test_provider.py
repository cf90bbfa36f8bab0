"""The provider client against the sandbox provider over real HTTP (and a few MockTransport edge cases)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator

import httpx
import pytest

from consumer.errors import ProviderAuthError, ProviderConfigError, ProviderInDoubt, RetriesExhausted
from consumer.provider import CallProgress, ProviderClient, RetryPolicy, classify_status, parse_retry_after
from producer.envelope import OPERATIONS
from tests.consumer.conftest import API_KEY, Sandbox

pytestmark = pytest.mark.anyio

AML = OPERATIONS["aml_screening"]
FAST = RetryPolicy(max_attempts=5, base_delay_s=0.01, max_delay_s=0.05)


TRANSPORT = {"kind": "httpx"}


@pytest.fixture(params=["httpx", "aiohttp", "httpx-aiohttp"])
def transport_kind(request: pytest.FixtureRequest) -> Iterator[str]:
    """Every test that talks to the sandbox runs on each provider transport (IDV_PROVIDER_TRANSPORT);
    MockTransport and pure-function tests do not use one, so they run once."""
    TRANSPORT["kind"] = request.param
    yield request.param
    TRANSPORT["kind"] = "httpx"


@pytest.fixture
def sb(sandbox: object, transport_kind: str) -> Iterator[Sandbox]:
    yield Sandbox(sandbox.url)  # type: ignore[attr-defined]


def client(sb: Sandbox, key: str = API_KEY, retry: RetryPolicy = FAST) -> ProviderClient:
    return ProviderClient(
        sb.url, key, retry=retry, timeout_s=5, rng=random.Random(0), transport_kind=TRANSPORT["kind"]
    )


async def test_500_500_then_200_is_one_side_effect_with_the_same_key(sb: Sandbox) -> None:
    sb.faults(script=["500", "500"])
    async with client(sb) as c:
        result = await c.call(AML, {"full_name": "A"}, "idv_key-500")
    assert result.outcome.status == "approved"
    assert result.attempts == 3
    entry = sb.ledger()["keys"]["idv_key-500"]
    assert entry["side_effects"] == 1
    assert [a["status"] for a in entry["attempts"]] == [500, 500, 200]
    assert {a["idempotency_key"] for a in entry["attempts"]} == {"idv_key-500"}


async def test_429_retry_after_is_a_minimum_wait(sb: Sandbox) -> None:
    sb.faults(script=["429:2"])
    async with client(sb) as c:
        t0 = time.monotonic()
        result = await c.call(AML, {"full_name": "A"}, "idv_key-429")
        waited = time.monotonic() - t0
    assert result.attempts == 2
    assert waited >= 2.0  # backoff alone would be ~0.01 s
    attempts = sb.ledger()["keys"]["idv_key-429"]["attempts"]
    assert attempts[1]["at"] - attempts[0]["at"] >= 2.0


async def test_dropped_connection_after_side_effect_replays_stored_response(sb: Sandbox) -> None:
    sb.faults(script=["drop"])
    async with client(sb) as c:
        result = await c.call(AML, {"full_name": "REVIEW me"}, "idv_key-drop")
    assert result.outcome.status == "review"
    entry = sb.ledger()["keys"]["idv_key-drop"]
    assert entry["side_effects"] == 1
    assert len(entry["attempts"]) == 2
    assert entry["attempts"][1]["replayed"] is True


async def test_declined_is_a_successful_call(sb: Sandbox) -> None:
    async with client(sb) as c:
        result = await c.call(AML, {"full_name": "DECLINE this"}, "idv_key-decl")
    assert not result.terminal_failure
    assert result.outcome.status == "declined"
    assert result.outcome.provider_reference


async def test_create_session_reference_is_the_session_id(sb: Sandbox) -> None:
    async with client(sb) as c:
        result = await c.call(OPERATIONS["create_session"], {"workflow_id": "wf"}, "idv_key-sess")
    assert result.outcome.status == "created"
    assert result.outcome.http_status == 201
    assert result.outcome.provider_reference and len(result.outcome.provider_reference) >= 8


async def test_422_is_terminal_and_not_retried(sb: Sandbox) -> None:
    async with client(sb) as c:
        result = await c.call(AML, {"no_name": "x"}, "idv_key-422")
    assert result.terminal_failure
    assert result.outcome.status == "failed" and result.outcome.http_status == 422
    assert result.outcome.detail == "validation_error"
    assert len(sb.ledger()["keys"]["idv_key-422"]["attempts"]) == 1


@pytest.mark.parametrize("api_key", ["wrong-key", "broke-key"])
async def test_401_and_403_are_configuration_errors(sb: Sandbox, api_key: str) -> None:
    async with client(sb, key=api_key) as c:
        with pytest.raises(ProviderAuthError) as info:
            await c.call(AML, {"full_name": "A"}, "idv_key-auth-" + api_key)
    assert info.value.status in (401, 403)
    assert api_key not in str(info.value)


async def test_retry_ceiling(sb: Sandbox) -> None:
    sb.faults(error_rate=1.0)
    try:
        async with client(sb, retry=RetryPolicy(3, 0.01, 0.02)) as c:
            with pytest.raises(RetriesExhausted) as info:
                await c.call(AML, {"full_name": "A"}, "idv_key-ceiling")
    finally:
        sb.faults(error_rate=0.0)
    assert info.value.attempts == 3
    entry = sb.ledger()["keys"]["idv_key-ceiling"]
    assert len(entry["attempts"]) == 3 and entry["side_effects"] == 0


async def test_409_in_flight_is_retried_until_the_first_finishes() -> None:
    """A 409 (the first request with this key still running) is retried, not recorded as a failure."""
    answers = iter(
        [
            httpx.Response(409, json={"error": "idempotency_request_in_flight"}),
            httpx.Response(200, json={"request_id": "r1", "aml": {"status": "Approved"}}),
        ]
    )
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["Idempotency-Key"])
        assert request.headers["x-api-key"] == "k"
        return next(answers)

    async with ProviderClient(
        "http://provider", "k", retry=FAST, transport=httpx.MockTransport(handler)
    ) as c:
        result = await c.call(AML, {"full_name": "A"}, "idv_same")
    assert result.outcome.status == "approved" and result.outcome.provider_reference == "r1"
    assert seen == ["idv_same", "idv_same"]


async def test_connect_error_is_retried() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls < 3:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200, json={"request_id": "r", "aml": {"status": "Approved"}})

    async with ProviderClient(
        "http://provider", "k", retry=FAST, transport=httpx.MockTransport(handler)
    ) as c:
        result = await c.call(AML, {"full_name": "A"}, "idv_x")
    assert result.attempts == 3


def test_classification_table() -> None:
    assert classify_status(200) == classify_status(201) == "ok"
    assert classify_status(401) == classify_status(403) == "auth"
    for status in (408, 409, 425, 429, 500, 502, 503, 504):
        assert classify_status(status) == "retry", status
    for status in (400, 404, 413, 422):  # 404: refined by the body (route or business resource)
        assert classify_status(status) == "terminal", status
    for status in (301, 302, 307, 308, 405):  # the endpoint is not there: configuration
        assert classify_status(status) == "config", status


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past


def test_backoff_grows_and_is_capped() -> None:
    policy = RetryPolicy(max_attempts=10, base_delay_s=0.1, max_delay_s=1.0)
    rng = random.Random(1)
    delays = [policy.backoff(n, rng) for n in range(1, 9)]
    assert all(0.05 <= d <= 1.0 for d in delays)
    assert delays[0] <= 0.1 and delays[-1] >= 0.5


async def test_a_provider_slower_than_the_timeout_is_a_retriable_transport_error(sb: Sandbox) -> None:
    """The timeout reaches the transport (requests bypass httpx.AsyncClient): each attempt is cut at
    ~0.3 s instead of waiting the sandbox's 2 s, and the same key is sent every time."""
    sb.faults(latency_ms=2000)
    retry = RetryPolicy(max_attempts=2, base_delay_s=0.01, max_delay_s=0.01)
    c = ProviderClient(sb.url, API_KEY, retry=retry, timeout_s=0.3, transport_kind=TRANSPORT["kind"])
    async with c:
        t0 = time.monotonic()
        with pytest.raises(RetriesExhausted):
            await c.call(AML, {"full_name": "Slow"}, "idv_key-timeout")
        elapsed = time.monotonic() - t0
    assert elapsed < 1.5, f"two attempts took {elapsed:.2f}s: the 0.3 s timeout was not applied"
    keys = {a["idempotency_key"] for a in sb.ledger()["keys"]["idv_key-timeout"]["attempts"]}
    assert keys == {"idv_key-timeout"}


async def test_requests_carry_the_client_headers() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "Approved"})

    c = ProviderClient("http://provider/", "secret-key", retry=FAST, transport=httpx.MockTransport(handler))
    async with c:
        await c.call(AML, {"full_name": "A"}, "idv_key-h")
    (request,) = seen
    assert str(request.url) == "http://provider" + AML.path
    assert request.method == "POST"
    assert request.headers["x-api-key"] == "secret-key"
    assert request.headers["idempotency-key"] == "idv_key-h"
    assert request.headers["content-type"] == "application/json"
    assert request.headers["host"] == "provider"
    assert request.headers["content-length"] == str(len(request.content))
    assert request.extensions["timeout"]["read"] == 10.0


# -- hardening: total deadline, Retry-After ceiling, configuration answers, in-doubt answers -------------


async def test_a_trickled_answer_is_cut_by_the_total_attempt_deadline_on_every_transport(sb: Sandbox) -> None:
    """The body arrives a piece every ~150 ms for 3 s: no read timeout ever fires, so only a total
    deadline ends the attempt (aiohttp's ClientTimeout(total=None) used to let it run its full length)."""
    sb.faults(script=["trickle:3000"])
    retry = RetryPolicy(max_attempts=3, base_delay_s=0.2, max_delay_s=0.2)
    c = ProviderClient(sb.url, API_KEY, retry=retry, timeout_s=0.8, transport_kind=TRANSPORT["kind"])
    async with c:
        t0 = time.monotonic()
        result = await c.call(AML, {"full_name": "Trickle"}, "idv_key-trickle")
        elapsed = time.monotonic() - t0
    assert result.outcome.status == "approved" and result.attempts == 2
    assert elapsed < 2.0, f"{elapsed:.2f}s: the attempt outlived its 0.8 s deadline"
    first, second = sb.ledger()["keys"]["idv_key-trickle"]["attempts"]
    assert first["ended_at"] - first["at"] < 1.3  # the server saw the client give up at the deadline
    assert second["replayed"] is True and second["at"] >= first["ended_at"]  # never two at once


async def test_retry_after_is_capped_by_the_ceiling(sb: Sandbox) -> None:
    sb.faults(script=["429:86400"])
    c = ProviderClient(
        sb.url, API_KEY, retry=FAST, timeout_s=5, retry_after_max_s=0.3, transport_kind=TRANSPORT["kind"]
    )
    async with c:
        t0 = time.monotonic()
        result = await c.call(AML, {"full_name": "A"}, "idv_key-ra-cap")
        waited = time.monotonic() - t0
    assert result.attempts == 2 and result.outcome.status == "approved"
    assert 0.3 <= waited < 3.0  # the ceiling, not a day; still at least the (capped) hint


async def test_a_404_for_the_route_itself_is_a_configuration_error(sb: Sandbox) -> None:
    """A wrong base URL (e.g. an API version missing): the sandbox answers 404 not_found for the path."""
    c = ProviderClient(sb.url + "/v2", API_KEY, retry=FAST, transport_kind=TRANSPORT["kind"])
    async with c:
        with pytest.raises(ProviderConfigError) as info:
            await c.call(AML, {"full_name": "A"}, "idv_key-route")
    assert info.value.status == 404 and isinstance(info.value, ProviderAuthError)  # the daemon's fatal path
    assert "IDV_PROVIDER_URL" in str(info.value)


@pytest.mark.parametrize("status", [301, 302, 307, 308, 405])
async def test_redirects_and_405_are_configuration_errors(status: int) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, headers={"location": "https://elsewhere/"}, content=b"")

    async with ProviderClient(
        "http://provider", "k", retry=FAST, transport=httpx.MockTransport(handler)
    ) as c:
        with pytest.raises(ProviderConfigError):
            await c.call(AML, {"full_name": "A"}, "idv_x")


@pytest.mark.parametrize(
    ("body", "config"),
    [
        (b"<html>Not Found</html>", True),
        (b'{"error": "not_found"}', True),
        (b'{"detail": "Not Found"}', True),
        (b'{"error": "session_not_found"}', False),
    ],
)
async def test_a_business_404_with_its_own_code_is_terminal_but_a_route_404_is_not(
    body: bytes, config: bool
) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(404, content=body)

    async with ProviderClient(
        "http://provider", "k", retry=FAST, transport=httpx.MockTransport(handler)
    ) as c:
        if config:
            with pytest.raises(ProviderConfigError):
                await c.call(AML, {"full_name": "A"}, "idv_x")
        else:
            result = await c.call(AML, {"full_name": "A"}, "idv_x")
            assert result.terminal_failure and result.outcome.detail == "session_not_found"


async def test_key_reused_for_another_body_is_in_doubt_not_a_failure(sb: Sandbox) -> None:
    async with client(sb) as c:
        await c.call(AML, {"full_name": "First"}, "idv_key-reused")
        with pytest.raises(ProviderInDoubt) as info:
            await c.call(AML, {"full_name": "Second"}, "idv_key-reused")
    assert info.value.status == 422 and info.value.code == "idempotency_key_reused"
    assert sb.ledger()["keys"]["idv_key-reused"]["side_effects"] == 1


async def test_the_body_is_canonical_so_key_order_does_not_make_another_request(sb: Sandbox) -> None:
    async with client(sb) as c:
        first = await c.call(AML, {"full_name": "A", "vendor_data": "v"}, "idv_key-order")
        again = await c.call(AML, {"vendor_data": "v", "full_name": "A"}, "idv_key-order")
    assert again.outcome == first.outcome
    attempts = sb.ledger()["keys"]["idv_key-order"]["attempts"]
    assert [a["status"] for a in attempts] == [200, 200] and attempts[1]["replayed"] is True


async def test_progress_tells_whether_a_request_may_still_be_at_the_provider(sb: Sandbox) -> None:
    sb.faults(latency_ms=2000)
    retry = RetryPolicy(max_attempts=1)
    c = ProviderClient(sb.url, API_KEY, retry=retry, timeout_s=0.3, transport_kind=TRANSPORT["kind"])
    progress = CallProgress()
    async with c:
        with pytest.raises(RetriesExhausted):
            await c.call(AML, {"full_name": "Slow"}, "idv_key-live", progress=progress)
    assert progress.sent == 1 and progress.live  # timed out: the provider may still be working on it

    refused = CallProgress()
    dead = ProviderClient("http://127.0.0.1:9", API_KEY, retry=retry, transport_kind=TRANSPORT["kind"])
    async with dead:
        with pytest.raises(RetriesExhausted):
            await dead.call(AML, {"full_name": "A"}, "idv_key-refused", progress=refused)
    if TRANSPORT["kind"] == "httpx-aiohttp":
        # That package reports failures after the request arrived as ConnectTimeout too (PITFALLS): a
        # "connect" timeout there proves nothing, so the key is conservatively kept.
        assert refused.live or refused.sent == 0
    else:
        assert refused.sent == 0 and not refused.live  # never connected: nothing left


async def test_keep_alive_runs_while_the_call_waits_behind_a_retry_after(sb: Sandbox) -> None:
    """The pipeline renews its lease here: a wait between attempts longer than a third of the lease must
    not let it run out."""
    sb.faults(script=["429:2"])
    calls: list[float] = []

    async def keep_alive() -> None:
        calls.append(time.monotonic())

    async with client(sb) as c:
        result = await c.call(
            AML, {"full_name": "A"}, "idv_key-keepalive", keep_alive=keep_alive, keep_alive_every_s=0.5
        )
    assert result.attempts == 2
    assert len(calls) >= 3  # every 0.5 s of the 2 s wait
