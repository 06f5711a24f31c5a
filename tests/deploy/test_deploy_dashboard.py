"""The Grafana dashboard: generated JSON in sync, every query parses (promtool) and references only metrics that
exist (vLLM's loggers.py, the plugin's metrics module), and the panels the SREs asked for are there.

Whether every query also returns data against a real Prometheus scraping `vllm serve` with the plugin is the
live end-to-end test's job (it needs the backend)."""
from __future__ import annotations

import sys

import pytest

from deploytools import (DEPLOY, dashboard, dashboard_targets, known_metric_names, metric_names, promtool_parse,
                         run, substitute_grafana_vars)


def test_json_is_generated_from_build_dashboard():
    r = run([sys.executable, str(DEPLOY / "grafana/build_dashboard.py"), "--check"])
    assert r.returncode == 0, r.stderr


def test_every_query_parses(tmp_path):
    targets = dashboard_targets(dashboard())
    assert len(targets) >= 15
    exprs = {f"{t}#{i}": substitute_grafana_vars(e) for i, (t, e) in enumerate(targets)}
    r = promtool_parse(exprs, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in r.stdout


def test_every_query_references_only_existing_metrics():
    known = known_metric_names()
    for title, expr in dashboard_targets(dashboard()):
        names = metric_names(substitute_grafana_vars(expr))
        assert names, f"{title}: no metric in {expr}"
        unknown = names - known
        assert not unknown, f"panel {title!r}: unknown metrics {unknown}"


def test_template_variable_queries_reference_existing_metrics():
    for v in dashboard()["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            inner = q[q.index("(") + 1:q.index(",")]
            assert inner in known_metric_names(), q


@pytest.mark.parametrize("expr,bad", [
    ("sum(rate(vllm:gpu_prefix_cache_hits_total[5m]))", "vllm:gpu_prefix_cache_hits_total"),   # v0 name
    ("vllm_kv_cache_usage_perc", "vllm_kv_cache_usage_perc"),                                 # escaped name
    ("sum(hybridkv:kv_blocks_saved)", "hybridkv:kv_blocks_saved"),
    ("rate(vllm:time_to_first_token_seconds[5m])", "vllm:time_to_first_token_seconds"),       # no _bucket
])
def test_metric_check_catches_drift(expr, bad):
    assert bad in metric_names(expr) - known_metric_names()


def test_metric_extraction_ignores_functions_labels_and_keywords():
    e = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket'
         '{model_name=~"a|b", engine!="x"}[5m] offset 1h))) > on (model_name) group_left (engine) 2 * '
         'max without (pod) (hybridkv:configured_budget) and vllm:num_requests_waiting > bool 1e3')
    assert metric_names(e) == {"vllm:time_to_first_token_seconds_bucket", "hybridkv:configured_budget",
                               "vllm:num_requests_waiting"}


def panels(dash):
    return [p for p in dash["panels"] if p["type"] != "row"]


def find(dash, needle):
    hits = [p for p in panels(dash) if any(needle in t["expr"] for t in p.get("targets", []))]
    assert hits, f"no panel queries {needle}"
    return hits


def test_required_panels_are_there():
    d = dashboard()
    for needle in ("hybridkv:kv_blocks_held", "hybridkv:kv_blocks_uncompressed", "hybridkv:kv_block_bytes",
                   "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                   "vllm:time_to_first_token_seconds_bucket", "vllm:request_time_per_output_token_seconds_bucket",
                   "hybridkv:retrieval_chunk_loads_total", "hybridkv:retrieval_swap_in_bytes_total",
                   "hybridkv:requests_bypassed_total", "hybridkv:requests_compressed_total",
                   "hybridkv:compression_time_seconds_bucket", "hybridkv:tokens_kept_total",
                   "hybridkv:profile_info"):
        find(d, needle)
    # memory saved (bytes) and the ratio are stat panels at the top
    top = [p for p in panels(d) if p["gridPos"]["y"] <= 1]
    assert any(p["fieldConfig"]["defaults"]["unit"] == "bytes" for p in top)
    assert any("/" in p["targets"][0]["expr"] and "kv_blocks_held" in p["targets"][0]["expr"] for p in top)


def test_ttft_and_tpot_side_by_side():
    d = dashboard()
    ttft = find(d, "vllm:time_to_first_token_seconds_bucket")[0]["gridPos"]
    tpot = find(d, "vllm:request_time_per_output_token_seconds_bucket")[0]["gridPos"]
    assert ttft["y"] == tpot["y"] and ttft["h"] == tpot["h"]
    assert abs(ttft["x"] - tpot["x"]) == ttft["w"]


def test_layout_has_no_overlapping_panels():
    cells = set()
    for p in dashboard()["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"panel {p['title']!r} overlaps another at {(x, y)}"
                cells.add((x, y))


def test_every_panel_uses_the_datasource_variable_and_model_filter():
    d = dashboard()
    assert any(v["name"] == "datasource" and v["type"] == "datasource" for v in d["templating"]["list"])
    for p in panels(d):
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            assert 'model_name=~"$model_name"' in t["expr"], (p["title"], t["expr"])
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
