"""Document references and sources (consumer/documents.py, consumer/document_http.py): real multi-MB image
files in a temporary directory, and an aiohttp.web document store on loopback."""

from __future__ import annotations

import base64
import io
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest
from PIL import Image

from consumer.document_http import HttpDocumentSource, parse_allow_list
from consumer.documents import (
    CHUNK_SIZE,
    DOCUMENT_REASONS,
    Document,
    DocumentError,
    DocumentSources,
    DocumentUnavailable,
    LocalDocumentSource,
    document_dead_letter,
    inline_document,
    is_reference,
    open_documents,
    references,
    sniff,
    source_from_settings,
)
from consumer.errors import ConfigurationError
from consumer.model import DLQ_REASONS
from consumer.settings import Settings
from tests.docfiles import Store, document_store, documents_dir, sha256
from tests.loopback import serve

pytestmark = pytest.mark.anyio


async def read_all(document: Document) -> tuple[bytes, int]:
    """The document's bytes and its largest chunk."""
    out = bytearray()
    largest = 0
    async for chunk in document.chunks():
        out += chunk
        largest = max(largest, len(chunk))
    return bytes(out), largest


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return documents_dir(tmp_path, seed=1)


# -- references -----------------------------------------------------------------------------------------


def test_references_are_top_level_document_objects() -> None:
    request = {
        "document_type": "passport",
        "front_image": {"document": "local:ab/cd.jpg"},
        "back_image": {"document": "https://store.example/docs/1"},
        "metadata": {"document": "x", "other": 1},  # two keys: not a reference
        "inline": "aGVsbG8=",
        "nested": {"front": {"document": "local:x"}},
    }
    assert references(request) == {
        "front_image": "local:ab/cd.jpg",
        "back_image": "https://store.example/docs/1",
    }
    assert is_reference({"document": "local:a"})
    for value in ({"document": ""}, {"document": 5}, {}, "local:a", None, ["document"]):
        assert not is_reference(value)


def test_content_type_comes_from_the_bytes() -> None:
    assert sniff(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "image/jpeg"
    assert sniff(b"\x89PNG\r\n\x1a\n\x00\x00") == "image/png"
    assert sniff(b"RIFF\x10\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"II*\x00\x08\x00") == "image/tiff"
    assert sniff(b"MM\x00*\x00\x08") == "image/tiff"
    assert sniff(b"%PDF-1.7\n") == "application/pdf"
    assert sniff(b"GIF89a") is None
    assert sniff(b"<html>") is None


def test_every_document_reason_is_a_dead_letter_reason() -> None:
    assert set(DOCUMENT_REASONS) <= set(DLQ_REASONS)
    letter = document_dead_letter(DocumentError("document_missing", "gone", field="front_image"), attempts=0)
    assert letter.reason == "document_missing" and letter.detail == "front_image: gone"


# -- the local source -----------------------------------------------------------------------------------


async def test_local_documents_stream_in_chunks_and_again(root: Path) -> None:
    source = LocalDocumentSource(root)
    front = await source.open("local:front.jpg", "front_image")
    assert front.size > 2_000_000
    assert (front.field, front.filename, front.content_type) == (
        "front_image",
        "front_image.jpg",
        "image/jpeg",
    )
    first, largest = await read_all(front)
    assert sha256(first) == sha256((root / "front.jpg").read_bytes())
    assert largest <= CHUNK_SIZE  # never the whole file at once
    second, _ = await read_all(front)  # re-iterable: a retry streams again
    assert second == first
    back = await source.open("local:back.png", "back_image")
    assert (back.content_type, back.filename) == ("image/png", "back_image.png")


async def test_the_type_is_read_from_the_file_not_its_name(root: Path) -> None:
    (root / "really-a-png.jpg").write_bytes((root / "back.png").read_bytes())
    (root / "photo.jpg").write_text("not an image at all")
    Image.new("RGB", (64, 64), "white").save(root / "scan.pdf.webp", "WEBP")
    source = LocalDocumentSource(root)
    assert (await source.open("local:really-a-png.jpg", "f")).content_type == "image/png"
    assert (await source.open("local:scan.pdf.webp", "f")).content_type == "image/webp"
    with pytest.raises(DocumentError, match="not a JPEG, PNG, WebP, TIFF or PDF") as info:
        await source.open("local:photo.jpg", "front_image")
    assert info.value.reason == "document_unreadable" and not info.value.retriable


async def test_subdirectories_are_fine(root: Path) -> None:
    (root / "sha256" / "ab").mkdir(parents=True)
    os.replace(root / "front.jpg", root / "sha256" / "ab" / "abcdef.jpg")
    doc = await LocalDocumentSource(root).open("local:sha256/ab/abcdef.jpg", "front_image")
    assert doc.content_type == "image/jpeg"


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("local:../outside.jpg", "'..'"),
        ("local:sub/../../outside.jpg", "'..'"),
        ("local:/etc/passwd", "absolute"),
        ("local://etc/passwd", "absolute"),
        ("local:", "empty"),
        ("local:a\\..\\outside.jpg", "backslash"),
        ("local:front.jpg\x00.png", "NUL"),
        ("local:./front.jpg", "'.'"),
        ("local:sub//front.jpg", "empty path segment"),
        ("file:/etc/passwd", "not a local: URI"),
    ],
)
async def test_paths_outside_the_root_are_refused(root: Path, uri: str, why: str) -> None:
    (root.parent / "outside.jpg").write_bytes((root / "front.jpg").read_bytes())
    with pytest.raises(DocumentError, match=why) as info:
        await LocalDocumentSource(root).open(uri, "front_image")
    assert info.value.reason == "document_unreadable"
    assert "outside" not in str(info.value) and "passwd" not in str(info.value)  # the path is never shown


