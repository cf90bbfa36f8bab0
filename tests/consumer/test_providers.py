"""Provider adapters (consumer/providers/): the status map, Didit's request shape, reconciliation before a
resend, the in-doubt rule without a lookup, request signing, and the key-retention check at start.

Against the sandbox over real HTTP (``--profile didit`` and ``--profile ietf``); the signing test runs a
small aiohttp server that recomputes the signature, since the sandbox does not sign-check.
"""

from __future__ import annotations

import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import orjson
import pytest
from aiohttp import web

from consumer.errors import ConfigurationError, ProviderNotFound, UnreconciledAttempt
from consumer.provider import ProviderClient, RetryPolicy
from consumer.providers import Capability, adapter_from_settings
from consumer.providers.calls import CallResult
from consumer.providers.checks import check_key_retention
from consumer.providers.didit import DiditAdapter
from consumer.providers.ietf import IetfAdapter
from consumer.providers.signed import SignedAdapter, signature
from consumer.settings import Settings
from producer.envelope import Envelope, get_operation
from sandbox import SandboxConfig, run_in_thread
from tests.consumer.conftest import API_KEY, FINGERPRINT_KEY, Sandbox
from tests.loopback import serve

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=5, base_delay_s=0.01, max_delay_s=0.05)

# Every status string docs.didit.me documents (session statuses, feature statuses, KYB spellings) and
# the outcome it must become. None of them may become "unknown".
DIDIT_STATUSES = {
    "Not Started": "created",
    "In Progress": "created",
    "Awaiting User": "created",
    "Resubmitted": "created",
    "In Review": "review",
    "Approved": "approved",
    "Declined": "declined",
    "Abandoned": "abandoned",
    "Expired": "expired",
    "Kyc Expired": "expired",
    "Not Finished": "created",  # a feature (check) status
    "NOT_STARTED": "created",  # KYB spellings
    "IN_PROGRESS": "created",
    "AWAITING_USER": "created",
    "IN_REVIEW": "review",
    "RESUB_REQUESTED": "created",
    "RESUBMITTED": "created",
    "APPROVED": "approved",
    "DECLINED": "declined",
    "ABANDONED": "abandoned",
    "EXPIRED": "expired",
}


@pytest.fixture
def didit() -> Iterator[Sandbox]:
    with run_in_thread(SandboxConfig(port=0, api_keys=(API_KEY,), profile="didit")) as handle:
        yield Sandbox(handle.url)


@pytest.fixture
def ietf() -> Iterator[Sandbox]:
    with run_in_thread(SandboxConfig(port=0, api_keys=(API_KEY,))) as handle:
        yield Sandbox(handle.url)


def client(url: str, adapter: Any, results: list[str] | None = None) -> ProviderClient:
    return ProviderClient(
        url,
        API_KEY,
        retry=FAST,
        timeout_s=5,
        rng=random.Random(0),
        transport_kind="aiohttp",
        adapter=adapter,
        on_reconcile=results.append if results is not None else None,
    )


def env(op: str, request: dict[str, Any], subject: str = "subj-1", mid: str = "m-1") -> Envelope:
    return Envelope(message_id=mid, operation=op, subject_id=subject, request=request)


async def screen_at_didit(didit: Sandbox, key: str, results: list[str]) -> CallResult:
    """One AML screening under ``key`` at the didit sandbox, a first send now: what a retry reconciles."""
    async with client(didit.url, DiditAdapter(), results) as c:
        return await c.call_envelope(
            get_operation("aml_screening"), env("aml_screening", {"full_name": "A"}), key, since=time.time()
        )


@pytest.mark.parametrize(("raw", "expected"), sorted(DIDIT_STATUSES.items()))
def test_every_documented_didit_status_maps_to_an_explicit_outcome(raw: str, expected: str) -> None:
    adapter = DiditAdapter()
    session = adapter.read(
        get_operation("create_session"), 201, orjson.dumps({"session_id": "s", "status": raw})
    )
    assert (session.status, session.detail) == (expected, None)
    for op, section in (
        ("id_verification", "id_verification"),
        ("passive_liveness", "liveness"),
        ("face_match", "face_match"),
        ("aml_screening", "aml"),
    ):
        body = {"request_id": "r", section: {"status": raw}}
        outcome = adapter.read(get_operation(op), 200, orjson.dumps(body))
        assert (outcome.status, outcome.provider_reference) == (expected, "r"), op
    decision, _ = adapter.read_decision(orjson.dumps({"session_id": "s", "status": raw}))
    assert decision.status == expected


