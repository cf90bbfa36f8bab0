"""Fault injection: what goes wrong, and when.

Faults are decided once per request on a business endpoint, after authentication and rate limiting
and before the idempotency layer. A gateway fault (an injected 5xx or 429) answers at once: nothing
is stored under the idempotency key and no side effect happens, as when a load balancer in front of
a real provider fails. A drop fault lets the request run through the idempotency layer (side effect
performed, response stored) and then closes the connection without sending the response, which is
the case that forces a client to retry with the same key.

The script, when not empty, takes precedence over the random rates: each request consumes one item.

In the ``didit`` profile faults hit the mutating endpoints (creates, checks, deletes); the read-only
ones (list, decision) only with ``read_faults`` on, so that a script's items land where a test expects.

Script items:

``ok``
    no fault for this request (the random rates are not rolled either)
``500`` .. ``599``
    gateway error with that status
``301``, ``302``, ``303``, ``307``, ``308``
    a redirect from a gateway or proxy in front of the provider (``Location`` elsewhere), nothing stored
``429`` / ``429:N``
    gateway rate limit with ``Retry-After: N`` (default ``retry_after_s``)
``drop``
    run the request, then close the connection instead of answering
``drop_before``
    close the connection before the request reaches the idempotency layer (no side effect)
``delay:MS``
    extra delay of MS milliseconds before business handling (on top of ``latency_ms``)
``trickle:MS``
    process normally, then send the answer slowly: the head at once, the body in small pieces spread
    over MS milliseconds (every gap far below a read timeout, so only a total deadline stops it)
"""

from __future__ import annotations

import dataclasses
import enum
import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import SandboxConfigError

__all__ = ["Fault", "FaultAction", "FaultConfig", "FaultInjector", "check_numbers", "parse_script_item"]


class FaultAction(enum.Enum):
    RESPOND = "respond"
    """Answer with ``Fault.status`` before the idempotency layer."""
    DROP_BEFORE = "drop_before"
    """Close the connection before the idempotency layer."""
    DROP_AFTER = "drop_after"
    """Process normally, then close the connection instead of answering."""
    TRICKLE = "trickle"
    """Process normally, then send the answer's body slowly over ``Fault.delay_s``."""
    DELAY = "delay"
    """Process normally after an extra ``Fault.delay_s``."""


@dataclass(frozen=True, slots=True)
class Fault:
    kind: str
    """``"<source>:<what>"``, e.g. ``script:500``, ``random:429``, ``random:drop``; counted in the ledger."""
    action: FaultAction
    status: int = 0
    retry_after_s: int | None = None
    delay_s: float = 0.0


