"""Serves an aiohttp.web app on a free loopback port for one test: the stand-ins tests talk to over HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web


@asynccontextmanager
async def serve(app: web.Application, **runner_options: Any) -> AsyncIterator[str]:
    """``app`` on 127.0.0.1 at a port the OS picks; yields its base URL and cleans the runner up after.
    ``runner_options`` go to ``web.AppRunner`` (``shutdown_timeout``, ``access_log``, ...)."""
    runner = web.AppRunner(app, **runner_options)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    try:
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()
