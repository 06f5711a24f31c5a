#!/usr/bin/env python3
"""Write deploy/grafana/hybridkv-vllm.json, the Grafana dashboard for HybridKV on vLLM.

The JSON is committed; this script is its source (tests/deploy checks that the two agree):
    python deploy/grafana/build_dashboard.py            # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the committed JSON is stale

Every query uses only vLLM's own metric names (vllm/v1/metrics/loggers.py, `vllm:` prefix) and the plugin's
(hybridkv_vllm/adapter/metrics.py, `hybridkv:` prefix); tests/deploy/test_dashboard.py enforces that.
Standard library only, so it runs anywhere.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).with_name("hybridkv-vllm.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
M = 'model_name=~"$model_name"'
RI = "$__rate_interval"

_next_id = [0]


def _id() -> int:
    _next_id[0] += 1
    return _next_id[0]


def target(expr: str, legend: str, ref: str, instant: bool = False, fmt: str = "time_series") -> dict:
    t = {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref, "range": not instant,
         "instant": instant}
    if fmt != "time_series":
        t["format"] = fmt
    return t


def timeseries(title: str, desc: str, targets: list[dict], unit: str, x: int, y: int, w: int, h: int = 8,
               overrides: list[dict] | None = None, stack: bool = False) -> dict:
    return {
        "id": _id(), "type": "timeseries", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {
            "defaults": {
                "unit": unit,
                "custom": {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                           "stacking": {"mode": "normal" if stack else "none", "group": "A"}},
            },
            "overrides": overrides or [],
        },
        "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
        "targets": targets,
    }


def stat(title: str, desc: str, expr: str, unit: str, x: int, y: int, w: int = 6, h: int = 4,
         decimals: int | None = None) -> dict:
    defaults: dict = {"unit": unit, "color": {"mode": "thresholds"},
                      "thresholds": {"mode": "absolute", "steps": [{"color": "blue", "value": None}]}}
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "id": _id(), "type": "stat", "title": title, "description": desc, "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                    "colorMode": "value", "graphMode": "area", "textMode": "auto", "justifyMode": "auto"},
        "targets": [target(expr, "", "A")],
    }


def row(title: str, y: int) -> dict:
    return {"id": _id(), "type": "row", "title": title, "collapsed": False, "panels": [],
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1}}


def quantiles(metric: str, what: str) -> list[dict]:
    return [
        target(f"histogram_quantile({q}, sum by (le, model_name) (rate({metric}_bucket{{{M}}}[{RI}])))",
               f"p{int(q * 100)} {what} {{{{model_name}}}}", chr(ord("A") + i))
        for i, q in enumerate((0.5, 0.95, 0.99))
    ]


def right_axis(name_regex: str, unit: str) -> dict:
    return {"matcher": {"id": "byRegexp", "options": name_regex},
            "properties": [{"id": "unit", "value": unit}, {"id": "custom.axisPlacement", "value": "right"}]}


def build() -> dict:
    _next_id[0] = 0
    saved_bytes = (f"(hybridkv:kv_blocks_uncompressed{{{M}}} - hybridkv:kv_blocks_held{{{M}}})"
                   f" * hybridkv:kv_block_bytes{{{M}}}")
    panels = [
        row("HybridKV: memory", 0),
        stat("KV memory saved", "Bytes of KV cache the compressed requests do not hold right now: "
             "(uncompressed - held blocks) x bytes per block, summed over replicas.",
             f"sum({saved_bytes})", "bytes", 0, 1),
        stat("KV compression ratio", "Blocks the compressed requests would hold without HybridKV / blocks they "
             "hold (vLLM's pool only; the dynamic heads' cold tier is not in it). About 1/budget is ideal.",
             f"sum(hybridkv:kv_blocks_uncompressed{{{M}}}) / (sum(hybridkv:kv_blocks_held{{{M}}}) > 0)",
             "none", 6, 1, decimals=2),
        stat("Static-head KV kept (5m)", "Share of the static heads' KV entries (head x token) kept at "
             "compression over the last 5 minutes; compare with the configured budget (the floor of blocks each "
             "head keeps raises it for short prompts). Dynamic heads keep a hot buffer of the same kind in the "
             "pool and their prompt in the cold tier: see 'KV entries kept by head type vs budget'.",
             f"sum(rate(hybridkv:tokens_kept_total{{{M},head_type=\"static\"}}[5m])) / "
             f"sum(rate(hybridkv:tokens_uncompressed_total{{{M},head_type=\"static\"}}[5m]))", "percentunit", 12, 1,
             decimals=1),
        stat("Configured budget", "hybridkv:configured_budget (from --additional-config).",
             f"max(hybridkv:configured_budget{{{M}}})", "percentunit", 18, 1, decimals=1),
        timeseries("KV blocks: held vs uncompressed",
                   "Blocks held by compressed requests and what the same requests would hold without HybridKV.",
                   [target(f"sum by (model_name) (hybridkv:kv_blocks_held{{{M}}})", "held {{model_name}}", "A"),
                    target(f"sum by (model_name) (hybridkv:kv_blocks_uncompressed{{{M}}})",
                           "uncompressed {{model_name}}", "B")],
                   "short", 0, 5, 12),
        timeseries("KV memory saved", "Bytes of vLLM's KV-cache pool saved, per model, and the bytes the dynamic "
                   "heads' prompts occupy in the cold tier instead (host memory on GPU machines).",
                   [target(f"sum by (model_name) ({saved_bytes})", "saved in pool {{model_name}}", "A"),
                    target(f"sum by (model_name) (hybridkv:cold_tier_bytes{{{M}}})", "cold tier {{model_name}}",
                           "B")], "bytes", 12, 5, 12),
        row("vLLM: load and KV cache", 13),
        timeseries("Concurrency", "vLLM's scheduler: requests running and waiting (the autoscaling signal).",
                   [target(f"sum by (model_name) (vllm:num_requests_running{{{M}}})", "running {{model_name}}",
                           "A"),
                    target(f"sum by (model_name) (vllm:num_requests_waiting{{{M}}})", "waiting {{model_name}}",
                           "B")],
                   "short", 0, 14, 8),
        timeseries("KV cache usage", "vllm:kv_cache_usage_perc per replica (1 = full). HybridKV frees pruned "
                   "blocks, so more requests fit before this reaches 1.",
                   [target(f"max by (model_name, instance) (vllm:kv_cache_usage_perc{{{M}}})",
                           "{{model_name}} {{instance}}", "A")],
                   "percentunit", 8, 14, 8),
        timeseries("KV entries kept by head type vs budget",
                   "Kept / uncompressed KV entries at compression, per head type, against the configured budget.",
                   [target(f"sum by (head_type) (rate(hybridkv:tokens_kept_total{{{M}}}[{RI}])) / "
                           f"sum by (head_type) (rate(hybridkv:tokens_uncompressed_total{{{M}}}[{RI}]))",
                           "kept {{head_type}}", "A"),
                    target(f"max(hybridkv:configured_budget{{{M}}})", "budget", "B")],
                   "percentunit", 16, 14, 8),
        row("Latency: stock vLLM histograms", 22),
        timeseries("Time to first token (TTFT)", "vllm:time_to_first_token_seconds quantiles.",
                   quantiles("vllm:time_to_first_token_seconds", "TTFT"), "s", 0, 23, 12),
        timeseries("Time per output token (TPOT)", "vllm:request_time_per_output_token_seconds quantiles.",
                   quantiles("vllm:request_time_per_output_token_seconds", "TPOT"), "s", 12, 23, 12),
        row("HybridKV: cost", 31),
        timeseries("Requests compressed vs bypassed",
                   "Requests per second whose KV was compressed, and those served uncompressed by reason "
                   "(short_prompt, full_budget and opt_out are expected; cold_tier_full, error, unsupported and "
                   "other are alerted on).",
                   [target(f"sum(rate(hybridkv:requests_compressed_total{{{M}}}[{RI}]))", "compressed", "A"),
                    target(f"sum by (reason) (rate(hybridkv:requests_bypassed_total{{{M}}}[{RI}]))",
                           "bypassed: {{reason}}", "B")],
                   "reqps", 0, 32, 8, stack=True),
        timeseries("Retrieval traffic", "Dynamic-head retrieval: chunks loaded and candidate chunks scored per "
                   "second, and bytes swapped in per second (right axis).",
                   [target(f"sum by (model_name) (rate(hybridkv:retrieval_chunk_loads_total{{{M}}}[{RI}]))",
                           "chunk loads {{model_name}}", "A"),
                    target(f"sum by (model_name) (rate(hybridkv:retrieval_chunks_scored_total{{{M}}}[{RI}]))",
                           "chunks scored {{model_name}}", "C"),
                    target(f"sum by (model_name) (rate(hybridkv:retrieval_swap_in_bytes_total{{{M}}}[{RI}]))",
                           "swap-in {{model_name}}", "B")],
                   "short", 8, 32, 8, overrides=[right_axis("swap-in.*", "Bps")]),
        timeseries("Prefill: compression time vs vLLM prefill time",
                   "p95 of HybridKV's compression at prefill next to vLLM's p95 prefill time.",
                   [target(f"histogram_quantile(0.95, sum by (le) "
                           f"(rate(hybridkv:compression_time_seconds_bucket{{{M}}}[{RI}])))",
                           "p95 compression", "A"),
                    target(f"histogram_quantile(0.95, sum by (le) "
                           f"(rate(vllm:request_prefill_time_seconds_bucket{{{M}}}[{RI}])))",
                           "p95 vLLM prefill", "B")],
                   "s", 16, 32, 8),
        {
            "id": _id(), "type": "table", "title": "Head profile in use",
            "description": "hybridkv:profile_info: profile model, version, fingerprint and budget per engine.",
            "datasource": DS, "gridPos": {"x": 0, "y": 40, "w": 24, "h": 5},
            "fieldConfig": {"defaults": {}, "overrides": []},
            "options": {"showHeader": True},
            "transformations": [{"id": "organize", "options": {
                "excludeByName": {"Time": True, "Value": True, "__name__": True}}}],
            "targets": [target(f"max by (model_name, engine, instance, profile_model, profile_version, "
                               f"profile_fingerprint, budget) (hybridkv:profile_info{{{M}}})", "", "A",
                               instant=True, fmt="table")],
        },
    ]
    return {
        "title": "HybridKV on vLLM",
        "uid": "hybridkv-vllm",
        "description": "KV memory saved by HybridKV, its cost (retrieval, prefill) and stock vLLM load/latency.",
        "tags": ["vllm", "hybridkv", "kv-cache"],
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-1h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "annotations": {"list": []},
        "links": [],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": []},
            {"name": "model_name", "label": "Model", "type": "query", "datasource": DS,
             "query": {"query": "label_values(vllm:num_requests_running, model_name)", "refId": "model_name"},
             "definition": "label_values(vllm:num_requests_running, model_name)",
             "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*", "current": {}, "hide": 0,
             "options": [], "regex": "", "sort": 1},
        ]},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2, sort_keys=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/build_dashboard.py",
                  file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
