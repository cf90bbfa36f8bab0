"""The chaos run's invariant checker (a)–(d), read from the ledger, the store and the topics afterwards."""

from __future__ import annotations

import asyncio
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson

from bench.chaos_env import (
    SandboxProcess,
)
from bench.chaos_plan import NAMESPACE, START_UP_CODES, Event, Options
from bench.chaos_procs import Counts, Monitor, read_topic
from consumer.keys import idempotency_key
from consumer.sinks import H_OFFSET, H_PARTITION, H_REASON
from producer.envelope import decode
from producer.errors import EnvelopeError


@dataclass
class Outcome:
    violations: dict[str, list[str]]
    table: list[tuple[str, str]]
    summary: dict[str, Any]


# -- the checker ---------------------------------------------------------------------------------------


async def check(
    opts: Options,
    *,
    sandbox: SandboxProcess,
    bootstrap: str,
    topic: str,
    dlq: str,
    results: str,
    store_url: str,
    monitor: Monitor,
    counts: Counts,
    caught_up: bool,
    settle_s: float,
    lag: dict[int, int],
    exit_codes: list[int | None],
    elapsed_s: float,
    setup_s: float,
    schedule: list[Event],
) -> Outcome:
    requests = await read_topic(bootstrap, topic, opts.partitions)
    dead = await read_topic(bootstrap, dlq, opts.partitions)
    result_events = await read_topic(bootstrap, results, opts.partitions)
    conn = await asyncpg.connect(store_url)
    try:
        rows = {
            r["key"]: r
            for r in await conn.fetch("SELECT key, message_id, state, attempts FROM idempotency_records")
        }
    finally:
        await conn.close()
    ledger = await asyncio.to_thread(sandbox.ledger)
    stats = await asyncio.to_thread(sandbox.stats)
    effects = {k: v["side_effects"] for k, v in ledger["keys"].items()}

    # The request topic as published: (partition, offset) → idempotency key (None when undecodable).
    published: dict[tuple[int, int], str | None] = {}
    unique: dict[str, str] = {}  # key → message ID
    copies: dict[str, list[tuple[int, int]]] = {}
    invalid = 0
    for partition, msgs in requests.items():
        for msg in msgs:
            try:
                env = decode(msg.value, msg.headers)
            except EnvelopeError:
                published[(partition, msg.offset)] = None
                invalid += 1
                continue
            key = idempotency_key(NAMESPACE, env.operation, env.message_id)
            published[(partition, msg.offset)] = key
            unique[key] = env.message_id
            copies.setdefault(key, []).append((partition, msg.offset))
    dlq_at: dict[tuple[int, int], str] = {}
    dlq_reasons: Counter[str] = Counter()
    for msgs in dead.values():
        for msg in msgs:
            headers = dict(msg.headers or ())
            where = (int(headers[H_PARTITION]), int(headers[H_OFFSET]))
            reason = headers[H_REASON].decode()
            dlq_at.setdefault(where, reason)
            dlq_reasons[reason] += 1
    results_by_id: dict[str, set[bytes]] = {}
    for msgs in result_events.values():
        for msg in msgs:
            mid = orjson.loads(msg.value)["message_id"]
            results_by_id.setdefault(mid, set()).add(msg.value)

    def state(key: str | None) -> str | None:
        row = rows.get(key) if key is not None else None
        return row["state"] if row is not None else None

    violations: dict[str, list[str]] = {"a": [], "b": [], "c": [], "d": []}

    # (a) side effects at the provider
    completed = failed = dead_only = 0
    extra = 0
    for key, mid in unique.items():
        side = effects.get(key, 0)
        st = state(key)
        if st == "completed":
            completed += 1
            if side != 1:
                violations["a"].append(f"{mid}: COMPLETED with {side} side effects")
        elif st == "failed":
            failed += 1
            if side > 1:
                violations["a"].append(f"{mid}: FAILED with {side} side effects")
        elif any(c in dlq_at for c in copies[key]):
            dead_only += 1
            if side > 1:
                violations["a"].append(f"{mid}: dead-lettered with {side} side effects")
        else:
            violations["a"].append(f"{mid}: no outcome (state {st}), {side} side effects")
        extra += max(0, side - 1)
    unknown = {k: v for k, v in effects.items() if k not in unique and v}
    for k, v in unknown.items():
        violations["a"].append(f"side effect under a key no message maps to: {k} ({v})")
        extra += v

    # (b) every record accounted for; results
    def accounted(where: tuple[int, int]) -> bool:
        return state(published[where]) in ("completed", "failed") or where in dlq_at

    lost = [where for where in published if not accounted(where)]
    for p, o in lost[:20]:
        violations["b"].append(f"{p}@{o}: no COMPLETED/FAILED record for its ID and no dead letter")
    if len(lost) > 20:
        violations["b"].append(f"... {len(lost) - 20} more unaccounted records")
    missing_results = [
        mid
        for key, mid in unique.items()
        if state(key) in ("completed", "failed") and mid not in results_by_id
    ]
    for mid in missing_results[:20]:
        violations["b"].append(f"{mid}: completed but no result event")
    differing = [mid for mid, values in results_by_id.items() if len(values) > 1]
    for mid in differing[:20]:
        violations["b"].append(f"{mid}: {len(results_by_id[mid])} different result events")
    stray_dlq = [where for where in dlq_at if where not in published]
    for where in stray_dlq[:20]:
        violations["b"].append(f"dead letter for {where}, which is not a record of the request topic")

    # (c) committed offsets never ahead of recorded outcomes
    inf = len(monitor.samples) + 1
    prefix_max: dict[int, list[int]] = {}
    for partition, msgs in requests.items():
        running, acc = -1, []
        for msg in msgs:
            where = (partition, msg.offset)
            record_key = published[where]
            first = min(
                monitor.key_first.get(record_key, inf) if record_key is not None else inf,
                monitor.dlq_first.get(where, inf),
            )
            running = max(running, first)
            acc.append(running)
        prefix_max[partition] = acc
    ahead = 0
    for index, (at, committed) in enumerate(monitor.samples):
        for partition, offset in committed.items():
            if offset <= 0:
                continue
            acc = prefix_max.get(partition, [])
            if offset > len(acc):
                violations["c"].append(
                    f"sample {index}: partition {partition} committed {offset} > end {len(acc)}"
                )
            elif acc[offset - 1] > index:
                ahead += 1
                if ahead <= 20:
                    bad = next(o for o in range(offset) if acc[o] > index)
                    violations["c"].append(
                        f"sample {index} (t={time.strftime('%H:%M:%S', time.localtime(at))}): partition "
                        f"{partition} committed {offset} while offset {bad} had no recorded outcome"
                    )
    if ahead > 20:
        violations["c"].append(f"... {ahead - 20} more (sample, partition) pairs committed ahead")
    regressions = 0
    last: dict[int, int] = {}
    for _, committed in monitor.samples:
        for p, o in committed.items():
            if o < last.get(p, 0):
                regressions += 1
            last[p] = o

    # (d) no stuck partition
    if not caught_up:
        violations["d"].append(f"lag not 0 {opts.settle_timeout:.0f}s after the faults stopped: {lag}")
    final = monitor.samples[-1][1] if monitor.samples else {}
    for partition, msgs in requests.items():
        end = msgs[-1].offset + 1 if msgs else 0
        if final.get(partition, 0) < end:
            violations["d"].append(
                f"partition {partition}: final committed {final.get(partition, 0)} < end {end}"
            )

    faults: dict[str, int] = dict(stats.get("faults", {}))
    side_total = sum(effects.values())
    taken_over = sum(1 for r in rows.values() if r["attempts"] > 1)
    valid_records = sum(1 for k in published.values() if k is not None)
    self_exits = counts.self_exits
    crashes = [e for e in self_exits if e["crash"]]
    refused = [e for e in self_exits if not e["crash"]]
    refused_other = [e for e in refused if e["code"] not in START_UP_CODES]
    table = [
        ("seed", str(opts.seed)),
        ("messages (records in the request topic)", str(len(published))),
        ("  published by the chaos publisher (acked)", str(counts.published)),
        ("  re-sent after a failed send", str(counts.publish_resends)),
        ("  invalid (dead-lettered by design)", str(invalid)),
        ("unique message IDs", str(len(unique))),
        ("duplicate records (same ID again)", str(valid_records - len(unique))),
        ("daemons", str(opts.processes)),
        (
            "SIGKILLs",
            f"{counts.kills}"
            + (f" ({counts.kills_skipped} skipped: target down)" * bool(counts.kills_skipped)),
        ),
        ("daemon restarts", str(counts.restarts)),
        (
            "daemon exits on their own: could not start (undocumented code) / crashed",
            f"{len(refused)} ({len(refused_other)}) / {len(crashes)}",
        ),
        ("broker restarts", str(counts.broker_restarts)),
        ("PostgreSQL restarts", str(counts.pg_restarts)),
        ("latency spikes", str(counts.spikes)),
        *[(f"provider faults: {kind}", str(n)) for kind, n in sorted(faults.items())],
        ("provider 409 in flight (same key, concurrent)", str(stats.get("conflicts_409", 0))),
        ("provider replays (same key answered from store)", str(stats.get("replays", 0))),
        ("provider requests", str(stats.get("requests", 0))),
        ("side effects (ledger)", str(side_total)),
        ("IDs COMPLETED / FAILED / only dead-lettered", f"{completed} / {failed} / {dead_only}"),
        ("records taken over (attempts > 1)", str(taken_over)),
        ("dead letters by reason", ", ".join(f"{r}={n}" for r, n in sorted(dlq_reasons.items())) or "0"),
        (
            "result events (distinct IDs)",
            f"{sum(len(m) for m in result_events.values())} ({len(results_by_id)})",
        ),
        ("duplicates (extra side effects)", str(extra)),
        ("lost (unaccounted records)", str(len(lost))),
        ("offset samples judged (discarded during outages)", f"{len(monitor.samples)} ({monitor.failed})"),
        ("commit regressions seen (redelivery, not loss)", str(regressions)),
        (
            "time to lag 0 after faults stopped",
            f"{settle_s:.1f}s" if caught_up else f"not within {opts.settle_timeout:.0f}s",
        ),
        ("daemon exit codes on SIGTERM", ", ".join(str(c) for c in exit_codes)),
        ("set-up", f"{setup_s:.1f}s"),
        ("chaos window + settle", f"{elapsed_s:.1f}s"),
    ]
    summary = {
        "seed": opts.seed,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(opts).items()},
        "schedule": [asdict(e) for e in schedule],
        "table": table,
        "violations": violations,
        "self_exits": self_exits,
        "dead_letters": dict(dlq_reasons),
        "faults": faults,
        "stats": stats,
    }
    return Outcome(violations, table, summary)
