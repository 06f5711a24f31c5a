"""Live end-to-end check of the dashboard and the plugin's metrics (issue 6): a real Prometheus scraping a real
`vllm serve --attention-backend HYBRIDKV` on the CPU build.

One server start (the cpu-demo Deployment's `vllm serve` command, args and env as the kubelet runs them, with
only the model path, the profile's ConfigMap mount, host and port moved to this machine: deploytools.
served_as_deployed; the shipped smollm2-vl profile, budget 0.1; no PROMETHEUS_MULTIPROC_DIR) and one Prometheus
(Debian's 2.42 binary from scripts/setup_deploy_tools.sh, deploy/prometheus/prometheus-local.yml with a 1 s scrape
interval and the committed rules), both on 127.0.0.1 only. The requests, sent through the `openai` client:

  * two chat requests with an image and text (~310 prompt tokens: compressed at min_prompt_tokens 256), run
    concurrently, one of them streamed with the server's /metrics sampled while it decodes;
  * one short text request (< 256 tokens: bypassed, reason short_prompt);
  * one long text request (~1500 tokens of the GPL-3 text), streamed; while it decodes, the instant T at which
    every check below is evaluated is taken from Prometheus itself (a sample with a request running and compressed
    blocks held), so no check depends on how the gauges look once the engine is idle.

Then every dashboard query (Grafana variables as in tests/deploy/deploytools.py: $__rate_interval = 1m) goes
through /api/v1/query at T and must parse and return at least one finite sample; only ALLOW_NO_DATA may be empty.
The plugin's counters and gauges must have moved (compressed > 0, bypassed{short_prompt} > 0, held < uncompressed),
the rules must load and evaluate without error, and deploy/grafana/render_preview.py must draw the dashboard from
the same Prometheus (set HYBRIDKV_DASHBOARD_PNG=deploy/grafana/dashboard_live.png to keep the picture; that is how
the committed one was made, see deploy/README.md).

Bounded: 300 s for the server to become healthy, 120 s per request, 60 s for Prometheus; both processes are
stopped (process group SIGTERM, then SIGKILL) at the end whatever happens.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
import yaml

from deploytools import (DEPLOY, ROOT, dashboard, dashboard_targets, render, served_as_deployed,
                         substitute_grafana_vars, tool)

pytestmark = [pytest.mark.engine, pytest.mark.timeout(600)]

MODEL_NAME = "smollm2-vl"
BUDGET = 0.1
SERVER_START_S = 300
REQUEST_S = 120
PROM_START_S = 60
GPL = Path("/usr/share/common-licenses/GPL-3")

#: Dashboard queries allowed to return no data in this test, {(panel title, expr substring): reason}. Keep empty
#: unless a query truly cannot have data on a CPU box (e.g. a GPU exporter metric). Currently nothing.
ALLOW_NO_DATA: dict[tuple[str, str], str] = {}


# ---------------------------------------------------------------------------------------------------------------
# processes
# ---------------------------------------------------------------------------------------------------------------
def _stop(proc: subprocess.Popen | None, grace: float = 30) -> None:
    from hybridkv_vllm.serving import stop
    stop(proc, grace)


def _tail(path: Path, n: int = 40) -> str:
    from hybridkv_vllm.serving import tail
    return tail(path, n)


class Prom:
    """Minimal client for Prometheus's HTTP API."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def get(self, path: str, **params) -> dict:
        q = urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{q}", timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:        # 400/422: a PromQL error, with Prometheus's message
            return json.loads(e.read())

    def query(self, expr: str, at: float | None = None) -> dict:
        params = {"query": expr}
        if at is not None:
            params["time"] = f"{at:.3f}"
        return self.get("/api/v1/query", **params)

    def values(self, expr: str, at: float | None = None) -> list[float]:
        r = self.query(expr, at)
        assert r.get("status") == "success", f"{expr}: {r}"
        data = r["data"]
        if data["resultType"] == "scalar":
            return [float(data["result"][1])]
        return [float(s["value"][1]) for s in data["result"]]


