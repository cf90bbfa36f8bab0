"""The read-only status page the health endpoint serves at ``/``: HTML from ``/status.json``'s figures.

Every value is escaped; no scripts, no external assets (the endpoint sends a CSP that forbids them); the
page refreshes itself every 5 s.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

__all__ = ["status_page"]


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .2em}h2{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;background:#fff}td,th{border:1px solid #ddd;padding:.25em .7em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#176b2c}.bad{color:#b3261e;font-weight:600}
.cards{display:flex;gap:1em;flex-wrap:wrap;margin-top:.8em}
.card{background:#fff;border:1px solid #ddd;padding:.5em 1em}
.card b{display:block;font-size:1.4em}small{color:#666}
"""


def _table(head: tuple[str, ...], rows: Sequence[tuple[object, ...]], cls: str) -> str:
    if not rows:
        return f'<p class="{cls}"><small>none</small></p>'
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            (f'<td class="n">{c}</td>' if isinstance(c, int) else f"<td>{html.escape(str(c))}</td>")
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>'


def status_page(status: dict[str, Any]) -> str:
    """The status page for ``status`` (``/status.json``'s content): every value escaped, no scripts, no
    external assets, ``<meta http-equiv="refresh">`` every 5 s."""
    e = html.escape
    ready = status.get("readiness") or {}
    is_ready = bool(ready.get("ready"))
    breaker = str(status.get("breaker", "?"))
    cards = [
        ("ready", "yes" if is_ready else "no", "ok" if is_ready else "bad", "ready"),
        ("circuit breaker", breaker, "ok" if breaker == "closed" else "bad", "breaker"),
        ("in flight", status.get("in_flight", 0), "", "in-flight"),
        ("in doubt", status.get("in_doubt", 0), "bad" if status.get("in_doubt") else "", "in-doubt"),
        ("provider replays", status.get("provider_replays", 0), "", "replays"),
    ]
    card_html = "".join(
        f'<div class="card" id="{e(ident)}"><small>{e(label)}</small>'
        f'<b class="{cls}">{e(str(value))}</b></div>'
        for label, value, cls, ident in cards
    )
    reasons = "".join(f"<li>{e(str(r))}</li>" for r in ready.get("reasons") or ())
    partitions = [
        (str(p.get("topic")), p.get("partition"), p.get("committed", "-"), p.get("lag", "-"))
        for p in status.get("partitions") or ()
    ]
    outcomes = sorted((str(k), v) for k, v in (status.get("outcomes") or {}).items())
    dispositions = sorted((str(k), v) for k, v in (status.get("dispositions") or {}).items())
    letters = sorted((str(k), v) for k, v in (status.get("dead_letters") or {}).items())
    return (
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="5"><meta name="viewport" content="width=device-width">'
        f"<title>idv-consumer status</title><style>{_CSS}</style></head><body>"
        "<h1>idv-consumer</h1><small>read-only; refreshes every 5 s; "
        '<a href="/status.json">status.json</a> · <a href="/metrics">metrics</a></small>'
        f'<div class="cards">{card_html}</div>'
        + (f'<ul class="bad" id="reasons">{reasons}</ul>' if reasons else "")
        + "<h2>Partitions</h2>"
        + _table(("topic", "partition", "committed offset", "lag"), partitions, "partitions")
        + "<h2>Outcomes by status</h2>"
        + _table(("status", "count"), outcomes, "outcomes")
        + "<h2>Finished by disposition</h2>"
        + _table(("disposition", "count"), dispositions, "dispositions")
        + "<h2>Dead letters by reason</h2>"
        + _table(("reason", "count"), letters, "dead-letters")
        + "</body></html>"
    )