def parse_script_item(item: str) -> Fault | None:
    """Parse one script item; ``None`` means ``ok``. Raises :class:`SandboxConfigError`."""
    text = item.strip().lower()
    if text == "ok":
        return None
    if text == "drop":
        return Fault("script:drop", FaultAction.DROP_AFTER)
    if text == "drop_before":
        return Fault("script:drop_before", FaultAction.DROP_BEFORE)
    head, sep, arg = text.partition(":")
    if head == "delay" and sep:
        delay_ms = _number(arg, item)
        if delay_ms < 0:
            raise SandboxConfigError(f"script item {item!r}: delay must be >= 0")
        return Fault("script:delay", FaultAction.DELAY, delay_s=delay_ms / 1000)
    if head == "trickle" and sep:
        trickle_ms = _number(arg, item)
        if trickle_ms < 0:
            raise SandboxConfigError(f"script item {item!r}: trickle must be >= 0")
        return Fault("script:trickle", FaultAction.TRICKLE, delay_s=trickle_ms / 1000)
    if head.isdigit():
        status = int(head)
        if status == 429:
            retry_after = None
            if sep:
                retry_after = int(_number(arg, item))
                if retry_after < 1:
                    raise SandboxConfigError(f"script item {item!r}: Retry-After must be >= 1")
            return Fault("script:429", FaultAction.RESPOND, status=429, retry_after_s=retry_after)
        if (500 <= status <= 599 or status in _REDIRECTS) and not sep:
            return Fault(f"script:{status}", FaultAction.RESPOND, status=status)
    raise SandboxConfigError(
        f"script item {item!r} not understood "
        "(ok, 5xx, 3xx redirect, 429[:N], drop, drop_before, delay:MS, trickle:MS)"
    )


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def _number(text: str, item: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise SandboxConfigError(f"script item {item!r}: {text!r} is not a number") from None


_RATES = ("error_rate", "rate_429", "drop_after_effect_rate")
_NON_NEGATIVE = ("latency_ms", "latency_jitter_ms")


@dataclass(frozen=True, slots=True)
class FaultConfig:
    latency_ms: float = 0.0
    """Delay before business handling (only when the request is processed, not replayed)."""
    latency_jitter_ms: float = 0.0
    """Extra uniformly random delay in ``[0, latency_jitter_ms]``."""
    error_rate: float = 0.0
    """Probability of a gateway 500."""
    rate_429: float = 0.0
    """Probability of a gateway 429 with ``Retry-After: retry_after_s``."""
    retry_after_s: int = 1
    drop_after_effect_rate: float = 0.0
    """Probability of dropping the connection after processing instead of answering."""
    seed: int | None = None
    """Seed of the random rolls; ``None`` seeds from the OS."""
    script: tuple[str, ...] = field(default=())
    """Items consumed one per business request, in order (see the module docstring)."""
    read_faults: bool = False
    """``didit`` profile: also inject faults on the read-only endpoints (list sessions, decision)."""

    def __post_init__(self) -> None:
        check_numbers(self, rates=_RATES, non_negative=_NON_NEGATIVE)
        if self.retry_after_s < 1:
            raise SandboxConfigError("retry_after_s must be >= 1")
        if isinstance(self.script, str):
            object.__setattr__(self, "script", _split_script(self.script))
        else:
            object.__setattr__(self, "script", tuple(self.script))
        for item in self.script:
            parse_script_item(item)

    def merged(self, changes: Mapping[str, object]) -> FaultConfig:
        """A copy with ``changes`` applied; values are type-checked because they come from JSON."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise SandboxConfigError(f"unknown fault setting(s): {', '.join(unknown)}")
        values: dict[str, Any] = {}
        for name, value in changes.items():
            if name == "script":
                values[name] = _script_value(value)
            elif name == "seed":
                if value is not None and not _is_int(value):
                    raise SandboxConfigError("seed must be an integer or null")
                values[name] = value
            elif name == "read_faults":
                if not isinstance(value, bool):
                    raise SandboxConfigError("read_faults must be true or false")
                values[name] = value
            elif name == "retry_after_s":
                if not _is_int(value):
                    raise SandboxConfigError("retry_after_s must be an integer")
                values[name] = value
            else:
                if not isinstance(value, int | float) or isinstance(value, bool):
                    raise SandboxConfigError(f"{name} must be a number")
                values[name] = float(value)
        return dataclasses.replace(self, **values)

    def to_dict(self) -> dict[str, object]:
        data = dataclasses.asdict(self)
        data["script"] = list(self.script)
        return data


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_numbers(
    record: object, *, rates: Iterable[str] = (), non_negative: Iterable[str] = (), label: str = ""
) -> None:
    """The rule of every fault-like setting: each of ``rates`` a number in ``[0, 1]``, each of
    ``non_negative`` a number ``>= 0``. Raises :class:`SandboxConfigError` naming the first that is not
    (after ``label``)."""
    for name in rates:
        value = getattr(record, name)
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise SandboxConfigError(f"{label}{name} must be between 0 and 1, got {value!r}")
    for name in non_negative:
        if not _is_number(getattr(record, name)) or getattr(record, name) < 0:
            raise SandboxConfigError(f"{label}{name} must be a number >= 0")


def _split_script(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _script_value(value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        return _split_script(value)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SandboxConfigError("script must be a list of strings or a comma-separated string")


class FaultInjector:
    """Mutable fault state of one server: the configuration, the seeded RNG and the remaining script."""

    def __init__(self, config: FaultConfig | None = None) -> None:
        self._config = FaultConfig()
        self._rng = random.Random()  # noqa: S311 - fault rolls, not cryptography
        self._script: deque[tuple[str, Fault | None]] = deque()
        self._set(config or FaultConfig(), reseed=True)

    @property
    def config(self) -> FaultConfig:
        """The current configuration; ``script`` holds only the items not consumed yet."""
        return dataclasses.replace(self._config, script=tuple(item for item, _ in self._script))

    def update(self, changes: Mapping[str, object]) -> FaultConfig:
        """Merge ``changes`` into the configuration (a new ``script`` replaces the remaining one)."""
        new = self.config.merged(changes)
        self._set(new, reseed="seed" in changes)
        return self.config

    def reset(self, config: FaultConfig | None = None) -> None:
        self._set(config or FaultConfig(), reseed=True)

    def _set(self, config: FaultConfig, *, reseed: bool) -> None:
        self._config = config
        self._script = deque(_parsed(config.script))
        if reseed:
            self._rng.seed(config.seed)

    def next_fault(self) -> Fault | None:
        """Decide the fault for the next business request (consumes a script item if any)."""
        if self._script:
            return self._script.popleft()[1]
        config = self._config
        rng = self._rng
        if config.error_rate and rng.random() < config.error_rate:
            return Fault("random:500", FaultAction.RESPOND, status=500)
        if config.rate_429 and rng.random() < config.rate_429:
            return Fault("random:429", FaultAction.RESPOND, status=429, retry_after_s=config.retry_after_s)
        if config.drop_after_effect_rate and rng.random() < config.drop_after_effect_rate:
            return Fault("random:drop", FaultAction.DROP_AFTER)
        return None

    def latency_s(self) -> float:
        config = self._config
        delay_ms = config.latency_ms
        if config.latency_jitter_ms:
            delay_ms += self._rng.uniform(0.0, config.latency_jitter_ms)
        return delay_ms / 1000

    def default_retry_after_s(self) -> int:
        return self._config.retry_after_s


def _parsed(items: Iterable[str]) -> list[tuple[str, Fault | None]]:
    return [(item, parse_script_item(item)) for item in items]
