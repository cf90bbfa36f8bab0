"""Side-by-side throughput benchmark: the daemon vs. a naive aiokafka loop vs. FastStream, same work.

One command runs the whole matrix (provider latency × key cardinality) on the local Kafka broker::

    python bench/throughput.py                      # default matrix, ~10 minutes on 2 cores
    python bench/throughput.py --quick              # 20 ms, 10,000 keys only, fewer messages
    python bench/throughput.py --latency-ms 20 --keys 10000 --variants daemon --profile
    python bench/throughput.py --concurrency        # adaptive vs fixed in-flight sweep + rate-limited cell

For every cell and every variant: a fresh topic (``--partitions``, default 8) holding the same messages,
a fresh sandbox provider process (so its ledger holds that variant's side effects alone), a fresh SQLite
dedupe store in a temp dir, and the variant as its own process:

* ``daemon``: ``python -m consumer run`` (``IDV_MAX_IN_FLIGHT=--in-flight``);
* ``naive``: ``bench/baselines.py naive``: per-partition sequential, commit after every message;
* ``faststream``: ``bench/baselines.py faststream``: FastStream subscriber, ``AckPolicy.MANUAL``;
* ceilings: ``bench/baselines.py raw`` (aiokafka ``getmany``, no work) and in-flight ÷ provider latency.

What is measured, and how:

* **msg/s**: the backlog is published before the variant starts; the rate is records with a recorded
  outcome in the store, divided by the time from the first claim (``created_at``) to the last outcome
  (``updated_at``): start-up and group join are excluded, for every variant alike. Slow variants get
  fewer messages (about ``--budget-s`` seconds' worth, from their parallelism) and a hard time cap; the
  table says how many each one processed.
* **CPU ms/msg**: user+sys CPU of the variant's process (psutil) between the first outcome and the last,
  divided by the outcomes recorded in between.
* **peak RSS**: the kernel's high-water mark (``VmHWM``) of the process at the end of the run.
* **p50/p99 latency**: after the backlog is drained, ``--latency-s`` seconds of new messages are
  published at half the variant's measured rate with the record timestamp set to the send time; the
  latency of each is its store record's ``updated_at`` minus that timestamp. (Measured on the backlog
  it would only say how long the queue was.)
* **ledger check**: ``GET /_admin/ledger`` of the variant's own sandbox: side effects beyond the first for
  any key (must be 0), recorded outcomes without a side effect, keys never sent; plus committed offsets
  equal to the end offsets after a clean stop.

Results: a plain-text table, ``bench/results/throughput.json`` and ``docs/performance.png``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import pstats
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka.partitioner import DefaultPartitioner

from bench.chaos_env import clean_env, daemon_child_env
from bench.common import (
    API_KEY,
    BOOTSTRAP,
    ROOT,
    MachineProbe,
    ProcessProbe,
    Sandbox,
    StoreProbe,
    committed_offsets,
    create_topic,
    delete_topics,
    end_offsets,
    expected_keys,
    ledger_check,
    make_envelopes,
    percentile,
    publish,
    publish_paced,
    random_topic,
    sample_metrics,
    workdir,
)

RESULTS = ROOT / "bench" / "results" / "throughput.json"
PLOT = ROOT / "docs" / "performance.png"
PROFILE_TXT = ROOT / "bench" / "results" / "daemon-profile.txt"

VARIANTS = ("daemon", "naive", "faststream")
# Per-message time on top of the provider latency for the sequential variants (measured: ~10 ms in the
# store and client, ~28 ms for the per-message commit), used only to size their message count.
_SEQUENTIAL_OVERHEAD_S = 0.040


@dataclass
class Run:
    variant: str
    latency_ms: float
    keys: int
    partitions: int
    in_flight: int | None
    planned: int
    processed: int = 0
    capped: bool = False
    seconds: float = 0.0
    msg_per_s: float = 0.0
    cpu_ms_per_msg: float = float("nan")
    peak_rss_mib: float = float("nan")
    latency_rate: float = 0.0
    latency_samples: int = 0
    p50_ms: float = float("nan")
    p99_ms: float = float("nan")
    p50_to_claim_ms: float = float("nan")
    duplicates: int = -1
    keys_with_duplicates: int = -1
    missing_side_effects: int = -1
    unexpected_keys: int = -1
    side_effects: int = 0
    provider_requests: int = 0
    committed_to_end: bool | None = None
    mean_in_flight: float = float("nan")
    cpu_split: dict[str, float] = field(default_factory=dict)
    cpu_ms_per_msg_by_thread: dict[str, float] = field(default_factory=dict)
    exit_code: int | None = None
    notes: list[str] = field(default_factory=list)
    # --concurrency mode: "fixed"/"adaptive" and the controller over time ([t, limit, in flight]).
    concurrency: str = ""
    timeline: list[list[float]] = field(default_factory=list)


@dataclass
class Ceiling:
    keys: int
    partitions: int
    messages: int
    raw_msg_per_s: float


# -- running one variant -------------------------------------------------------------------------------


def _partitions_used(keys: int, partitions: int) -> int:
    part = DefaultPartitioner()
    every = list(range(partitions))
    return len(
        {part(f"bench-subject-{i % keys:06d}".encode(), every, every) for i in range(min(keys, 100_000))}
    )


def _planned(variant: str, args: argparse.Namespace, latency_ms: float, keys: int) -> int:
    """How many messages a variant gets: all of them, or about ``budget_s`` seconds' worth if slower."""
    lat = latency_ms / 1000.0
    if variant == "daemon":
        lanes = min(args.in_flight, keys)
        est = lanes / (lat + 0.010)
    else:
        est = _partitions_used(keys, args.partitions) / (lat + _SEQUENTIAL_OVERHEAD_S)
    return int(min(args.messages, max(args.min_messages, est * args.budget_s)))


