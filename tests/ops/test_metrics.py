"""hybridkv_vllm.adapter.metrics: names, types, labels and values, with prometheus_client's own registry."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from hybridkv_vllm.adapter import metrics as M

MODEL = "smollm2-vl"


@pytest.fixture()
def reg():
    M.reset_for_tests()
    r = CollectorRegistry()
    M.configure(model_name=MODEL, engine=0, registry=r)
    yield r
    M.reset_for_tests()


def val(reg, name, **labels):
    labels = {"model_name": MODEL, "engine": "0", **labels}
    v = reg.get_sample_value(name, labels)
    return 0.0 if v is None else v


def test_names_are_vllm_style_and_unique():
    names = [s.name for s in M.METRICS]
    assert len(names) == len(set(names))
    for s in M.METRICS:
        assert s.name.startswith("hybridkv:"), s.name
        assert s.labels[:2] == ("model_name", "engine"), s.name
        assert not (s.type == "counter" and s.name.endswith("_total")), s.name
        # bounded labels only
        assert set(s.labels) <= {"model_name", "engine", "head_type", "reason", *M.PROFILE_INFO_LABELS}
        for bad in ("request_id", "req_id", "prompt", "user"):
            assert bad not in s.labels


def test_families_types_and_help_in_exposition(reg):
    text = generate_latest(reg).decode()
    for s in M.METRICS:
        exposed = s.name + "_total" if s.type == "counter" else s.name  # text format 0.0.4
        assert f"# TYPE {exposed} {s.type}" in text, s.name
        assert f"# HELP {exposed} " in text
    # vLLM's /metrics keeps the colon in the text format
    assert "hybridkv_" not in text


def test_bounded_series_exist_at_zero_after_configure(reg):
    for h in M.HEAD_TYPES:
        assert reg.get_sample_value("hybridkv:tokens_kept_total",
                                    {"model_name": MODEL, "engine": "0", "head_type": h}) == 0.0
    for r in M.BYPASS_REASONS:
        assert reg.get_sample_value("hybridkv:requests_bypassed_total",
                                    {"model_name": MODEL, "engine": "0", "reason": r}) == 0.0


def test_record_compression_moves_counters_and_histogram(reg):
    M.record_compression({"static": 100, "dynamic": 300}, {"static": 1000, "dynamic": 1000}, seconds=0.003)
    M.record_compression({"static": 50}, {"static": 500}, seconds=0.2)
    assert val(reg, "hybridkv:tokens_kept_total", head_type="static") == 150
    assert val(reg, "hybridkv:tokens_kept_total", head_type="dynamic") == 300
    assert val(reg, "hybridkv:tokens_uncompressed_total", head_type="static") == 1500
    assert val(reg, "hybridkv:tokens_uncompressed_total", head_type="dynamic") == 1000
    assert val(reg, "hybridkv:requests_compressed_total") == 2
    assert val(reg, "hybridkv:compression_time_seconds_count") == 2
    assert val(reg, "hybridkv:compression_time_seconds_sum") == pytest.approx(0.203)
    assert val(reg, "hybridkv:compression_time_seconds_bucket", le="0.005") == 1
    assert val(reg, "hybridkv:compression_time_seconds_bucket", le="0.25") == 2
    assert val(reg, "hybridkv:compression_time_seconds_bucket", le="+Inf") == 2


def test_record_compression_rejects_unknown_head_type(reg):
    with pytest.raises(ValueError, match="head_type"):
        M.record_compression({"visual": 1}, {})


def test_record_bypass_bounded_reason(reg):
    M.record_bypass("short_prompt")
    M.record_bypass("short_prompt", requests=2)
    M.record_bypass("error")
    M.record_bypass("req-1234-some-unbounded-string")  # must not create a new series
    assert val(reg, "hybridkv:requests_bypassed_total", reason="short_prompt") == 3
    assert val(reg, "hybridkv:requests_bypassed_total", reason="error") == 1
    assert val(reg, "hybridkv:requests_bypassed_total", reason="other") == 1
    assert "req-1234" not in generate_latest(reg).decode()


def test_set_blocks_gauges_give_savings_and_ratio(reg):
    M.set_blocks(held=40, uncompressed=400, block_bytes=16 * 64 * 2 * 2)
    assert val(reg, "hybridkv:kv_blocks_held") == 40
    assert val(reg, "hybridkv:kv_blocks_uncompressed") == 400
    saved = (val(reg, "hybridkv:kv_blocks_uncompressed") - val(reg, "hybridkv:kv_blocks_held")) \
        * val(reg, "hybridkv:kv_block_bytes")
    assert saved == 360 * 4096
    M.set_blocks(held=10, uncompressed=20)  # gauges go down too; block_bytes kept
    assert val(reg, "hybridkv:kv_blocks_held") == 10
    assert val(reg, "hybridkv:kv_blocks_uncompressed") == 20
    assert val(reg, "hybridkv:kv_block_bytes") == 4096


def test_negative_values_are_ignored_not_raised(reg):
    M.set_blocks(held=-1, uncompressed=float("nan"))
    M.record_retrieval(chunk_loads=-5)
    assert val(reg, "hybridkv:kv_blocks_held") == 0
    assert val(reg, "hybridkv:retrieval_chunk_loads_total") == 0


def test_record_retrieval(reg):
    M.record_retrieval(chunk_loads=8, swap_in_bytes=8 * 4096)
    M.record_retrieval(2)
    M.record_retrieval(3, 12)          # positional (selected, total), as the backend calls it
    assert val(reg, "hybridkv:retrieval_chunk_loads_total") == 13
    assert val(reg, "hybridkv:retrieval_chunks_scored_total") == 12
    assert val(reg, "hybridkv:retrieval_swap_in_bytes_total") == 32768


def test_profile_info_and_budget(reg):
    M.set_profile_info("Qwen2_5_VLForConditionalGeneration", 1, 0.1, "sha256:ab")
    labels = dict(profile_model="Qwen2_5_VLForConditionalGeneration", profile_version="1",
                  profile_fingerprint="sha256:ab", budget="0.1")
    assert val(reg, "hybridkv:profile_info", **labels) == 1
    assert val(reg, "hybridkv:configured_budget") == 0.1
    # a new profile replaces the old info series instead of adding a second one at 1
    M.set_profile_info("Qwen2_5_VLForConditionalGeneration", 1, 0.2, "sha256:ab")
    assert reg.get_sample_value("hybridkv:profile_info", {"model_name": MODEL, "engine": "0", **labels}) is None
    assert val(reg, "hybridkv:profile_info", **{**labels, "budget": "0.2"}) == 1
    assert val(reg, "hybridkv:configured_budget") == 0.2


def test_rebind_labels_and_engines_are_separate_series(reg):
    M.record_bypass("error")
    M.configure(model_name=MODEL, engine=1)
    M.record_bypass("error")
    M.record_bypass("error")
    assert val(reg, "hybridkv:requests_bypassed_total", reason="error") == 1
    assert val(reg, "hybridkv:requests_bypassed_total", reason="error", engine="1") == 2


def test_configure_twice_does_not_duplicate_registration(reg):
    M.configure(model_name=MODEL, engine=0)
    M.configure(model_name=MODEL, engine=0)
    M.record_retrieval(1)
    assert val(reg, "hybridkv:retrieval_chunk_loads_total") == 1


def test_gauges_have_a_multiprocess_mode():
    m = M.HybridKVMetrics(registry=CollectorRegistry())
    for spec in M.METRICS:
        if spec.type == "gauge":
            assert m.families[spec.name]._multiprocess_mode in ("mostrecent", "livemostrecent", "livesum", "max")


def test_safe_without_multiprocess_dir(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    M.reset_for_tests()
    try:
        M.configure(registry=CollectorRegistry())
        M.record_bypass("short_prompt")
        M.set_blocks(1, 2)
        M.record_compression({"static": 1}, {"static": 2}, seconds=0.01)
        M.record_retrieval(1, 1)
        assert M.multiprocess_enabled() is False
    finally:
        M.reset_for_tests()


def test_multiprocess_values_reach_the_collector(tmp_path):
    """A child process records with PROMETHEUS_MULTIPROC_DIR set (as vLLM's engine core does); the parent reads
    them through MultiProcessCollector, as vLLM's get_prometheus_registry() does for /metrics."""
    code = textwrap.dedent("""
        from hybridkv_vllm.adapter import metrics as M
        assert M.multiprocess_enabled()
        M.configure(model_name="m", engine=0)
        M.set_profile_info("Arch", 1, 0.1)
        M.set_blocks(held=30, uncompressed=300, block_bytes=1024)
        M.record_compression({"static": 10, "dynamic": 90}, {"static": 100, "dynamic": 100}, seconds=0.01)
        M.record_bypass("short_prompt")
        M.record_retrieval(4, 16, swap_in_bytes=4096)
    """)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    reg = CollectorRegistry()
    MultiProcessCollector(reg, path=str(tmp_path))
    base = {"model_name": "m", "engine": "0"}
    assert reg.get_sample_value("hybridkv:kv_blocks_held", base) == 30
    assert reg.get_sample_value("hybridkv:kv_blocks_uncompressed", base) == 300
    assert reg.get_sample_value("hybridkv:configured_budget", base) == 0.1
    assert reg.get_sample_value("hybridkv:requests_compressed_total", base) == 1
    assert reg.get_sample_value("hybridkv:tokens_kept_total", {**base, "head_type": "dynamic"}) == 90
    assert reg.get_sample_value("hybridkv:requests_bypassed_total", {**base, "reason": "short_prompt"}) == 1
    assert reg.get_sample_value("hybridkv:retrieval_swap_in_bytes_total", base) == 4096
    assert reg.get_sample_value("hybridkv:retrieval_chunks_scored_total", base) == 16
    assert reg.get_sample_value("hybridkv:compression_time_seconds_count", base) == 1
    info = {**base, "profile_model": "Arch", "profile_version": "1", "profile_fingerprint": "", "budget": "0.1"}
    assert reg.get_sample_value("hybridkv:profile_info", info) == 1


def test_exposed_names():
    names = M.exposed_metric_names()
    assert "hybridkv:requests_bypassed_total" in names
    assert "hybridkv:compression_time_seconds_bucket" in names
    assert "hybridkv:kv_blocks_held" in names
