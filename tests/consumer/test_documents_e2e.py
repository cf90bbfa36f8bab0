"""Documents end to end: real multi-MB images referenced from envelopes on the real broker, the daemon
(``IDV_PROVIDER=didit``) streaming them as multipart uploads to the sandbox in ``--profile didit`` over
HTTP, from the local directory and from an HTTP document store; a missing document is a dead letter, and
no image byte is ever in a Kafka record."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from consumer.keys import idempotency_key
from producer.documents import store_local_document
from producer.envelope import Envelope
from tests.consumer.conftest import Sandbox, publish, read_all
from tests.consumer.test_exactly_once import run_until_committed, settings_for
from tests.docfiles import document_store, noise_image

pytestmark = [pytest.mark.anyio, pytest.mark.kafka]


@pytest.fixture
def sb(didit: Sandbox) -> Sandbox:
    """Documents go to Didit's multipart endpoint: this module's sandbox is the ``didit`` one."""
    return didit


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def id_check(message_id: str, front: object, back: object | None = None) -> Envelope:
    request: dict[str, object] = {"document_type": "passport", "front_image": front}
    if back is not None:
        request["back_image"] = back
    return Envelope(
        message_id=message_id, operation="id_verification", subject_id=f"subj-{message_id}", request=request
    )


async def test_images_by_reference_are_uploaded_and_a_missing_one_is_a_dead_letter(
    kafka_bootstrap: str, topic: str, sqlite_url: str, group: str, sb: Sandbox, tmp_path: Path
) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    docs = tmp_path / "documents"
    front = noise_image(inbox / "front.jpg", seed=31)  # ~3 MB
    back = noise_image(inbox / "back.png", width=1000, height=1000, seed=32, fmt="PNG")  # ~3 MB
    remote = noise_image(inbox / "remote.jpg", seed=33)
    front_uri = store_local_document(front, docs)
    back_uri = store_local_document(back, docs)
    assert front.stat().st_size > 2_000_000 and back.stat().st_size > 2_000_000

    async with document_store(inbox, token="store-token") as store:
        envelopes = [
            id_check("doc-local", {"document": front_uri}, {"document": back_uri}),
            id_check("doc-http", {"document": f"{store.url}/docs/remote.jpg"}),
            id_check("doc-missing", {"document": "local:sha256/00/" + "0" * 64 + ".jpg"}),
            id_check("doc-outside", {"document": "local:../inbox/front.jpg"}),
        ]
        await publish(kafka_bootstrap, topic, envelopes)
        daemon = await run_until_committed(
            settings_for(
                kafka_bootstrap,
                topic,
                group,
                sqlite_url,
                sb.url,
                provider="didit",
                documents_dir=str(docs),
                documents_http_allow=f"{store.url}/docs/",
                documents_token="store-token",
            )
        )
        effects = sb.effects(operation="id_verification")["effects"]
    by_key = {e["idv_key"]: e for e in effects}
    local = by_key[idempotency_key("idv", "id_verification", "doc-local")]
    assert {f["field"]: (f["content_type"], f["sha256"], f["size"]) for f in local["files"]} == {
        "front_image": ("image/jpeg", sha(front), front.stat().st_size),
        "back_image": ("image/png", sha(back), back.stat().st_size),
    }
    http = by_key[idempotency_key("idv", "id_verification", "doc-http")]
    assert [(f["field"], f["sha256"]) for f in http["files"]] == [("front_image", sha(remote))]
    assert len(effects) == 2  # the missing and the refused documents reached nobody
    assert set(store.authorizations) == {"Bearer store-token"}
    assert daemon.stats.by_disposition["completed"] == 2
    assert daemon.stats.by_disposition["set_aside"] == 2 and daemon.stats.by_disposition["error"] == 0

    letters = await read_all(kafka_bootstrap, f"{topic}.dlq")
    reasons = {dict(r.headers)["idv-message-id"].decode(): dict(r.headers)["idv-dlq-reason"] for r in letters}
    assert reasons == {"doc-missing": b"document_missing", "doc-outside": b"document_unreadable"}
    # No image byte in any record: requests, dead letters, results are small and hold references only.
    for name in (topic, f"{topic}.dlq", f"{topic}.results"):
        for record in await read_all(kafka_bootstrap, name):
            assert len(record.value or b"") < 4096, name
            assert front.read_bytes()[:4096] not in (record.value or b"")
    for record in letters:
        assert b"/inbox/" not in b"".join(v for _, v in record.headers)  # no path in any detail


async def test_a_retried_upload_streams_the_whole_document_again(
    kafka_bootstrap: str, topic: str, sqlite_url: str, group: str, sb: Sandbox, tmp_path: Path
) -> None:
    """Two gateway errors, then success: the multipart body is streamed three times from the local source
    (re-iterable, never held in memory), and the one check the provider performed got the exact bytes."""
    docs = tmp_path / "documents"
    front = noise_image(tmp_path / "front.jpg", seed=41)
    uri = store_local_document(front, docs)
    await publish(kafka_bootstrap, topic, [id_check("doc-retried", {"document": uri})])
    sb.faults(script=["503", "502", "ok"])
    daemon = await run_until_committed(
        settings_for(
            kafka_bootstrap, topic, group, sqlite_url, sb.url, provider="didit", documents_dir=str(docs)
        )
    )
    effects = sb.effects(operation="id_verification")["effects"]
    faults = sb.stats()["faults"]
    assert sum(faults.values()) == 2, faults
    (effect,) = effects
    assert [(f["field"], f["sha256"], f["size"]) for f in effect["files"]] == [
        ("front_image", sha(front), front.stat().st_size)
    ]
    assert daemon.stats.by_disposition["completed"] == 1
