"""Chaos run: several consumer daemons under random SIGKILLs, broker and PostgreSQL restarts and provider
faults, then an invariant checker. Exits 1 on any violation.

    python bench/chaos.py --seed 7 --messages 2000 --kills 4 --broker-restarts 1 --pg-restarts 0 --processes 3

Everything it restarts is its own: a second Kafka broker (``--kafka-port``, default 19192, via
``scripts/kafka.sh``), a PostgreSQL cluster in ``--pg-data-dir`` on ``--pg-port`` (default 5499), and a
fresh sandbox provider process. The shared broker (9092) and PostgreSQL (5432) are never touched.

**The schedule** (kill times and targets, restart delays, broker and PostgreSQL outages, latency spikes),
the requests (IDs, payloads, which ones are re-sent: 10 % duplicates) and the sandbox's fault rolls all
derive from ``--seed``: the same seed gives the same schedule (``--schedule-only`` prints it). Process
start-up times and the interleaving of concurrent work are not deterministic, so the same seed does not
give byte-identical runs; a violation found with a seed is replayed by running that seed again (often
more than once).

**During the run** a publisher sends the requests at a steady rate over ~90 % of the chaos window
(``--duration``); the daemons run with short leases (``IDV_LEASE_S=4``, ``IDV_PROVIDER_TIMEOUT_S=3``) so
take-overs after kills happen within the run; a supervisor restarts any daemon that exits (a SIGKILLed
one after its scheduled delay, one that exits by itself — e.g. it could not reach the broker at start-up —
after 1 s, counted). A monitor samples the group's committed offsets every ``--sample-interval`` seconds
and, right after each sample, which outcomes are recorded (store) and which messages are dead-lettered.

**Then** faults stop, every daemon is brought back, and the checker verifies:

(a) exactly one provider side effect (sandbox ledger) per unique message ID that completed; at most one
    for IDs that were only dead-lettered (or ended FAILED); no side effect under any other key;
(b) every record of the request topic is accounted for — its ID's outcome is COMPLETED/FAILED in the
    store (processed or skipped duplicate) or that very record (partition, offset) is in the dead-letter
    topic — and every completed ID has a result event, all result events of one ID being identical;
(c) committed offsets were never ahead of recorded outcomes: for every sample, every record below the
    committed offset was accounted for (as in b) by the time of the sample; also for the final offsets;
(d) no stuck partition: every partition's committed offset reaches its end within ``--settle-timeout``
    seconds after the faults stop.

Logs of every process and a JSON summary are kept in the run directory (``.run/chaos/<run id>/``).

``--mutant NAME`` runs the daemons from a copy of the tree with one mutant of ``tests/mutants.py`` applied
(e.g. ``new-key-on-takeover``); the run must then fail, which shows the checker is not vacuous.
``--fail-on-crash`` (CI) also fails the run on any daemon exit the harness did not cause.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from bench.chaos_check import Outcome, check
from bench.chaos_env import (
    ROOT,
    DaemonProcess,
    PrivateKafka,
    PrivatePostgres,
    SandboxProcess,
    ToolMissing,
    daemon_child_env,
)
from bench.chaos_plan import (
    API_KEY,
    EXIT_SETUP,
    EXIT_VIOLATION,
    START_UP_CODES,
    Event,
    Options,
    make_records,
    make_schedule,
)
from bench.chaos_procs import (
    Counts,
    Monitor,
    Supervisor,
    _sandbox_faults,
    create_topics,
    publish,
    wait_caught_up,
)

#: The daemons' settings: short leases, timeouts and drains, so a killed daemon's work is taken over (and a
#: rebalance finishes) well within a run.
DAEMON_SETTINGS: dict[str, object] = {
    "lease_s": 4, "provider_timeout_s": 3, "commit_interval_s": 0.5, "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000, "rebalance_drain_s": 3, "drain_timeout_s": 5,
    "provider_backoff_base_s": 0.1, "provider_backoff_max_s": 2, "log_format": "json", "log_level": "INFO",
    "health_port": 0,  # several daemons on one host: each takes a free port
}  # fmt: skip


def daemon_env(
    opts: Options, *, bootstrap: str, topic: str, group: str, store_url: str, provider_url: str, i: int
) -> dict[str, str]:
    return daemon_child_env(
        bootstrap, topic, group, store_url, provider_url, API_KEY, "bench-fingerprint-key-not-secret",
        instance_id=f"chaos-{i}", max_in_flight=opts.max_in_flight, **DAEMON_SETTINGS,
        provider=opts.profile,
    )  # fmt: skip


async def run(opts: Options) -> Outcome:
    counts = Counts()
    schedule = make_schedule(opts)
    records = make_records(opts.seed, opts.messages, opts.dup_ratio, opts.invalid_ratio, opts.profile)
    run_id = opts.run_dir.name
    print(f"run dir: {opts.run_dir}")
    for event in schedule:
        print(f"  t+{event.at:7.2f}s  {event.describe()}")

    t_setup = time.monotonic()
    kafka = PrivateKafka(opts.kafka_port, opts.kafka_controller_port, opts.kafka_data_dir)
    pg = PrivatePostgres(ROOT / opts.pg_data_dir, opts.pg_port)
    started_kafka = not await asyncio.to_thread(kafka.running)
    if started_kafka:
        print(f"starting the private broker at {kafka.bootstrap}")
    await asyncio.to_thread(kafka.start)
    started_pg = not await asyncio.to_thread(pg.running)
    await asyncio.to_thread(pg.start)
    schema = "chaos_" + run_id.replace("-", "_")
    store_url = await asyncio.to_thread(pg.create_schema, schema)
    sandbox = await asyncio.to_thread(
        SandboxProcess,
        opts.run_dir,
        API_KEY,
        seed=opts.seed,
        profile=opts.profile,
        latency_ms=opts.latency_ms,
        latency_jitter_ms=opts.latency_jitter_ms,
    )
    topic = f"chaos-{run_id}"
    dlq, results = f"{topic}.dlq", f"{topic}.results"
    group = f"chaos-{run_id}"
    await create_topics(kafka.bootstrap, [topic, dlq, results], opts.partitions)

    deps = {"broker": False, "pg": False}
    daemon_tree = ROOT
    if opts.mutant is not None:
        # The checker's strength test: the daemons run a deliberately broken build (a text patch on a copy
        # of the tree), the checker and everything else run the real code; the run must fail.
        from tests.mutants import by_name, prepare_tree

        daemon_tree = await asyncio.to_thread(prepare_tree, by_name(opts.mutant), opts.run_dir / "src")
        print(f"MUTANT {opts.mutant}: the daemons run a broken build from {daemon_tree}")
    daemons = [
        DaemonProcess(
            {
                **daemon_env(
                    opts,
                    bootstrap=kafka.bootstrap,
                    topic=topic,
                    group=group,
                    store_url=store_url,
                    provider_url=sandbox.url,
                    i=i,
                ),
                "PYTHONPATH": str(daemon_tree),
            },
            opts.run_dir / f"daemon-{i}.log",
            cwd=daemon_tree,
        )
        for i in range(opts.processes)
    ]
    supervisor = Supervisor(daemons, counts, lambda: any(deps.values()))
    monitor = Monitor(kafka.bootstrap, group, topic, dlq, store_url)
    passed = False
    try:
        for d in daemons:
            d.start()
        deadline = time.monotonic() + 60
        while not all(d.started() for d in daemons):
            if time.monotonic() > deadline or any(not d.alive() for d in daemons):
                raise RuntimeError(
                    "daemons did not start:\n" + "\n".join(d.current_log()[-800:] for d in daemons)
                )
            await asyncio.sleep(0.1)
        await monitor.start(opts.partitions)
        setup_s = time.monotonic() - t_setup
        print(f"set-up took {setup_s:.1f}s; chaos window {opts.duration:.0f}s, {len(records)} records")

        await _sandbox_faults(
            sandbox.url,
            error_rate=opts.error_rate,
            rate_429=opts.rate_429,
            retry_after_s=1,
            drop_after_effect_rate=opts.drop_rate,
        )
        t0 = time.monotonic()
        stop_monitor = asyncio.Event()
        supervisor_task = asyncio.create_task(supervisor.run())
        monitor_task = asyncio.create_task(monitor.run(opts.sample_interval, stop_monitor))
        publisher = asyncio.create_task(publish(kafka.bootstrap, topic, records, opts.duration * 0.9, counts))

        async def outage(
            dep: str, stop: Callable[[], None], start: Callable[[], None], down_s: float
        ) -> None:
            # While ``deps[dep]`` is set the supervisor counts daemon exits as outage-caused, not crashes.
            deps[dep] = True
            try:
                await asyncio.to_thread(stop)
                await asyncio.sleep(down_s)
                await asyncio.to_thread(start)
            finally:
                deps[dep] = False

        async def broker_restart(e: Event) -> None:
            await outage("broker", kafka.stop, kafka.start, e.down_s)
            counts.broker_restarts += 1

        async def pg_restart(e: Event) -> None:
            await outage("pg", lambda: pg.stop(e.mode), pg.start, e.down_s)
            counts.pg_restarts += 1

        async def spike(e: Event) -> None:
            await _sandbox_faults(sandbox.url, latency_ms=e.latency_ms, latency_jitter_ms=500)
            counts.spikes += 1
            await asyncio.sleep(e.down_s)
            await _sandbox_faults(
                sandbox.url, latency_ms=opts.latency_ms, latency_jitter_ms=opts.latency_jitter_ms
            )

        handlers: dict[str, Callable[[Event], Coroutine[Any, Any, None]]] = {
            "kill": lambda e: supervisor.kill(e.target, e.down_s),
            "broker": broker_restart,
            "pg": pg_restart,
            "spike": spike,
        }
        tasks: list[asyncio.Task[None]] = []
        for event in schedule:
            await asyncio.sleep(max(0.0, t0 + event.at - time.monotonic()))
            print(f"  t+{time.monotonic() - t0:7.2f}s  {event.describe()}")
            tasks.append(asyncio.create_task(handlers[event.kind](event)))
        await asyncio.gather(*tasks)
        await publisher
        await asyncio.sleep(max(0.0, t0 + opts.duration - time.monotonic()))

        # Faults stop: the provider behaves, every dependency is up, every daemon runs.
        await _sandbox_faults(
            sandbox.url,
            error_rate=0.0,
            rate_429=0.0,
            drop_after_effect_rate=0.0,
            latency_ms=0.0,
            latency_jitter_ms=0.0,
        )
        chaos_s = time.monotonic() - t0
        print(f"faults stopped after {chaos_s:.1f}s; waiting for lag 0 (bound {opts.settle_timeout:.0f}s)")
        caught_up, settle_s, lag = await wait_caught_up(
            monitor, kafka.bootstrap, topic, opts.partitions, opts.settle_timeout
        )
        stop_monitor.set()
        await monitor_task
        supervisor_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor_task
        exit_codes = await asyncio.to_thread(stop_all, daemons)
        await monitor.sample()  # the final committed offsets, judged like every other sample
        await monitor.stop()

        outcome = await check(
            opts,
            sandbox=sandbox,
            bootstrap=kafka.bootstrap,
            topic=topic,
            dlq=dlq,
            results=results,
            store_url=store_url,
            monitor=monitor,
            counts=counts,
            caught_up=caught_up,
            settle_s=settle_s,
            lag=lag,
            exit_codes=exit_codes,
            elapsed_s=time.monotonic() - t0,
            setup_s=setup_s,
            schedule=schedule,
        )
        passed = not any(outcome.violations.values())
        return outcome
    finally:
        for d in daemons:
            d.kill()
        sandbox.stop()
        if passed:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(pg.drop_schema, schema)
        else:
            print(
                f"kept for inspection: schema {schema} in {pg.url}, topics {topic}*, logs in {opts.run_dir}"
            )
        if not opts.keep_services:
            if started_pg:
                await asyncio.to_thread(pg.stop)
            if started_kafka:
                await asyncio.to_thread(kafka.stop, wipe=passed)


def stop_all(daemons: list[DaemonProcess]) -> list[int | None]:
    """SIGTERM every daemon at once (each drains and commits), then collect the exit codes."""
    for d in daemons:
        if d.alive() and d.proc is not None:
            d.proc.send_signal(signal.SIGTERM)
    codes: list[int | None] = []
    for d in daemons:
        try:
            codes.append(d.proc.wait(30) if d.proc is not None else None)
        except subprocess.TimeoutExpired:
            d.kill()
            codes.append(-9)
    return codes


# -- CLI -----------------------------------------------------------------------------------------------

INVARIANTS = {
    "a": "one side effect per completed ID, at most one per dead-lettered ID",
    "b": "every record completed, skipped duplicate or dead-lettered; a result per completed ID",
    "c": "committed offsets never ahead of recorded outcomes",
    "d": "no stuck partition: lag 0 after the faults stopped",
}


def print_table(table: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in table)
    print()
    print(f"| {'':<{width}} | value")
    print(f"|{'-' * (width + 2)}|{'-' * 30}")
    for name, value in table:
        print(f"| {name:<{width}} | {value}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Options]:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seed", type=int, default=None, help="default: random (printed first)")
    # Options without a help line (the fault mix, the private services' ports): flag, type, default.
    for flag, kind, default in (
        ("--broker-restarts", int, 1), ("--pg-restarts", int, 0), ("--partitions", int, 12),
        ("--dup-ratio", float, 0.10), ("--invalid-ratio", float, 0.005), ("--latency-ms", float, 30.0),
        ("--latency-jitter-ms", float, 60.0), ("--sample-interval", float, 1.0), ("--max-in-flight", int, 32),
        ("--kafka-port", int, 19192), ("--kafka-controller-port", int, 19193), ("--pg-port", int, 5499),
    ):  # fmt: skip
        ap.add_argument(flag, type=kind, default=default)
    ap.add_argument("--messages", type=int, default=2000, help="records to publish (duplicates included)")
    ap.add_argument("--kills", type=int, default=4, help="SIGKILLs of daemons")
    ap.add_argument("--processes", type=int, default=3, help="daemons in the group")
    ap.add_argument(
        "--duration", type=float, default=None, help="chaos window in seconds (default: messages/60, ≥ 40)"
    )
    ap.add_argument("--spikes", type=int, default=None, help="latency spikes (default: one per 10 s)")
    ap.add_argument("--error-rate", type=float, default=0.05, help="provider gateway 500s")
    ap.add_argument("--rate-429", type=float, default=0.03, help="provider 429s with Retry-After: 1")
    ap.add_argument("--drop-rate", type=float, default=0.02, help="connection dropped after the side effect")
    ap.add_argument("--settle-timeout", type=float, default=120.0, help="bound for lag 0 after faults stop")
    ap.add_argument("--kafka-data-dir", default=".run/kafka-chaos")
    ap.add_argument("--pg-data-dir", default=".run/pg-chaos")
    ap.add_argument("--run-dir", type=Path, default=None, help="logs and summary (default .run/chaos/<id>)")
    ap.add_argument(
        "--keep-services", action="store_true", help="leave the private broker and PostgreSQL running"
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument(
        "--fail-on-crash",
        action="store_true",
        help="a daemon exit the harness did not cause (a crash after start-up, a start-up failure with an "
        "undocumented code) or an internal_error dead letter fails the run (CI sets it)",
    )
    ap.add_argument(
        "--mutant",
        default=None,
        help="run the daemons with this mutant of tests/mutants.py (e.g. new-key-on-takeover): the run "
        "must then fail (exit 1); shows the checker is not vacuous",
    )
    ap.add_argument(
        "--profile",
        choices=("ietf", "didit"),
        default="ietf",
        help="provider profile: the sandbox's --profile and the daemons' IDV_PROVIDER",
    )
    ap.add_argument("--schedule-only", action="store_true", help="print the seed and schedule, run nothing")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    duration = args.duration if args.duration is not None else max(40.0, args.messages / 60)
    spikes = args.spikes if args.spikes is not None else max(1, int(duration // 10))
    run_id = f"s{args.seed}-{uuid.uuid4().hex[:6]}"
    run_dir = args.run_dir or ROOT / ".run" / "chaos" / run_id
    # Every option is the argument of the same name, but for these four (worked out above, or renamed).
    derived = {"duration": duration, "spikes": spikes, "run_dir": run_dir, "json_path": args.json}
    given = {f.name: getattr(args, f.name) for f in fields(Options) if f.name not in derived}
    opts = Options(**given, **derived)
    return args, opts


def main(argv: list[str] | None = None) -> int:
    args, opts = parse_args(argv)
    print(f"seed: {opts.seed}", flush=True)
    if args.schedule_only:
        schedule = make_schedule(opts)
        for event in schedule:
            print(f"  t+{event.at:7.2f}s  {event.describe()}")
        return 0
    if opts.mutant is not None:
        from tests.mutants import MutantError, by_name

        try:
            by_name(opts.mutant)
        except MutantError as exc:
            print(f"chaos: {exc}", file=sys.stderr)
            return EXIT_SETUP
    opts.run_dir.mkdir(parents=True, exist_ok=True)
    # The clients' own complaints while the broker or PostgreSQL is down go to a file, not the table.
    logging.basicConfig(
        filename=opts.run_dir / "chaos.log",
        level=logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    # One run at a time per private broker/cluster: they are stopped and started under the run.
    lock_path = ROOT / ".run" / f"chaos-{opts.kafka_port}-{opts.pg_port}.lock"
    lock = open(lock_path, "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"another chaos run holds {lock_path}; use other --kafka-port/--pg-port", file=sys.stderr)
        return EXIT_SETUP
    started = time.monotonic()
    try:
        outcome = asyncio.run(run(opts))
    except ToolMissing as exc:
        print(f"chaos: missing tool: {exc}", file=sys.stderr)
        return EXIT_SETUP
    except KeyboardInterrupt:
        return 130
    print_table(outcome.table)
    print(
        f"| {'total wall time':<{max(len(n) for n, _ in outcome.table)}} | {time.monotonic() - started:.1f}s"
    )
    print()
    failed = False
    for name, text in INVARIANTS.items():
        found = outcome.violations[name]
        print(f"({name}) {text}: {'FAIL' if found else 'ok'}")
        for line in found[:20]:
            print(f"      {line}")
        failed |= bool(found)
    crashes = [e for e in outcome.summary["self_exits"] if e["crash"]]
    if crashes:
        print(f"(!) {len(crashes)} daemon crash(es) after start-up:")
        for error, n in Counter(e["error"] or f"exit {e['code']}" for e in crashes).most_common():
            print(f"      {n}x {error}")
        failed |= args.fail_on_crash
    internal = outcome.summary["dead_letters"].get("internal_error", 0)
    if internal:
        print(
            f"(!) {internal} dead letter(s) for internal errors: messages set aside by a consumer error, "
            "not by their content (see the daemon logs)"
        )
        failed |= args.fail_on_crash
    odd = [e for e in outcome.summary["self_exits"] if not e["crash"] and e["code"] not in START_UP_CODES]
    if odd:
        print(f"(!) {len(odd)} start-up failure(s) with an undocumented exit code (not 2, 4, 5 or 6):")
        for error, n in Counter(f"exit {e['code']}: {e['error']}" for e in odd).most_common():
            print(f"      {n}x {error}")
        failed |= args.fail_on_crash
    outcome.summary["total_s"] = round(time.monotonic() - started, 1)
    summary = orjson.dumps(outcome.summary, option=orjson.OPT_INDENT_2)
    (opts.run_dir / "summary.json").write_bytes(summary)
    if opts.json_path is not None:
        opts.json_path.write_bytes(summary)
    if failed:
        print(f"\nFAILED with seed {opts.seed} (logs: {opts.run_dir})")
        return EXIT_VIOLATION
    print(f"\nall invariants hold (seed {opts.seed})")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    sys.exit(main())
