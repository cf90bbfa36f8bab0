"""Test documents made at test time (never committed): real JPEG/PNG files of a few MB, drawn with Pillow,
and an aiohttp.web document store on loopback that serves a directory of them."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from PIL import Image

from tests.loopback import serve


def noise_image(
    path: Path, *, width: int = 2000, height: int = 1400, seed: int = 1, fmt: str = "JPEG"
) -> Path:
    """A real image file of random pixels (noise compresses badly: a 2000x1400 JPEG is ~3 MB)."""
    rng = random.Random(seed)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    if fmt == "JPEG":
        image.save(path, fmt, quality=95)
    else:
        image.save(path, fmt)
    return path


def documents_dir(parent: Path, seed: int) -> Path:
    """``parent/documents`` holding ``front.jpg`` (~3 MB) and ``back.png``, drawn from ``seed`` and
    ``seed + 1``."""
    docs = parent / "documents"
    docs.mkdir()
    noise_image(docs / "front.jpg", seed=seed)
    noise_image(docs / "back.png", width=1000, height=1000, seed=seed + 1, fmt="PNG")
    return docs


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Store:
    """A document store on 127.0.0.1: ``/docs/<name>`` serves a file of ``root`` with Content-Length,
    ``/chunked/<name>`` the same without a length, ``/gzip/<name>`` gzip-encoded whatever was asked,
    ``/status/<code>`` answers that status, ``/slow/<x>`` never answers in time, ``/redirect/<x>`` is a
    302. With ``token`` set every request needs ``Bearer <token>``."""

    root: Path
    token: str | None = None
    url: str = ""
    requests: list[str] = field(default_factory=list)
    authorizations: list[str | None] = field(default_factory=list)
    encodings: list[str | None] = field(default_factory=list)


@asynccontextmanager
async def document_store(root: Path, token: str | None = None) -> AsyncIterator[Store]:
    store = Store(root, token)

    @web.middleware
    async def auth(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        store.requests.append(request.path)
        store.authorizations.append(request.headers.get("Authorization"))
        store.encodings.append(request.headers.get("Accept-Encoding"))
        if token is not None and request.headers.get("Authorization") != f"Bearer {token}":
            return web.Response(status=401)
        return await handler(request)

    async def docs(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["name"]
        if not path.is_file():
            return web.Response(status=404)
        data = path.read_bytes()
        return web.Response(body=data, content_type="application/octet-stream")

    async def chunked(request: web.Request) -> web.StreamResponse:
        path = root / request.match_info["name"]
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        data = path.read_bytes()
        for i in range(0, len(data), 50_000):
            await response.write(data[i : i + 50_000])
        await response.write_eof()
        return response

    async def gzipped(request: web.Request) -> web.StreamResponse:
        data = gzip.compress((root / request.match_info["name"]).read_bytes())
        return web.Response(body=data, headers={"Content-Encoding": "gzip"})

    async def status(request: web.Request) -> web.StreamResponse:
        return web.Response(status=int(request.match_info["code"]))

    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(status=200)

    async def redirect(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/docs/elsewhere.jpg")

    app = web.Application(middlewares=[auth])
    app.router.add_get("/docs/{name}", docs)
    app.router.add_get("/chunked/{name}", chunked)
    app.router.add_get("/gzip/{name}", gzipped)
    app.router.add_get("/status/{code}", status)
    app.router.add_get("/slow/{name}", slow)
    app.router.add_get("/redirect/{name}", redirect)
    async with serve(app, shutdown_timeout=0.5) as store.url:
        yield store