def _prometheus_config(tmp: Path, target_port: int) -> Path:
    """The committed loopback config (relabelling included) with a 1 s scrape and absolute rule paths."""
    cfg = yaml.safe_load((DEPLOY / "prometheus/prometheus-local.yml").read_text())
    cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    cfg["rule_files"] = [str((DEPLOY / "prometheus" / f).resolve()) for f in cfg["rule_files"]]
    (job,) = cfg["scrape_configs"]
    job["static_configs"][0]["targets"] = [f"127.0.0.1:{target_port}"]
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------------------------
# requests
# ---------------------------------------------------------------------------------------------------------------
def _client(port: int, retries: int = 0):
    from openai import OpenAI

    return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=REQUEST_S, max_retries=retries)


def _image_messages():
    from hybridkv_vllm.demo import QUESTION
    from hybridkv_vllm.serving import image_data_url

    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}},
                                         {"type": "text", "text": QUESTION}]}]


def _long_text(tokenizer_dir: Path, tokens: int = 1500) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tok(GPL.read_text())["input_ids"][:tokens]
    return tok.decode(ids) + "\n\nSummarise the license above in one sentence."


def _stream(client, sample_at: int | None = None, port: int | None = None, stop: threading.Event | None = None,
            on_token=None, **kw) -> dict:
    """Stream one chat completion; optionally sample /metrics after `sample_at` chunks and stop when `stop` is
    set (closing the stream aborts the request server-side)."""
    from hybridkv_vllm.serving import metrics as read_metrics

    out = {"text": "", "usage": None, "sample": None, "chunks": 0}
    stream = client.chat.completions.create(model=MODEL_NAME, stream=True, temperature=0,
                                            stream_options={"include_usage": True}, **kw)
    try:
        for chunk in stream:
            out["chunks"] += 1
            if chunk.choices and chunk.choices[0].delta.content:
                out["text"] += chunk.choices[0].delta.content
                if on_token is not None:
                    on_token()
            if chunk.usage is not None:
                out["usage"] = chunk.usage
            if sample_at is not None and out["chunks"] == sample_at:
                out["sample"] = read_metrics(port)
            if stop is not None and stop.is_set():
                break
    finally:
        stream.close()
    return out


