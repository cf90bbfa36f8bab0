"""Run a sandbox server on its own event loop in a background thread (for synchronous fixtures)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import TypeVar

from .app import SandboxApp
from .config import SandboxConfig
from .server import SandboxServer

__all__ = ["SandboxThread", "run_in_thread"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class SandboxThread:
    """Handle of a sandbox server running in a background thread.

    The server's state lives on the thread's loop; read and change it through the methods here
    (they hop onto that loop) or over HTTP at ``/_admin/``.
    """

    def __init__(self, config: SandboxConfig | None = None) -> None:
        self.config = config or SandboxConfig()
        self._server: SandboxServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="idv-sandbox", daemon=True)

    @property
    def url(self) -> str:
        return self._started().url

    @property
    def port(self) -> int:
        return self._started().port

    def start(self, timeout: float = 10.0) -> SandboxThread:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("the sandbox server did not start in time")
        if self._error is not None:
            self._thread.join(timeout)
            raise self._error
        return self

    def stop(self, timeout: float = 10.0) -> None:
        loop, event = self._loop, self._stop_event
        if loop is not None and event is not None and self._thread.is_alive():
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # the loop already closed
                pass
        if self._thread.is_alive():
            self._thread.join(timeout)

    def call(self, fn: Callable[[SandboxApp], T], timeout: float = 10.0) -> T:
        """Run ``fn(app)`` on the server's loop and return its result."""
        server, loop = self._started(), self._loop
        assert loop is not None
        future: concurrent.futures.Future[T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn(server.app))
            except Exception as exc:  # noqa: BLE001 - handed to the calling thread via the future
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout)

    def ledger(self) -> dict[str, object]:
        """Same as ``GET /_admin/ledger``."""
        return self.call(lambda app: app.snapshot())

    def stats(self) -> dict[str, object]:
        """Same as ``GET /_admin/stats``."""
        return self.call(lambda app: app.totals())

    def set_faults(self, **changes: object) -> dict[str, object]:
        """Same as ``POST /_admin/faults``: merge ``changes``, return the current fault settings."""
        return self.call(lambda app: app.faults.update(changes).to_dict())

    def reset(self) -> None:
        """Same as ``POST /_admin/reset``."""
        self.call(lambda app: app.reset())

    def __enter__(self) -> SandboxThread:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _started(self) -> SandboxServer:
        if self._server is None:
            raise RuntimeError("the sandbox thread is not running")
        return self._server

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:
            if self._ready.is_set():
                log.exception("sandbox server thread failed")
            else:
                self._error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        server = SandboxServer(self.config)
        await server.start()
        self._server = server
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await server.stop()


def run_in_thread(config: SandboxConfig | None = None) -> SandboxThread:
    """Start a sandbox server in a background thread; use the result as a context manager.

    ::

        with run_in_thread(SandboxConfig(api_keys=("k",))) as sandbox:
            httpx.post(f"{sandbox.url}/v3/aml/", ...)
    """
    return SandboxThread(config).start()
