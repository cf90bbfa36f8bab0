"""``python -m consumer run`` with the provider transport chosen by ``IDV_PROVIDER_TRANSPORT``.

``IDV_PROVIDER_TRANSPORT=aiohttp-native`` swaps the httpx transport for ``bench/native_aiohttp.py`` (bare
aiohttp): a comparison point, measured here, not a daemon setting.

The benchmark measures the daemon on the aiohttp transport before the daemon's settings know that
variable: when set to anything but ``httpx``, every :class:`~consumer.provider.ProviderClient` built
without an explicit transport gets ``transport_kind`` from it. Once the daemon passes ``transport_kind``
itself, its value wins and this wrapper changes nothing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import consumer.provider
from consumer.cli import main

KIND = os.environ.get("IDV_PROVIDER_TRANSPORT", "httpx")

if KIND != "httpx":
    _init = consumer.provider.ProviderClient.__init__

    def _with_transport_kind(self: consumer.provider.ProviderClient, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("transport") is not None:
            _init(self, *args, **kwargs)
        elif KIND == "aiohttp-native":
            # Proposed change 1 of docs/performance.md, measured before it is written for real.
            from bench import native_aiohttp

            _init(self, *args, **kwargs)
            native_aiohttp.install(
                self,
                timeout_s=kwargs.get("timeout_s", 10.0),
                max_connections=kwargs.get("max_connections", 64),
            )
        else:
            kwargs.setdefault("transport_kind", KIND)
            _init(self, *args, **kwargs)

    consumer.provider.ProviderClient.__init__ = _with_transport_kind  # type: ignore[method-assign]

if __name__ == "__main__":
    main(["run"])