def _command(
    variant: str,
    args: argparse.Namespace,
    topic: str,
    group: str,
    store: Path,
    url: str,
    profile_out: Path | None,
) -> tuple[list[str], dict[str, str]]:
    env = clean_env()
    if variant == "daemon":
        env = daemon_child_env(
            BOOTSTRAP,
            topic,
            group,
            f"sqlite:///{store}",
            url,
            API_KEY,
            "bench-fingerprint-key-not-secret",
            max_in_flight=args.in_flight,
            provider_max_connections=args.in_flight,
            log_level="WARNING",
            log_format="json",
        )
        env["IDV_PROVIDER_TRANSPORT"] = args.provider_transport
        env["IDV_EVENT_LOOP"] = args.event_loop
        env.update(dict(kv.split("=", 1) for kv in args.daemon_env))
        # bench/daemon_entry.py is `python -m consumer run` plus IDV_PROVIDER_TRANSPORT (see its docstring).
        entry = str(ROOT / "bench" / "daemon_entry.py")
        if profile_out is not None and args.profiler == "pyinstrument":
            return [
                sys.executable,
                "-m",
                "pyinstrument",
                "-r",
                "text",
                "--show-all",
                "-o",
                str(profile_out),
                entry,
            ], env
        if profile_out is not None:
            return [sys.executable, "-m", "cProfile", "-o", str(profile_out), entry], env
        return [sys.executable, entry], env
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "baselines.py"),
        variant,
        "--topic",
        topic,
        "--bootstrap",
        BOOTSTRAP,
        "--group",
        group,
        "--store",
        str(store),
        "--provider-url",
        url,
        "--partitions",
        str(args.partitions),
        "--provider-transport",
        args.provider_transport,
        "--event-loop",
        args.event_loop,
    ]
    env["BENCH_API_KEY"] = API_KEY
    return cmd, env


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return -9
    return proc.returncode


