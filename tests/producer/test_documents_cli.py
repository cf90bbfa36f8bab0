"""``idv-publish one --document FIELD=PATH`` and producer/documents.py: a real image file goes into the local
document source under its content address, only its reference goes to the real broker, and the daemon's
local source opens that reference to the same bytes."""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from click.testing import CliRunner, Result

from consumer.documents import LocalDocumentSource, references
from producer.cli import main
from producer.documents import DocumentFileError, sniff, store_local_document
from producer.envelope import decode
from tests.docfiles import noise_image

ReadSync = Callable[[str, int], list[ConsumerRecord[bytes, bytes]]]


@pytest.fixture
def images(tmp_path: Path) -> dict[str, Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return {
        "front": noise_image(inbox / "Jane Doe passport front.jpg", seed=21),
        "back": noise_image(inbox / "back.png", width=900, height=900, seed=22, fmt="PNG"),
    }


@pytest.fixture
def run(kafka_bootstrap: str) -> Callable[..., Result]:
    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        full_env = {"IDV_KAFKA_BOOTSTRAP": kafka_bootstrap, **(env or {})}
        return CliRunner().invoke(main, list(args), env=full_env, catch_exceptions=False)

    return invoke


def one_args(
    topic: str, *extra: str, subject: str = "applicant-7", request: str = '{"document_type": "passport"}'
) -> list[str]:
    """``idv-publish one`` of an ``id_verification`` request to ``topic``, then ``extra``."""
    return ["one", "--topic", topic, "--operation", "id_verification",
            "--subject", subject, "--request", request, *extra]  # fmt: skip


def address(data: bytes, ext: str) -> str:
    digest = hashlib.sha256(data).hexdigest()
    return f"local:sha256/{digest[:2]}/{digest}.{ext}"


@pytest.mark.kafka
def test_upload_and_publish_in_one_step(
    run: Callable[..., Result],
    topic: str,
    read_topic_sync: ReadSync,
    images: dict[str, Path],
    tmp_path: Path,
) -> None:
    docs = tmp_path / "documents"
    front, back = images["front"].read_bytes(), images["back"].read_bytes()
    result = run(
        *one_args(
            topic,
            "--document",
            f"front_image={images['front']}",
            "--document",
            f"back_image={images['back']}",
        ),
        "--json",
        env={"IDV_DOCUMENTS_DIR": str(docs)},
    )
    assert result.exit_code == 0, result.output
    data: dict[str, Any] = orjson.loads(result.stdout)
    expected = {"front_image": address(front, "jpg"), "back_image": address(back, "png")}
    assert data["documents"] == expected
    [record] = read_topic_sync(topic, 1)
    assert len(record.value) < 1024  # the images are not in the message, only their references
    env = decode(record.value, list(record.headers))
    assert env.request == {
        "document_type": "passport",
        "front_image": {"document": expected["front_image"]},
        "back_image": {"document": expected["back_image"]},
    }
    for uri, content in ((expected["front_image"], front), (expected["back_image"], back)):
        stored = docs / uri.removeprefix("local:")
        assert stored.read_bytes() == content
        assert stat.S_IMODE(stored.stat().st_mode) == 0o600
    assert not list(docs.rglob(".upload-*"))  # no temporary file left behind
    assert "Jane" not in result.output  # the file's name is not echoed into the summary

    async def open_as_the_daemon() -> list[bytes]:
        source = LocalDocumentSource(docs)
        out = []
        for name, uri in references(env.request).items():
            document = await source.open(uri, name)
            out.append(b"".join([chunk async for chunk in document.chunks()]))
        return out

    with ThreadPoolExecutor(1) as pool:  # this test's thread already runs the fixtures' event loop
        assert pool.submit(anyio.run, open_as_the_daemon).result() == [front, back]


@pytest.mark.kafka
def test_the_same_image_twice_is_one_document(
    run: Callable[..., Result], topic: str, images: dict[str, Path], tmp_path: Path
) -> None:
    docs = tmp_path / "documents"
    uris = set()
    for _ in range(2):
        result = run(
            *one_args(topic, "--document", f"front_image={images['front']}"), "--documents-dir", str(docs)
        )
        assert result.exit_code == 0, result.output
        assert result.stderr.startswith("stored front_image as local:sha256/")
        uris.add(result.stderr.split()[3])
    assert len(uris) == 1
    assert [p.name for p in docs.rglob("*") if p.is_file()] == [uris.pop().rsplit("/", 1)[1]]


@pytest.mark.kafka
@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("front_image={text}", "not a JPEG, PNG, WebP, TIFF or PDF file"),
        ("front_image={missing}", "cannot read the file"),
        ("front_image={empty}", "the file is empty"),
        (
            "selfie={front}",
            "'selfie' is not an image field of id_verification (its image fields: front_image, back_image)",
        ),
        ("front_image", "expected FIELD=PATH"),
        ("document_type={front}", "not an image field"),
    ],
)
def test_bad_documents_are_usage_errors_and_nothing_is_published(
    run: Callable[..., Result],
    topic: str,
    read_topic_sync: ReadSync,
    images: dict[str, Path],
    tmp_path: Path,
    spec: str,
    fragment: str,
) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("Jane Secret Doe, passport X1234567")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    paths = {"text": text, "missing": tmp_path / "nope.jpg", "empty": empty, "front": images["front"]}
    docs = tmp_path / "documents"
    result = run(*one_args(topic, "--document", spec.format(**paths), "--documents-dir", str(docs)))
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr
    assert "X1234567" not in result.output  # the content of a rejected file is never shown
    assert not docs.exists() or not [p for p in docs.rglob("*") if p.is_file()]
    assert read_topic_sync(topic, 0) == []


