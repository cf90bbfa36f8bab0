"""Running one benchmark variant end to end: its topic, sandbox, store, process(es), and the checks after.

:func:`run_variant` is what every table of ``bench/throughput.py`` and ``bench/cells.py`` is made of: a
fresh topic holding the given messages, a fresh sandbox provider process (its ledger then holds that
variant's side effects alone, optionally with injected faults), a fresh dedupe store (a SQLite file in a
temp dir, or a throw-away schema of a PostgreSQL database), and the variant as one or more processes of
one consumer group. It measures rate, CPU, RSS and latency from the store, then checks the ledger
(duplicate side effects) and that committed offsets reached the end offsets.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka.partitioner import DefaultPartitioner

from bench.chaos_env import clean_env, daemon_child_env
from bench.common import (
    API_KEY,
    BOOTSTRAP,
    ROOT,
    MachineProbe,
    ProcessProbe,
    Sandbox,
    committed_offsets,
    create_topic,
    delete_topics,
    end_offsets,
    expected_keys,
    ledger_check,
    percentile,
    publish,
    publish_paced,
    random_topic,
    sample_metrics,
    workdir,
)
from bench.store_probe import probe_for, throwaway_schema

VARIANTS = ("daemon", "naive", "faststream")
#: What a variant's process runs (``Variant.kind``): the daemon, or one of ``bench/baselines.py``'s loops.
KINDS = ("daemon", "naive", "naive-pp", "faststream")
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
    # bench/cells.py: the store backend, processes in the group, sandbox faults and the faults it served.
    store: str = "sqlite"
    processes: int = 1
    faults: dict[str, float] = field(default_factory=dict)
    faults_served: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Variant:
    """One column of a table: what runs (``kind``), on which store, as how many processes of one group."""

    label: str
    kind: str = "daemon"
    store: str = "sqlite"  # "sqlite" or "postgresql"
    processes: int = 1


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
    store_url: str,
    url: str,
    profile_out: Path | None,
    instance: int = 0,
) -> tuple[list[str], dict[str, str]]:
    """The command and environment of one process of ``variant`` (a kind of :data:`KINDS`)."""
    env = clean_env()
    if variant == "daemon":
        env = daemon_child_env(
            BOOTSTRAP,
            topic,
            group,
            store_url,
            url,
            API_KEY,
            "bench-fingerprint-key-not-secret",
            max_in_flight=args.in_flight,
            provider_max_connections=args.in_flight,
            log_level="WARNING",
            log_format="json",
            instance_id=f"bench-{instance}",
            health_port=0,  # any free port: several daemons (and other runs) share the machine
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
    cmd = [sys.executable, str(ROOT / "bench" / "baselines.py"), variant, "--topic", topic]
    cmd += ["--bootstrap", BOOTSTRAP, "--group", group, "--store-url", store_url, "--provider-url", url]
    cmd += ["--partitions", str(args.partitions), "--provider-transport", args.provider_transport]
    cmd += ["--event-loop", args.event_loop]
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


class GroupProbe(ProcessProbe):
    """:class:`ProcessProbe` over the processes of one variant: CPU summed, peak RSS of the largest."""

    def __init__(self, pids: list[int]) -> None:
        super().__init__(pids[0])
        self.members = [ProcessProbe(pid) for pid in pids]

    def cpu_s(self) -> float:
        return sum(m.cpu_s() for m in self.members)

    def thread_cpu_s(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for m in self.members:
            for k, v in m.thread_cpu_s().items():
                out[k] = out.get(k, 0.0) + v
        return out

    def peak_rss_mib(self) -> float:
        return max(m.peak_rss_mib() for m in self.members)


@contextlib.asynccontextmanager
async def _store_url(backend: str, tmp: Path, args: argparse.Namespace) -> AsyncIterator[str]:
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'dedupe.db'}"
        return
    async with throwaway_schema(args.postgres_url) as url:
        yield url


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
    spec: Variant | None = None,
    faults: dict[str, float] | None = None,
) -> Run:
    """Run ``variant`` (a kind, or ``spec`` for the store and process count) on a fresh topic, sandbox
    (with ``faults``, ``POST /_admin/faults``) and store; ``health_port`` samples the daemon's metrics."""
    spec = spec or Variant(variant, variant)
    tmp = workdir()
    async with _store_url(spec.store, tmp, args) as store_url:
        return await _run(
            spec,
            args,
            latency_ms,
            keys,
            backlog,
            late,
            tmp,
            store_url,
            profile_out,
            health_port,
            faults or {},
        )


