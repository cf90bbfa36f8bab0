"""Dedupe stores, chosen by URL scheme; drivers are imported only when their scheme is used."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from consumer.errors import ConfigurationError
from consumer.store.base import Claim, ClaimStatus, DedupeStore, Outcome, Record, State

__all__ = ["Claim", "ClaimStatus", "DedupeStore", "Outcome", "Record", "State", "open_store"]


def open_store(url: str) -> DedupeStore:
    """Build (not yet open) the store for ``url``.

    * ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``;
      query ``?synchronous=NORMAL`` trades power-loss durability for speed (see docs/configuration.md).
    * ``postgresql://user:pass@host:port/db`` (needs the ``postgres`` extra).
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if not path:
            raise ConfigurationError(f"SQLite store URL has no path: {url!r}")
        query = parse_qs(parts.query)
        from consumer.store.sqlite import SqliteStore

        try:
            return SqliteStore(path, synchronous=query.get("synchronous", ["FULL"])[0])
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    if parts.scheme in ("postgresql", "postgres"):
        try:
            from consumer.store.postgres import PostgresStore  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConfigurationError(
                "the PostgreSQL store needs the 'postgres' extra "
                f"(pip install 'idv-exactly-once[postgres]'): {exc}"
            ) from None
        store: DedupeStore = PostgresStore(url)
        return store
    raise ConfigurationError(
        f"unsupported store URL scheme {parts.scheme!r} (use sqlite:// or postgresql://)"
    )
