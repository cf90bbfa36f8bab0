"""The benchmark cells issue #14 added to the main matrix: one command per table, every variant in one run.

    python bench/cells.py postgres   # daemon on SQLite vs on PostgreSQL vs 2 daemon processes on PostgreSQL
    python bench/cells.py naive      # daemon vs the naive loop vs naive with one consumer per partition
    python bench/cells.py faults     # daemon (and both naive loops) against a provider injecting faults

All in the target cell (``--latency-ms 20``, ``--partitions 8``, ``--keys 10000``), each variant on its own
topic, sandbox and store exactly as in ``bench/throughput.py`` (:func:`bench.runner.run_variant`; see
docs/performance.md for what each column measures). ``--rounds N`` repeats the variants interleaved
(A B C A B C …), because on a shared machine only runs taken back to back compare; the targets use each
variant's median. PostgreSQL variants work in a throw-away schema of ``--postgres-url``, dropped after
the run. Results: a table, ``bench/results/cells-<table>.json`` and ``.txt``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, code_version, make_envelopes, write_results
from bench.runner import Run, Variant, _planned, run_variant

DEFAULT_PG_URL = "postgresql://idv:idv@127.0.0.1:5432/idv"

TABLES: dict[str, tuple[Variant, ...]] = {
    "postgres": (
        Variant("daemon sqlite"),
        Variant("daemon pg", store="postgresql"),
        Variant("daemon pg ×2", store="postgresql", processes=2),
    ),
    "naive": (
        Variant("daemon"),
        Variant("naive", kind="naive"),
        Variant("naive-pp", kind="naive-pp"),
    ),
    "faults": (
        Variant("daemon"),
        Variant("naive", kind="naive"),
        Variant("naive-pp", kind="naive-pp"),
    ),
}


def _median_rate(runs: list[Run], label: str) -> float:
    rates = [r.msg_per_s for r in runs if r.variant == label and r.msg_per_s > 0]
    return statistics.median(rates) if rates else float("nan")


def targets(table: str, runs: list[Run]) -> list[tuple[str, bool, str]]:
    """The issue's targets for ``table`` (on median rates), plus exactly-once in every run."""
    out: list[tuple[str, bool, str]] = []

    def ratio(name: str, a: str, b: str, goal: float) -> None:
        x = _median_rate(runs, a) / _median_rate(runs, b)
        out.append((name, not math.isnan(x) and x >= goal, f"{x:.2f}×" if not math.isnan(x) else "—"))

    if table == "postgres":
        ratio("daemon on PostgreSQL ≥ 80 % of daemon on SQLite", "daemon pg", "daemon sqlite", 0.8)
        ratio("2 daemon processes ≥ 1.6× one (PostgreSQL)", "daemon pg ×2", "daemon pg", 1.6)
    elif table == "naive":
        ratio("≥ 10× naive", "daemon", "naive", 10.0)
        ratio("≥ 10× naive with one consumer per partition", "daemon", "naive-pp", 10.0)
    bad = [r for r in runs if not _ok(r)]
    dups = sum(max(r.duplicates, 0) for r in runs)
    out.append(
        (
            "0 duplicate side effects and committed = end offsets (every run)",
            not bad,
            f"{dups} duplicates, {len(bad)} of {len(runs)} runs not ok",
        )
    )
    return out


def _ok(r: Run) -> bool:
    return (
        (r.capped or r.processed >= r.planned)
        and r.duplicates == 0
        and r.missing_side_effects == 0
        and r.unexpected_keys == 0
        and r.committed_to_end is not False
    )