async def run_variant(
    variant: str,
    args: argparse.Namespace,
    latency_ms: float,
    keys: int,
    backlog: list[Any],
    late: list[Any],
    *,
    profile_out: Path | None = None,
    health_port: int | None = None,
) -> Run:
    planned = len(backlog)
    run = Run(
        variant, latency_ms, keys, args.partitions, args.in_flight if variant == "daemon" else None, planned
    )
    tmp = workdir()
    topic = random_topic(variant)
    group = f"{topic}-group"
    await create_topic(topic, args.partitions)
    # The daemon writes a result event per message (and dead letters) to "<topic>.results"/".dlq".
    sink_topics = [f"{topic}.results", f"{topic}.dlq"] if variant == "daemon" else []
    for name in sink_topics:
        await create_topic(name, args.partitions)
    await publish(topic, backlog)
    sandbox = Sandbox(latency_ms, tmp)
    store_path = tmp / "dedupe.db"
    store = StoreProbe(store_path)
    log_path = tmp / f"{variant}.log"
    cmd, env = _command(variant, args, topic, group, store_path, sandbox.url, profile_out)
    try:
        proc = _spawn(cmd, env, log_path)
    except BaseException:
        sandbox.stop()
        raise
    probe = ProcessProbe(proc.pid)
    machine = MachineProbe(probe, sandbox.proc.pid)
    sampler = None
    if health_port is not None:
        sampler = asyncio.create_task(sample_metrics(health_port, run.timeline))
    try:
        # -- drain the backlog ------------------------------------------------------------------------
        lat = latency_ms / 1000.0
        cap_s = max(args.budget_s * 3, 60.0)
        started = time.monotonic()
        first_seen: tuple[float, int] | None = None  # (cpu seconds, count) at the first outcome seen
        count = 0
        while True:
            await asyncio.sleep(0.2)
            count, _, _ = store.progress()
            if count and first_seen is None:
                first_seen = (probe.cpu_s(), count)
                threads0 = probe.thread_cpu_s()
                machine.start()
            if count >= planned:
                break
            if proc.poll() is not None:
                run.notes.append(f"exited early with {proc.returncode}; see {log_path}")
                break
            # Start-up (imports, group join) is not part of the cap.
            if first_seen is not None and time.monotonic() - started > cap_s:
                run.capped = True
                run.notes.append(f"time cap {cap_s:.0f}s reached")
                break
            if first_seen is None and time.monotonic() - started > 60:
                run.notes.append("no outcome within 60 s of start")
                break
        cpu_end = probe.cpu_s()
        run.cpu_split = machine.stop()
        count, first_claim, last_outcome = store.progress()
        run.processed = count
        if first_seen is not None and count > first_seen[1]:
            n_done = count - first_seen[1]
            run.cpu_ms_per_msg = (cpu_end - first_seen[0]) * 1000.0 / n_done
            threads1 = probe.thread_cpu_s()
            run.cpu_ms_per_msg_by_thread = {
                k: round((threads1[k] - threads0.get(k, 0.0)) * 1000.0 / n_done, 3) for k in threads1
            }
        run.mean_in_flight = store.mean_in_flight()
        if first_claim is not None and last_outcome is not None and count > 1:
            run.seconds = last_outcome - first_claim
            run.msg_per_s = count / run.seconds if run.seconds > 0 else float("nan")

        # -- latency at half the measured rate ----------------------------------------------------
        if not run.capped and count >= planned and run.msg_per_s > 0 and late:
            rate = max(2.0, min(args.latency_max_rate, run.msg_per_s / 2))
            n_late = int(max(20, min(len(late), rate * args.latency_s)))
            batch = late[:n_late]
            sent = await publish_paced(topic, batch, rate)
            deadline = time.monotonic() + 30 + n_late / rate + 10 * lat
            while time.monotonic() < deadline:
                count, _, _ = store.progress()
                if count >= planned + n_late:
                    break
                await asyncio.sleep(0.1)
            done = store.outcome_times(list(sent))
            lats = [(done[mid][1] - ts) * 1000.0 for mid, ts in sent.items() if mid in done]
            # Where the latency goes: until the claim (fetch, dispatch, decode, claim's fsync) and after it.
            to_claim = [(done[mid][0] - ts) * 1000.0 for mid, ts in sent.items() if mid in done]
            run.p50_to_claim_ms = percentile(to_claim, 50)
            run.latency_rate = rate
            run.latency_samples = len(lats)
            run.p50_ms = percentile(lats, 50)
            run.p99_ms = percentile(lats, 99)
            if len(lats) < n_late:
                run.notes.append(f"latency: {n_late - len(lats)} of {n_late} not recorded in time")
        run.peak_rss_mib = probe.peak_rss_mib()
    except BaseException:
        _stop(proc)
        sandbox.stop()
        raise
    finally:
        store.close()
        if sampler is not None:
            sampler.cancel()
    run.exit_code = _stop(proc)

    # -- verification -------------------------------------------------------------------------------
    try:
        ledger = sandbox.ledger()
    finally:
        sandbox.stop()
    conn_keys = _recorded_keys(store_path)
    sent_keys = expected_keys(backlog) | expected_keys(late)
    check = ledger_check(ledger, conn_keys)
    run.duplicates = check["duplicates"]
    run.keys_with_duplicates = check["keys_with_duplicates"]
    run.missing_side_effects = check["missing"]
    run.unexpected_keys = sum(1 for k in ledger["keys"] if k not in sent_keys)
    run.side_effects = check["side_effects"]
    run.provider_requests = check["requests"]
    if not run.capped:
        ends = await end_offsets(topic)
        committed = await committed_offsets(group, topic, sorted(ends))
        run.committed_to_end = all(committed.get(p, 0) >= e for p, e in ends.items())
    if run.exit_code not in (0, None):
        run.notes.append(f"exit code {run.exit_code}")
    healthy = run.exit_code in (0, None) and (run.capped or run.processed >= run.planned)
    if not args.keep and healthy:
        shutil.rmtree(tmp, ignore_errors=True)
        await delete_topics([topic, *sink_topics])
    else:
        run.notes.append(f"kept {tmp}")
    return run