async def _run(
    spec: Variant,
    args: argparse.Namespace,
    latency_ms: float,
    keys: int,
    backlog: list[Any],
    late: list[Any],
    tmp: Path,
    store_url: str,
    profile_out: Path | None,
    health_port: int | None,
    faults: dict[str, float],
) -> Run:
    planned = len(backlog)
    run = Run(
        spec.label,
        latency_ms,
        keys,
        args.partitions,
        args.in_flight if spec.kind == "daemon" else None,
        planned,
        store=spec.store,
        processes=spec.processes,
        faults=dict(faults),
    )
    topic = random_topic(spec.kind)
    group = f"{topic}-group"
    await create_topic(topic, args.partitions)
    # The daemon writes a result event per message (and dead letters) to "<topic>.results"/".dlq".
    sink_topics = [f"{topic}.results", f"{topic}.dlq"] if spec.kind == "daemon" else []
    for name in sink_topics:
        await create_topic(name, args.partitions)
    if spec.processes == 1:
        await publish(topic, backlog)
    sandbox = Sandbox(latency_ms, tmp)
    if faults:
        sandbox.faults(**faults)
    store = probe_for(store_url)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(spec.processes):
            cmd, env = _command(spec.kind, args, topic, group, store_url, sandbox.url, profile_out, i)
            if health_port is not None and i == 0:
                env["IDV_HEALTH_PORT"] = str(health_port)
            procs.append(_spawn(cmd, env, tmp / f"{spec.kind}-{i}.log"))
    except BaseException:
        for proc in procs:
            _stop(proc)
        sandbox.stop()
        raise
    log_path = tmp / f"{spec.kind}-0.log"
    if spec.processes > 1:
        # The rate excludes start-up and group join for every variant: a group of several processes
        # gets its backlog once all its members have joined (a single process's is waiting for it).
        if not await _group_stable(group, spec.processes, procs):
            run.notes.append(f"group not stable with {spec.processes} members within 90 s")
        await publish(topic, backlog)
    probe = GroupProbe([p.pid for p in procs])
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
        threads0: dict[str, float] = {}
        count = 0
        while True:
            await asyncio.sleep(0.2)
            count, _, _ = await store.progress()
            if count and first_seen is None:
                first_seen = (probe.cpu_s(), count)
                threads0 = probe.thread_cpu_s()
                machine.start()
            if count >= planned:
                break
            if any(p.poll() is not None for p in procs):
                codes = [p.returncode for p in procs]
                run.notes.append(f"exited early with {codes}; see {log_path}")
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
        count, first_claim, last_outcome = await store.progress()
        run.processed = count
        if first_seen is not None and count > first_seen[1]:
            n_done = count - first_seen[1]
            run.cpu_ms_per_msg = (cpu_end - first_seen[0]) * 1000.0 / n_done
            threads1 = probe.thread_cpu_s()
            run.cpu_ms_per_msg_by_thread = {
                k: round((threads1[k] - threads0.get(k, 0.0)) * 1000.0 / n_done, 3) for k in threads1
            }
        run.mean_in_flight = await store.mean_in_flight()
        if first_claim is not None and last_outcome is not None and count > 1:
            run.seconds = last_outcome - first_claim
            run.msg_per_s = count / run.seconds if run.seconds > 0 else float("nan")
        if not run.capped and count >= planned and run.msg_per_s > 0 and late:
            await _latency_phase(run, args, store, topic, planned, late, lat)
        run.peak_rss_mib = probe.peak_rss_mib()
    except BaseException:
        for proc in procs:
            _stop(proc)
        sandbox.stop()
        raise
    finally:
        recorded = await store.recorded_keys()
        await store.close()
        if sampler is not None:
            sampler.cancel()
    codes = [_stop(proc) for proc in procs]
    run.exit_code = next((c for c in codes if c not in (0, None)), codes[0])
    await _verify(run, sandbox, recorded, expected_keys(backlog) | expected_keys(late), topic, group)
    healthy = run.exit_code in (0, None) and (run.capped or run.processed >= run.planned)
    if not args.keep and healthy:
        shutil.rmtree(tmp, ignore_errors=True)
        await delete_topics([topic, *sink_topics])
    else:
        run.notes.append(f"kept {tmp}")
    return run


async def _group_stable(group: str, members: int, procs: list[subprocess.Popen[bytes]]) -> bool:
    """Wait (≤ 90 s) until ``group`` is Stable with ``members`` members; False if it never is."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and all(p.poll() is None for p in procs):
            described = (await admin.describe_consumer_groups([group]))[0].groups[0]
            if described[2] == "Stable" and len(described[5]) == members:
                return True
            await asyncio.sleep(0.5)
        return False
    finally:
        await admin.close()


async def _latency_phase(
    run: Run, args: argparse.Namespace, store: Any, topic: str, planned: int, late: list[Any], lat: float
) -> None:
    """After the backlog: new messages at half the measured rate, latency = outcome − record timestamp."""
    rate = max(2.0, min(args.latency_max_rate, run.msg_per_s / 2))
    n_late = int(max(20, min(len(late), rate * args.latency_s)))
    sent = await publish_paced(topic, late[:n_late], rate)
    deadline = time.monotonic() + 30 + n_late / rate + 10 * lat
    while time.monotonic() < deadline:
        count, _, _ = await store.progress()
        if count >= planned + n_late:
            break
        await asyncio.sleep(0.1)
    done = await store.outcome_times(list(sent))
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


async def _verify(
    run: Run, sandbox: Sandbox, recorded: set[str], sent_keys: set[str], topic: str, group: str
) -> None:
    """The sandbox ledger (duplicate side effects, faults served) and committed = end offsets."""
    try:
        ledger = sandbox.ledger()
        stats = sandbox.stats()
    finally:
        sandbox.stop()
    check = ledger_check(ledger, recorded)
    run.duplicates = check["duplicates"]
    run.keys_with_duplicates = check["keys_with_duplicates"]
    run.missing_side_effects = check["missing"]
    run.unexpected_keys = sum(1 for k in ledger["keys"] if k not in sent_keys)
    run.side_effects = check["side_effects"]
    run.provider_requests = check["requests"]
    run.faults_served = {str(k): int(v) for k, v in (stats.get("faults") or {}).items()}
    if not run.capped:
        ends = await end_offsets(topic)
        committed = await committed_offsets(group, topic, sorted(ends))
        run.committed_to_end = all(committed.get(p, 0) >= e for p, e in ends.items())
    if run.exit_code not in (0, None):
        run.notes.append(f"exit code {run.exit_code}")


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
