"""``make demo``: serve the embedded real-weight model with HybridKV and answer a chat request with an image.

Starts ``vllm serve models/smollm2-vl --attention-backend HYBRIDKV`` with the shipped head profile, sends an
OpenAI chat request (an image from scikit-image's sample data plus a question) through the ``openai`` client,
prints the answer and the KV memory the request holds (read from the server's own ``/metrics`` while it
decodes): vLLM's pool, the cold tier and their sum, against what stock vLLM would hold for the same tokens, then
stops the server.

The vision tower of the embedded model is random (no real VLM ships in an installable package), so the answer
shows the plumbing, not image understanding; the language model is the real SmolLM2-135M-Instruct.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

from hybridkv_vllm.serving import (DEFAULT_MODEL, DEFAULT_PROFILE, ServerProcess, free_port, image_data_url, metrics,
                                   serve_command)

QUESTION = ("Here is a picture. Question: what is the capital of France, and why is it famous? "
            "Answer in two sentences.")


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
            sample = metrics(port)
        if chunk.usage is not None:
            usage = chunk.usage
    return "".join(parts), sample, usage


def report(answer: str, sample: dict[str, float], usage) -> None:
    held = sample.get("hybridkv:kv_blocks_held", 0.0)
    full = sample.get("hybridkv:kv_blocks_uncompressed", 0.0)
    block = sample.get("hybridkv:kv_block_bytes", 0.0)
    cold = sample.get("hybridkv:cold_tier_bytes", 0.0)
    print("\n=== answer ===\n" + answer.strip())
    if usage is not None:
        print(f"\n(prompt tokens {usage.prompt_tokens}, completion tokens {usage.completion_tokens})")
    print("\n=== KV memory of this request, mid-decode (from the server's /metrics) ===")
    if full:
        mib = 2**20
        pool, stock = held * block / mib, full * block / mib
        print(f"{'':18s}{'pool (vLLM blocks)':>24s}{'cold tier':>12s}{'total':>12s}")
        print(f"{'HybridKV':18s}{held:>10.0f} = {pool:7.2f} MiB{cold / mib:>8.2f} MiB{pool + cold / mib:>8.2f} MiB")
        print(f"{'stock vLLM':18s}{full:>10.0f} = {stock:7.2f} MiB{'-':>12s}{stock:>8.2f} MiB")
        print(f"{'HybridKV / stock':18s}{pool / stock:>24.3f}{'':12s}{(pool + cold / mib) / stock:>12.3f}")
        print("The pool is vLLM's KV cache (HBM on a GPU): what it saves admits more requests. The cold tier holds "
              "the dynamic heads' prompt chunks outside it (host memory on a GPU; on this CPU build both are RAM, "
              "so the total is what this machine spends).")
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
    log = Path(tempfile.mkdtemp(prefix="hybridkv-demo-")) / "server.log"
    # No PROMETHEUS_MULTIPROC_DIR: the plugin turns multiprocess mode on itself in `vllm serve` (a fresh directory).
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1")
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")     # GiB of KV cache on the CPU build
    cmd = serve_command(args.model, args.profile, args.budget, port, name)
    print("$ " + " ".join(cmd[2:]).replace("vllm.entrypoints.cli.main", "vllm"), flush=True)
    with ServerProcess(cmd, log, port, env=env) as server:
        print(f"server healthy after {server.started_s:.0f} s (log: {log})", flush=True)
        answer, sample, usage = chat(port, name, args.max_tokens)
        report(answer, sample, usage)
    print("server stopped")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