def _recorded_keys(path: Path) -> set[str]:
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        rows = conn.execute("SELECT key FROM idempotency_records WHERE state IN ('completed', 'failed')")
        return {r[0] for r in rows}
    finally:
        conn.close()


async def raw_ceiling(args: argparse.Namespace, keys: int, envelopes: list[Any]) -> Ceiling:
    topic = random_topic("raw")
    await create_topic(topic, args.partitions)
    await publish(topic, envelopes)
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "baselines.py"),
        "raw",
        "--topic",
        topic,
        "--bootstrap",
        BOOTSTRAP,
        "--expect",
        str(len(envelopes)),
        "--timeout",
        "60",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, check=True, timeout=120)  # noqa: ASYNC221
    data = json.loads(out.stdout.decode().strip().splitlines()[-1])
    await delete_topics([topic])
    counted = data["count"] - data["first_batch"]
    rate = counted / data["seconds"] if data["seconds"] > 0 else float("nan")
    return Ceiling(keys, args.partitions, data["count"], rate)


# -- reporting -----------------------------------------------------------------------------------------


def _fmt(x: float, nd: int = 0) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:,.{nd}f}"


def _ratio(a: float, b: float) -> str:
    if not a or not b or math.isnan(a) or math.isnan(b):
        return "—"
    return f"{a / b:.1f}×"


def table(runs: list[Run], ceilings: dict[int, Ceiling], in_flight: int, messages: int) -> str:
    header = (
        f"{'lat':>5} {'keys':>6} {'variant':<10} {'msgs':>7} {'msg/s':>8} {'vs naive':>9} {'vs FS':>7} "
        f"{'CPU ms/msg':>10} {'RSS MiB':>8} {'p50 ms':>8} {'p99 ms':>8} {'@msg/s':>7} {'dup':>4} "
        f"{'ok':>3} {'load':>5} {'steal':>5}  notes"
    )
    lines = [header, "-" * len(header)]
    cells: dict[tuple[float, int], dict[str, Run]] = {}
    for r in runs:
        cells.setdefault((r.latency_ms, r.keys), {})[r.variant] = r
    for (lat, keys), by in cells.items():
        naive = by.get("naive")
        fs = by.get("faststream")
        for name in VARIANTS:
            r = by.get(name)
            if r is None:
                continue
            ok = (
                (r.capped or r.processed >= r.planned)
                and r.duplicates == 0
                and r.missing_side_effects == 0
                and r.unexpected_keys == 0
                and r.committed_to_end is not False
            )
            notes = list(r.notes)
            if r.planned < messages:
                notes.insert(0, f"slow: given {r.planned:,} of {messages:,} messages")
            lines.append(
                f"{_fmt(lat):>5} {keys:>6} {name:<10} {r.processed:>7,} {_fmt(r.msg_per_s):>8} "
                f"{_ratio(r.msg_per_s, naive.msg_per_s) if naive and r is not naive else '':>9} "
                f"{_ratio(r.msg_per_s, fs.msg_per_s) if fs and r is not fs else '':>7} "
                f"{_fmt(r.cpu_ms_per_msg, 2):>10} {_fmt(r.peak_rss_mib):>8} {_fmt(r.p50_ms):>8} "
                f"{_fmt(r.p99_ms):>8} {_fmt(r.latency_rate):>7} {r.duplicates:>4} {'yes' if ok else 'NO':>3} "
                f"{_fmt(r.cpu_split.get('other_cores', float('nan')), 1):>5} "
                f"{_fmt(r.cpu_split.get('steal_cores', float('nan')), 2):>5}  " + "; ".join(notes)
            )
        ceiling = ceilings.get(keys)
        bound = min(in_flight, keys) / (lat / 1000.0)
        partitions = next(iter(by.values())).partitions
        seq_bound = _partitions_used(keys, partitions) / (lat / 1000.0)
        lines.append(
            f"{'':>5} {'':>6} {'ceilings':<10} raw aiokafka {_fmt(ceiling.raw_msg_per_s) if ceiling else '—'}"
            f" msg/s; in-flight/latency {in_flight}/{_fmt(lat)} ms = {_fmt(in_flight / (lat / 1000.0))} msg/s"
            f" (these keys allow {_fmt(bound)}; one-at-a-time per partition {_fmt(seq_bound)})"
        )
    return "\n".join(lines)


