"""What a chaos run does, all derived from its seed: its options, the fault schedule and the requests."""

from __future__ import annotations

import base64
import random
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson

from producer.envelope import Envelope, encode
from producer.samples import iter_sample_envelopes

API_KEY = "chaos-key"
NAMESPACE = "idv"
EXIT_VIOLATION = 1
EXIT_SETUP = 2

# -- the schedule --------------------------------------------------------------------------------------

# idv-consumer run's documented start-up failures: configuration, broker, store, topic.
START_UP_CODES = frozenset({2, 4, 5, 6})


@dataclass(frozen=True)
class Event:
    at: float  # seconds after the chaos window opens
    kind: str  # kill | broker | pg | spike
    target: int = -1  # kill: which daemon
    down_s: float = 0.0  # kill: restart delay; broker/pg: downtime; spike: length
    mode: str = ""  # pg: pg_ctl stop mode
    latency_ms: float = 0.0  # spike: provider latency

    def describe(self) -> str:
        if self.kind == "kill":
            return f"SIGKILL daemon {self.target}, restart after {self.down_s:.1f}s"
        if self.kind == "broker":
            return f"broker stop, down {self.down_s:.1f}s, start"
        if self.kind == "pg":
            return f"PostgreSQL stop -m {self.mode}, down {self.down_s:.1f}s, start"
        return f"provider latency {self.latency_ms:.0f}ms for {self.down_s:.1f}s"


def _slots(rng: random.Random, n: int, start: float, end: float) -> list[float]:
    """``n`` times, one per equal slot of [start, end), placed in the first 60 % of their slot, so
    consecutive events of one kind are at least 40 % of a slot apart."""
    if n <= 0:
        return []
    width = (end - start) / n
    return [start + i * width + rng.uniform(0.0, 0.6 * width) for i in range(n)]


def make_schedule(opts: Options) -> list[Event]:
    """The fault schedule of a run: a pure function of the seed and the options."""
    seed, duration, processes = opts.seed, opts.duration, opts.processes
    kills, spikes = opts.kills, opts.spikes
    broker_restarts, pg_restarts = opts.broker_restarts, opts.pg_restarts
    # A string seed is hashed with SHA-512 by random.Random: stable across runs and PYTHONHASHSEED.
    rng = random.Random(f"idv-chaos-schedule:{seed}")
    events: list[Event] = []
    previous = -1
    for at in _slots(rng, kills, 0.05 * duration, 0.95 * duration):
        # Never the daemon hit last, so a target has been restarted before it is killed again.
        target = rng.choice([i for i in range(processes) if i != previous] or [0])
        previous = target
        events.append(Event(round(at, 2), "kill", target=target, down_s=round(rng.uniform(0.5, 3.0), 2)))
    events.extend(
        Event(round(at, 2), "broker", down_s=round(rng.uniform(1.0, 5.0), 2))
        for at in _slots(rng, broker_restarts, 0.15 * duration, 0.8 * duration)
    )
    events.extend(
        Event(
            round(at, 2),
            "pg",
            mode=rng.choice(["fast", "immediate"]),
            down_s=round(rng.uniform(1.0, 5.0), 2),
        )
        for at in _slots(rng, pg_restarts, 0.1 * duration, 0.85 * duration)
    )
    events.extend(
        Event(
            round(at, 2),
            "spike",
            down_s=round(rng.uniform(2.0, 5.0), 2),
            latency_ms=round(rng.uniform(500.0, 3500.0)),
        )
        for at in _slots(rng, spikes, 0.0, 0.9 * duration)
    )
    return sorted(events, key=lambda e: (e.at, e.kind))


# -- the requests --------------------------------------------------------------------------------------

Raw = tuple[bytes | None, bytes, list[tuple[str, bytes]]]


def _for_didit(env: Envelope) -> Envelope:
    """``--profile didit``: a session per message (Didit hands a subject's unfinished session of the same
    workflow to the next create: no side effect, another request's session; one side effect per message
    ID needs a workflow per message), and the sample images as inline base64 (sent as file parts)."""
    request = dict(env.request)
    if env.operation == "create_session":
        request["workflow_id"] = f"wf-{env.message_id}"
    for name in ("front_image", "back_image"):
        if isinstance(request.get(name), str):
            request[name] = base64.b64encode(request[name].encode()).decode()
    return Envelope(
        message_id=env.message_id,
        operation=env.operation,
        subject_id=env.subject_id,
        request=request,
        created_at=env.created_at,
        correlation_id=env.correlation_id,
    )


def make_records(
    seed: int, messages: int, dup_ratio: float, invalid_ratio: float, profile: str = "ietf"
) -> list[Raw]:
    """``messages`` Kafka records: valid requests (``dup_ratio`` of them re-sends of a recent one: same
    ID, same payload) with ``invalid_ratio`` undecodable ones mixed in at seeded positions."""
    rng = random.Random(f"idv-chaos-records:{seed}")
    invalid = round(messages * invalid_ratio)
    valid = iter_sample_envelopes(messages - invalid, seed=seed, duplicate_ratio=dup_ratio)
    if profile == "didit":
        valid = (_for_didit(env) for env in valid)
    records: list[Raw] = [(env.key, encode(env), env.headers()) for env in valid]
    for i in range(invalid):
        kind = i % 3
        if kind == 0:
            value = b"{not json at all"
        elif kind == 1:
            value = orjson.dumps({"operation": "aml_screening", "subject_id": "x", "request": {}})
        else:
            value = orjson.dumps(
                {
                    "message_id": f"chaos-bad-{seed}-{i}",
                    "operation": "teleport",
                    "subject_id": "x",
                    "request": {},
                }
            )
        records.insert(rng.randrange(len(records) + 1), (f"chaos-invalid-{i}".encode(), value, []))
    return records


# -- the run -------------------------------------------------------------------------------------------


@dataclass
class Options:
    seed: int
    messages: int
    kills: int
    broker_restarts: int
    pg_restarts: int
    processes: int
    partitions: int
    duration: float
    spikes: int
    dup_ratio: float
    invalid_ratio: float
    error_rate: float
    rate_429: float
    drop_rate: float
    latency_ms: float
    latency_jitter_ms: float
    settle_timeout: float
    sample_interval: float
    max_in_flight: int
    kafka_port: int
    kafka_controller_port: int
    kafka_data_dir: str
    pg_port: int
    pg_data_dir: str
    run_dir: Path
    keep_services: bool
    json_path: Path | None
    mutant: str | None = None
    """Run the daemons from a copy of the tree with this mutant of tests/mutants.py applied."""
    profile: str = "ietf"
    """The provider profile: the sandbox's ``--profile`` and the daemons' ``IDV_PROVIDER``."""
