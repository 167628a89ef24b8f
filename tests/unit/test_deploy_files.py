"""deploy/prometheus-alerts.yml and deploy/grafana-dashboard.json parse, have the shape Prometheus
and Grafana load, name the alerts the operator relies on, and reference only metrics syncd exports
(promtool is run too when it is on PATH)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from syncd.metrics import ServiceMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
ALERTS = DEPLOY / "prometheus-alerts.yml"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
_METRIC = re.compile(r"\bsyncd_[a-z0-9_]+\b")


def exported() -> set[str]:
    """Every series name /metrics can show: family names and their samples' suffixes."""
    m = ServiceMetrics({"contacts": 60, "deals": 300}, daily_budgets={"hubspot": 1, "salesforce": 1})
    names: set[str] = set()
    for fam in m.registry.collect():
        names.add(fam.name)
        suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                    "gauge": ()}.get(fam.type, ())
        names.update(fam.name + s for s in suffixes)
        names.update(s.name for s in fam.samples)
    return names


def _exprs_of_alerts() -> list[tuple[str, str]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [(r["alert"], r["expr"]) for g in doc["groups"] for r in g["rules"]]


def test_alert_rules_have_the_shape_prometheus_loads() -> None:
    doc = yaml.safe_load(ALERTS.read_text())
    assert set(doc) == {"groups"}
    for group in doc["groups"]:
        assert group["name"] and group["rules"]
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, rule
            assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", rule["alert"])
            assert isinstance(rule["expr"], str) and rule["expr"].strip()
            assert re.fullmatch(r"\d+[smhd]", rule.get("for", "0s"))
            assert rule["labels"]["severity"] in ("warning", "critical")
            assert rule["annotations"]["summary"]
            assert rule["expr"].count("(") == rule["expr"].count(")"), rule["alert"]


def test_the_alerts_the_operator_relies_on_exist() -> None:
    names = {a for a, _ in _exprs_of_alerts()}
    for wanted in ("SyncdNoSuccessfulCycle", "SyncdPartialCycles", "SyncdAuthFailing", "SyncdBudgetNearCap",
                   "SyncdOutboxGrowing", "SyncdQuarantineGrowing", "SyncdSlaBreachesOpen"):
        assert wanted in names


def test_every_metric_the_alerts_and_the_dashboard_name_is_exported() -> None:
    known = exported()
    exprs = [e for _, e in _exprs_of_alerts()]
    dash = json.loads(DASHBOARD.read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in _METRIC.findall(e)}
    assert used, "no syncd metric referenced"
    assert sorted(used - known) == [], f"not exported by syncd/metrics.py: {sorted(used - known)}"


def test_auth_alerts_read_the_auth_metrics_not_the_generic_back_off() -> None:
    """Backed off is not auth failing (a spent budget backs off too): the alert reads syncd_auth_failing,
    and refused grants warn before the token in use runs out; the dashboard shows both."""
    exprs = dict(_exprs_of_alerts())
    assert _METRIC.findall(exprs["SyncdAuthFailing"]) == ["syncd_auth_failing"]
    assert "syncd_auth_grants_total" in exprs["SyncdAuthRenewalRefused"]
    assert 'outcome="refused"' in exprs["SyncdAuthRenewalRefused"]
    dash = json.loads(DASHBOARD.read_text())
    shown = {m for p in dash["panels"] for t in p["targets"] for m in _METRIC.findall(t["expr"])}
    assert {"syncd_auth_failing", "syncd_auth_grants_total"} <= shown


def test_dashboard_has_the_shape_grafana_imports() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["type"] in ("timeseries", "stat", "gauge", "table") and p["targets"]
        assert {"x", "y", "w", "h"} <= set(p["gridPos"])
        assert all(t["refId"] and t["expr"] for t in p["targets"])


def test_the_rules_unit_tests_cover_the_alerts_the_operator_relies_on() -> None:
    doc = yaml.safe_load((DEPLOY / "prometheus-alerts.test.yml").read_text())
    assert doc["rule_files"] == [ALERTS.name]
    tested = {t["alertname"] for case in doc["tests"] for t in case["alert_rule_test"]}
    assert {"SyncdNoSuccessfulCycle", "SyncdPartialCycles", "SyncdAuthFailing", "SyncdAuthRenewalRefused",
            "SyncdBudgetNearCap", "SyncdOutboxGrowing", "SyncdQuarantineGrowing", "SyncdSlaBreachesOpen"} <= tested
    known = exported()
    series = {re.sub(r"\{.*", "", i["series"]).strip("'") for case in doc["tests"] for i in case["input_series"]}
    assert sorted(series - known) == []


# promtool comes with Debian's prometheus package; .ci/run unpacks it (no service) when it can.
@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (the parse tests run)")
@pytest.mark.parametrize("args", [("check", "rules", ALERTS.name), ("test", "rules", "prometheus-alerts.test.yml")])
def test_promtool_accepts_the_rules_and_their_unit_tests(args: tuple[str, ...]) -> None:
    r = subprocess.run(["promtool", *args], cwd=DEPLOY, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
