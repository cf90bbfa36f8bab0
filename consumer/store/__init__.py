"""Dedupe stores, chosen by URL scheme; drivers are imported only when their scheme is used."""

from __future__ import annotations

from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

from consumer.errors import ConfigurationError
from consumer.store.base import Claim, ClaimStatus, DedupeStore, Outcome, Record, State

__all__ = [
    "POSTGRES_SCHEMES",
    "Claim",
    "ClaimStatus",
    "DedupeStore",
    "Outcome",
    "Record",
    "State",
    "open_store",
    "redact",
    "redact_url",
    "sqlite_target",
]

#: The URL schemes of a PostgreSQL store (the dedupe store's and the workflow store's).
POSTGRES_SCHEMES = ("postgresql", "postgres")


def sqlite_target(parts: SplitResult) -> tuple[str, str]:
    """A ``sqlite:`` store URL's file path and ``?synchronous=`` mode (``FULL`` unless given), for the
    dedupe store and the workflow store alike: ``sqlite:///rel.db`` is ``rel.db``, ``sqlite:////abs.db``
    is ``/abs.db``, ``sqlite:///:memory:`` is ``:memory:``. Checks nothing: the callers do."""
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    return path, parse_qs(parts.query).get("synchronous", ["FULL"])[0]


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; anything unparsable is hidden entirely."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))
    except ValueError:
        return "<unparsable store URL>"


def redact(text: str, url: str) -> str:
    """``text`` (an error message that may echo the DSN) with ``url``'s password removed, in both its
    raw and percent-decoded forms."""
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    if url:
        text = text.replace(url, redact_url(url))
    if password:
        for form in {password, unquote(password)}:
            if form:
                text = text.replace(form, "***")
    return text


def open_store(url: str) -> DedupeStore:
    """Build (not yet open) the store for ``url``.

    * ``sqlite:///relative/path.db``, ``sqlite:////absolute/path.db``, ``sqlite:///:memory:``;
      query ``?synchronous=NORMAL`` trades power-loss durability for speed (see docs/configuration.md).
    * ``postgresql://user:pass@host:port/db`` (needs the ``postgres`` extra).
    """
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not a number
    except ValueError as exc:
        raise ConfigurationError(f"invalid store URL {redact_url(url)}: {redact(str(exc), url)}") from None
    if parts.scheme == "sqlite":
        path, synchronous = sqlite_target(parts)
        if not path:
            raise ConfigurationError(f"SQLite store URL has no path: {redact_url(url)!r}")
        from consumer.store.sqlite import SqliteStore

        try:
            return SqliteStore(path, synchronous=synchronous)
        except ValueError as exc:
            raise ConfigurationError(str(exc)) from None
    if parts.scheme in POSTGRES_SCHEMES:
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