@pytest.mark.parametrize("raw", ["Teleported", "", None, 7, "approved but later"])
def test_an_undocumented_status_is_a_failed_outcome_never_unknown(raw: object) -> None:
    outcome = DiditAdapter().read(
        get_operation("create_session"), 201, orjson.dumps({"session_id": "s", "status": raw})
    )
    assert (outcome.status, outcome.detail) == ("failed", "unknown_status")


def test_capability_profiles() -> None:
    assert IetfAdapter(3600).capability("aml_screening") == Capability("idempotency_key", 3600, lookup=False)
    didit = DiditAdapter()
    assert didit.capability("create_session") == Capability("body_field", None, lookup=True)
    for op in ("aml_screening", "id_verification", "passive_liveness", "face_match"):
        assert didit.capability(op) == Capability("none", None, lookup=True)
    base = dict(provider_api_key="k", fingerprint_key=FINGERPRINT_KEY)
    assert adapter_from_settings(Settings.from_env({}, **base)).name == "ietf"
    assert adapter_from_settings(Settings.from_env({}, provider="didit", **base)).name == "didit"
    with pytest.raises(ConfigurationError, match="IDV_PROVIDER_SIGNING_SECRET"):
        Settings.from_env({}, provider="signed", **base)
    with pytest.raises(ConfigurationError, match="IDV_PROVIDER: unknown provider"):
        Settings.from_env({}, provider="onfido", **base)


async def test_didit_session_carries_the_subject_as_vendor_data_and_our_key_in_metadata(
    didit: Sandbox,
) -> None:
    request = {"workflow_id": "wf-1", "vendor_data": "per-request-id", "metadata": {"order": "o-9"}}
    async with client(didit.url, DiditAdapter()) as c:
        result = await c.call_envelope(get_operation("create_session"), env("create_session", request), "k-1")
    assert result.outcome.status == "created" and result.outcome.http_status == 201
    (session,) = didit.sessions()
    assert session["vendor_data"] == "subj-1"  # the stable subject, never a per-request value
    assert session["metadata"] == {"order": "o-9", "idv_key": "k-1"}
    assert session["session_id"] == result.outcome.provider_reference
    assert didit.effects_per_idv_key() == {"k-1": 1}


async def test_every_operation_reaches_didit_once_json_or_multipart(didit: Sandbox) -> None:
    ops = {
        "create_session": {"workflow_id": "wf-1"},
        "aml_screening": {"full_name": "Jane Roe"},
        "id_verification": {"document_type": "passport", "front_image": "aGVsbG8=", "back_image": "d29ybGQ="},
        "passive_liveness": {"user_image": "aGVsbG8="},
        "face_match": {"user_image": "aGVsbG8=", "ref_image": "d29ybGQ="},
    }
    async with client(didit.url, DiditAdapter()) as c:
        for op, request in ops.items():
            result = await c.call_envelope(get_operation(op), env(op, request), f"k-{op}")
            assert result.outcome.status in ("approved", "created"), (op, result)
            assert not result.reconciled
    effects = didit.effects()["effects"]
    assert {e["operation"]: e["idv_key"] for e in effects} == {op: f"k-{op}" for op in ops}
    files = {e["operation"]: sorted(f["field"] for f in e["files"] or []) for e in effects}
    assert files["id_verification"] == ["back_image", "front_image"]
    assert files["face_match"] == ["ref_image", "user_image"]


async def test_a_retry_after_the_provider_acted_is_reconciled_not_sent_again(didit: Sandbox) -> None:
    """Didit acted, then the connection dropped: the retry looks the check up by our key and records it."""
    didit.faults(script=["drop"])
    results: list[str] = []
    result = await screen_at_didit(didit, "k-drop", results)
    assert result.reconciled and result.outcome.status == "approved" and result.outcome.detail == "reconciled"
    assert results == ["found"]
    assert didit.effects_per_idv_key() == {"k-drop": 1}
    assert len(didit.key("k-drop")["attempts"]) == 1  # one POST: the lookup made the second unnecessary
    (effect,) = didit.effects()["effects"]
    assert effect["reference"] == result.outcome.provider_reference


async def test_a_retry_after_an_attempt_that_cannot_have_acted_is_sent_without_a_lookup(
    didit: Sandbox,
) -> None:
    """429 is refused before any work: resent straight away. A 500 may come after the work: looked up."""
    didit.faults(script=["429:1", "500"])
    results: list[str] = []
    result = await screen_at_didit(didit, "k-429", results)
    assert result.attempts == 3 and not result.reconciled
    assert results == ["not_found"]  # only before the attempt after the 500
    assert didit.effects_per_idv_key() == {"k-429": 1}


