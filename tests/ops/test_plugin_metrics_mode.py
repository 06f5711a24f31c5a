"""For a server that serves HYBRIDKV (and no other), the plugin turns Prometheus multiprocess mode on in `vllm serve`'s
API-server process although prometheus_client is already imported there (hybridkv_vllm/adapter/plugin.py
`_share_metrics_across_processes`), and leaves it off when a metric already exists. Each case runs in a fresh
interpreter, as the `vllm` CLI does: prometheus_client is imported first, then the plugin's hook runs. The end-to-end
check is tests/engine/test_metrics_plain_serve.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

CASE = textwrap.dedent("""
    import json, os, sys
    import prometheus_client
    from prometheus_client import values
    sys.argv = [sys.argv[1], sys.argv[2], "MODEL"] + sys.argv[3:]
    if {pre_existing!r}:
        prometheus_client.Counter("early", "created before the plugin loads")
    from hybridkv_vllm.adapter import plugin
    plugin._share_metrics_across_processes()
    d = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    c = prometheus_client.Counter("after_plugin", "created after the plugin loads")
    c.inc()
    from vllm.v1.metrics.prometheus import shutdown_prometheus
    shutdown_prometheus()                     # what vLLM's server runs as it stops (must log no ERROR)
    print(json.dumps({{"dir": d, "multiprocess": values.ValueClass is not values.MutexValue,
                       "files": sorted(os.listdir(d)) if d else []}}))
""")


HYBRIDKV_ARGS = ("--attention-backend", "HYBRIDKV")


def _run(argv0: str, subcommand: str = "serve", pre_existing: bool = False, args=HYBRIDKV_ARGS) -> dict:
    env = {k: v for k, v in os.environ.items() if k.upper() != "PROMETHEUS_MULTIPROC_DIR"}
    r = subprocess.run([sys.executable, "-c", CASE.format(pre_existing=pre_existing), argv0, subcommand, *args],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["stderr"], out["stdout"] = r.stderr, r.stdout
    return out


@pytest.mark.parametrize("argv0", ["/usr/local/bin/vllm", "/opt/venv/lib/python3/site-packages/vllm/entrypoints/"
                                                           "cli/main.py"])
def test_switches_to_multiprocess_mode_after_prometheus_client_import(argv0):
    out = _run(argv0)
    assert out["multiprocess"], out
    assert out["dir"] and out["files"] and all(f.startswith("counter_") for f in out["files"]), out
    assert not os.path.exists(out["dir"]), "the temporary directory is removed at exit"
    assert "Error during metrics cleanup" not in out["stdout"] + out["stderr"], out["stdout"][-2000:]


@pytest.mark.parametrize("args", [("--attention-backend=HYBRIDKV",), ("--attention-config", '{"backend": "HYBRIDKV"}')])
def test_every_spelling_of_the_backend_counts(args):
    assert _run("vllm", args=args)["multiprocess"]


def test_a_stock_server_is_left_as_it_was():
    """The plugin is installed, the server does not ask for HYBRIDKV: nothing changes."""
    out = _run("vllm", args=("--attention-backend", "FLASH_ATTN"))
    assert not out["multiprocess"] and out["dir"] is None, out


def test_leaves_mode_alone_when_a_metric_already_exists():
    out = _run("vllm", pre_existing=True)
    assert not out["multiprocess"] and out["dir"] is None, out
    assert "set PROMETHEUS_MULTIPROC_DIR" in out["stderr"] and "early" in out["stderr"], out["stderr"][-2000:]


@pytest.mark.parametrize("subcommand", ["chat", "bench"])
def test_not_in_other_commands(subcommand):
    out = _run("vllm", subcommand)
    assert not out["multiprocess"] and out["dir"] is None, out
