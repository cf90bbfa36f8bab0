"""The daemon under cProfile: own time per library and the top functions (``throughput.py --profile``)."""

from __future__ import annotations

import pstats
from pathlib import Path

_CATEGORIES = (
    ("/httpx_aiohttp/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/aiohttp/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/yarl/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/multidict/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/aiohappyeyeballs/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/propcache/", "aiohttp transport (httpx-aiohttp, aiohttp, yarl, multidict)"),
    ("/httpx/", "httpx (client, models, URL parsing)"),
    ("/httpcore/", "httpcore (connection pool)"),
    ("/h11/", "httpcore (connection pool)"),
    ("/aiokafka/", "aiokafka (fetch, commit, results producer)"),
    ("/kafka/", "aiokafka (fetch, commit, results producer)"),
    ("/anyio/", "anyio (tasks, cancel scopes, streams, to_thread)"),
    ("/sniffio/", "anyio (tasks, cancel scopes, streams, to_thread)"),
    ("/asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("/logging/", "logging"),
    ("/consumer/logs.py", "logging"),
)


def _category(filename: str, name: str) -> str:
    if filename == "~":
        if "epoll" in name or "select" in name:
            return "(idle: waiting in epoll)"
        if "sqlite3" in name:
            return "sqlite3 (main thread part)"
        if "_socket" in name or "socket" in name:
            return "socket syscalls"
        if "orjson" in name or "loads" in name or "dumps" in name:
            return "orjson"
        if "hashlib" in name or "sha256" in name or "hexdigest" in name:
            return "hashing"
        return "builtins (other)"
    for needle, label in _CATEGORIES:
        if needle in filename:
            return label
    if "/consumer/" in filename:
        return "consumer/" + filename.rsplit("/", 1)[-1]
    if "/producer/" in filename:
        return "producer/" + filename.rsplit("/", 1)[-1]
    return "other"


def profile_categories(stats: pstats.Stats) -> list[tuple[str, float]]:
    """Own time per library, the idle epoll wait included (as its own line)."""
    totals: dict[str, float] = {}
    for (filename, _line, name), (_cc, _nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        cat = _category(filename, name)
        totals[cat] = totals.get(cat, 0.0) + tt
    return sorted(totals.items(), key=lambda kv: -kv[1])


def print_profile(path: Path, out: Path, top: int = 30) -> None:
    import io

    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    cats = profile_categories(stats)
    busy = sum(t for c, t in cats if not c.startswith("(idle"))
    buf.write("=== own time by library (main thread; SQLite statements run in a worker thread) ===\n")
    for cat, t in cats:
        share = "" if cat.startswith("(idle") else f"{t / busy:6.1%}"
        buf.write(f"  {t:8.2f} s {share:>7}  {cat}\n")
    stats.strip_dirs()
    buf.write("=== by cumulative time ===\n")
    stats.sort_stats("cumulative").print_stats(top)
    buf.write("=== by own (total) time ===\n")
    stats.sort_stats("tottime").print_stats(top)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(buf.getvalue())
    print(buf.getvalue())