async def test_symlinks_escaping_the_root_are_refused_inside_ones_followed(root: Path) -> None:
    secret = root.parent / "secret.jpg"
    secret.write_bytes((root / "front.jpg").read_bytes())
    (root / "escape.jpg").symlink_to(secret)
    (root / "escape-dir").symlink_to(root.parent)
    (root / "alias.jpg").symlink_to(root / "front.jpg")
    source = LocalDocumentSource(root)
    for uri in ("local:escape.jpg", "local:escape-dir/secret.jpg"):
        with pytest.raises(DocumentError, match="outside IDV_DOCUMENTS_DIR") as info:
            await source.open(uri, "front_image")
        assert info.value.reason == "document_unreadable"
    assert (await source.open("local:alias.jpg", "front_image")).content_type == "image/jpeg"


async def test_missing_unreadable_too_large(root: Path) -> None:
    source = LocalDocumentSource(root, max_bytes=2_000_000)
    with pytest.raises(DocumentError) as info:
        await source.open("local:nope.jpg", "front_image")
    assert info.value.reason == "document_missing" and not info.value.retriable
    assert str(info.value) == "front_image: no such document in IDV_DOCUMENTS_DIR"
    with pytest.raises(DocumentError, match="limit is 2000000") as info:
        await source.open("local:front.jpg", "front_image")
    assert info.value.reason == "document_too_large"
    (root / "dir.jpg").mkdir()
    os.mkfifo(root / "pipe.jpg")  # opening a FIFO must not block; it is not a regular file
    (root / "empty.jpg").write_bytes(b"")
    for name, why in (
        ("dir.jpg", "not a regular file"),
        ("pipe.jpg", "not a regular file"),
        ("empty.jpg", "empty"),
    ):
        with pytest.raises(DocumentError, match=why) as info:
            await source.open(f"local:{name}", "front_image")
        assert info.value.reason == "document_unreadable"
    gone = LocalDocumentSource(root / "absent")
    with pytest.raises(DocumentError, match="does not exist") as info:
        await gone.open("local:front.jpg", "front_image")
    assert info.value.reason == "document_missing"


def test_os_errors_map_to_reasons_without_the_path() -> None:
    import errno

    from consumer.documents import _local_error

    denied = _local_error(
        PermissionError(errno.EACCES, "Permission denied", "/srv/docs/Jane.jpg"), "front_image"
    )
    assert (denied.reason, str(denied)) == (
        "document_unreadable",
        "front_image: cannot read the file (EACCES)",
    )
    assert _local_error(FileNotFoundError(errno.ENOENT, "x"), "f").reason == "document_missing"
    assert "symlink" in str(_local_error(OSError(errno.ELOOP, "x"), "f"))


