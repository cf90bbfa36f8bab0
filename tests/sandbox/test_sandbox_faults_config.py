from __future__ import annotations

import pytest

from sandbox import FaultAction, FaultConfig, FaultInjector, SandboxConfigError, parse_script_item


@pytest.mark.parametrize(
    ("item", "kind", "action", "status", "retry_after", "delay_s"),
    [
        ("500", "script:500", FaultAction.RESPOND, 500, None, 0.0),
        (" 503 ", "script:503", FaultAction.RESPOND, 503, None, 0.0),
        ("429", "script:429", FaultAction.RESPOND, 429, None, 0.0),
        ("429:2", "script:429", FaultAction.RESPOND, 429, 2, 0.0),
        ("drop", "script:drop", FaultAction.DROP_AFTER, 0, None, 0.0),
        ("DROP_BEFORE", "script:drop_before", FaultAction.DROP_BEFORE, 0, None, 0.0),
        ("delay:250", "script:delay", FaultAction.DELAY, 0, None, 0.25),
    ],
)
def test_parse_script_item(
    item: str, kind: str, action: FaultAction, status: int, retry_after: int | None, delay_s: float
) -> None:
    fault = parse_script_item(item)
    assert fault is not None
    assert (fault.kind, fault.action, fault.status, fault.retry_after_s, fault.delay_s) == (
        kind,
        action,
        status,
        retry_after,
        delay_s,
    )


def test_ok_is_no_fault() -> None:
    assert parse_script_item("ok") is None
    assert parse_script_item("OK") is None


@pytest.mark.parametrize(
    "item", ["", "404", "200", "600", "500:1", "429:0", "429:x", "delay", "delay:-1", "boom"]
)
def test_bad_script_items(item: str) -> None:
    with pytest.raises(SandboxConfigError):
        parse_script_item(item)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"error_rate": 1.5},
        {"rate_429": -0.1},
        {"drop_after_effect_rate": 2.0},
        {"latency_ms": -1.0},
        {"latency_jitter_ms": -1.0},
        {"retry_after_s": 0},
        {"script": ("500", "nope")},
    ],
)
def test_config_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(SandboxConfigError):
        FaultConfig(**kwargs)  # type: ignore[arg-type]


def test_script_accepts_comma_separated_text() -> None:
    config = FaultConfig(script="500, 500,ok")  # type: ignore[arg-type]
    assert config.script == ("500", "500", "ok")


def test_merged_checks_json_types() -> None:
    base = FaultConfig(latency_ms=5.0)
    merged = base.merged({"error_rate": 1, "script": ["drop"], "seed": 3, "retry_after_s": 4})
    assert merged == FaultConfig(latency_ms=5.0, error_rate=1.0, script=("drop",), seed=3, retry_after_s=4)
    for bad in (
        {"nope": 1},
        {"error_rate": "0.5"},
        {"error_rate": True},
        {"seed": 1.5},
        {"retry_after_s": 1.5},
        {"script": [1]},
        {"script": {"a": "b"}},
    ):
        with pytest.raises(SandboxConfigError):
            base.merged(bad)


def test_to_dict_round_trips() -> None:
    config = FaultConfig(latency_ms=1.0, script=("500",), seed=9)
    assert FaultConfig().merged(config.to_dict()) == config


def test_script_is_consumed_in_order_before_random_rolls() -> None:
    injector = FaultInjector(FaultConfig(error_rate=1.0, script=("500", "ok", "429:7")))
    first = injector.next_fault()
    assert first is not None
    assert first.kind == "script:500"
    assert injector.config.script == ("ok", "429:7")
    assert injector.next_fault() is None  # "ok" also suppresses the random error rate
    third = injector.next_fault()
    assert third is not None
    assert third.retry_after_s == 7
    fourth = injector.next_fault()
    assert fourth is not None
    assert fourth.kind == "random:500"


def test_random_rolls_are_reproducible_with_a_seed() -> None:
    def kinds(seed: int) -> list[str | None]:
        injector = FaultInjector(
            FaultConfig(error_rate=0.3, rate_429=0.3, drop_after_effect_rate=0.3, seed=seed)
        )
        return [f.kind if (f := injector.next_fault()) else None for _ in range(200)]

    assert kinds(42) == kinds(42)
    assert kinds(42) != kinds(43)
    assert set(kinds(42)) == {None, "random:500", "random:429", "random:drop"}


def test_update_merges_and_replaces_the_script() -> None:
    injector = FaultInjector(FaultConfig(latency_ms=10.0, script=("500", "500")))
    injector.next_fault()
    assert injector.update({"error_rate": 0.5}).script == ("500",)
    config = injector.update({"script": "drop,ok"})
    assert config.script == ("drop", "ok")
    assert config.latency_ms == 10.0
    assert config.error_rate == 0.5
    injector.reset()
    assert injector.config == FaultConfig()


def test_failed_update_changes_nothing() -> None:
    injector = FaultInjector(FaultConfig(script=("500",)))
    with pytest.raises(SandboxConfigError):
        injector.update({"error_rate": 0.5, "script": ["bad"]})
    assert injector.config == FaultConfig(script=("500",))


def test_latency_with_jitter_stays_in_range() -> None:
    injector = FaultInjector(FaultConfig(latency_ms=100.0, latency_jitter_ms=50.0, seed=1))
    samples = [injector.latency_s() for _ in range(100)]
    assert all(0.1 <= s <= 0.15 for s in samples)
    assert len(set(samples)) > 1
    assert FaultInjector().latency_s() == 0.0
