"""The chaos run (``bench/chaos.py``) in its small configuration, as CI runs it, on ``--profile ietf`` and
``--profile didit`` (no idempotency key at the provider: reconciliation by lookup).

Three daemons, 2000 requests (10 % duplicate IDs), three SIGKILLs, a broker restart, provider faults; the
run's invariant checker decides (exit 0 = exactly one side effect per message ID, nothing lost, commits
never ahead of recorded outcomes, no stuck partition; with ``--fail-on-crash``, no daemon exit the harness
did not cause). Then the same harness runs daemons with a deliberate bug (``--mutant new-key-on-takeover``,
a text patch on a copy of the tree) and must fail invariant (a). The runs get their own broker, PostgreSQL
cluster and ports, so several test sessions on one machine do not collide; the shared services are not
touched.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from tests.conftest import ROOT, free_port, service_missing

pytestmark = [pytest.mark.kafka, pytest.mark.postgres]

SEED = 20260101
CHAOS = ROOT / "bench" / "chaos.py"


def _require_tools() -> None:
    from bench.chaos_env import ToolMissing, _pg_bindir

    if not shutil.which("java"):
        service_missing("java (for the private Kafka broker)", "apt-get install openjdk-17-jre-headless")
    try:
        _pg_bindir()
    except ToolMissing as exc:
        service_missing(str(exc), "apt-get install postgresql-15")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        service_missing("runuser (to run PostgreSQL as the postgres user)", "apt-get install util-linux")


def test_same_seed_same_schedule() -> None:
    def schedule(seed: int) -> str:
        out = subprocess.run(
            [sys.executable, str(CHAOS), "--seed", str(seed), "--kills", "20", "--schedule-only"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
        assert out.startswith(f"seed: {seed}\n")
        return out

    assert schedule(5) == schedule(5)
    assert schedule(5).count("SIGKILL") == 20
    assert schedule(5).replace("seed: 5", "") != schedule(6).replace("seed: 6", "")


@pytest.mark.timeout(900)
def test_small_chaos_run_holds_every_invariant() -> None:
    _require_tools()
    from bench.chaos_env import PrivateKafka, PrivatePostgres

    kafka_port, controller_port, pg_port = free_port(), free_port(), free_port()
    # The postgres user must be able to reach the data directory: not pytest's tmp_path.
    pg_base = Path(tempfile.mkdtemp(prefix="idv-chaos-pg-"))
    pg_base.chmod(0o755)
    kafka_dir = f".run/kafka-chaos-test-{uuid.uuid4().hex[:8]}"
    services = [
        *("--kafka-port", str(kafka_port), "--kafka-controller-port", str(controller_port)),
        *("--kafka-data-dir", kafka_dir, "--pg-port", str(pg_port), "--pg-data-dir", str(pg_base / "data")),
    ]
    cmd = [
        sys.executable,
        str(CHAOS),
        *("--seed", str(SEED), "--messages", "2000", "--kills", "3"),
        *("--broker-restarts", "1", "--pg-restarts", "0", "--processes", "3"),
        # A daemon exit the harness did not cause (crash, undocumented start-up code) fails the run.
        "--fail-on-crash",
        *services,
        "--keep-services",  # the mutant run below reuses the broker and the cluster
    ]
    # Didit's profile (no idempotency key: reconciliation closes the crash window), on the same services.
    didit_cmd = [
        sys.executable,
        str(CHAOS),
        *("--seed", str(SEED), "--messages", "1000", "--kills", "3", "--duration", "30"),
        *("--broker-restarts", "0", "--pg-restarts", "0", "--processes", "3", "--profile", "didit"),
        "--fail-on-crash",
        *services,
        "--keep-services",
    ]
    # The checker's strength: the same harness with daemons that send a new key on take-over must fail.
    mutant_cmd = [
        sys.executable,
        str(CHAOS),
        *("--seed", str(SEED), "--messages", "600", "--kills", "3", "--duration", "20"),
        *("--broker-restarts", "0", "--pg-restarts", "0", "--processes", "3"),
        *("--mutant", "new-key-on-takeover"),
        *services,
    ]
    try:
        result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=560)
        mutant = didit = None
        if result.returncode == 0:
            didit = subprocess.run(didit_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
            mutant = subprocess.run(mutant_cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    finally:
        # Normally the run stops what it started; this covers a run that died half-way.
        PrivateKafka(kafka_port, controller_port, kafka_dir).stop(wipe=True)
        PrivatePostgres(pg_base / "data", pg_port).stop("immediate")
        shutil.rmtree(pg_base, ignore_errors=True)
    output = result.stdout + result.stderr
    if result.returncode == 2 and "missing tool" in output:
        service_missing(output.strip().splitlines()[-1], "see bench/chaos_env.py")
    print(output[-6000:])
    assert output.startswith(f"seed: {SEED}\n"), output[:500]
    assert result.returncode == 0, f"chaos run failed (seed {SEED}):\n{output[-6000:]}"
    table = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in result.stdout.splitlines()
        if line.startswith("| ") and line.count("|") >= 2
    }
    assert table["duplicates (extra side effects)"] == "0"
    assert table["lost (unaccounted records)"] == "0"
    assert table["SIGKILLs"].startswith("3")
    assert table["broker restarts"] == "1"
    assert "all invariants hold" in result.stdout
    assert "(!)" not in result.stdout, "a daemon exited on its own or set a message aside as internal_error"
    assert didit is not None
    didit_out = didit.stdout + didit.stderr
    print(didit_out[-3000:])
    assert didit.returncode == 0, f"chaos run on --profile didit failed (seed {SEED}):\n{didit_out[-6000:]}"
    assert "all invariants hold" in didit.stdout and "(!)" not in didit.stdout
    assert mutant is not None
    mutant_out = mutant.stdout + mutant.stderr
    print(mutant_out[-4000:])
    assert mutant.returncode == 1, (
        f"the checker missed the mutant (exit {mutant.returncode}):\n{mutant_out[-4000:]}"
    )
    # Invariant (a) names the damage: side effects under keys no message maps to, and COMPLETED IDs with
    # no side effect under their own key (only the first 20 violations are printed).
    assert any(line.startswith("(a) ") and line.endswith("FAIL") for line in mutant.stdout.splitlines())
    assert "key no message maps to" in mutant.stdout or "COMPLETED with 0 side effects" in mutant.stdout
