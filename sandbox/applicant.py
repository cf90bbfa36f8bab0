"""The ``didit`` profile's simulated applicant: opens a new session, then finishes (or abandons) it.

After ``delay_s / 2`` (plus jitter) a ``Not Started`` session becomes ``In Progress``; after as long again
it gets the decision its input asked for (``decisions.decide``: ``Approved``, ``Declined`` or
``In Review``), or ``Abandoned`` for a share ``abandon_rate`` of sessions. A step whose session was
changed meanwhile (an admin status change, a delete) is skipped, as a real applicant cannot act on a
session that moved on. Each change goes through ``DiditApi.change_status``, which sends the webhook.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .config import DiditConfig
from .errors import SandboxConfigError
from .sessions import Session

if TYPE_CHECKING:
    from .didit import DiditApi

__all__ = ["Applicant"]


class Applicant:
    def __init__(self, api: DiditApi, config: DiditConfig) -> None:
        self._api = api
        self.delay_s = config.applicant_delay_s
        self.jitter_s = config.applicant_jitter_s
        self.abandon_rate = config.abandon_rate
        self._rng = random.Random(config.seed)  # noqa: S311 - simulation rolls, not cryptography
        self._tasks: set[asyncio.Task[None]] = set()

    def state(self) -> dict[str, object]:
        return {
            "delay_s": self.delay_s,
            "jitter_s": self.jitter_s,
            "abandon_rate": self.abandon_rate,
            "running": len(self._tasks),
        }

    def configure(self, changes: Mapping[str, Any]) -> None:
        """``POST /_admin/applicant``: ``delay_s`` (``null``: never act), ``jitter_s``, ``abandon_rate``,
        ``seed``; applies to sessions created from now on."""
        unknown = sorted(set(changes) - {"delay_s", "jitter_s", "abandon_rate", "seed"})
        if unknown:
            raise SandboxConfigError(f"unknown applicant setting(s): {', '.join(unknown)}")
        for name, value in changes.items():
            nullable = name in ("delay_s", "seed")
            number = isinstance(value, int) if name == "seed" else isinstance(value, int | float)
            if (value is None and not nullable) or (
                value is not None and (not number or isinstance(value, bool))
            ):
                raise SandboxConfigError(
                    f"applicant {name} must be a number" + (" or null" if nullable else "")
                )
        delay = changes.get("delay_s", self.delay_s)
        checked = DiditConfig(  # range checks
            applicant_delay_s=delay,
            applicant_jitter_s=changes.get("jitter_s", self.jitter_s),
            abandon_rate=changes.get("abandon_rate", self.abandon_rate),
        )
        self.delay_s, self.jitter_s, self.abandon_rate = (
            delay,
            checked.applicant_jitter_s,
            checked.abandon_rate,
        )
        if "seed" in changes:
            self._rng.seed(changes["seed"])

    def start(self, session: Session) -> None:
        if self.delay_s is None:
            return
        step_s = self.delay_s / 2
        first = step_s + self._jitter()
        second = step_s + self._jitter()
        abandon = self.abandon_rate > 0 and self._rng.random() < self.abandon_rate
        task = asyncio.get_running_loop().create_task(self._run(session, first, second, abandon))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _jitter(self) -> float:
        return self._rng.uniform(0, self.jitter_s) if self.jitter_s else 0.0

    async def _run(self, session: Session, first_s: float, second_s: float, abandon: bool) -> None:
        await asyncio.sleep(first_s)
        if not self._current(session, "Not Started"):
            return
        self._api.change_status(session, "In Progress")
        await asyncio.sleep(second_s)
        if not self._current(session, "In Progress"):
            return
        self._api.change_status(session, "Abandoned" if abandon else session.planned.value)

    def _current(self, session: Session, status: str) -> bool:
        return self._api.sessions.get(session.session_id) is session and session.status == status

    def cancel(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    async def aclose(self) -> None:
        self.cancel()
        await asyncio.gather(*list(self._tasks), return_exceptions=True)
