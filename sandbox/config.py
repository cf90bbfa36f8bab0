"""Settings of one sandbox server."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import SandboxConfigError
from .faults import FaultConfig

__all__ = ["DEFAULT_API_KEY", "SandboxConfig", "api_key_id"]

DEFAULT_API_KEY = "sandbox-test-key"
"""Accepted by a ``SandboxConfig()`` built without ``api_keys``; a fake secret for tests."""


def api_key_id(api_key: str) -> str:
    """A stable, non-secret name for an API key, used in the ledger instead of the key itself."""
    return "ak_" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 0
    """0 binds an ephemeral port; read it back from ``SandboxServer.port``."""
    api_keys: tuple[str, ...] = (DEFAULT_API_KEY,)
    out_of_credit_keys: tuple[str, ...] = ()
    """Keys that authenticate but get 403 ``insufficient_credits``."""
    rate_limit_per_min: int | None = None
    """Requests per minute per API key; ``None`` disables rate limiting."""
    rate_limit_burst: int | None = None
    """Token bucket capacity; defaults to ``rate_limit_per_min``."""
    idempotency_ttl_s: float = 24 * 3600.0
    faults: FaultConfig = field(default_factory=FaultConfig)
    clock: Callable[[], float] = time.time
    """Seconds; drives key expiry, rate limiting and ledger timestamps. Inject a fake one in tests."""
    max_body_bytes: int = 8 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("api_keys", "out_of_credit_keys"):
            value = getattr(self, name)
            if isinstance(value, str):
                raise SandboxConfigError(f"{name} must be a sequence of strings, not one string")
            keys = tuple(value)
            if any(not isinstance(k, str) or not k for k in keys):
                raise SandboxConfigError(f"{name} must contain non-empty strings")
            object.__setattr__(self, name, keys)
        if not self.api_keys and not self.out_of_credit_keys:
            raise SandboxConfigError("at least one API key is required")
        if not 0 <= self.port <= 65535:
            raise SandboxConfigError(f"port must be between 0 and 65535, got {self.port}")
        if self.rate_limit_per_min is not None and self.rate_limit_per_min < 1:
            raise SandboxConfigError("rate_limit_per_min must be >= 1 (or None to disable)")
        if self.rate_limit_burst is not None and self.rate_limit_burst < 1:
            raise SandboxConfigError("rate_limit_burst must be >= 1")
        if self.idempotency_ttl_s <= 0:
            raise SandboxConfigError("idempotency_ttl_s must be > 0")
        if self.max_body_bytes < 1:
            raise SandboxConfigError("max_body_bytes must be >= 1")
