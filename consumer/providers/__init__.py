"""Provider adapters (``IDV_PROVIDER``): one module per provider profile, the contract in :mod:`.base`."""

from __future__ import annotations

from consumer.providers.base import (
    ADAPTERS,
    Capability,
    PreparedCall,
    ProviderAdapter,
    Sender,
    adapter_from_settings,
    register_adapter,
)

__all__ = [
    "ADAPTERS",
    "Capability",
    "PreparedCall",
    "ProviderAdapter",
    "Sender",
    "adapter_from_settings",
    "register_adapter",
]