def render(
    runs: list[Run],
    ceilings: dict[int, Ceiling],
    in_flight: int,
    messages: int,
    goals: list[tuple[str, bool, str]],
    elapsed: float,
) -> str:
    return "\n".join(
        [
            table(runs, ceilings, in_flight, messages),
            "",
            *(f"  [{'met' if ok else 'MISSED'}] {name}: {detail}" for name, ok, detail in goals),
            "",
            f"{len(runs)} runs in {elapsed / 60:.1f} min; load = CPU cores used by other processes on the "
            "machine during the run (not the variant, its sandbox or the broker); steal = cores the "
            "hypervisor took from this VM meanwhile",
        ]
    )


def targets(runs: list[Run]) -> list[tuple[str, bool, str]]:
    by = {(r.latency_ms, r.keys, r.variant): r for r in runs}
    d = by.get((20.0, 10000, "daemon"))
    n = by.get((20.0, 10000, "naive"))
    f = by.get((20.0, 10000, "faststream"))
    out: list[tuple[str, bool, str]] = []
    if d is None:
        return out
    out.append(
        (
            "≥ 1,000 msg/s (20 ms, 8 partitions, 10,000 keys)",
            d.msg_per_s >= 1000,
            f"{d.msg_per_s:,.0f} msg/s ({d.msg_per_s / 1000 - 1:+.0%})",
        )
    )
    if n is not None:
        ratio = d.msg_per_s / n.msg_per_s
        out.append(("≥ 10× naive", ratio >= 10, f"{ratio:.1f}×"))
    if f is not None:
        ratio = d.msg_per_s / f.msg_per_s
        out.append(("≥ 2× FastStream", ratio >= 2, f"{ratio:.1f}×"))
    out.append(("daemon CPU ≤ 1 ms/message", d.cpu_ms_per_msg <= 1.0, f"{d.cpu_ms_per_msg:.2f} ms/msg"))
    out.append(("peak RSS ≤ 150 MiB", d.peak_rss_mib <= 150, f"{d.peak_rss_mib:.0f} MiB"))
    dups = sum(max(r.duplicates, 0) for r in runs)
    bad = [r for r in runs if r.duplicates != 0 or r.missing_side_effects != 0 or r.unexpected_keys != 0]
    out.append(("0 duplicate side effects (every run)", not bad, f"{dups} duplicates in {len(runs)} runs"))
    return out


