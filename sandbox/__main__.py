"""``python -m sandbox``: same as the ``idv-sandbox`` console script."""

from __future__ import annotations

from .cli import main

main()
