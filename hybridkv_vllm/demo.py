"""``make demo``: serve the embedded real-weight model with HybridKV and answer a chat request with an image.

Starts ``vllm serve models/smollm2-vl --attention-backend HYBRIDKV`` with the shipped head profile, sends an
OpenAI chat request (an image from scikit-image's sample data plus a question) through the ``openai`` client,
prints the answer and the KV memory the request holds (read from the server's own ``/metrics`` while it
decodes) against what stock vLLM would hold for the same tokens, then stops the server.

The vision tower of the embedded model is random (no real VLM ships in an installable package), so the answer
shows the plumbing, not image understanding; the language model is the real SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "smollm2-vl"
DEFAULT_PROFILE = ROOT / "configs" / "profiles" / "smollm2-vl.json"
QUESTION = ("Here is a picture. Question: what is the capital of France, and why is it famous? "
            "Answer in two sentences.")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: Path, profile: Path, budget: float, port: int, name: str) -> list[str]:
    config = {"hybridkv": {"profile": str(profile), "budget": budget}}
    return [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", str(model), "--host", "127.0.0.1",
            "--port", str(port), "--served-model-name", name, "--attention-backend", "HYBRIDKV",
            "--additional-config", json.dumps(config), "--block-size", "32", "--no-enable-prefix-caching",
            "--enforce-eager", "--max-model-len", "4096", "--max-num-seqs", "4", "--dtype", "bfloat16",
            "--limit-mm-per-prompt", json.dumps({"image": 1, "video": 0})]


def wait_healthy(proc: subprocess.Popen, port: int, log: Path, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vllm serve exited with {proc.returncode}; last log lines:\n" + tail(log))
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit("vllm serve did not become healthy in time; last log lines:\n" + tail(log))


def tail(log: Path, n: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def image_data_url() -> str:
    from PIL import Image
    from skimage import data
    buf = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def read_metrics(port: int) -> dict[str, float]:
    """Sum each sample name over its label sets (one model, one engine here)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+([-+0-9.eE]+|NaN)$", line)
        if m:
            values[m.group(1)] = values.get(m.group(1), 0.0) + float(m.group(3))
    return values


def chat(port: int, name: str, max_tokens: int) -> tuple[str, dict[str, float], object]:
    """Stream one chat request; sample /metrics mid-decode, while the request holds its KV."""
    from openai import OpenAI
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    stream = client.chat.completions.create(
        model=name, max_tokens=max_tokens, temperature=0, stream=True, stream_options={"include_usage": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image_data_url()}},
                                               {"type": "text", "text": QUESTION}]}])
    parts, sample, usage = [], {}, None
    for i, chunk in enumerate(stream):
        if chunk.choices and chunk.choices[0].delta.content:
            parts.append(chunk.choices[0].delta.content)
        if i == 3:                        # a few tokens in: the prompt has been compressed
            sample = read_metrics(port)
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), sample, usage


def report(answer: str, sample: dict[str, float], usage) -> None:
    held = sample.get("hybridkv:kv_blocks_held", 0.0)
    full = sample.get("hybridkv:kv_blocks_uncompressed", 0.0)
    block = sample.get("hybridkv:kv_block_bytes", 0.0)
    print("\n=== answer ===\n" + answer.strip())
    if usage is not None:
        print(f"\n(prompt tokens {usage.prompt_tokens}, completion tokens {usage.completion_tokens})")
    print("\n=== KV memory of this request, mid-decode (from the server's /metrics) ===")
    if full:
        print(f"HybridKV holds     {held:8.0f} blocks = {held * block / 2**20:7.2f} MiB")
        print(f"stock vLLM holds   {full:8.0f} blocks = {full * block / 2**20:7.2f} MiB (same tokens, no compression)")
        print(f"ratio              {held / full:8.3f}   (saved {(full - held) * block / 2**20:.2f} MiB of the pool)")
        cold = sample.get("hybridkv:cold_tier_bytes", 0.0)
        print(f"cold tier          {cold / 2**20:8.2f} MiB of dynamic-head prompt KV outside the pool "
              "(host memory on GPU machines)")
    elif "hybridkv:kv_blocks_held" not in sample:
        print("no hybridkv metrics on /metrics (see the server log for a `hybridkv:` warning)")
    else:
        print("the request was not compressed (prompt shorter than min_prompt_tokens?)")
    usage_perc = sample.get("vllm:kv_cache_usage_perc")
    if usage_perc is not None:
        print(f"vllm:kv_cache_usage_perc = {usage_perc:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    parser.add_argument("--budget", type=float, default=0.1)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args(argv)
    port, name = free_port(), args.model.name
    workdir = Path(tempfile.mkdtemp(prefix="hybridkv-demo-"))
    log = workdir / "server.log"
    # No PROMETHEUS_MULTIPROC_DIR: the plugin turns multiprocess mode on itself in `vllm serve` (a fresh directory).
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")     # GiB of KV cache on the CPU build
    cmd = serve_command(args.model, args.profile, args.budget, port, name)
    print("$ " + " ".join(cmd[2:]).replace("vllm.entrypoints.cli.main", "vllm"), flush=True)
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        started = time.time()
        wait_healthy(proc, port, log)
        print(f"server healthy after {time.time() - started:.0f} s (log: {log})", flush=True)
        answer, sample, usage = chat(port, name, args.max_tokens)
        report(answer, sample, usage)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        print("server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
