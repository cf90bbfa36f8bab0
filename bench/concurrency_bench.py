# ruff: noqa: E501 - wide table rows
"""The adaptive-concurrency tables of ``python bench/throughput.py --concurrency`` (docs/performance.md).

Two tables from one command, every variant side by side in the same run:

* **latency cells** (provider latency 20 ms, 500 ms, 2 s; 10,000 keys): the daemon with
  ``IDV_CONCURRENCY=fixed`` at each ``--sweep`` in-flight setting (128…4096) and with the defaults
  (adaptive, ceiling 4096), each on its own topic, sandbox and store (``run_variant``); the best fixed
  setting of the cell is the hand-tuned reference.
* **rate-limited cell**: the sandbox's token bucket at ``--rl-rate`` req/s (burst ``--rl-burst``),
  ``--rl-latency-ms``; the limit is changed through ``POST /_admin/rate-limit`` to ``--rl-rate2`` a
  third of the way in and back to ``--rl-rate`` at two thirds. From the sandbox ledger: accepted calls/s
  vs the limit, the share of calls answered 429, and seconds until a 2-s window again has ≥ 90 % of the
  limit accepted with ≤ 1 % answered 429 ("settled").

The controller over time (limit, provider calls in flight, mean call latency, 429s) is read from each
daemon's ``/metrics`` every 0.25 s and plotted to ``docs/performance-concurrency.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.common import (
    ROOT,
    MachineProbe,
    ProcessProbe,
    Sandbox,
    StoreProbe,
    create_topic,
    delete_topics,
    free_port,
    ledger_check,
    make_envelopes,
    publish,
    random_topic,
    sample_metrics,
    workdir,
    write_results,
)

RESULTS = ROOT / "bench" / "results" / "concurrency.json"
PLOT = ROOT / "docs" / "performance-concurrency.png"
KEYS = 10_000


def _args_for(args: argparse.Namespace, setting: int | str) -> tuple[argparse.Namespace, int]:
    a = argparse.Namespace(**vars(args))
    port = free_port()
    if setting == "adaptive":
        a.in_flight = args.ceiling
        mode = ["IDV_CONCURRENCY=adaptive"]
    else:
        a.in_flight = int(setting)
        mode = ["IDV_CONCURRENCY=fixed"]
    a.daemon_env = [*args.daemon_env, *mode, f"IDV_HEALTH_PORT={port}"]
    return a, port


async def latency_cells(args: argparse.Namespace) -> list[Any]:
    from bench.runner import _planned, run_variant

    envelopes = make_envelopes(args.messages, KEYS, seed=1)
    late = make_envelopes(int(args.latency_max_rate * args.latency_s) + 50, KEYS, seed=2)
    runs = []
    for latency_ms in args.conc_latency_ms:
        for setting in [*args.sweep, "adaptive"]:
            a, port = _args_for(args, setting)
            n = _planned("daemon", a, latency_ms, KEYS)
            t0 = time.monotonic()
            run = await run_variant("daemon", a, latency_ms, KEYS, envelopes[:n], late, health_port=port)
            run.concurrency = "adaptive" if setting == "adaptive" else "fixed"
            runs.append(run)
            last = run.timeline[-1][1] if run.timeline else float("nan")
            print(
                f"{latency_ms:g} ms {run.concurrency} {a.in_flight}: {run.processed:,} msgs, "
                f"{run.msg_per_s:,.0f} msg/s, in flight {run.mean_in_flight:.0f}, limit at end {last:.0f}, "
                f"cpu {run.cpu_ms_per_msg:.2f} ms/msg, rss {run.peak_rss_mib:.0f} MiB, dup {run.duplicates}, "
                f"cores {run.cpu_split} [{time.monotonic() - t0:.0f}s] {'; '.join(run.notes)}",
                flush=True,
            )
    return runs


def _attempts(ledger: dict[str, Any]) -> list[tuple[float, int | None]]:
    return [(a["at"], a["status"]) for entry in ledger["keys"].values() for a in entry["attempts"]]


def analyse_rate_limited(
    attempts: list[tuple[float, int | None]], t0: float, phases: list[tuple[float, float, float]]
) -> dict[str, Any]:
    """``phases``: (start s, end s, limit req/s) relative to ``t0`` (the first outcome)."""
    rel = sorted((at - t0, status) for at, status in attempts if at >= t0)
    end = phases[-1][1]
    rel = [(t, s) for t, s in rel if t < end]

    def window(a: float, b: float) -> tuple[float, float, int]:
        n = [s for t, s in rel if a <= t < b]
        r429 = sum(1 for s in n if s == 429)
        ok = len(n) - r429
        return ok / (b - a), (r429 / len(n) if n else 0.0), len(n)

    out: list[dict[str, Any]] = []
    for start, stop, limit in phases:
        settle = math.nan
        t = start
        while t + 2.0 <= stop:
            ok_rate, share_429, _ = window(t, t + 2.0)
            if ok_rate >= 0.9 * limit and share_429 <= 0.01:
                settle = t - start
                break
            t += 0.25
        from_t = start + (settle if not math.isnan(settle) else 0.0)
        ok_rate, share_429, n = window(from_t, stop) if stop > from_t else (math.nan, math.nan, 0)
        whole_ok, whole_429, whole_n = window(start, stop)
        out.append(
            {
                "start_s": start,
                "end_s": stop,
                "limit": limit,
                "settle_s": settle,
                "sustained_per_s": ok_rate,
                "sustained_share_of_limit": ok_rate / limit,
                "share_429_after_settling": share_429,
                "accepted_per_s": whole_ok,
                "share_429": whole_429,
                "calls": whole_n,
            }
        )
    total = len(rel)
    r429 = sum(1 for _, s in rel if s == 429)
    series = []
    step = 0.5
    t = 0.0
    while t < end:
        ok_rate, _, n = window(t, t + step)
        series.append([t, ok_rate, sum(1 for tt, s in rel if t <= tt < t + step and s == 429) / step])
        t += step
    return {"phases": out, "calls": total, "share_429": r429 / total if total else math.nan, "series": series}


async def rate_limited_cell(
    args: argparse.Namespace, name: str, setting: int | str, extra: list[str]
) -> dict[str, Any]:
    from bench.runner import _command, _spawn, _stop

    tmp = workdir()
    topic = random_topic("rl")
    group = f"{topic}-group"
    sinks = [f"{topic}.results", f"{topic}.dlq"]
    for t in (topic, *sinks):
        await create_topic(t, args.partitions)
    envelopes = make_envelopes(int(args.rl_rate * args.rl_seconds * 1.3), KEYS, seed=3)
    await publish(topic, envelopes)
    sandbox = Sandbox(args.rl_latency_ms, tmp)
    sandbox.rate_limit(per_second=args.rl_rate, burst=args.rl_burst)
    a, port = _args_for(args, setting)
    a.daemon_env = [*a.daemon_env, *extra]
    store_path = tmp / "dedupe.db"
    cmd, env = _command("daemon", a, topic, group, f"sqlite:///{store_path}", sandbox.url, None)
    proc = _spawn(cmd, env, tmp / "daemon.log")
    probe = ProcessProbe(proc.pid)
    machine = MachineProbe(probe, sandbox.proc.pid)
    timeline: list[list[float]] = []
    sampler = asyncio.create_task(sample_metrics(port, timeline))
    store = StoreProbe(store_path)
    third = args.rl_seconds / 3
    phases = [
        (0.0, third, args.rl_rate),
        (third, 2 * third, args.rl_rate2),
        (2 * third, args.rl_seconds, args.rl_rate),
    ]
    try:
        deadline = time.monotonic() + 60
        while store.progress()[0] == 0:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"daemon did not start (see {tmp / 'daemon.log'})")
            await asyncio.sleep(0.05)
        t0 = time.time()
        machine.start()
        for start, _, limit in phases[1:]:
            await asyncio.sleep(max(0.0, t0 + start - time.time()))
            sandbox.rate_limit(per_second=limit, burst=args.rl_burst)
        await asyncio.sleep(max(0.0, t0 + args.rl_seconds - time.time()))
        cores = machine.stop()
        peak = probe.peak_rss_mib()
    finally:
        sampler.cancel()
        store.close()
        code = _stop(proc)
    try:
        ledger = sandbox.ledger()
    finally:
        sandbox.stop()
    check = ledger_check(ledger, set())
    result = analyse_rate_limited(_attempts(ledger), t0, phases)
    result.update(
        name=name,
        setting=str(setting),
        t0=t0,
        exit_code=code,
        duplicates=check["duplicates"],
        peak_rss_mib=peak,
        cores=cores,
        timeline=timeline,
        limit_rates=[args.rl_rate, args.rl_rate2, args.rl_rate],
        burst=args.rl_burst,
        latency_ms=args.rl_latency_ms,
    )
    await delete_topics([topic, *sinks])
    p = result["phases"]
    print(
        f"rate-limited {name}: 429 {result['share_429']:.2%} of {result['calls']:,} calls; "
        + "; ".join(
            f"{ph['limit']:g}/s: sustained {ph['sustained_share_of_limit']:.0%}, settle {ph['settle_s']:.2f}s, "
            f"429 {ph['share_429']:.2%}"
            for ph in p
        )
        + f"; rss {peak:.0f} MiB; dup {check['duplicates']}; cores {cores}",
        flush=True,
    )
    return result


def _f(x: float, nd: int = 0) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:,.{nd}f}"


def tables(runs: list[Any], rl: list[dict[str, Any]]) -> tuple[str, list[tuple[str, bool, str]]]:
    lines = []
    head = (
        f"{'lat ms':>6} {'setting':<16} {'msgs':>7} {'msg/s':>7} {'vs best':>7} {'in flight':>9} {'limit end':>9} "
        f"{'lag ms':>6} "
        f"{'CPU ms/msg':>10} {'RSS MiB':>8} {'p50 ms':>7} {'p99 ms':>7} {'dup':>4} {'load':>5} {'steal':>5}  notes"
    )
    lines += [head, "-" * len(head)]
    goals: list[tuple[str, bool, str]] = []
    peak_rss = 0.0
    for lat in sorted({r.latency_ms for r in runs}):
        cell = [r for r in runs if r.latency_ms == lat]
        fixed = [r for r in cell if r.concurrency == "fixed" and r.msg_per_s > 0]
        best = max(fixed, key=lambda r: r.msg_per_s) if fixed else None
        for r in cell:
            label = f"fixed {r.in_flight}" if r.concurrency == "fixed" else f"adaptive ≤{r.in_flight}"
            if r is best:
                label += " *"
            vs = r.msg_per_s / best.msg_per_s if best else math.nan
            end_limit = r.timeline[-1][1] if r.timeline else math.nan
            lags = [row[7] for row in r.timeline if len(row) > 7 and not math.isnan(row[7])]
            lag_ms = 1000 * sum(lags) / len(lags) if lags else math.nan
            if r.in_flight and r.in_flight >= 4096:
                peak_rss = max(peak_rss, r.peak_rss_mib)
            lines.append(
                f"{lat:>6g} {label:<16} {r.processed:>7,} {_f(r.msg_per_s):>7} {_f(vs * 100) + ' %':>7} "
                f"{_f(r.mean_in_flight):>9} {_f(end_limit):>9} {_f(lag_ms, 1):>6} {_f(r.cpu_ms_per_msg, 2):>10} {_f(r.peak_rss_mib):>8} "
                f"{_f(r.p50_ms):>7} {_f(r.p99_ms):>7} {r.duplicates:>4} "
                f"{_f(r.cpu_split.get('other_cores', math.nan), 1):>5} {_f(r.cpu_split.get('steal_cores', math.nan), 2):>5}  "
                + "; ".join(r.notes)
            )
            if r.concurrency == "adaptive" and best is not None:
                goals.append(
                    (
                        f"defaults ≥ 90 % of the best fixed setting at {lat:g} ms",
                        vs >= 0.9,
                        f"{r.msg_per_s:,.0f} vs {best.msg_per_s:,.0f} msg/s (fixed {best.in_flight}) = {vs:.0%}",
                    )
                )
    lines.append("")
    head2 = (
        f"{'variant':<28} {'limit /s':>9} {'accepted/s':>10} {'of limit':>8} {'sustained':>9} {'429 %':>6} "
        f"{'settle s':>8}"
    )
    for res in rl:
        lines += [
            f"rate-limited cell: {res['name']} ({res['latency_ms']:g} ms, burst {res['burst']}): "
            f"{res['share_429']:.2%} of {res['calls']:,} calls answered 429, peak RSS {res['peak_rss_mib']:.0f} MiB, "
            f"load {_f(res['cores'].get('other_cores', math.nan), 1)}, steal {_f(res['cores'].get('steal_cores', math.nan), 2)}",
            head2,
        ]
        for i, ph in enumerate(res["phases"]):
            what = "start" if i == 0 else "after change"
            span = "{:.0f}-{:.0f} s ({})".format(ph["start_s"], ph["end_s"], what)
            lines.append(
                f"  {span:<26} {ph['limit']:>9g} {_f(ph['accepted_per_s']):>10} "
                f"{ph['accepted_per_s'] / ph['limit']:>8.0%} {ph['sustained_share_of_limit']:>9.0%} "
                f"{ph['share_429'] * 100:>6.2f} {_f(ph['settle_s'], 2):>8}"
            )
        if res["name"] == "adaptive":
            changes = res["phases"][1:]
            settled = [ph["settle_s"] for ph in changes]
            goals.append(
                (
                    "rate-limited: ≥ 90 % of the limit sustained",
                    all(ph["sustained_share_of_limit"] >= 0.9 for ph in res["phases"]),
                    ", ".join(
                        f"{ph['sustained_share_of_limit']:.0%} of {ph['limit']:g}/s" for ph in res["phases"]
                    ),
                )
            )
            goals.append(
                (
                    "rate-limited: ≤ 1 % of calls answered 429",
                    res["share_429"] <= 0.01,
                    f"{res['share_429']:.2%}",
                )
            )
            goals.append(
                (
                    "rate-limited: settled within 10 s of a limit change",
                    all(not math.isnan(s) and s <= 10 for s in settled),
                    ", ".join(f"{_f(s, 2)} s" for s in settled),
                )
            )
    goals.append(
        (
            "peak RSS ≤ 200 MiB at 4,096 in flight",
            0 < peak_rss <= 200,
            f"{peak_rss:.0f} MiB (max over the runs with ceiling 4096)",
        )
    )
    lines.append("")
    lines += [f"  [{'met' if ok else 'MISSED'}] {n}: {d}" for n, ok, d in goals]
    return "\n".join(lines), goals


def plot(runs: list[Any], rl: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adaptive = [r for r in runs if r.concurrency == "adaptive" and len(r.timeline) > 2]
    rl_ad = [res for res in rl if res["name"] == "adaptive"]
    panels = len(adaptive) + len(rl_ad)
    if not panels:
        return
    fig, axes = plt.subplots(panels, 1, figsize=(10, 3.2 * panels), squeeze=False)
    i = 0

    def lat_429(tl: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
        ts, lat, r429 = [], [], []
        for a, b in zip(tl, tl[1:], strict=False):
            dn = b[4] - a[4]
            ts.append(b[0] - tl[0][0])
            lat.append((b[3] - a[3]) / dn * 1000 if dn > 0 else math.nan)
            r429.append((b[5] - a[5]) / (b[0] - a[0]) if b[0] > a[0] else 0.0)
        return ts, lat, r429

    for r in adaptive:
        ax = axes[i][0]
        i += 1
        tl = r.timeline
        t = [x[0] - tl[0][0] for x in tl]
        ax.plot(t, [x[1] for x in tl], label="concurrency limit", color="#1f77b4")
        ax.plot(t, [x[2] for x in tl], label="provider calls in flight", color="#2ca02c", alpha=0.7)
        ax.set_ylabel("calls")
        ts, lat, _ = lat_429(tl)
        ax2 = ax.twinx()
        ax2.plot(ts, lat, color="#ff7f0e", alpha=0.6, label="mean call latency (ms)")
        ax2.set_ylabel("latency ms")
        ax.set_title(f"adaptive, provider latency {r.latency_ms:g} ms: {r.msg_per_s:,.0f} msg/s")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="lower right", fontsize=7)
        ax.grid(alpha=0.3)
    for res in rl_ad:
        ax = axes[i][0]
        i += 1
        tl = res["timeline"]
        t0 = res["t0"]
        ax.plot([x[0] - t0 for x in tl], [x[1] for x in tl], label="concurrency limit", color="#1f77b4")
        ax.plot(
            [x[0] - t0 for x in tl], [x[2] for x in tl], label="calls in flight", color="#2ca02c", alpha=0.7
        )
        ax.set_ylabel("calls")
        ax2 = ax.twinx()
        s = res["series"]
        ax2.plot([x[0] for x in s], [x[1] for x in s], color="#9467bd", label="accepted calls/s")
        ax2.plot([x[0] for x in s], [x[2] for x in s], color="#d62728", label="429 answers/s")
        for ph in res["phases"]:
            ax2.hlines(ph["limit"], ph["start_s"], ph["end_s"], colors="gray", linestyles="dashed")
        ax2.set_ylabel("per second (dashed: provider limit)")
        ax.set_title(
            f"rate-limited provider ({res['latency_ms']:g} ms, limit changed through the admin API): "
            f"{res['share_429']:.2%} answered 429"
        )
        ax.set_xlabel("seconds since the first outcome")
        ax.legend(loc="upper left", fontsize=7)
        ax2.legend(loc="upper right", fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


async def amain(args: argparse.Namespace, code: str) -> int:
    started = time.monotonic()
    runs = await latency_cells(args) if args.conc_latency_ms else []
    rl: list[dict[str, Any]] = []
    if args.rl_seconds > 0:
        rl.append(await rate_limited_cell(args, "adaptive", "adaptive", []))
        if not args.quick:
            rl.append(await rate_limited_cell(args, "fixed 128 (old default)", 128, []))
    text, goals = tables(runs, rl)
    elapsed = time.monotonic() - started
    text += f"\n\n{len(runs) + len(rl)} runs in {elapsed / 60:.1f} min, code {code}; load = cores used by other processes, steal = cores taken by the hypervisor"
    print()
    print(text)
    write_results(
        args.conc_results, text, code=code, goals=goals, runs=[asdict(r) for r in runs], rate_limited=rl
    )
    try:
        plot(runs, rl, args.conc_plot)
        print(f"wrote {args.conc_plot}")
    except ImportError:
        print("matplotlib not installed: no plot")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("adaptive concurrency (--concurrency)")
    g.add_argument("--concurrency", action="store_true", help="run the adaptive-concurrency tables instead")
    g.add_argument(
        "--sweep", type=lambda t: [int(x) for x in t.split(",") if x], default=[128, 512, 1024, 2048, 4096]
    )
    g.add_argument(
        "--conc-latency-ms",
        type=lambda t: [float(x) for x in t.split(",") if x],
        default=[20.0, 500.0, 2000.0],
    )
    g.add_argument("--ceiling", type=int, default=4096, help="IDV_MAX_IN_FLIGHT of the adaptive variant")
    g.add_argument("--rl-rate", type=float, default=500.0)
    g.add_argument("--rl-rate2", type=float, default=250.0, help="the limit during the middle third")
    g.add_argument("--rl-burst", type=int, default=100)
    g.add_argument("--rl-latency-ms", type=float, default=200.0)
    g.add_argument("--rl-seconds", type=float, default=30.0, help="0 skips the rate-limited cell")
    g.add_argument("--conc-results", type=Path, default=RESULTS)
    g.add_argument("--conc-plot", type=Path, default=PLOT)