@pytest.mark.kafka
def test_a_document_twice_or_too_large_is_refused(
    run: Callable[..., Result], topic: str, images: dict[str, Path], tmp_path: Path
) -> None:
    docs = ["--documents-dir", str(tmp_path / "documents")]
    twice = run(
        *one_args(
            topic,
            "--document",
            f"front_image={images['front']}",
            "--document",
            f"front_image={images['back']}",
            *docs,
        )
    )
    assert twice.exit_code == 2 and "front_image is given more than once" in twice.stderr
    both = run(
        *one_args(
            topic,
            "--document",
            f"front_image={images['front']}",
            *docs,
            subject="s",
            request='{"document_type": "passport", "front_image": "aGk="}',
        )
    )
    assert both.exit_code == 2 and "front_image is given more than once" in both.stderr
    size = images["front"].stat().st_size
    big = run(
        *one_args(topic, "--document", f"front_image={images['front']}", *docs),
        env={"IDV_DOCUMENTS_MAX_BYTES": str(size - 1)},
    )
    assert big.exit_code == 2 and f"{size} bytes, limit is {size - 1}" in big.stderr


# -- producer/documents.py -------------------------------------------------------------------------------


def test_store_is_content_addressed_and_typed_by_bytes(images: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "root"
    disguised = tmp_path / "really-a-png.jpg"
    disguised.write_bytes(images["back"].read_bytes())
    uri = store_local_document(disguised, root)
    assert uri == address(disguised.read_bytes(), "png")
    assert sniff((root / uri.removeprefix("local:")).read_bytes()[:16]) == "image/png"


def test_a_failed_store_leaves_nothing_behind(images: dict[str, Path], tmp_path: Path) -> None:
    """The copy is complete, the rename cannot happen (the destination's directory is a file): a clear
    error, and the temporary copy is gone."""
    root = tmp_path / "root"
    digest = hashlib.sha256(images["front"].read_bytes()).hexdigest()
    (root / "sha256").mkdir(parents=True)
    blocker = root / "sha256" / digest[:2]
    blocker.write_bytes(b"in the way")
    with pytest.raises(DocumentFileError, match="cannot store the document"):
        store_local_document(images["front"], root)
    assert sorted(root.rglob("*")) == [root / "sha256", blocker]
    blocker.unlink()
    assert store_local_document(images["front"], root) == address(images["front"].read_bytes(), "jpg")
