"""``--profile didit``: standalone checks over real HTTP — multipart uploads of several MB, AML as JSON,
each one a side effect, saved as a session unless ``save_api_request=false``."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest

from sandbox.testing import SandboxHarness

MakeSandbox = Callable[..., Awaitable[SandboxHarness]]

pytestmark = pytest.mark.anyio


def image(size: int) -> bytes:
    """A JPEG-looking blob of ``size`` bytes; random, so every byte pattern (CRLF, dashes) occurs."""
    return b"\xff\xd8\xff\xe0" + os.urandom(size - 6) + b"\xff\xd9"


@pytest.fixture
async def didit(make_sandbox: MakeSandbox) -> SandboxHarness:
    return await make_sandbox(profile="didit")


async def upload(
    sandbox: SandboxHarness,
    path: str,
    files: dict[str, tuple[str, bytes, str]],
    **fields: str,
) -> httpx.Response:
    return await sandbox.client.post(path, data=fields, files=files)


async def test_id_verification_takes_a_multipart_upload_of_several_mb(didit: SandboxHarness) -> None:
    front, back = image(4_500_000), image(3_200_000)
    response = await upload(
        didit,
        "/v3/id-verification/",
        {"front_image": ("front.jpg", front, "image/jpeg"), "back_image": ("back.jpg", back, "image/jpeg")},
        vendor_data="subj-1",
        metadata=json.dumps({"idv_key": "key-1", "ref": "r"}),
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"request_id", "id_verification", "vendor_data", "metadata", "created_at"}
    assert body["id_verification"]["status"] == "Approved"
    assert body["id_verification"]["warnings"] == []
    assert body["vendor_data"] == "subj-1"
    assert body["metadata"] == {"idv_key": "key-1", "ref": "r"}

    effects = await didit.effects(idv_key="key-1")
    assert effects["count"] == 1
    effect = effects["effects"][0]
    assert (effect["profile"], effect["operation"], effect["reference"]) == (
        "didit",
        "id_verification",
        body["request_id"],
    )
    uploaded = {f["field"]: f for f in effect["files"]}
    assert uploaded["front_image"]["size"] == len(front)
    assert uploaded["front_image"]["sha256"] == hashlib.sha256(front).hexdigest()
    assert uploaded["back_image"]["sha256"] == hashlib.sha256(back).hexdigest()
    assert uploaded["front_image"]["filename"] == "front.jpg"
    assert uploaded["front_image"]["content_type"] == "image/jpeg"

    # Saved as a session: listed under its vendor_data, decision served with its metadata.
    listed = (await didit.client.get("/v3/sessions/", params={"vendor_data": "subj-1"})).json()
    assert [r["session_id"] for r in listed["results"]] == [body["request_id"]]
    assert listed["results"][0]["status"] == "Approved"
    decision = (await didit.client.get(f"/v3/session/{body['request_id']}/decision/")).json()
    assert decision["metadata"] == {"idv_key": "key-1", "ref": "r"}
    assert decision["features"] == ["ID_VERIFICATION"]
    assert decision["id_verifications"] == [body["id_verification"]]


@pytest.mark.parametrize(
    ("fields", "filename", "expected"),
    [
        ({}, "front.jpg", "Approved"),
        ({"document_type": "passport needs REVIEW"}, "front.jpg", "In Review"),
        ({}, "front-DECLINE.jpg", "Declined"),
        ({"metadata": json.dumps({"case": "decline"})}, "front.jpg", "Declined"),
    ],
)
async def test_multipart_outcome_comes_from_fields_and_file_names(
    didit: SandboxHarness, fields: dict[str, str], filename: str, expected: str
) -> None:
    response = await upload(
        didit, "/v3/id-verification/", {"front_image": (filename, image(2048), "image/jpeg")}, **fields
    )
    assert response.status_code == 200
    assert response.json()["id_verification"]["status"] == expected


async def test_liveness_and_face_match(didit: SandboxHarness) -> None:
    selfie = image(1_500_000)
    liveness = await upload(
        didit, "/v3/passive-liveness/", {"user_image": ("me.jpg", selfie, "image/jpeg")}, vendor_data="subj-2"
    )
    assert liveness.status_code == 200
    assert set(liveness.json()["liveness"]) == {"status", "score"}
    assert liveness.json()["liveness"]["status"] == "Approved"
    match = await upload(
        didit,
        "/v3/face-match/",
        {
            "user_image": ("me.jpg", selfie, "image/jpeg"),
            "ref_image": ("ref REVIEW.png", image(900_000), "image/png"),
        },
        vendor_data="subj-2",
    )
    assert match.status_code == 200
    assert match.json()["face_match"]["status"] == "In Review"
    half = await upload(didit, "/v3/face-match/", {"user_image": ("me.jpg", selfie, "image/jpeg")})
    assert half.status_code == 400
    assert half.json() == {"error": "validation_error", "detail": "ref_image"}
    listed = (await didit.client.get("/v3/sessions/", params={"vendor_data": "subj-2"})).json()
    assert [r["session_id"] for r in listed["results"]] == [
        match.json()["request_id"],
        liveness.json()["request_id"],
    ]
    assert [e["operation"] for e in (await didit.effects())["effects"]] == ["passive_liveness", "face_match"]


@pytest.mark.parametrize(
    ("files", "content", "detail"),
    [
        ({}, None, "front_image"),
        ({"front_image": ("empty.jpg", b"", "image/jpeg")}, None, "front_image"),
        ({"back_image": ("b.jpg", b"xx", "image/jpeg")}, None, "front_image"),
        (None, b'{"front_image": "aGVsbG8="}', "content_type"),
    ],
)
async def test_multipart_validation_is_400_without_side_effect(
    didit: SandboxHarness, files: dict[str, Any] | None, content: bytes | None, detail: str
) -> None:
    if content is not None:
        response = await didit.client.post(
            "/v3/id-verification/", content=content, headers={"content-type": "application/json"}
        )
    else:
        response = await didit.client.post(
            "/v3/id-verification/", data={"vendor_data": "s"}, files=files or {"x": ("", b"", "text/plain")}
        )
    assert response.status_code == 400
    assert response.json() == {"error": "validation_error", "detail": detail}
    assert (await didit.effects())["count"] == 0


async def test_malformed_multipart_bodies_are_400(didit: SandboxHarness) -> None:
    truncated = b'--xyz\r\nContent-Disposition: form-data; name="front_image"; filename="a.jpg"\r\n\r\nabc'
    for content_type in ("multipart/form-data; boundary=xyz", "multipart/form-data"):
        response = await didit.client.post(
            "/v3/id-verification/", content=truncated, headers={"content-type": content_type}
        )
        assert response.status_code == 400, content_type
    bad_meta = await upload(
        didit, "/v3/id-verification/", {"front_image": ("a.jpg", b"abc", "image/jpeg")}, metadata="[1"
    )
    assert bad_meta.json() == {"error": "validation_error", "detail": "metadata"}
    bad_flag = await upload(
        didit,
        "/v3/id-verification/",
        {"front_image": ("a.jpg", b"abc", "image/jpeg")},
        save_api_request="maybe",
    )
    assert bad_flag.json() == {"error": "validation_error", "detail": "save_api_request"}
    assert (await didit.effects())["count"] == 0


async def test_save_api_request_false_is_a_side_effect_that_is_not_kept(didit: SandboxHarness) -> None:
    response = await upload(
        didit,
        "/v3/id-verification/",
        {"front_image": ("a.jpg", image(4096), "image/jpeg")},
        vendor_data="subj-3",
        metadata=json.dumps({"idv_key": "key-3"}),
        save_api_request="false",
    )
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    assert (await didit.client.get(f"/v3/session/{request_id}/decision/")).status_code == 404
    assert (await didit.client.get("/v3/sessions/", params={"vendor_data": "subj-3"})).json()["count"] == 0
    assert (await didit.effects())["per_idv_key"] == {"key-3": 1}


async def test_checks_are_never_deduplicated(didit: SandboxHarness) -> None:
    files = {"user_image": ("me.jpg", image(4096), "image/jpeg")}
    meta = json.dumps({"idv_key": "key-4"})
    first = await upload(didit, "/v3/passive-liveness/", files, vendor_data="s", metadata=meta)
    second = await upload(didit, "/v3/passive-liveness/", files, vendor_data="s", metadata=meta)
    assert first.json()["request_id"] != second.json()["request_id"]
    assert (await didit.effects())["per_idv_key"] == {"key-4": 2}
    assert (await didit.key("key-4"))["side_effects"] == 2


async def test_aml_is_json(didit: SandboxHarness) -> None:
    response = await didit.client.post(
        "/v3/aml/",
        json={
            "full_name": "Grace Hopper",
            "date_of_birth": "1906-12-09",
            "vendor_data": "subj-5",
            "metadata": {"idv_key": "key-5"},
        },
    )
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"request_id", "aml", "vendor_data", "metadata", "created_at"}
    assert set(body["aml"]) == {"status", "total_hits", "score", "hits"}
    assert body["aml"]["status"] == "Approved"
    assert b"Grace" not in response.content
    assert b"1906" not in response.content
    decision = (await didit.client.get(f"/v3/session/{body['request_id']}/decision/")).json()
    assert decision["aml_screenings"] == [body["aml"]]
    assert decision["features"] == ["AML"]

    review = await didit.client.post("/v3/aml/", json={"full_name": "Ada REVIEW", "save_api_request": False})
    assert review.json()["aml"]["status"] == "In Review"
    assert review.json()["aml"]["total_hits"] == len(review.json()["aml"]["hits"]) > 0
    assert (await didit.client.get(f"/v3/session/{review.json()['request_id']}/decision/")).status_code == 404
    for bad, detail in (
        ({"full_name": ""}, "full_name"),
        ({}, "full_name"),
        ({"full_name": "x", "metadata": 3}, "metadata"),
    ):
        answer = await didit.client.post("/v3/aml/", json=bad)
        assert answer.status_code == 400
        assert answer.json()["detail"] == detail
    assert (await didit.effects())["count"] == 2


async def test_a_body_above_the_limit_is_413(make_sandbox: MakeSandbox) -> None:
    sandbox = await make_sandbox(profile="didit", max_body_bytes=1_000_000)
    response = await upload(
        sandbox, "/v3/id-verification/", {"front_image": ("a.jpg", image(1_200_000), "image/jpeg")}
    )
    assert response.status_code == 413
    assert (await sandbox.effects())["count"] == 0
