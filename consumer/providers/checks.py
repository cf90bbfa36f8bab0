"""Start-up check: every window in which a key may be resent must fit inside the provider's key retention.

For an operation the profile dedupes by ``Idempotency-Key`` (``ietf``, ``signed``), a resend is safe only
while the provider still recognises the key. Automatic resends of one key happen within:

* the call's own retries: ``IDV_PROVIDER_MAX_ATTEMPTS`` attempts of at most ``IDV_PROVIDER_TIMEOUT_S``
  each, and between them a backoff of at most ``IDV_PROVIDER_BACKOFF_MAX_S`` or a ``Retry-After`` of at
  most ``IDV_PROVIDER_RETRY_AFTER_MAX_S``;
* a take-over after a crash (the replay of the unfinished message to a new owner): the group notices the
  dead member (``IDV_SESSION_TIMEOUT_MS``), the revoking members drain (``IDV_REBALANCE_DRAIN_S``) and the
  lease runs out (``IDV_LEASE_S``); then the new owner's call retries again.

If their sum exceeds the retention, the daemon refuses to start (:class:`ConfigurationError`, exit 2) and
names the window that would be unprotected; with ``IDV_PROVIDER_RETENTION_CHECK=warn`` it logs the same
line as a warning and runs. Later resends (a redrive from the dead-letter topic, a replay
of an unfinished record) are guarded at run time instead: an unfinished record older than the retention is
dead-lettered ``in_doubt``, not sent. Time spent waiting in an open circuit breaker is not bounded and not
counted here (docs/guarantees.md says so).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from consumer.errors import ConfigurationError
from consumer.providers.base import ProviderAdapter
from producer.envelope import OPERATIONS

if TYPE_CHECKING:
    from consumer.settings import Settings

log = logging.getLogger(__name__)

__all__ = ["check_key_retention", "resend_span"]


def resend_span(settings: Settings) -> tuple[float, str]:
    """Seconds from a key's first attempt to its last automatic resend, and how that sum is made up."""
    attempts = settings.provider_max_attempts
    wait = max(settings.provider_backoff_max_s, settings.provider_retry_after_max_s)
    retries = attempts * settings.provider_timeout_s + (attempts - 1) * wait
    takeover = settings.session_timeout_ms / 1000 + settings.rebalance_drain_s + settings.lease_s
    total = 2 * retries + takeover
    session = settings.session_timeout_ms / 1000
    parts = (
        f"retries {retries:g}s ({attempts} attempts x {settings.provider_timeout_s:g}s + "
        f"{attempts - 1} waits x {wait:g}s), take-over {takeover:g}s (session {session:g}s + drain "
        f"{settings.rebalance_drain_s:g}s + lease {settings.lease_s:g}s), then the new owner's retries "
        f"{retries:g}s"
    )
    return total, parts


def check_key_retention(settings: Settings, adapter: ProviderAdapter) -> None:
    """Raise :class:`ConfigurationError` if a key could be resent after the provider forgot it (a warning
    instead with ``IDV_PROVIDER_RETENTION_CHECK=warn``)."""
    span, parts = resend_span(settings)
    for name in sorted(OPERATIONS):
        capability = adapter.capability(name)
        if not capability.by_key or capability.retention_s is None or span <= capability.retention_s:
            continue
        problem = ConfigurationError(
            f"IDV_PROVIDER_KEY_RETENTION_S: the {adapter.name} provider keeps keys "
            f"{capability.retention_s:g}s, but a key may be resent up to {span:g}s after its first "
            f"attempt ({parts}): a resend between "
            f"{capability.retention_s:g}s and {span:g}s (operation {name}) could act twice. Lower "
            "IDV_PROVIDER_MAX_ATTEMPTS, IDV_PROVIDER_TIMEOUT_S, IDV_PROVIDER_RETRY_AFTER_MAX_S or "
            "IDV_LEASE_S, or set the provider's real (longer) retention"
        )
        if settings.provider_retention_check != "warn":
            raise problem
        log.warning("unprotected window (IDV_PROVIDER_RETENTION_CHECK=warn): %s", problem)
        return
