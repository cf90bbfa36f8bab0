"""Exactly-once consumer of identity-verification requests."""

from __future__ import annotations

from consumer.daemon import Daemon
from consumer.errors import (
    ConfigurationError,
    ConsumerError,
    LeaseLost,
    ProviderAuthError,
    ProviderConfigError,
    ProviderError,
    ProviderInDoubt,
    ProviderNotFound,
    ProviderRetriableError,
    RetriesExhausted,
    StoreError,
    UnreconciledAttempt,
)
from consumer.keys import fingerprint, idempotency_key
from consumer.offsets import PartitionOffsets
from consumer.pipeline import Disposition, Processor, Stats
from consumer.provider import CallProgress, CallResult, ProviderClient, RetryPolicy
from consumer.settings import Settings
from consumer.store import Claim, ClaimStatus, DedupeStore, Outcome, Record, State, open_store

__all__ = [
    "CallProgress",
    "CallResult",
    "Claim",
    "ClaimStatus",
    "ConfigurationError",
    "ConsumerError",
    "Daemon",
    "DedupeStore",
    "Disposition",
    "LeaseLost",
    "Outcome",
    "PartitionOffsets",
    "Processor",
    "ProviderAuthError",
    "ProviderClient",
    "ProviderConfigError",
    "ProviderError",
    "ProviderInDoubt",
    "ProviderNotFound",
    "ProviderRetriableError",
    "Record",
    "RetriesExhausted",
    "RetryPolicy",
    "Settings",
    "State",
    "StoreError",
    "UnreconciledAttempt",
    "Stats",
    "fingerprint",
    "idempotency_key",
    "open_store",
]