async def test_a_take_over_is_reconciled_before_the_first_send(didit: Sandbox) -> None:
    """A record claimed before (a crashed owner) is looked up first: found → no call; not found → sent."""
    aml = get_operation("aml_screening")
    started = time.time()
    results: list[str] = []
    async with client(didit.url, DiditAdapter(), results) as c:
        first = await c.call_envelope(aml, env("aml_screening", {"full_name": "A"}, mid="a"), "k-acted")
        # Two take-overs: of the call that acted ("a"), and of one that never reached Didit ("b").
        again, fresh = [
            await c.call_envelope(
                aml, env("aml_screening", {"full_name": n}, mid=m), k, earlier_claims=True, since=started
            )
            for n, m, k in (("A", "a", "k-acted"), ("B", "b", "k-fresh"))
        ]
    assert again.reconciled and again.attempts == 0
    assert again.outcome.provider_reference == first.outcome.provider_reference
    assert not fresh.reconciled and fresh.attempts == 1
    assert results == ["found", "not_found"]
    assert didit.effects_per_idv_key() == {"k-acted": 1, "k-fresh": 1}


async def test_a_lookup_that_keeps_failing_is_in_doubt_never_a_second_call(didit: Sandbox) -> None:
    didit.faults(read_faults=True, script=["drop", "500", "500", "500", "500", "500"])
    results: list[str] = []
    with pytest.raises(UnreconciledAttempt, match="kept failing") as caught:
        await screen_at_didit(didit, "k-x", results)
    assert caught.value.attempts == 1
    assert results == ["in_doubt"]
    assert didit.effects_per_idv_key() == {"k-x": 1}


class NoDedupeNoLookup(IetfAdapter):
    """An Onfido-like profile: no idempotency key and no way to find an earlier attempt."""

    name = "none"

    def capability(self, operation: str) -> Capability:
        return Capability("none", None, lookup=False)


async def test_without_dedupe_or_lookup_an_attempt_that_may_have_acted_is_in_doubt(ietf: Sandbox) -> None:
    ietf.faults(script=["drop"])
    results: list[str] = []
    aml = get_operation("aml_screening")
    async with client(ietf.url, NoDedupeNoLookup(), results) as c:
        with pytest.raises(UnreconciledAttempt, match="neither dedupes"):
            await c.call_envelope(aml, env("aml_screening", {"full_name": "A"}), "k-onfido")
        with pytest.raises(UnreconciledAttempt):  # a take-over: not even a first send
            await c.call_envelope(
                aml, env("aml_screening", {"full_name": "B"}, mid="b"), "k-2", earlier_claims=True
            )
        forced = await c.call_envelope(
            aml, env("aml_screening", {"full_name": "C"}, mid="c"), "k-3", earlier_claims=True, force=True
        )
    assert forced.outcome.status == "approved"
    assert results == ["in_doubt", "in_doubt"]
    assert len(ietf.key("k-onfido")["attempts"]) == 1
    assert "k-2" not in ietf.ledger()["keys"]


async def test_get_decision_reads_a_session_and_types_a_404(didit: Sandbox) -> None:
    async with client(didit.url, DiditAdapter()) as c:
        created = await c.call_envelope(
            get_operation("create_session"), env("create_session", {"workflow_id": "wf-1"}), "k-s"
        )
        session_id = created.outcome.provider_reference
        assert session_id is not None
        assert (await c.get_decision(session_id)).status == "created"
        didit.set_session_status(session_id, "In Review")
        assert (await c.get_decision(session_id)).status == "review"
        with pytest.raises(ProviderNotFound):
            await c.get_decision("00000000-0000-0000-0000-000000000000")


@pytest.fixture
async def signature_checker() -> AsyncIterator[tuple[str, list[dict[str, Any]]]]:
    """A provider that recomputes the ``signed`` profile's HMAC and answers 401 when it does not match;
    its first answer is a 500, so the retry's signature is checked too."""
    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        ts = request.headers.get("x-timestamp", "")
        expected = signature(b"sign-secret", ts, request.method, request.path_qs, body)
        valid = request.headers.get("x-signature") == expected and abs(time.time() - int(ts or 0)) < 60
        seen.append({"valid": valid, "key": request.headers.get("idempotency-key"), "ts": ts})
        if not valid:
            return web.json_response({"error": "bad_signature"}, status=401)
        if len(seen) == 1:
            return web.json_response({"error": "boom"}, status=500)
        return web.json_response({"request_id": "r-1", "aml": {"status": "Approved"}})

    app = web.Application()
    app.router.add_post("/v3/aml/", handle)
    async with serve(app) as url:
        yield url, seen


async def test_signed_profile_signs_every_attempt(
    signature_checker: tuple[str, list[dict[str, Any]]],
) -> None:
    url, seen = signature_checker
    async with client(url, SignedAdapter("sign-secret")) as c:
        result = await c.call_envelope(
            get_operation("aml_screening"), env("aml_screening", {"full_name": "A"}), "k-s"
        )
    assert result.outcome.status == "approved" and result.attempts == 2
    assert [s["valid"] for s in seen] == [True, True]
    assert {s["key"] for s in seen} == {"k-s"}  # otherwise the ietf profile: the same key on every attempt