def _f(x: float, nd: int = 0) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def render(table: str, runs: list[Run], goals: list[tuple[str, bool, str]], elapsed: float) -> str:
    ref = runs[0].variant if runs else ""
    head = (
        f"{'variant':<14} {'store':<10} {'procs':>5} {'msgs':>7} {'msg/s':>8} {'vs ' + ref:>16} "
        f"{'CPU ms/msg':>10} {'RSS MiB':>8} {'p50 ms':>7} {'p99 ms':>7} {'dup':>4} {'ok':>3} "
        f"{'load':>5} {'steal':>5}  {'faults served' if table == 'faults' else 'notes'}"
    )
    lines = [head, "-" * len(head)]
    ref_rate = _median_rate(runs, ref)
    for r in runs:
        served = ", ".join(f"{k} {v}" for k, v in sorted(r.faults_served.items()))
        slow = [f"slow: given {r.planned:,}"] if r.planned < max(x.planned for x in runs) else []
        notes = "; ".join(slow + ([served] if table == "faults" and served else []) + r.notes)
        lines.append(
            f"{r.variant:<14} {r.store:<10} {r.processes:>5} {r.processed:>7,} {_f(r.msg_per_s):>8} "
            f"{_f(r.msg_per_s / ref_rate, 2) + '×' if ref_rate > 0 else '—':>16} "
            f"{_f(r.cpu_ms_per_msg, 2):>10} {_f(r.peak_rss_mib):>8} {_f(r.p50_ms):>7} {_f(r.p99_ms):>7} "
            f"{r.duplicates:>4} {'yes' if _ok(r) else 'NO':>3} "
            f"{_f(r.cpu_split.get('other_cores', math.nan), 1):>5} "
            f"{_f(r.cpu_split.get('steal_cores', math.nan), 2):>5}  {notes}"
        )
    if table == "faults" and runs:
        lines.append(f"faults injected by every sandbox: {runs[0].faults}")
    lines += ["", *(f"  [{'met' if ok else 'MISSED'}] {n}: {d}" for n, ok, d in goals), ""]
    lines.append(f"{len(runs)} runs in {elapsed / 60:.1f} min (vs: ratio to the first variant's median)")
    return "\n".join(lines)


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    code = code_version()
    variants = TABLES[args.table]
    envelopes = make_envelopes(args.messages, args.keys, seed=1)
    late = make_envelopes(int(args.latency_max_rate * args.latency_s) + 50, args.keys, seed=2)
    faults = (
        {
            "error_rate": args.fault_rate,
            "rate_429": args.fault_rate,
            "drop_after_effect_rate": args.fault_rate,
            "retry_after_s": 1,
            "seed": 14,
        }
        if args.table == "faults"
        else None
    )
    runs: list[Run] = []
    for round_no in range(args.rounds):
        for v in variants:
            n = _planned(v.kind, args, args.latency_ms, args.keys)
            t0 = time.monotonic()
            run = await run_variant(
                v.kind, args, args.latency_ms, args.keys, envelopes[:n], late, spec=v, faults=faults
            )
            runs.append(run)
            print(
                f"round {round_no + 1}, {v.label}: {run.processed:,} msgs, {run.msg_per_s:,.0f} msg/s, "
                f"cpu {run.cpu_ms_per_msg:.2f} ms/msg, dup {run.duplicates}, missing "
                f"{run.missing_side_effects}, committed {run.committed_to_end}, faults {run.faults_served}, "
                f"cores {run.cpu_split} [{time.monotonic() - t0:.0f}s] {'; '.join(run.notes)}",
                flush=True,
            )
    elapsed = time.monotonic() - started
    goals = targets(args.table, runs)
    report = render(args.table, runs, goals, elapsed)
    print()
    print(report)
    write_results(
        args.results or ROOT / "bench" / "results" / f"cells-{args.table}.json",
        report,
        code=code,
        goals=goals,
        parameters={k: v for k, v in vars(args).items() if k != "postgres_url"},
        elapsed_s=round(elapsed, 1),
        runs=[asdict(r) for r in runs],
    )
    return 0 if all(r.exit_code in (0, None) for r in runs) else 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("table", choices=sorted(TABLES))
    p.add_argument("--messages", type=int, default=20000, help="backlog per variant (slow ones get fewer)")
    p.add_argument("--rounds", type=int, default=1, help="interleaved repeats of all the variants")
    p.add_argument("--latency-ms", type=float, default=20.0)
    p.add_argument("--keys", type=int, default=10000)
    p.add_argument("--partitions", type=int, default=8)
    p.add_argument("--in-flight", type=int, default=128, help="each daemon's IDV_MAX_IN_FLIGHT")
    p.add_argument(
        "--fault-rate", type=float, default=0.03, help="faults: each of 500, 429, drop-after-effect"
    )
    p.add_argument("--budget-s", type=float, default=20.0, help="slow variants get ~this many seconds' worth")
    p.add_argument("--min-messages", type=int, default=300)
    p.add_argument("--latency-s", type=float, default=4.0)
    p.add_argument("--latency-max-rate", type=float, default=1000.0)
    p.add_argument("--provider-transport", default="aiohttp")
    p.add_argument("--event-loop", default="auto", choices=["auto", "uvloop", "asyncio"])
    p.add_argument("--daemon-env", action="append", default=[], metavar="IDV_X=V")
    p.add_argument(
        "--postgres-url",
        default=os.environ.get("IDV_BENCH_POSTGRES_URL")
        or os.environ.get("IDV_TEST_POSTGRES_URL")
        or DEFAULT_PG_URL,
    )
    p.add_argument("--results", type=Path, default=None)
    p.add_argument("--keep", action="store_true", help="keep temp dirs and topics")
    args = p.parse_args(argv)
    args.profiler = "cprofile"
    return args


def main() -> None:
    sys.exit(asyncio.run(amain(parse_args())))


if __name__ == "__main__":
    main()
