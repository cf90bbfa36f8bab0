"""Settings of one sandbox server."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from .errors import SandboxConfigError
from .faults import FaultConfig, check_numbers
from .webhooks import WebhookFaults, WebhookSettings

__all__ = ["DEFAULT_API_KEY", "PROFILES", "DiditConfig", "SandboxConfig", "api_key_id"]

PROFILES = ("ietf", "didit")
"""``ietf``: an ``Idempotency-Key`` provider (the IETF draft, as Stripe or Persona). ``didit``: Didit's v3
contract (no key; the unfinished session for the same ``vendor_data`` is returned; multipart checks)."""

DEFAULT_API_KEY = "sandbox-test-key"
"""Accepted by a ``SandboxConfig()`` built without ``api_keys``; a fake secret for tests."""


def api_key_id(api_key: str) -> str:
    """A stable, non-secret name for an API key, used in the ledger instead of the key itself."""
    return "ak_" + hashlib.sha256(api_key.encode()).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class DiditConfig:
    """Settings of the ``didit`` profile's simulated applicant and webhook sender."""

    applicant_delay_s: float | None = None
    """After a session is created, the applicant opens it at half this delay (``In Progress``) and
    finishes it at the full delay (the decision). ``None``: the applicant never acts (admin only)."""
    applicant_jitter_s: float = 0.0
    """Extra uniformly random delay in ``[0, applicant_jitter_s]`` added to each step."""
    abandon_rate: float = 0.0
    """Share of sessions the applicant abandons (``Abandoned``) instead of finishing."""
    webhook_url: str | None = None
    """Where ``status.updated`` / ``data.updated`` webhooks go; ``None`` sends none."""
    webhook_secret: str | None = None
    """The webhook secret key the deliveries are signed with (required with ``webhook_url``)."""
    webhook_max_attempts: int = 4
    """Delivery attempts per event (the first plus retries) before the sender gives up."""
    webhook_backoff_s: float = 0.5
    """Wait before the first retry; doubled after each further failed attempt."""
    webhook_timeout_s: float = 5.0
    """Total time one delivery attempt may take before it counts as failed."""
    webhook_faults: WebhookFaults = field(default_factory=WebhookFaults)
    seed: int | None = None
    """Seed of the applicant's rolls; ``None`` seeds from the OS."""

    def __post_init__(self) -> None:
        check_numbers(self, rates=("abandon_rate",), non_negative=("applicant_jitter_s",))
        if self.applicant_delay_s is not None and self.applicant_delay_s < 0:
            raise SandboxConfigError("applicant_delay_s must be >= 0 (or None: the applicant never acts)")
        try:
            self.webhook_settings()
        except SandboxConfigError as exc:
            raise SandboxConfigError(f"webhook_{exc}") from None  # the field's name here

    def webhook_settings(self) -> WebhookSettings:
        """The ``webhook_*`` fields as the sender's settings (which check them)."""
        names = (f.name for f in fields(WebhookSettings))
        return WebhookSettings(**{name: getattr(self, f"webhook_{name}") for name in names})


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
    max_body_bytes: int | None = None
    """Largest request body accepted (413 beyond). ``None``: 8 MiB in the ``ietf`` profile, 32 MiB in
    ``didit`` (its multipart uploads carry images of several MB). Read :attr:`body_limit`."""
    profile: str = "ietf"
    """One of :data:`PROFILES`."""
    didit: DiditConfig = field(default_factory=DiditConfig)

    def __post_init__(self) -> None:
        if self.profile not in PROFILES:
            raise SandboxConfigError(f"profile must be one of {', '.join(PROFILES)}, got {self.profile!r}")
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
        if self.max_body_bytes is not None and self.max_body_bytes < 1:
            raise SandboxConfigError("max_body_bytes must be >= 1")

    @property
    def body_limit(self) -> int:
        if self.max_body_bytes is not None:
            return self.max_body_bytes
        return (32 if self.profile == "didit" else 8) * 1024 * 1024
