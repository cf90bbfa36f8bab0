"""Private services for the chaos benchmark and the scale-out tests.

The shared Kafka broker (9092) and PostgreSQL (5432) serve everybody's tests, so nothing here ever stops
them. What a chaos run stops and starts is its own:

* :class:`PrivatePostgres` – a PostgreSQL cluster in a directory of its own (``initdb`` + ``pg_ctl``, run as
  the ``postgres`` user when we are root), on its own port, trust authentication on loopback only;
* :class:`PrivateKafka` – a second broker run by ``scripts/kafka.sh`` with its own ports and data dir;
* :class:`SandboxProcess` – the sandbox provider as a process (its ledger outlives every consumer);
* :class:`DaemonProcess` – ``python -m consumer run`` with a log file.

A missing tool raises :class:`ToolMissing`, so callers can fail (under ``CI``) or skip with one line.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sandbox import testing

ROOT = Path(__file__).resolve().parent.parent

__all__ = [
    "ROOT",
    "DaemonProcess",
    "PrivateKafka",
    "PrivatePostgres",
    "SandboxProcess",
    "ToolMissing",
    "clean_env",
    "daemon_child_env",
    "port_open",
]


class ToolMissing(RuntimeError):
    """A program the private services need is not installed."""


def clean_env() -> dict[str, str]:
    """This process's environment without any ``IDV_*`` variable: a child sees only the settings given."""
    return {k: v for k, v in os.environ.items() if not k.startswith("IDV_")}


def daemon_child_env(
    bootstrap: str,
    topic: str,
    group: str,
    store_url: str,
    provider_url: str,
    api_key: str,
    fingerprint_key: str,
    **settings: object,
) -> dict[str, str]:
    """The environment of a ``python -m consumer run`` child: :func:`clean_env` plus its connection
    settings and ``IDV_<NAME>`` for every other setting (``max_in_flight=8`` → ``IDV_MAX_IN_FLIGHT=8``)."""
    env = clean_env()
    settings = {
        "kafka_bootstrap": bootstrap,
        "topic": topic,
        "group_id": group,
        "store_url": store_url,
        "provider_url": provider_url,
        "provider_api_key": api_key,
        "fingerprint_key": fingerprint_key,
    } | settings
    env.update({f"IDV_{k.upper()}": str(v) for k, v in settings.items()})
    return env


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


# -- PostgreSQL ----------------------------------------------------------------------------------------


def _pg_bindir() -> Path:
    candidates: list[Path] = []
    found = shutil.which("pg_ctl")
    if found:
        candidates.append(Path(os.path.realpath(found)).parent)
    candidates += [Path(p) for p in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)]
    for bindir in candidates:
        if all((bindir / tool).exists() for tool in ("initdb", "pg_ctl", "postgres", "psql")):
            return bindir
    raise ToolMissing("PostgreSQL server programs (initdb, pg_ctl) not found: apt-get install postgresql-15")


class PrivatePostgres:
    """A PostgreSQL cluster of our own: ``init``, ``start``, ``stop``, ``restart`` at will.

    The data directory's parents must be traversable by the ``postgres`` user when running as root (a
    directory under the repository or ``/tmp`` is; pytest's ``tmp_path`` is not).
    """

    def __init__(self, data_dir: Path, port: int, *, user: str = "idv", database: str = "idv") -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.user = user
        self.database = database
        self.bindir = _pg_bindir()
        self.log_path = self.data_dir.parent / f"{self.data_dir.name}.log"
        self._as_postgres = os.geteuid() == 0

    @property
    def url(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"

    def _run(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if self._as_postgres:
            if not shutil.which("runuser"):
                raise ToolMissing("runuser not found (needed to run PostgreSQL as the postgres user)")
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        # cwd=/: the postgres user may not be able to read the caller's working directory.
        return subprocess.run(cmd, cwd="/", capture_output=True, text=True, check=check, timeout=timeout)

    def init(self) -> None:
        if (self.data_dir / "PG_VERSION").exists():
            return
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            shutil.chown(self.data_dir, "postgres", "postgres")
            # The log file lives next to the data dir and pg_ctl (as postgres) appends to it.
            self.log_path.touch()
            shutil.chown(self.log_path, "postgres", "postgres")
        self.data_dir.chmod(0o700)
        try:
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-U",
                self.user,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-sync",
                "--no-instructions",
            )
        except subprocess.CalledProcessError as exc:
            raise RuntimeError(f"initdb failed: {exc.stderr.strip()[-1000:]}") from None
        with open(self.data_dir / "postgresql.conf", "a", encoding="utf-8") as fh:
            fh.write(
                "\n# Written by bench/chaos_env.py\n"
                f"port = {self.port}\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.data_dir}'\n"
                "max_connections = 200\n"
                "shared_buffers = 64MB\n"
                "fsync = on\n"
                "synchronous_commit = on\n"
            )

    def running(self) -> bool:
        return self._run("pg_ctl", "-D", str(self.data_dir), "status", check=False).returncode == 0

    def start(self, timeout: float = 60) -> None:
        self.init()
        if not self.running():
            if port_open(self.port):
                raise RuntimeError(f"port {self.port} is taken by another process")
            if not self.log_path.exists() and self._as_postgres:
                self.log_path.touch()
                shutil.chown(self.log_path, "postgres", "postgres")
            result = self._run(
                "pg_ctl",
                "-D",
                str(self.data_dir),
                "-l",
                str(self.log_path),
                "-w",
                "-t",
                str(int(timeout)),
                "start",
                check=False,
                timeout=timeout + 30,
            )
            if result.returncode != 0:
                tail = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
                raise RuntimeError(f"pg_ctl start failed: {result.stderr.strip()}\n{tail}")
        self._ensure_database()

    def _psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bindir / "psql"), "-X", "-q", "-tA", "-h", "127.0.0.1", "-p", str(self.port)]
            + ["-U", self.user, "-d", database, "-v", "ON_ERROR_STOP=1", "-c", sql],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _ensure_database(self) -> None:
        if self.database == "postgres":
            return
        if not self._psql(f"SELECT 1 FROM pg_database WHERE datname = '{self.database}'"):
            self._psql(f"CREATE DATABASE {self.database}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server. ``immediate`` is a crash as far as clients and recovery are concerned."""
        if not self.running():
            return
        result = self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "-w", "stop", check=False)
        if result.returncode != 0 and self.running():
            raise RuntimeError(f"pg_ctl stop failed: {result.stderr.strip()}")

    def restart(self, mode: str = "fast", down_s: float = 0.0) -> None:
        self.stop(mode)
        time.sleep(down_s)
        self.start()

    def create_schema(self, name: str) -> str:
        """A fresh, empty schema; returns the store URL whose connections work inside it."""
        self._psql(f"CREATE SCHEMA {name}", self.database)
        return f"{self.url}?search_path={name}"

    def drop_schema(self, name: str) -> None:
        self._psql(f"DROP SCHEMA IF EXISTS {name} CASCADE", self.database)

    def wipe(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.data_dir, ignore_errors=True)
        self.log_path.unlink(missing_ok=True)


