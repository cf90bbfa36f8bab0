"""The Grafana dashboard and the Prometheus alert rules under docker/ (docs/operations.md, "Dashboards and
alerts").

* ``promtool`` checks the rules and the Prometheus config, runs the alerts' unit tests
  (docker/prometheus/alerts.test.yml) and parses every dashboard expression;
* a real daemon process, after processing requests from the sandbox and one bad record, is scraped: every
  metric named in a dashboard or alert expression must be in that scrape (with samples), and every label
  an expression selects on must be one the metric carries.

Metric names are read out of PromQL by :func:`metric_selectors`, a small tokenizer (strings, label
matchers, ranges and label lists are skipped; identifiers followed by ``(`` are functions). A histogram is
used through its ``_bucket``/``_sum``/``_count`` series, which the scrape lists under those names, so they
match as they are.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import yaml

from tests.conftest import ROOT, free_port, service_missing

DASHBOARD = ROOT / "docker" / "grafana" / "dashboards" / "idv.json"
ALERTS = ROOT / "docker" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "docker" / "prometheus" / "alerts.test.yml"
PROMETHEUS_CONFIG = ROOT / "docker" / "prometheus.yml"

# Metrics used in expressions that the daemon does not export, and why (an explicit list, not a filter).
NOT_FROM_THE_DAEMON = {
    "up": "synthesized by Prometheus for every scrape target (1 = the scrape succeeded)",
}
# Labels every series gets from Prometheus' scrape, not from the daemon.
TARGET_LABELS = {"job", "instance"}

# Grafana's variables, replaced by plain values before promtool parses an expression.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}


# -- PromQL tokenizer ----------------------------------------------------------------------------------

_TOKEN = re.compile(
    r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<matchers>\{(?:"(?:\\.|[^"\\])*"|[^}"])*\})
  | (?P<range>\[[^\]]*\])
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<number>[0-9][0-9.]*(?:[eE][+-]?[0-9]+)?[a-zA-Z]*)
  | (?P<variable>\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*)
  | (?P<other>\S)
    """,
    re.VERBOSE,
)
_LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
_AGGREGATIONS = {
    "sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values", "bottomk", "topk",
    "quantile", "limitk", "limit_ratio",
}  # fmt: skip
_KEYWORDS = {"and", "or", "unless", "offset", "bool", "atan2", "inf", "nan", "start", "end"}
_MATCHER = re.compile(r'([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)\s*"')


def metric_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names in its matchers) for every vector selector in a PromQL expression."""
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    out: list[tuple[str, set[str]]] = []
    i = 0
    while i < len(tokens):
        kind, text = tokens[i]
        nxt = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if kind == "ident" and text in _LABEL_LISTS and nxt == "(":
            depth = 0
            while i < len(tokens):  # skip the parenthesised label list
                depth += {"(": 1, ")": -1}.get(tokens[i][1], 0)
                i += 1
                if depth == 0 and tokens[i - 1][1] == ")":
                    break
            continue
        if kind == "ident" and nxt != "(" and text not in _AGGREGATIONS and text not in _KEYWORDS:
            labels: set[str] = set()
            if i + 1 < len(tokens) and tokens[i + 1][0] == "matchers":
                labels = set(_MATCHER.findall(tokens[i + 1][1]))
            out.append((text, labels))
        i += 1
    return out


def test_tokenizer_finds_metrics_and_skips_everything_else() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le, op) (rate(idv_store_operation_duration_seconds_bucket"
        '{instance=~"$instance", op!="x}y"}[$__rate_interval]))) > 0.25 and on (topic) '
        "max_over_time(idv_circuit_breaker_state[5m] offset 15m) == bool 2 or vector(0) "
        'unless foo:bar_total{reason=~"a|b"} offset 15m'
    )
    assert metric_selectors(expr) == [
        ("idv_store_operation_duration_seconds_bucket", {"instance", "op"}),
        ("idv_circuit_breaker_state", set()),
        ("foo:bar_total", {"reason"}),
    ]
    assert metric_selectors("sum without (instance) (up)") == [("up", set())]
    assert metric_selectors("deriv(sum by (topic) (idv_consumer_lag)[15m:1m]) > 0") == [
        ("idv_consumer_lag", set())
    ]


# -- the expressions -----------------------------------------------------------------------------------


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def dashboard_expressions() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and every query variable."""
    out = [
        (f"panel {panel['title']!r} {target['refId']}", target["expr"])
        for panel in dashboard()["panels"]
        for target in panel.get("targets", ())
    ]
    for var in dashboard()["templating"]["list"]:
        if var["type"] == "query":
            found = re.fullmatch(r"label_values\((.+),\s*([A-Za-z_]\w*)\)", var["definition"])
            assert found, var["definition"]
            out.append((f"variable {var['name']}", found.group(1)))
            out.append((f"variable {var['name']} label", f"count by ({found.group(2)}) ({found.group(1)})"))
    return out


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]
    return [rule for group in groups for rule in group["rules"]]