# ---------------------------------------------------------------------------------------------------------------
# the live run (one server, one Prometheus, for every test in this module)
# ---------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    from hybridkv_vllm.serving import DEFAULT_MODEL, DEFAULT_PROFILE, free_port, wait_healthy, wait_ready
    from hybridkv_vllm.serving import metrics as read_metrics

    if not (DEFAULT_MODEL / "config.json").exists():
        pytest.fail(f"{DEFAULT_MODEL} missing: run `make setup`")
    assert DEFAULT_PROFILE.exists(), f"{DEFAULT_PROFILE} missing"
    assert GPL.exists(), f"{GPL} missing (Debian base-files)"
    tmp = tmp_path_factory.mktemp("live")
    server_log, prom_log = tmp / "server.log", tmp / "prometheus.log"
    port, prom_port = free_port(), free_port()
    # The server as the cpu-demo Deployment starts it (its args and env; model, profile mount, host and port moved
    # to this machine): nothing set for the plugin's metrics, nothing added.
    argv, env = served_as_deployed(render("overlays/cpu-demo"), port, DEFAULT_MODEL, tmp)
    server = prom = None
    ctx: dict = {"tmp": tmp, "port": port, "server_log": server_log, "prom_log": prom_log}
    try:
        # Prometheus first (it starts in a second), so it already scrapes the series at 0 before any request.
        prom_cfg = _prometheus_config(tmp, port)
        r = subprocess.run([tool("promtool"), "check", "config", str(prom_cfg)], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        with open(prom_log, "w") as out:
            prom = subprocess.Popen(
                [tool("prometheus"), f"--config.file={prom_cfg}", f"--web.listen-address=127.0.0.1:{prom_port}",
                 f"--storage.tsdb.path={tmp / 'tsdb'}", "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        api = Prom(f"http://127.0.0.1:{prom_port}")
        ctx["api"] = api
        wait_ready(prom, f"{api.url}/-/ready", prom_log, PROM_START_S, what="prometheus", poll_s=0.5)

        with open(server_log, "w") as out:
            server = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                      cwd=ROOT)
        wait_healthy(server, port, server_log, timeout=SERVER_START_S)
        ctx["idle"] = read_metrics(port)

        # At least two successful scrapes before the first request (counters seen at 0, so rate() sees the rise).
        deadline = time.time() + PROM_START_S
        while not [v for v in api.values('sum_over_time(up{job="hybridkv-vllm"}[5m])') if v >= 2]:
            assert time.time() < deadline, "prometheus did not scrape the server twice:\n" + _tail(prom_log)
            time.sleep(0.5)
        ctx["t_requests"] = time.time()

        client = _client(port)
        # 1+2: two image chats at once, the first streamed with a /metrics sample while it decodes. Two requests
        # with the same new image race in vLLM's multi-modal cache: the frontend may send the second one without
        # the image before the engine holds it, and vLLM answers that request with a retryable HTTP 500 ("P0/P1
        # cache drift", MultiModalCacheMissError), to be resent with the data. Stock `vllm serve` does the same
        # (1 of 12 rounds of this pair, measured on this machine), so these two requests retry as vLLM intends.
        image_client = _client(port, retries=2)
        results: dict = {}

        def image_stream():
            results["image_stream"] = _stream(image_client, sample_at=4, port=port, messages=_image_messages(),
                                              max_tokens=32)

        th = threading.Thread(target=image_stream)
        th.start()
        chat = image_client.chat.completions.create(model=MODEL_NAME, messages=_image_messages(), max_tokens=24,
                                              temperature=0)
        th.join(REQUEST_S)
        assert not th.is_alive(), "streamed image request did not finish"
        ctx["image_usage"] = [chat.usage, results["image_stream"]["usage"]]
        ctx["decode_sample"] = results["image_stream"]["sample"]
        # 3: short text: bypassed (short_prompt).
        short = client.chat.completions.create(model=MODEL_NAME, max_tokens=8, temperature=0,
                                               messages=[{"role": "user", "content": "Say hello."}])
        ctx["short_usage"] = short.usage
        # 4: long text, streamed. While it decodes, take T from Prometheus: a scraped sample with a request running
        # and compressed blocks held. Stop the request once T is found (or after 128 tokens).
        stop, first_token = threading.Event(), threading.Event()

        def long_stream():
            results["long"] = _stream(client, stop=stop, on_token=first_token.set,
                                      messages=[{"role": "user", "content": _long_text(DEFAULT_MODEL)}],
                                      max_tokens=128, extra_body={"ignore_eos": True, "min_tokens": 128})

        th = threading.Thread(target=long_stream)
        th.start()
        probe = ('sum(vllm:num_requests_running{model_name="%s"}) > 0 and on() '
                 'sum(hybridkv:kv_blocks_held{model_name="%s"}) > 0' % (MODEL_NAME, MODEL_NAME))
        t_eval = None
        deadline = time.time() + REQUEST_S
        while th.is_alive() and time.time() < deadline:
            if first_token.is_set():
                now = time.time()
                if api.values(probe, now):
                    t_eval = now
                    ctx["long_sample"] = read_metrics(port)
                    break
            time.sleep(0.25)
        # Keep decoding for a few more scrapes so the preview shows the request, then stop it.
        time.sleep(3)
        stop.set()
        th.join(REQUEST_S)
        assert not th.is_alive(), "long request did not stop"
        assert t_eval is not None, ("no scrape showed a running request holding compressed blocks; long request: "
                                    f"{results.get('long')}\nserver log:\n{_tail(server_log)}")
        ctx["t_eval"] = t_eval
        ctx["long"] = results["long"]
        time.sleep(3)                                 # two more scrapes: the idle state after the last request
        ctx["after"] = read_metrics(port)
        ctx["t_end"] = time.time()
        yield ctx
    finally:
        _stop(server, grace=60)
        _stop(prom)


def _data(api: Prom, expr: str, at: float) -> tuple[str, list]:
    r = api.query(expr, at)
    if r.get("status") != "success":
        return f"error: {r.get('errorType')}: {r.get('error')}", []
    return "", r["data"]["result"]


def _finite(result: list) -> list[float]:
    vals = [float(s["value"][1]) for s in result] if result and isinstance(result[0], dict) else []
    return [v for v in vals if math.isfinite(v)]


def test_every_dashboard_query_returns_data(live):
    api, at = live["api"], live["t_eval"]
    failures, report = [], []
    for title, expr in dashboard_targets(dashboard()):
        q = substitute_grafana_vars(expr)
        err, result = _data(api, q, at)
        vals = _finite(result)
        report.append(f"{title!r}: {len(result)} series {vals[:4]}")
        allowed = [why for (t, sub), why in ALLOW_NO_DATA.items() if t == title and sub in expr]
        assert not err, f"panel {title!r}: {q}\n{err}"            # parse errors are never allowed
        if not vals and not allowed:
            failures.append(f"panel {title!r}: no finite sample for\n  {q}\n  result: {result}")
    print("\n".join(report))
    assert not failures, "\n".join(failures) + "\nserver log:\n" + _tail(live["server_log"], 15)


def test_template_variable_values(live):
    """The dashboard's `model_name` variable (label_values(vllm:num_requests_running, model_name)) lists the model."""
    api = live["api"]
    for v in dashboard()["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        metric, label = (s.strip() for s in q[q.index("(") + 1:q.rindex(")")].split(","))
        r = api.get(f"/api/v1/label/{label}/values", **{"match[]": metric})
        assert r["status"] == "success" and MODEL_NAME in r["data"], (q, r)


def test_plugin_metrics_moved(live):
    api, at = live["api"], live["t_eval"]
    sel = f'{{model_name="{MODEL_NAME}"}}'
    image_prompt = [u.prompt_tokens for u in live["image_usage"]]
    assert all(256 <= p < 1024 for p in image_prompt), image_prompt          # compressed at min_prompt_tokens 256
    assert live["short_usage"].prompt_tokens < 256, live["short_usage"]       # bypassed
    long_prompt = live["long"]["usage"].prompt_tokens if live["long"]["usage"] else None
    assert long_prompt is None or long_prompt > 1000, long_prompt

    def one(expr: str, when: float = at) -> float:
        vals = api.values(expr, when)
        assert len(vals) == 1, f"{expr}: {vals}"
        return vals[0]

    def run_max(expr: str) -> float:
        # The maximum over the whole run, evaluated at its end: a subquery evaluated at T itself steps on whole
        # seconds and can miss the one scrape between the last whole second and T.
        window = math.ceil(live["t_end"] - live["t_requests"]) + 5
        return one(f"max_over_time(({expr})[{window}s:1s])", live["t_end"])

    # Counters, from Prometheus at T: the two image prompts and the long prompt compressed, the short one bypassed.
    assert one(f"sum(hybridkv:requests_compressed_total{sel})") >= 3
    assert one(f'sum(hybridkv:requests_bypassed_total{{model_name="{MODEL_NAME}",reason="short_prompt"}})') >= 1
    assert one(f'sum(hybridkv:requests_bypassed_total{{model_name="{MODEL_NAME}",reason!="short_prompt"}})') == 0
    kept = one(f"sum(hybridkv:tokens_kept_total{sel})")
    total = one(f"sum(hybridkv:tokens_uncompressed_total{sel})")
    assert 0 < kept < total, (kept, total)
    assert one(f'sum(hybridkv:tokens_uncompressed_total{{model_name="{MODEL_NAME}",head_type="static"}})') > 0
    assert one(f"sum(hybridkv:compression_time_seconds_count{sel})") >= 1
    assert one(f"max(hybridkv:configured_budget{sel})") == pytest.approx(BUDGET)
    assert one(f'count(hybridkv:profile_info{{model_name="{MODEL_NAME}",budget="{BUDGET!r}"}} == 1)') == 1
    # Blocks saved > 0: at T (a request running) and as the series' maximum over the run.
    held = one(f"sum(hybridkv:kv_blocks_held{sel})")
    full = one(f"sum(hybridkv:kv_blocks_uncompressed{sel})")
    assert 0 < held < full, (held, full)
    assert run_max(f"sum(hybridkv:kv_blocks_uncompressed{sel}) - sum(hybridkv:kv_blocks_held{sel})") > 0
    assert one(f"sum(hybridkv:kv_block_bytes{sel})") > 0
    # And straight from the server's /metrics while the streamed image request decoded.
    s = live["decode_sample"]
    assert s is not None and 0 < s["hybridkv:kv_blocks_held"] < s["hybridkv:kv_blocks_uncompressed"], s
    # Retrieval on the dynamic heads during the long request's decode.
    assert one(f"sum(hybridkv:retrieval_chunks_scored_total{sel})") > 0
    assert one(f"sum(hybridkv:retrieval_chunk_loads_total{sel})") > 0
    assert one(f"sum(hybridkv:retrieval_swap_in_bytes_total{sel})") > 0
    # The dynamic heads' prompts sat in the cold tier while requests ran.
    assert run_max(f"sum(hybridkv:cold_tier_bytes{sel})") > 0
    # vLLM's own view agrees: requests ran, KV usage was non-zero.
    assert run_max(f"sum(vllm:kv_cache_usage_perc{sel})") > 0
    assert one(f"sum(vllm:request_success_total{sel})") >= 3
    # Idle at the end (the long request was stopped): vLLM's own gauges say so.
    assert live["after"]["vllm:num_requests_running"] == 0, live["after"]
    assert live["after"]["vllm:kv_cache_usage_perc"] == 0, live["after"]


def test_block_gauges_return_to_zero_when_idle(live):
    """Once the last request has finished, the gauges say nothing is held (not the last batch's figures), in the
    pool or in the cold tier."""
    after = live["after"]
    assert after["hybridkv:kv_blocks_held"] == 0 and after["hybridkv:kv_blocks_uncompressed"] == 0, after
    assert after["hybridkv:cold_tier_bytes"] == 0, after                  # every cold entry was released


def test_rules_load_and_evaluate(live):
    """The committed rules load into the live Prometheus and evaluate without error; none fires on a healthy run."""
    r = live["api"].get("/api/v1/rules")
    assert r["status"] == "success", r
    groups = {g["name"]: g for g in r["data"]["groups"]}
    assert {"hybridkv-vllm.recording", "hybridkv-vllm.alerts"} <= set(groups), list(groups)
    for g in groups.values():
        for rule in g["rules"]:
            assert rule["health"] in ("ok", "unknown"), (rule["name"], rule.get("lastError"))
            if rule["type"] == "alerting":
                assert rule["state"] != "firing", rule["name"]


def test_render_preview_png(live):
    """deploy/grafana/render_preview.py draws every panel from the live Prometheus into one PNG."""
    out = Path(os.environ.get("HYBRIDKV_DASHBOARD_PNG") or live["tmp"] / "dashboard_live.png")
    if not out.is_absolute():
        out = ROOT / out
    cmd = [sys.executable, str(DEPLOY / "grafana/render_preview.py"), "--prometheus", live["api"].url,
           "--out", str(out), "--start", f"{live['t_requests'] - 10:.0f}", "--end", f"{live['t_end']:.0f}",
           "--step", "1s", "--rate-interval", "15s"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "no data" not in r.stdout, r.stdout
    print(r.stdout)
