"""Starting a ``vllm serve`` process and reading its Prometheus metrics: the one helper the demo, the tests and the
benchmarks share (none of them imports another's copy).

``serve_command`` builds the command line (HybridKV's settings in ``--additional-config``, or stock vLLM with
``profile=None``); :class:`ServerProcess` starts it with its output in a log file, waits for ``/health`` (failing
with the log's tail if the server exits or never becomes healthy) and stops the whole process group; ``metrics``
reads ``/metrics`` with prometheus_client's own text parser.
"""
from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "smollm2-vl"
DEFAULT_PROFILE = ROOT / "configs" / "profiles" / "smollm2-vl.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, profile: Path | None, budget: float, port: int, name: str,
                  extra: list[str] | None = None, **hybridkv) -> list[str]:
    """``vllm serve`` for this machine (loopback, eager, bf16, a 4k context); ``profile=None``: stock vLLM."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1",
           "--port", str(port), "--served-model-name", name, "--block-size", "32", "--no-enable-prefix-caching",
           "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "4", "--dtype", "bfloat16",
           "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})]
    if profile is not None:
        config = {"hybridkv": {"profile": str(profile), "budget": budget, **hybridkv}}
        cmd += ["--attention-backend", "HYBRIDKV", "--additional-config", json.dumps(config)]
    return cmd + list(extra or [])


def tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float, what: str = "vllm serve",
               poll_s: float = 1.0) -> None:
    """Until ``url`` answers 200; fails with the log's tail if ``proc`` exits or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}; last log lines:\n" + tail(log))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(poll_s)
    raise RuntimeError(f"{what} was not ready in time; last log lines:\n" + tail(log))


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    wait_ready(proc, f"http://127.0.0.1:{port}/health", log, timeout)


def stop(proc: subprocess.Popen | None, grace: float = 60) -> None:
    """Stop a process group started with ``start_new_session`` (SIGTERM, then SIGKILL after ``grace`` seconds)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


class ServerProcess:
    """``with ServerProcess(cmd, log) as server:`` a healthy server on ``server.port``; stopped on exit."""

    def __init__(self, cmd: list[str], log: Path, port: int, env: dict | None = None, cwd: Path | None = None,
                 timeout: float = 600) -> None:
        self.cmd, self.log, self.port, self.env, self.cwd, self.timeout = cmd, log, port, env, cwd, timeout
        self.proc: subprocess.Popen | None = None
        self.started_s = 0.0

    def __enter__(self) -> ServerProcess:
        started = time.time()
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, cwd=self.cwd, start_new_session=True)
        try:
            wait_healthy(self.proc, self.port, self.log, self.timeout)
        except BaseException:
            stop(self.proc)
            raise
        self.started_s = time.time() - started
        return self

    def __exit__(self, *exc) -> None:
        stop(self.proc)

    def metrics(self) -> dict[str, float]:
        return metrics(self.port)


def metric_families(port: int) -> list:
    """``/metrics`` parsed by prometheus_client's text parser."""
    from prometheus_client.parser import text_string_to_metric_families
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return list(text_string_to_metric_families(r.read().decode()))


def metrics(port: int) -> dict[str, float]:
    """Each sample name summed over its label sets (one model and engine per server here)."""
    values: dict[str, float] = {}
    for family in metric_families(port):
        for sample in family.samples:
            values[sample.name] = values.get(sample.name, 0.0) + sample.value
    return values


def image_data_url() -> str:
    """A real photograph (scikit-image's astronaut) as a PNG data URL, for image chat requests."""
    from PIL import Image
    from skimage import data
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