def alert_expressions() -> list[tuple[str, str]]:
    return [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def grafana_free(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


# -- promtool ------------------------------------------------------------------------------------------


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    if exe is None:
        service_missing("promtool", "apt-get install -y prometheus")
        raise AssertionError("unreachable")
    return subprocess.run([exe, *map(str, args)], capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_checks_the_prometheus_config_with_the_rules_wired_in() -> None:
    result = promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    (rule_file,) = config["rule_files"]
    assert (PROMETHEUS_CONFIG.parent / rule_file).resolve() == ALERTS.resolve()
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    mounts = compose["services"]["prometheus"]["volumes"]
    assert f"./docker/prometheus/alerts.yml:/etc/prometheus/{rule_file}:ro" in mounts


def test_every_dashboard_expression_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each one, as a recording rule (Grafana's variables replaced by plain values)."""
    rules = [
        {"record": f"dashboard:expr_{i}", "expr": grafana_free(e)}
        for i, (_, e) in enumerate(dashboard_expressions())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}), encoding="utf-8")
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_unit_test_severity_and_docs() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", ())
        if case.get("exp_alerts")
    }
    checked_quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", ())
        if not case.get("exp_alerts")
    }
    operations = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    section = operations.split("## Dashboards and alerts", 1)[1].split("\n## ", 1)[0]
    for rule in alert_rules():
        name = rule["alert"]
        assert name in fired, f"{name}: no unit test where it fires"
        assert name in checked_quiet, f"{name}: no unit test where it stays quiet"
        assert rule["labels"]["severity"] in {"page", "warning", "ticket"}
        assert rule["annotations"]["summary"]
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert anchor in heading_anchors(ROOT / page), rule["annotations"]["runbook_url"]
        assert f"`{name}`" in section, f"{name} is not explained in docs/operations.md"


def heading_anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    anchors = set()
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^a-z0-9 _-]", "", title).replace(" ", "-"))
    return anchors


# -- the dashboard file --------------------------------------------------------------------------------


def test_dashboard_is_provisioned_and_well_formed() -> None:
    board = dashboard()
    assert board["uid"] and board["title"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        pos = panel["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
    datasources = yaml.safe_load(
        (ROOT / "docker/grafana/provisioning/datasources/prometheus.yml").read_text(encoding="utf-8")
    )["datasources"]
    (ds,) = datasources
    (var,) = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert var["current"]["value"] == ds["uid"] and ds["type"] == "prometheus"
    assert ds["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (ROOT / "docker/grafana/provisioning/dashboards/idv.yml").read_text(encoding="utf-8")
    )["providers"][0]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    grafana = compose["services"]["grafana"]
    assert grafana["profiles"] == compose["services"]["prometheus"]["profiles"]
    assert f"./docker/grafana/dashboards:{provider['options']['path']}:ro" in grafana["volumes"]
    assert "./docker/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
    # The panels the dashboard promises (docs/operations.md).
    used = {name for _, expr in dashboard_expressions() for name, _ in metric_selectors(expr)}
    from consumer.metrics import METRIC_NAMES

    for name in METRIC_NAMES:
        assert any(u == name or u.startswith(name + "_") for u in used), f"{name} is on no panel"


# -- against a real daemon -----------------------------------------------------------------------------


def parse_scrape(text: str) -> dict[str, set[str]]:
    """Sample name -> label names, from the Prometheus text format (only names with samples)."""
    out: dict[str, set[str]] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        found = re.match(r"([A-Za-z_:][A-Za-z0-9_:]*)(\{[^}]*\})?\s", line)
        assert found, line
        out.setdefault(found.group(1), set()).update(re.findall(r'([A-Za-z_]\w*)="', found.group(2) or ""))
    return out


@pytest.mark.kafka
@pytest.mark.anyio
async def test_every_metric_in_the_dashboard_and_alerts_is_exported_by_a_real_daemon(
    kafka_bootstrap: str, topic: str, sandbox: object, sqlite_url: str, tmp_path: Path
) -> None:
    from producer.envelope import Envelope
    from tests.consumer.conftest import (
        Sandbox,
        daemon_env,
        publish,
        publish_raw,
        start_daemon,
        wait_committed_to_end,
    )

    sb = Sandbox(sandbox.url)  # type: ignore[attr-defined]
    envs = [
        Envelope(
            message_id=f"dash-{i}-{uuid.uuid4().hex[:6]}",
            operation="aml_screening",
            subject_id=f"s{i}",
            request={"full_name": "DECLINE" if i == 0 else "Fine"},
        )
        for i in range(8)
    ]
    await publish(kafka_bootstrap, topic, envs)
    await publish_raw(kafka_bootstrap, topic, [(b"bad", b"not json", [])])  # one dead letter
    group = "g-" + uuid.uuid4().hex[:8]
    port = free_port()
    env = daemon_env(kafka_bootstrap, topic, group, sqlite_url, sb.url, health_port=port)
    proc = start_daemon(env, tmp_path / "daemon.log")
    try:
        await wait_committed_to_end(kafka_bootstrap, group, topic, 60)
        await anyio.sleep(1.5)  # one more commit-loop tick sets the offset and lag gauges
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            response = await client.get("/metrics")
        assert response.status_code == 200
        scrape = parse_scrape(response.text)
    finally:
        proc.terminate()
        proc.wait(30)
        proc.kill()

    problems = []
    for where, expr in [*dashboard_expressions(), *alert_expressions()]:
        for name, labels in metric_selectors(expr):
            if name in NOT_FROM_THE_DAEMON:
                continue
            if name not in scrape:
                problems.append(f"{where}: {name} is not in the daemon's /metrics")
                continue
            unknown = labels - scrape[name] - TARGET_LABELS
            if unknown:
                problems.append(f"{where}: {name} has no label(s) {sorted(unknown)}")
    assert not problems, "\n".join(problems) + "\n\nscrape names: " + ", ".join(sorted(scrape))
    # The exceptions are real exceptions: not exported by the daemon, and used somewhere.
    used = {n for _, e in [*dashboard_expressions(), *alert_expressions()] for n, _ in metric_selectors(e)}
    for name in NOT_FROM_THE_DAEMON:
        assert name not in scrape and name in used


def test_missing_promtool_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under CI a missing promtool is a failure (service_missing), never a skip."""
    monkeypatch.setenv("CI", "1")
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.fail.Exception):
        promtool("--version")
    assert os.environ["CI"] == "1"