# -- Kafka ---------------------------------------------------------------------------------------------


class PrivateKafka:
    """A second single-node broker, via ``scripts/kafka.sh`` with its own ports and data dir."""

    def __init__(self, port: int = 19192, controller_port: int = 19193, data_dir: str = ".run/kafka-chaos"):
        if port == 9092:
            raise ValueError("port 9092 is the shared broker; a private broker needs another port")
        self.port = port
        self.controller_port = controller_port
        self.data_dir = data_dir
        self.bootstrap = f"127.0.0.1:{port}"
        if not shutil.which("java"):
            raise ToolMissing("java not found: apt-get install openjdk-17-jre-headless")

    def _script(self, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
        env = dict(
            os.environ,
            KAFKA_PORT=str(self.port),
            KAFKA_CONTROLLER_PORT=str(self.controller_port),
            KAFKA_DATA_DIR=self.data_dir,
        )
        return subprocess.run(
            ["bash", str(ROOT / "scripts" / "kafka.sh"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def running(self) -> bool:
        return self._script("status", timeout=60).returncode == 0

    def start(self) -> None:
        result = self._script("start")
        if result.returncode != 0:
            raise RuntimeError(f"kafka.sh start failed:\n{result.stdout}{result.stderr}"[-3000:])

    def stop(self, *, wipe: bool = False) -> None:
        result = self._script("stop", *(["--wipe"] if wipe else []))
        if result.returncode != 0:
            raise RuntimeError(f"kafka.sh stop failed:\n{result.stdout}{result.stderr}"[-3000:])


# -- sandbox -------------------------------------------------------------------------------------------


class SandboxProcess(testing.SandboxProcess):
    """``python -m sandbox`` on a free port; admin calls over HTTP."""

    def __init__(
        self, run_dir: Path, api_key: str, *, seed: int | None = None, profile: str = "ietf", **faults: Any
    ) -> None:
        self.run_dir = run_dir
        self.api_key = api_key
        env = clean_env()
        args = ["--seed", str(seed)] if seed is not None else []
        args += ["--profile", profile]
        super().__init__(run_dir / "sandbox.log", api_key, *args, env=env)
        if faults:
            self.faults(**faults)


# -- the daemon ----------------------------------------------------------------------------------------


class DaemonProcess:
    """One ``python -m consumer run``; the same log file across restarts of the same instance."""

    def __init__(self, env: Mapping[str, str], log_path: Path, cwd: Path = ROOT) -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd  # the tree the daemon runs from (a mutated copy in `chaos.py --mutant`)
        self.starts = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self._log_offset = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "consumer", "run"],
                env=self.env,
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                cwd=self.cwd,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def current_log(self) -> str:
        """The log of the current (latest) start only."""
        with open(self.log_path, "rb") as fh:
            fh.seek(self._log_offset)
            return fh.read().decode(errors="replace")

    def started(self) -> bool:
        return "consumer started" in self.current_log()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM once it runs (a signal during interpreter start-up kills it outright); its exit code."""
        assert self.proc is not None
        deadline = time.monotonic() + 30
        while self.proc.poll() is None and not self.started() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return -9
