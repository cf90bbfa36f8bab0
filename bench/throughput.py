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

Results: a plain-text table, ``bench/results/throughput.json`` and ``docs/performance.png``. Running one
variant is :mod:`bench.runner`, the table and chart :mod:`bench.report`, the profile :mod:`bench.profiling`;
the PostgreSQL, fair-naive and faulty-provider tables are ``bench/cells.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ROOT, code_version, make_envelopes, write_results
from bench.profiling import print_profile
from bench.report import plot, render, targets
from bench.runner import VARIANTS, Ceiling, Run, _planned, raw_ceiling, run_variant

RESULTS = ROOT / "bench" / "results" / "throughput.json"
PLOT = ROOT / "docs" / "performance.png"
PROFILE_TXT = ROOT / "bench" / "results" / "daemon-profile.txt"


# -- main ----------------------------------------------------------------------------------------------


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


async def amain(args: argparse.Namespace) -> int:
    started = time.monotonic()
    code = code_version()  # the work tree the variants are started from
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
    write_results(
        args.results,
        report,
        code=code,
        goals=goals,
        parameters={k: v for k, v in vars(args).items() if k != "daemon_env"}
        | {"daemon_env": args.daemon_env},
        elapsed_s=round(elapsed, 1),
        ceilings=[asdict(c) for c in ceilings.values()],
        runs=[asdict(r) for r in runs],
    )
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
        sys.exit(asyncio.run(concurrency_bench.amain(args, code_version())))
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
