"""The plugin's metrics reach ``/metrics`` with no extra step: ``vllm serve`` started as the README shows it, with
no ``PROMETHEUS_MULTIPROC_DIR`` in its environment (the plugin turns Prometheus multiprocess mode on itself,
hybridkv_vllm/adapter/plugin.py ``_share_metrics_across_processes``).

The command is the README's line (the ``vllm`` console script, the shipped smollm2-vl profile, budget 0.1) plus only
what a test on a small CPU box needs: a loopback host and free port, a bounded context and KV cache, eager mode and
bf16. One chat request with a prompt over ``min_prompt_tokens`` (256) must then show up in
``hybridkv:requests_compressed_total``. Bounded: 400 s to become healthy, 180 s for the request, and the server's
process group is stopped (SIGTERM, then SIGKILL) whatever happens.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hybridkv_vllm.adapter import metrics as M
from hybridkv_vllm.serving import free_port, metric_families, stop, tail, wait_healthy

pytestmark = [pytest.mark.engine, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
MODEL = "models/smollm2-vl"                          # relative to ROOT, as in the README / `make demo`
PROFILE = "configs/profiles/smollm2-vl.json"
SERVER_START_S = 400
REQUEST_S = 180
COMPRESSED = M.REQUESTS_COMPRESSED                   # the family; its sample is ..._total


def _metrics(port: int) -> dict[str, dict[str, float]]:
    """/metrics as {family: {sample name + labels: value}} (prometheus_client's own text parser)."""
    return {fam.name: {f"{s.name}{sorted(s.labels.items())}": s.value for s in fam.samples}
            for fam in metric_families(port)}


def _compressed(fams: dict[str, dict[str, float]]) -> float:
    return sum(v for k, v in fams.get(COMPRESSED, {}).items() if k.startswith(COMPRESSED + "_total"))


def _chat(port: int, model: str, prompt: str) -> dict:
    body = {"model": model, "max_tokens": 8, "temperature": 0, "messages": [{"role": "user", "content": prompt}]}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=REQUEST_S) as r:
        return json.loads(r.read())


def _long_prompt() -> str:
    lines = [f"Item {i}: the {w} crate holds {i * 7 % 23} parts for order {1000 + i}." for i, w in
             enumerate(["red", "blue", "green", "small", "large", "old", "new", "heavy"] * 8)]
    return "\n".join(lines) + "\nWhich colour is mentioned first? Answer in one word."


def test_readme_serve_line_exposes_plugin_metrics(tmp_path):
    vllm = Path(sys.executable).with_name("vllm")     # the console script: `vllm serve`, as the README writes it
    assert vllm.exists(), f"{vllm} missing"
    if not (ROOT / MODEL / "config.json").exists():
        pytest.fail(f"{MODEL} missing: run `make setup`")
    port = free_port()
    readme = [str(vllm), "serve", MODEL, "--attention-backend", "HYBRIDKV", "--block-size", "32",
              "--no-enable-prefix-caching",
              "--additional-config", json.dumps({"hybridkv": {"profile": PROFILE, "budget": 0.1}})]
    # Only what this box needs: loopback on a free port, a small context, a 1 GiB KV cache (by flag, not by
    # environment), eager mode (no compile), bf16, a few sequences (bounds the cold tier's worst case).
    small_box = ["--host", "127.0.0.1", "--port", str(port), "--max-model-len", "4096", "--max-num-seqs", "4",
                 "--kv-cache-memory-bytes", str(2**30), "--enforce-eager", "--dtype", "bfloat16"]
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(readme + small_box, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        started = time.time()
        wait_healthy(proc, port, log, timeout=SERVER_START_S)
        print(f"healthy after {time.time() - started:.0f} s")
        before = _metrics(port)
        reply = _chat(port, MODEL, _long_prompt())
        assert reply["usage"]["prompt_tokens"] > 256, reply["usage"]      # above min_prompt_tokens: compressed
        after = _metrics(port)

        ours = sorted(f for f in after if f.startswith(M.PREFIX))
        assert ours, ("no hybridkv:* family on /metrics of a plain `vllm serve`; server log:\n" + tail(log, 40))
        assert {s.name for s in M.METRICS} <= set(ours), sorted({s.name for s in M.METRICS} - set(ours))
        assert _compressed(after) > _compressed(before), (COMPRESSED, before.get(COMPRESSED), after.get(COMPRESSED))
        assert "vllm:num_requests_running" in after                        # vLLM's own metrics are still there
        assert "set PROMETHEUS_MULTIPROC_DIR" not in log.read_text(errors="replace")
    finally:
        stop(proc)
