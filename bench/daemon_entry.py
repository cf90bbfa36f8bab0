"""``python -m consumer run``, optionally with the bare-aiohttp comparison point.

``IDV_PROVIDER_TRANSPORT=aiohttp-native`` is not a daemon setting: this wrapper turns it into ``aiohttp``
for the daemon and then swaps every :class:`~consumer.provider.ProviderClient`'s sending method for
``bench/native_aiohttp.py`` (aiohttp with no httpx objects at all), so the benchmark can show what the
httpx layer costs. Any other value is passed to the daemon unchanged.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consumer.provider
from consumer.cli import main

if os.environ.get("IDV_PROVIDER_TRANSPORT") == "aiohttp-native":
    os.environ["IDV_PROVIDER_TRANSPORT"] = "aiohttp"
    _init = consumer.provider.ProviderClient.__init__

    def _native(self: consumer.provider.ProviderClient, *args: Any, **kwargs: Any) -> None:
        from bench import native_aiohttp

        _init(self, *args, **kwargs)
        if kwargs.get("transport") is None:
            native_aiohttp.install(
                self,
                timeout_s=kwargs.get("timeout_s", 10.0),
                max_connections=kwargs.get("max_connections", 64),
            )

    consumer.provider.ProviderClient.__init__ = _native  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["run"])