def plot(runs: list[Run], ceilings: dict[int, Ceiling], in_flight: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    latencies = sorted({r.latency_ms for r in runs})
    keys_all = sorted({r.keys for r in runs})
    colors = {"daemon": "#1f77b4", "naive": "#d62728", "faststream": "#ff7f0e"}
    fig, axes = plt.subplots(
        1, len(latencies), figsize=(5.5 * len(latencies), 4.6), sharey=True, squeeze=False
    )
    width = 0.26
    for ax, lat in zip(axes[0], latencies, strict=True):
        for i, name in enumerate(VARIANTS):
            xs, ys = [], []
            for j, k in enumerate(keys_all):
                r = next((r for r in runs if r.latency_ms == lat and r.keys == k and r.variant == name), None)
                if r is not None and r.msg_per_s > 0:
                    xs.append(j + (i - 1) * width)
                    ys.append(r.msg_per_s)
            bars = ax.bar(xs, ys, width, label=name, color=colors[name])
            ax.bar_label(bars, labels=[f"{y:,.0f}" for y in ys], fontsize=7, padding=1)
        for j, k in enumerate(keys_all):
            bound = min(in_flight, k) / (lat / 1000.0)
            ax.hlines(
                bound,
                j - 1.5 * width,
                j + 1.5 * width,
                colors="gray",
                linestyles="dashed",
                label="min(in-flight, keys) ÷ latency" if j == 0 else None,
            )
            c = ceilings.get(k)
            if c is not None:
                # Off the scale of the real variants (10^5): written, not drawn.
                ax.annotate(
                    f"raw aiokafka\n{c.raw_msg_per_s / 1000:,.0f}k msg/s",
                    (j, 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(0, -4),
                    textcoords="offset points",
                    ha="center",
                    va="top",
                    fontsize=7,
                    color="dimgray",
                )
        ax.set_yscale("log")
        ax.set_xticks(range(len(keys_all)), [f"{k:,} key{'s' if k > 1 else ''}" for k in keys_all])
        ax.set_title(f"provider latency {lat:g} ms, {runs[0].partitions} partitions")
        ax.grid(axis="y", which="both", alpha=0.3)
    shown = [r.msg_per_s for r in runs if r.msg_per_s > 0]
    bounds = [min(in_flight, r.keys) / (r.latency_ms / 1000.0) for r in runs]
    if shown:
        axes[0][0].set_ylim(min(shown) / 2, max(bounds + shown) * 8)
    axes[0][0].set_ylabel("verified messages / s (log)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(f"Exactly-once throughput: daemon (in-flight {in_flight}) vs naive vs FastStream")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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


# -- main ----------------------------------------------------------------------------------------------


def _code_version() -> str:
    """The commit measured, with ``+dirty`` when the work tree differed from it (the daemon runs from it)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "consumer", "producer", "sandbox"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    code = _code_version()  # the work tree the variants are started from
    variants = [v for v in args.variants.split(",") if v]
    late_pool = make_envelopes(int(args.latency_max_rate * args.latency_s) + 50, 1, seed=2)
    runs: list[Run] = []
    ceilings: dict[int, Ceiling] = {}
    for keys in args.keys:
        envelopes = make_envelopes(args.messages, keys, seed=1)
        if not args.profile:
            ceilings[keys] = await raw_ceiling(args, keys, envelopes)
            print(f"raw aiokafka, {keys} keys: {ceilings[keys].raw_msg_per_s:,.0f} msg/s", flush=True)
        late_all = make_envelopes(len(late_pool), keys, seed=2)
        for latency_ms in args.latency_ms:
            for variant in variants:
                n = args.messages if args.profile else _planned(variant, args, latency_ms, keys)
                profile_out = None
                if args.profile and variant == "daemon":
                    suffix = "prof" if args.profiler == "cprofile" else "pyinstrument.txt"
                    profile_out = ROOT / "bench" / "results" / f"daemon.{suffix}"
                    profile_out.parent.mkdir(parents=True, exist_ok=True)
                t0 = time.monotonic()
                run = await run_variant(
                    variant, args, latency_ms, keys, envelopes[:n], late_all, profile_out=profile_out
                )
                runs.append(run)
                print(
                    f"{latency_ms:g} ms, {keys} keys, {variant}: {run.processed:,} msgs, "
                    f"{run.msg_per_s:,.0f} msg/s, in flight {run.mean_in_flight:.1f}, "
                    f"cpu {run.cpu_ms_per_msg:.2f} ms/msg, rss {run.peak_rss_mib:.0f} MiB, "
                    f"p50 {run.p50_ms:.0f} ms (to claim {run.p50_to_claim_ms:.0f}), "
                    f"p99 {run.p99_ms:.0f} ms, "
                    f"dup {run.duplicates}, committed {run.committed_to_end}, cores {run.cpu_split}, "
                    f"cpu by thread {run.cpu_ms_per_msg_by_thread} "
                    f"[{time.monotonic() - t0:.0f}s] {'; '.join(run.notes)}",
                    flush=True,
                )
                if profile_out is not None and profile_out.exists() and args.profiler == "cprofile":
                    print_profile(profile_out, PROFILE_TXT)
    elapsed = time.monotonic() - started
    print()
    goals = targets(runs)
    report = render(runs, ceilings, args.in_flight, args.messages, goals, elapsed)
    print(report)
    if args.profile:
        return 0
    results = args.results
    results.parent.mkdir(parents=True, exist_ok=True)
    results.with_suffix(".txt").write_text(report + "\n")
    results.write_text(
        json.dumps(
            {
                "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "code": code,
                "machine": {
                    "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "platform": platform.platform(),
                },
                "parameters": {k: v for k, v in vars(args).items() if k != "daemon_env"}
                | {"daemon_env": args.daemon_env},
                "elapsed_s": round(elapsed, 1),
                "ceilings": [asdict(c) for c in ceilings.values()],
                "runs": [asdict(r) for r in runs],
                "targets": [{"target": n, "met": ok, "measured": d} for n, ok, d in goals],
            },
            indent=2,
            default=str,
        )
        + "\n"
    )
    print(f"wrote {results}")
    if not args.no_plot:
        plot(runs, ceilings, args.in_flight, args.plot)
        print(f"wrote {args.plot}")
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Daemon vs naive aiokafka vs FastStream, same broker, messages, store and provider.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--messages", type=int, default=20000, help="backlog per variant (slow ones get fewer)"
    )
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument(
        "--latency-ms", type=_floats, default=[20.0, 50.0], help="sandbox latencies, e.g. 20,50"
    )
    parser.add_argument(
        "--keys", type=_ints, default=[1, 10, 10000], help="key cardinalities, e.g. 1,10,10000"
    )
    parser.add_argument("--in-flight", type=int, default=128, help="the daemon's IDV_MAX_IN_FLIGHT")
    parser.add_argument(
        "--provider-transport",
        default="aiohttp",
        choices=["httpx", "aiohttp", "httpx-aiohttp", "aiohttp-native"],
        help="provider transport of every variant (the daemon's IDV_PROVIDER_TRANSPORT)",
    )
    parser.add_argument(
        "--event-loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop of every variant (the daemon's IDV_EVENT_LOOP; auto = uvloop when installed)",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument(
        "--budget-s",
        type=float,
        default=20.0,
        help="slow variants get about this many seconds' worth of messages",
    )
    parser.add_argument("--min-messages", type=int, default=300)
    parser.add_argument("--latency-s", type=float, default=4.0, help="length of the paced latency phase")
    parser.add_argument("--latency-max-rate", type=float, default=1000.0)
    parser.add_argument(
        "--daemon-env",
        action="append",
        default=[],
        metavar="IDV_X=V",
        help="extra daemon settings (repeatable)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the daemon under cProfile (no comparison; writes bench/results/daemon.prof)",
    )
    parser.add_argument("--profiler", choices=["cprofile", "pyinstrument"], default="cprofile")
    parser.add_argument("--quick", action="store_true", help="20 ms, 10,000 keys, 10,000 messages")
    parser.add_argument("--keep", action="store_true", help="keep temp dirs and topics")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument(
        "--print-profile",
        type=Path,
        default=None,
        metavar="PROF",
        help="only print a saved cProfile file (as --profile does) and exit",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the JSON (and .txt table) go")
    parser.add_argument("--plot", type=Path, default=PLOT, help="where the PNG goes")
    parser.add_argument(
        "--replot", action="store_true", help="redraw the PNG and the .txt table from the results JSON"
    )
    from bench.concurrency_bench import add_arguments

    add_arguments(parser)
    args = parser.parse_args()
    if args.concurrency:
        from bench import concurrency_bench

        if args.quick:
            args.conc_latency_ms, args.sweep, args.rl_seconds = [500.0, 2000.0], [512, 2048, 4096], 24.0
        args.latency_s = min(args.latency_s, 3.0)
        sys.exit(asyncio.run(concurrency_bench.amain(args, _code_version())))
    if args.replot:
        data = json.loads(args.results.read_text())
        runs = [Run(**r) for r in data["runs"]]
        ceilings = {c["keys"]: Ceiling(**c) for c in data["ceilings"]}
        params = data["parameters"]
        plot(runs, ceilings, params["in_flight"], args.plot)
        report = render(
            runs, ceilings, params["in_flight"], params["messages"], targets(runs), data["elapsed_s"]
        )
        args.results.with_suffix(".txt").write_text(report + "\n")
        return
    if args.print_profile is not None:
        print_profile(args.print_profile, PROFILE_TXT)
        return
    if args.quick:
        args.latency_ms, args.keys, args.messages = [20.0], [10000], min(args.messages, 10000)
    if args.profile:
        args.variants = "daemon"
    sys.exit(asyncio.run(amain(args)))


if __name__ == "__main__":
    main()
