"""The async-context protocol of the daemon's servers: ``async with`` starts one and stops it, once."""

from __future__ import annotations

from typing import Self

__all__ = ["AsyncService"]


class AsyncService:
    """``async with service:`` runs ``start()`` on entry and ``stop()`` on exit; subclasses define both."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
