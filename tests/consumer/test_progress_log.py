"""The lines for people: "caught up" once per idle period, the run summary, quiet text logs."""

from __future__ import annotations

import logging
import uuid

import anyio
import pytest
from aiokafka.errors import GroupCoordinatorNotAvailableError, NodeNotReadyError

from consumer import logs
from consumer.daemon import Daemon
from consumer.pipeline import Disposition, Stats
from consumer.progress_log import CaughtUp, run_summary
from tests.consumer.conftest import Sandbox, publish, wait_committed_to_end
from tests.consumer.test_exactly_once import make_envelopes, settings_for


def stats(consumed: int, **by: int) -> Stats:
    s = Stats(consumed=consumed)
    for name, n in by.items():
        s.by_disposition[Disposition(name).value] = n
    return s


def test_caught_up_is_said_once_per_idle_period(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "consumer.daemon")
    c = CaughtUp(idle_s=1.0)
    busy = stats(3, completed=2)
    assert not c.observe(3, busy, now=100.0)
    assert not c.observe(0, busy, now=101.5)  # empty fetch, but one message still running: not caught up
    done = stats(3, completed=2, duplicate=1)
    assert c.observe(0, done, now=101.6)
    assert not c.observe(0, done, now=102.0) and not c.observe(0, done, now=200.0)  # once per idle period
    assert not c.observe(5, done, now=201.0)  # new requests: a new busy period
    after = stats(8, completed=7, duplicate=1)
    assert not c.observe(0, after, now=201.5)  # one empty poll is not idle yet (a late partition)
    assert c.observe(0, after, now=202.0)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "caught up: 3 processed, waiting for new requests",
        "caught up: 8 processed, waiting for new requests",
    ]


def test_run_summary_is_one_line_for_people() -> None:
    assert run_summary(stats(10, completed=8, duplicate=2)) == (
        "10 received → 8 verified, 2 duplicates skipped, 0 dead letters"
    )
    assert run_summary(stats(4, completed=1, failed=1, duplicate=1, invalid=1)) == (
        "4 received → 1 verified, 1 refused by the provider, 1 duplicate skipped, 1 dead letter"
    )
    assert run_summary(stats(5, completed=2, set_aside=1)) == (
        "5 received → 2 verified, 0 duplicates skipped, 1 dead letter, 2 left for the next run"
    )


def _record(name: str, level: int, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_text_logs_are_quiet_and_first_start_coordinator_error_is_debug() -> None:
    root = logging.getLogger()
    saved = root.handlers[:], root.level, logging.getLogger("aiokafka").level
    try:
        logs.configure("INFO", "text")
        assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.WARNING
        logs.configure("INFO", "json")
        assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.INFO
        logs.configure("DEBUG", "text")
        assert logging.getLogger("aiokafka").getEffectiveLevel() == logging.INFO
        logs.configure("INFO", "text")
    finally:
        root.handlers[:], lvl, aio = saved
        root.setLevel(lvl)
        logging.getLogger("aiokafka").setLevel(aio)

    f = logs.FirstStartNoise(window_s=60)
    name, msg = "aiokafka.consumer.group_coordinator", "Group Coordinator Request failed: %s"
    first = _record(name, logging.ERROR, msg, GroupCoordinatorNotAvailableError())
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    try:
        assert f.filter(first) is False and first.levelname == "DEBUG"
        logging.getLogger("aiokafka").setLevel(logging.DEBUG)
        again = _record(name, logging.ERROR, msg, GroupCoordinatorNotAvailableError())
        assert f.filter(again) is True and again.levelno == logging.DEBUG  # shown at DEBUG when asked for
    finally:
        logging.getLogger("aiokafka").setLevel(aio)
    dead = _record(name, logging.WARNING, "Marking the coordinator dead (node %s)for group %s.", 1, "g")
    assert f.filter(dead) is False and dead.levelno == logging.DEBUG
    other = _record(name, logging.ERROR, msg, NodeNotReadyError())
    assert f.filter(other) is True and other.levelno == logging.ERROR  # other errors unchanged
    late = logs.FirstStartNoise(window_s=0)
    after = _record(name, logging.ERROR, msg, GroupCoordinatorNotAvailableError())
    assert late.filter(after) is True and after.levelno == logging.ERROR  # later on it is a real error


def test_text_format_prints_the_human_line_instead_of_dicts() -> None:
    rec = _record("consumer.daemon", logging.INFO, "stopped cleanly")
    rec.stats = {"completed": 8}  # type: ignore[attr-defined]
    rec.consumed = 10  # type: ignore[attr-defined]
    rec._text = "stopped cleanly: 10 received → 8 verified"  # type: ignore[attr-defined]
    line = logs.TextFormatter().format(rec)
    assert line.endswith("consumer.daemon: stopped cleanly: 10 received → 8 verified")
    assert "{" not in line
    js = logs.JsonFormatter().format(rec)
    assert '"msg":"stopped cleanly"' in js and '"consumed":10' in js and "_text" not in js


@pytest.mark.anyio
@pytest.mark.kafka
async def test_daemon_says_caught_up_once_while_idle(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "consumer.daemon")
    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    envs = make_envelopes(4, seed=91)
    await publish(kafka_bootstrap, topic, [*envs, envs[0]])
    group = "g-" + uuid.uuid4().hex[:6]
    daemon = Daemon(settings_for(kafka_bootstrap, topic, group, sqlite_url, sb.url))

    def caught_up() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("caught up")]

    async with anyio.create_task_group() as tg:
        tg.start_soon(daemon.run)
        await wait_committed_to_end(kafka_bootstrap, group, topic, 90)
        with anyio.fail_after(30):
            while not caught_up():
                await anyio.sleep(0.1)
        await anyio.sleep(2.0)  # several more empty fetches
        daemon.stop()
    assert caught_up() == ["caught up: 5 processed, waiting for new requests"]
    stopped = [r for r in caplog.records if r.getMessage() == "stopped cleanly"]
    assert len(stopped) == 1
    assert stopped[0]._text == (  # type: ignore[attr-defined]
        "stopped cleanly: 5 received → 4 verified, 1 duplicate skipped, 0 dead letters"
    )