async def test_a_wrong_signing_secret_is_refused_by_the_provider(
    signature_checker: tuple[str, list[dict[str, Any]]],
) -> None:
    from consumer.errors import ProviderAuthError

    url, seen = signature_checker
    async with client(url, SignedAdapter("not-the-secret")) as c:
        with pytest.raises(ProviderAuthError):
            await c.call_envelope(
                get_operation("aml_screening"), env("aml_screening", {"full_name": "A"}), "k"
            )
    assert [s["valid"] for s in seen] == [False]


def settings(**kw: Any) -> Settings:
    return Settings.from_env({}, provider_api_key="k", fingerprint_key=FINGERPRINT_KEY, **kw)


def test_a_retention_shorter_than_lease_and_retries_is_refused_naming_the_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    short = settings(provider_key_retention_s=300)  # defaults: up to 800 s between first and last resend
    with pytest.raises(ConfigurationError) as caught:
        check_key_retention(short, adapter_from_settings(short))
    text = str(caught.value)
    assert "keeps keys 300s" in text and "up to 800s" in text and "between 300s and 800s" in text
    assert "lease 60s" in text and "6 attempts x 10s" in text
    # Didit dedupes by nothing, so no key retention applies: reconciliation covers it instead.
    check_key_retention(settings(provider_key_retention_s=300, provider="didit"), DiditAdapter())
    check_key_retention(settings(), adapter_from_settings(settings()))  # 24 h: fits
    warn = settings(provider_key_retention_s=300, provider_retention_check="warn")
    with caplog.at_level("WARNING"):
        check_key_retention(warn, adapter_from_settings(warn))
    assert any("unprotected window" in r.getMessage() for r in caplog.records)


def test_the_daemon_refuses_to_start_with_exit_2(tmp_path: Any) -> None:
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2]),
        "IDV_PROVIDER_API_KEY": "k",
        "IDV_FINGERPRINT_KEY": FINGERPRINT_KEY,
        "IDV_PROVIDER_KEY_RETENTION_S": "120",
        "IDV_STORE_URL": f"sqlite:///{tmp_path / 'd.db'}",
        "IDV_HEALTH_PORT": "-1",
    }
    proc = subprocess.run(
        [sys.executable, "-m", "consumer", "run"], env=env, capture_output=True, timeout=60, check=False
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert b"IDV_PROVIDER_KEY_RETENTION_S" in proc.stderr and b"could act twice" in proc.stderr


async def test_after_a_timeout_the_lookup_waits_for_a_request_still_running_at_the_provider(
    didit: Sandbox,
) -> None:
    """Didit gets the request but acts only after our deadline: a lookup right after the timeout would
    find nothing and the resend would act twice. The retry waits one more deadline, then finds it."""
    didit.faults(script=["delay:900"])
    results: list[str] = []
    c = ProviderClient(
        didit.url, API_KEY, retry=FAST, timeout_s=0.6, transport_kind="aiohttp", adapter=DiditAdapter(),
        on_reconcile=results.append,
    )  # fmt: skip
    async with c:
        result = await c.call_envelope(
            get_operation("aml_screening"),
            env("aml_screening", {"full_name": "A"}),
            "k-slow",
            since=time.time(),
        )
    assert result.reconciled, result
    assert results == ["found"]
    assert didit.effects_per_idv_key() == {"k-slow": 1}


async def test_a_referenced_image_of_megabytes_reaches_didit_intact_as_multipart(
    didit: Sandbox, tmp_path: Any
) -> None:
    """A document reference is opened at call time and streamed as the multipart file part; the bytes
    Didit receives are the file's (size and SHA-256 in the sandbox's effect)."""
    import hashlib
    import os

    from consumer.documents import LocalDocumentSource

    front = b"\xff\xd8\xff\xe0" + os.urandom(3 * 1024 * 1024)
    (tmp_path / "front.jpg").write_bytes(front)
    request = {"document_type": "passport", "front_image": {"document": "local:front.jpg"}}
    async with client(didit.url, DiditAdapter()) as c:
        result = await c.call_envelope(
            get_operation("id_verification"),
            env("id_verification", request),
            "k-doc",
            documents=LocalDocumentSource(tmp_path),
        )
    assert result.outcome.status == "approved"
    ((upload,),) = [e["files"] for e in didit.effects()["effects"]]
    assert upload["field"] == "front_image" and upload["content_type"] == "image/jpeg"
    assert upload["size"] == len(front) and upload["sha256"] == hashlib.sha256(front).hexdigest()