async def test_permission_denied_is_unreadable(root: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")
    (root / "front.jpg").chmod(0)
    with pytest.raises(DocumentError, match="EACCES") as info:
        await LocalDocumentSource(root).open("local:front.jpg", "front_image")
    assert info.value.reason == "document_unreadable"


async def test_a_document_that_changes_after_open_fails_its_stream(root: Path) -> None:
    source = LocalDocumentSource(root)
    doc = await source.open("local:front.jpg", "front_image")
    path = root / "front.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DocumentError, match="shorter"):
        await read_all(doc)
    path.write_bytes(data + b"more")
    with pytest.raises(DocumentError, match="longer"):
        await read_all(doc)
    path.write_bytes(b"%PDF-" + data[5:])
    with pytest.raises(DocumentError, match="type"):
        await read_all(doc)
    path.unlink()
    with pytest.raises(DocumentError) as info:
        await read_all(doc)
    assert info.value.reason == "document_missing"
    path.write_bytes(data)
    assert (await read_all(doc))[0] == data


class _ThreadProbe(LocalDocumentSource):
    """The real local source, noting which thread runs each of its blocking parts (the checked open, the
    file's open, every read and the close). ``hold`` (optional) is called inside the checked open."""

    def __init__(self, root: Path, *, threads: int = 8, hold: Callable[[], None] | None = None) -> None:
        super().__init__(root, threads=threads)
        self.seen: dict[str, set[int]] = {"check": set(), "open": set(), "read": set(), "close": set()}
        self.hold = hold

    def _check(self, uri: str, field: str) -> tuple[Path, int, bytes]:
        self.seen["check"].add(threading.get_ident())
        if self.hold is not None:
            self.hold()
        return super()._check(uri, field)

    def _open_file(self, path: Path) -> io.BufferedReader:
        self.seen["open"].add(threading.get_ident())
        probe = self

        class Noted(io.BufferedReader):
            def read(self, size: int | None = -1, /) -> bytes:
                probe.seen["read"].add(threading.get_ident())
                return super().read(size)

            def close(self) -> None:
                probe.seen["close"].add(threading.get_ident())
                super().close()

        return Noted(super()._open_file(path).detach())  # the source's own open, its reads noted


async def test_local_filesystem_work_runs_in_worker_threads_not_on_the_loop(root: Path) -> None:
    loop_thread = threading.get_ident()
    entered, release = threading.Event(), threading.Event()
    released: list[bool] = []

    def hold() -> None:  # set by a task on the event loop: only reachable while the loop is free
        entered.set()
        released.append(release.wait(timeout=10))

    source = _ThreadProbe(root, hold=hold)
    opened: list[Document] = []

    async def open_front() -> None:
        opened.append(await source.open("local:front.jpg", "front_image"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(open_front)
        with anyio.fail_after(10):
            while not entered.is_set():
                await anyio.sleep(0.005)
        release.set()
    assert released == [True]  # the loop ran this task while the open was inside its blocking part
    data, _ = await read_all(opened[0])
    assert sha256(data) == sha256((root / "front.jpg").read_bytes())
    for part, threads in source.seen.items():
        assert threads, part
        assert loop_thread not in threads, part


async def test_local_filesystem_work_is_bounded_by_the_sources_limiter(root: Path) -> None:
    lock, go = threading.Lock(), threading.Event()
    active, peak = [0], [0]

    def hold() -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        go.wait(timeout=10)
        with lock:
            active[0] -= 1

    source = _ThreadProbe(root, threads=2, hold=hold)
    kinds: list[str] = []

    async def open_front() -> None:
        kinds.append((await source.open("local:front.jpg", "front_image")).content_type)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(open_front)
        with anyio.fail_after(10):
            while not (
                source.limiter.statistics().borrowed_tokens == 2
                and source.limiter.statistics().tasks_waiting == 8
                and active[0] == 2
            ):
                await anyio.sleep(0.005)
        assert peak[0] == 2  # ten opens at once, two in threads, eight waiting for a token
        go.set()
    assert kinds == ["image/jpeg"] * 10 and peak[0] == 2


# -- the HTTP source --------------------------------------------------------------------------------------


@pytest.fixture
async def store(root: Path) -> AsyncIterator[Store]:
    async with document_store(root, token="doc-token-1") as s:
        yield s


@pytest.fixture
async def http(store: Store) -> AsyncIterator[HttpDocumentSource]:
    source = HttpDocumentSource(
        allow=[
            store.url + "/docs/",
            store.url + "/chunked",
            store.url + "/status/",
            store.url + "/slow",
            store.url + "/redirect",
            store.url + "/gzip/",
        ],
        token="doc-token-1",
        timeout_s=1.0,
        backoff_s=0.01,
    )
    yield source
    await source.aclose()


async def test_http_documents_stream_with_the_token(
    store: Store, http: HttpDocumentSource, root: Path
) -> None:
    doc = await http.open(store.url + "/docs/front.jpg", "front_image")
    expected = (root / "front.jpg").read_bytes()
    assert (doc.content_type, doc.size, doc.filename) == ("image/jpeg", len(expected), "front_image.jpg")
    assert (await read_all(doc))[0] == expected
    assert (await read_all(doc))[0] == expected  # a retry fetches again
    assert store.requests == ["/docs/front.jpg"] * 3
    assert set(store.authorizations) == {"Bearer doc-token-1"}
    assert set(store.encodings) == {"identity"}  # the bytes as stored, never a compressed form
    png = await http.open(store.url + "/docs/back.png", "back_image")
    assert png.content_type == "image/png"


async def test_http_without_content_length_is_counted(
    store: Store, http: HttpDocumentSource, root: Path
) -> None:
    doc = await http.open(store.url + "/chunked/front.jpg", "front_image")
    expected = (root / "front.jpg").read_bytes()
    assert doc.size == len(expected)
    assert (await read_all(doc))[0] == expected


async def test_http_too_large_is_refused_before_the_body(store: Store, root: Path) -> None:
    size = (root / "front.jpg").stat().st_size
    for path in ("/docs/front.jpg", "/chunked/front.jpg"):
        source = HttpDocumentSource(allow=[store.url + "/"], token="doc-token-1", max_bytes=size - 1)
        try:
            with pytest.raises(DocumentError) as info:
                await source.open(store.url + path, "front_image")
        finally:
            await source.aclose()
        assert info.value.reason == "document_too_large", path


@pytest.mark.parametrize(
    ("path", "reason", "retriable"),
    [
        ("/docs/absent.jpg", "document_missing", False),
        ("/status/410", "document_missing", False),
        ("/status/413", "document_too_large", False),
        ("/status/400", "document_unreadable", False),
        ("/status/403", "document_unreadable", False),
        ("/redirect/front.jpg", "document_unreadable", False),
        ("/gzip/front.jpg", "document_unreadable", False),
        ("/status/500", "document_unreadable", True),
        ("/status/503", "document_unreadable", True),
        ("/status/429", "document_unreadable", True),
        ("/slow/front.jpg", "document_unreadable", True),
    ],
)
async def test_http_failures_are_typed(
    store: Store, http: HttpDocumentSource, path: str, reason: str, retriable: bool
) -> None:
    with pytest.raises(DocumentError) as info:
        await http.open(store.url + path, "front_image")
    # The store was asked (this is its answer, not a refused URL); what may pass was asked 3 times.
    assert store.requests == [path] * (3 if retriable else 1)
    assert (info.value.reason, info.value.retriable) == (reason, retriable)
    assert str(info.value).endswith("(3 attempts)") == retriable
    assert isinstance(info.value, DocumentUnavailable) == retriable
    assert store.url not in str(info.value)


async def test_a_wrong_token_is_refused_by_the_store(store: Store) -> None:
    source = HttpDocumentSource(allow=[store.url + "/docs/"], token="wrong")
    try:
        with pytest.raises(DocumentError, match="HTTP 401") as info:
            await source.open(store.url + "/docs/front.jpg", "front_image")
    finally:
        await source.aclose()
    assert not info.value.retriable


async def test_an_unreachable_store_is_retriable() -> None:
    source = HttpDocumentSource(allow=["http://127.0.0.1:9/"], timeout_s=1.0, backoff_s=0.01)  # nobody there
    try:
        with pytest.raises(DocumentUnavailable, match="cannot reach"):
            await source.open("http://127.0.0.1:9/docs/a.jpg", "front_image")
    finally:
        await source.aclose()


@pytest.mark.parametrize(
    "suffix",
    [
        "http://127.0.0.2:{port}/docs/front.jpg",  # another host
        "{url}/other/front.jpg",  # outside the path prefix
        "{url}/docsfront.jpg",  # a prefix of the name is not a path prefix
        "{url}/docs/../status/200",
        "{url}/docs/%2e%2e/status/200",
        "{url}/docs/a%2Fb.jpg",
        "{url}/docs/",  # the prefix itself
        "http://user:pw@127.0.0.1:{port}/docs/front.jpg",
        "ftp://127.0.0.1/docs/front.jpg",
    ],
)
async def test_only_allowed_urls_are_fetched(store: Store, suffix: str) -> None:
    port = store.url.rsplit(":", 1)[1]
    source = HttpDocumentSource(allow=[store.url + "/docs"], token="doc-token-1")
    try:
        with pytest.raises(DocumentError) as info:
            await source.open(suffix.format(url=store.url, port=port), "front_image")
    finally:
        await source.aclose()
    assert info.value.reason == "document_unreadable"
    assert store.requests == []  # refused before any request: the token went nowhere


async def test_http_references_are_off_without_an_allow_list(store: Store) -> None:
    source = HttpDocumentSource()
    with pytest.raises(DocumentError, match="IDV_DOCUMENTS_HTTP_ALLOW"):
        await source.open(store.url + "/docs/front.jpg", "front_image")
    assert store.requests == []


def test_allow_list_is_validated() -> None:
    assert [str(u) for u in parse_allow_list(["https://store.example/docs"])] == [
        "https://store.example/docs/"
    ]
    for bad in ("store.example/docs", "ftp://x/", "https://u:p@x/", "https://x/?q=1"):
        with pytest.raises(ValueError, match="not an http"):
            parse_allow_list([bad])
    with pytest.raises(ConfigurationError, match="IDV_DOCUMENTS_HTTP_ALLOW"):
        Settings.from_env(
            {
                "IDV_PROVIDER_API_KEY": "k",
                "IDV_FINGERPRINT_KEY": "f" * 16,
                "IDV_DOCUMENTS_HTTP_ALLOW": "ftp://x/",
            }
        )


# -- routing from the settings ------------------------------------------------------------------------------


async def test_sources_from_settings_route_by_scheme(root: Path, store: Store, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("doc-token-1\n")
    settings = Settings.from_env(
        {
            "IDV_PROVIDER_API_KEY": "k",
            "IDV_FINGERPRINT_KEY": "f" * 16,
            "IDV_DOCUMENTS_DIR": str(root),
            "IDV_DOCUMENTS_HTTP_ALLOW": f"https://elsewhere.invalid/, {store.url}/docs/",
            "IDV_DOCUMENTS_TOKEN_FILE": str(token_file),
        }
    )
    assert "doc-token-1" not in repr(settings)
    sources = source_from_settings(settings)
    try:
        local = await sources.open("local:front.jpg", "front_image")
        remote = await sources.open(store.url + "/docs/front.jpg", "front_image")
        assert (await read_all(local))[0] == (await read_all(remote))[0]
        with pytest.raises(DocumentError, match="no document source for this URI scheme") as info:
            await sources.open("s3://bucket/front.jpg", "front_image")
        assert info.value.reason == "document_unreadable"
    finally:
        await sources.aclose()
    assert store.authorizations == ["Bearer doc-token-1"] * 2


async def test_more_sources_can_be_registered(root: Path) -> None:
    class Prefixed:
        """A source for another scheme, as a deployment could add (here: memory:<name> → a local file)."""

        def __init__(self) -> None:
            self.local = LocalDocumentSource(root)

        async def open(self, uri: str, field: str) -> Document:
            return await self.local.open("local:" + uri.split(":", 1)[1], field)

    sources = DocumentSources()
    sources.register("memory", Prefixed())
    doc = await sources.open("memory:front.jpg", "front_image")
    assert doc.content_type == "image/jpeg"
    with pytest.raises(DocumentError, match="known: memory:"):
        await sources.open("local:front.jpg", "front_image")


async def test_a_store_failure_that_passes_is_retried_within_open(root: Path) -> None:
    from aiohttp import web

    calls = 0

    async def flaky(request: web.Request) -> web.StreamResponse:
        nonlocal calls
        calls += 1
        if calls < 3:
            return web.Response(status=503)
        return web.Response(body=(root / "front.jpg").read_bytes())

    app = web.Application()
    app.router.add_get("/docs/front.jpg", flaky)
    async with serve(app, shutdown_timeout=0.5) as url:
        source = HttpDocumentSource(allow=[url + "/docs/"], backoff_s=0.01)
        try:
            doc = await source.open(url + "/docs/front.jpg", "front_image")
            assert (await read_all(doc))[0] == (root / "front.jpg").read_bytes()
        finally:
            await source.aclose()
    assert calls == 4  # two 503s, the open, the stream


# -- inline images and the adapters' helper ---------------------------------------------------------------


async def test_open_documents_takes_references_and_small_inline_images(root: Path) -> None:
    png = (root / "back.png").read_bytes()
    small = base64.b64encode(png[:2000]).decode()  # a PNG header is enough for the type
    request = {
        "document_type": "passport",
        "front_image": {"document": "local:front.jpg"},
        "back_image": small,
    }
    docs = await open_documents(LocalDocumentSource(root), request, ("front_image", "back_image", "selfie"))
    assert [(d.field, d.content_type) for d in docs] == [
        ("front_image", "image/jpeg"),
        ("back_image", "image/png"),
    ]
    assert (await read_all(docs[1]))[0] == png[:2000]
    for bad, fragment in (("not base64!", "not valid base64"), ("aGVsbG8=", "not a JPEG")):
        with pytest.raises(DocumentError, match=fragment):
            await open_documents(None, {"front_image": bad}, ("front_image",))
    with pytest.raises(DocumentError, match="no document source is configured"):
        await open_documents(None, request, ("front_image",))
    with pytest.raises(DocumentError, match="limit is 100") as info:
        inline_document("front_image", small, max_bytes=100)
    assert info.value.reason == "document_too_large"


# -- where the daemon meets a broken document ----------------------------------------------------------------


@pytest.mark.parametrize("reason", DOCUMENT_REASONS)
async def test_a_document_error_during_the_call_is_a_dead_letter_not_a_crash(
    tmp_path: Path, reason: str
) -> None:
    """The pipeline's safety net: a DocumentError out of the provider call (raised by a document while its
    body is sent) ends the message as a dead letter under the document's reason, with no outcome recorded
    (nothing was decided: the message can be redriven once the document is back), and no exception."""
    import anyio

    from consumer.store import State
    from consumer.store.sqlite import SqliteStore
    from tests.consumer.test_processor import FakeClock, MockProvider, envelope, key_of, processor, record_of

    provider = MockProvider((200, {"status": "approved", "request_id": "ref-1"}))

    async def broken(request: object) -> None:
        raise DocumentError(reason, "the cause", field="front_image")

    provider.before_answer = broken
    env = envelope()
    async with SqliteStore(tmp_path / "dedupe.db", clock=FakeClock()) as store:
        p = processor(store, provider)
        with anyio.fail_after(10):
            async with p.provider:
                handled = await p.handle_safely(record_of(env))
        record = await store.get(key_of(env))
    assert handled.dead_letter is not None
    assert (handled.disposition.value, handled.dead_letter.reason) == ("set_aside", reason)
    assert handled.dead_letter.detail == "front_image: the cause"
    assert p.stats.by_disposition["set_aside"] == 1 and p.stats.by_disposition["error"] == 0
    assert record is not None and record.outcome is None
    assert record.state in (State.IN_PROGRESS, State.RELEASED)  # never COMPLETED or FAILED
