"""A sandbox identity-verification provider: a real HTTP server standing in for a Didit-style v3 API.

Tests prove exactly-once processing by reading its ledger (``GET /_admin/ledger``): for every
``Idempotency-Key`` (``ietf`` profile) or ``metadata.idv_key`` (``didit`` profile), how many side effects
the provider performed and every attempt it saw; ``GET /_admin/effects`` lists the side effects.
"""

from __future__ import annotations

from .app import Request, Response, SandboxApp
from .config import DEFAULT_API_KEY, PROFILES, DiditConfig, SandboxConfig, api_key_id
from .decisions import Decision, decide
from .errors import SandboxConfigError, SandboxError
from .faults import Fault, FaultAction, FaultConfig, FaultInjector, parse_script_item
from .idempotency import MAX_KEY_LENGTH, IdempotencyStore, StoredResponse, fingerprint
from .ledger import Attempt, Effect, KeyRecord, Ledger, Outcome
from .provider import Endpoint
from .server import SandboxServer
from .thread import SandboxThread, run_in_thread

__all__ = [
    "DEFAULT_API_KEY",
    "MAX_KEY_LENGTH",
    "PROFILES",
    "Attempt",
    "Decision",
    "DiditConfig",
    "Effect",
    "Endpoint",
    "Fault",
    "FaultAction",
    "FaultConfig",
    "FaultInjector",
    "IdempotencyStore",
    "KeyRecord",
    "Ledger",
    "Outcome",
    "Request",
    "Response",
    "SandboxApp",
    "SandboxConfig",
    "SandboxConfigError",
    "SandboxError",
    "SandboxServer",
    "SandboxThread",
    "StoredResponse",
    "api_key_id",
    "decide",
    "fingerprint",
    "parse_script_item",
    "run_in_thread",
]
