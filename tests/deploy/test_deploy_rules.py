"""Prometheus rules: promtool check + unit tests, the PrometheusRule CR in sync with the rule file, and every
metric a rule reads exists in vLLM's loggers.py or the plugin's metrics module."""
from __future__ import annotations

import yaml

from deploytools import DEPLOY, known_metric_names, metric_names, run, tool

RULES = DEPLOY / "prometheus/hybridkv-rules.yaml"
RULE_TESTS = DEPLOY / "prometheus/tests/hybridkv-rules.test.yaml"


def test_promtool_check_rules():
    r = run([tool("promtool"), "check", "rules", str(RULES)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_promtool_test_rules():
    r = run([tool("promtool"), "test", "rules", str(RULE_TESTS)], cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_alert_has_a_unit_test_that_fires_it():
    rules = yaml.safe_load(RULES.read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    fired = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if a.get("exp_alerts")}
    quiet = {a["alertname"] for t in tests for a in t.get("alert_rule_test", []) if not a.get("exp_alerts")}
    assert alerts == fired, f"alerts without a firing test: {alerts - fired}"
    assert {"VLLMKVCacheNearlyFull", "HybridKVCompressionBelowBudget", "HybridKVUnexpectedBypass",
            "HybridKVPrefillCompressionSlow"} <= alerts
    assert len(quiet) >= 3, "alerts need not-yet/not-firing cases too"
    for g in rules["groups"]:
        for r in g["rules"]:
            if "alert" in r:
                assert r["labels"]["severity"] in ("info", "warning", "critical")
                assert r["annotations"]["summary"] and r["annotations"]["description"]


def test_rules_read_only_existing_metrics():
    rules = yaml.safe_load(RULES.read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    known = known_metric_names() | recorded
    for g in rules["groups"]:
        for r in g["rules"]:
            unknown = metric_names(r["expr"]) - known
            assert not unknown, f"{r.get('alert') or r.get('record')}: unknown metrics {unknown}"


def test_prometheusrule_cr_is_in_sync():
    r = run(["python3", str(DEPLOY / "prometheus/build_prometheusrule.py"), "--check"])
    if r.returncode != 0 and "No module named 'yaml'" in r.stderr:   # system python without PyYAML
        import sys
        r = run([sys.executable, str(DEPLOY / "prometheus/build_prometheusrule.py"), "--check"])
    assert r.returncode == 0, r.stderr
    cr = yaml.safe_load((DEPLOY / "prometheus/prometheusrule.yaml").read_text())
    assert cr["spec"] == yaml.safe_load(RULES.read_text())


def test_local_prometheus_config_for_the_live_check():
    cfg = DEPLOY / "prometheus/prometheus-local.yml"
    r = run([tool("promtool"), "check", "config", str(cfg)])
    assert r.returncode == 0, r.stdout + r.stderr
    assert yaml.safe_load(cfg.read_text())["rule_files"] == ["hybridkv-rules.yaml"]
