"""Side-by-side serving benchmark on vLLM's CPU build: stock vLLM (CPU_ATTN) vs the HYBRIDKV backend.

Everything runs in ONE process, sequentially (stock engine, then each HybridKV configuration; every engine is
freed with ``del`` + ``gc.collect()`` before the next is built). All engines get the SAME KV-cache bytes: the
stock pool is sized to hold only a few of the burst's requests at full length, and each HybridKV engine gets
``num_gpu_blocks_override`` scaled by its bytes per block (its block ids span one-head virtual layers of one
KV-cache group, so it gets about ``num_groups`` times as many ids); the byte totals are checked from
``kv_cache_config.kv_cache_tensors`` and reported.

Measured per engine (vLLM's own scheduler / block-pool accounting, read in-process after every ``step()``):

* burst: N long text prompts (GPL-3 text, ~1300-1500 tokens) submitted at once, greedy, ``max_tokens``
  generated each (ignore_eos): peak concurrent running requests (``len(scheduler.running)``), peak and
  time-weighted mean KV bytes in use (pool total - free blocks, x bytes per block), wall time, output tokens/s,
  number of preemptions (calls of ``Scheduler._preempt_request``);
* single request (run alone, before the burst; doubles as warm-up): KV bytes held right after prefill (sum over
  KV-cache groups of the request's non-null blocks x bytes per block, read at the first decode step, i.e. once
  the budget managers have dropped the pruned prompt gap), prefill time and mean decode time per token.

Configurations: stock; HybridKV with (a) the shipped profile ``configs/profiles/smollm2-vl.json`` at budget 0.1,
(b) a synthetic profile with ~half static heads (``hybridkv_vllm.profiler.synthetic``) at budget 0.1,
(c) the synthetic profile at budget 0.2.

    python benchmarks/serving.py --out benchmarks/results/serving_cpu.md --cpus 0   # full run (~25 min, 1 core)
    python benchmarks/serving.py --out /tmp/serving_quick.md --quick                 # smoke test

Writes the markdown report to ``--out`` and the raw numbers to the same path with ``.json``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hybridkv_vllm.adapter.engine_probe import (cold_tier_bytes, free_blocks, held_blocks, make_llm,  # noqa: E402
                                                 scheduler_of)
from hybridkv_vllm.eval.prompts import haystack_chat_prompt as text_prompt  # noqa: E402
from hybridkv_vllm.profiler.synthetic import synthetic_profile  # noqa: E402
from hybridkv_vllm.serving import DEFAULT_MODEL as MODEL  # noqa: E402

SHIPPED_PROFILE = ROOT / "configs" / "profiles" / "smollm2-vl.json"
BLOCK_SIZE = 32
MAX_MODEL_LEN = 4096


# ------------------------------------------------------------------------------------------------ helpers
def kv_bytes_config_sum(llm) -> int:
    """Sum of ``kv_cache_config.kv_cache_tensors`` sizes. NOT the memory in this vLLM (0.32): the entries of
    different KV-cache groups overlay (alias) one backing allocation, so for HybridKV this counts it once per
    group."""
    return sum(t.size for t in scheduler_of(llm).kv_cache_config.kv_cache_tensors)


def kv_bytes(llm) -> int:
    """KV-cache bytes really allocated: distinct storages behind the worker's per-layer KV tensors."""
    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    storages, stack = {}, list(runner.kv_caches)
    while stack:
        t = stack.pop()
        if isinstance(t, (list, tuple)):
            stack.extend(t)
        else:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def num_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_config.num_blocks


def usable_blocks(llm) -> int:
    """Blocks a request can get: the pool minus vLLM's reserved null block."""
    return scheduler_of(llm).kv_cache_manager.block_pool.num_gpu_blocks - 1


def num_groups_planned(profile: Path, budget: float) -> int:
    """KV-cache groups the adapter will make (pure: core allocator + tier planner, no vllm)."""
    from hybridkv_vllm.adapter.config import HybridKVConfig
    from hybridkv_vllm.core.tiers import plan_tiers
    from hybridkv_vllm.core.budgets import allocate
    from hybridkv_vllm.core.profile import HeadProfile

    cfg = HybridKVConfig(profile=profile, budget=budget)
    plan = allocate(HeadProfile.load(profile), cfg.budget_config(BLOCK_SIZE))
    return len(plan_tiers(plan, cfg.max_groups).tiers)


def static_heads(profile: Path) -> tuple[int, int]:
    from hybridkv_vllm.core.profile import HeadProfile
    p = HeadProfile.load(profile)
    return int(p.is_static.sum()), int(p.is_static.numel())


def count_preemptions(llm) -> list[int]:
    sched = scheduler_of(llm)
    counter = [0]
    orig = sched._preempt_request

    def wrapped(*args, **kwargs):
        counter[0] += 1
        return orig(*args, **kwargs)

    sched._preempt_request = wrapped
    return counter


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(MODEL)


def prompt_of_tokens(tok, n_tokens: int, question: str) -> str:
    """A GPL-3 prompt whose token count is close to ``n_tokens`` (bisection on the character count)."""
    lo, hi = 100, 34000
    while hi - lo > 8:
        mid = (lo + hi) // 2
        if len(tok(text_prompt(mid, question)).input_ids) < n_tokens:
            lo = mid
        else:
            hi = mid
    return text_prompt(hi, question)


# ---------------------------------------------------------------------------------------------- measurements
def single_request(llm, prompt: str, max_tokens: int, bytes_per_block: int) -> dict:
    """Run one request alone: KV bytes it holds after prefill, prefill time, decode time per token."""
    from vllm import SamplingParams
    engine, sched = llm.llm_engine, scheduler_of(llm)
    free0 = free_blocks(llm)
    rid = engine.add_request("single", prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                              ignore_eos=True))
    req = sched.requests[rid]
    prompt_len = req.num_prompt_tokens
    t_start, c_start = time.perf_counter(), time.process_time()
    t_prefill_done = c_prefill_done = None
    held_after_prefill = held_at_prefill_step = None
    cold_after_prefill = 0
    n_out, finished = 0, False
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.perf_counter()
        for out in outs:
            n_out = len(out.outputs[0].token_ids)
            finished = finished or out.finished
        r = sched.requests.get(rid)
        if r is None:
            continue
        if t_prefill_done is None and r.num_computed_tokens >= prompt_len:
            t_prefill_done, c_prefill_done = now, time.process_time()
            held_at_prefill_step = held_blocks(llm, rid)
        elif held_after_prefill is None and r.num_computed_tokens > prompt_len:
            held_after_prefill = held_blocks(llm, rid)    # first decode step: pruned gap already returned
            cold_after_prefill = cold_tier_bytes(llm)
    t_end, c_end = time.perf_counter(), time.process_time()
    assert free_blocks(llm) == free0, "blocks leaked by the single request"
    return dict(prompt_tokens=prompt_len, output_tokens=n_out,
                held_blocks_per_group=held_after_prefill, held_blocks_per_group_prefill_step=held_at_prefill_step,
                held_bytes=sum(held_after_prefill) * bytes_per_block, cold_bytes=cold_after_prefill,
                total_bytes=sum(held_after_prefill) * bytes_per_block + cold_after_prefill,
                full_stock_equiv_blocks=-(-(prompt_len + 1) // BLOCK_SIZE),
                prefill_s=t_prefill_done - t_start, prefill_cpu_s=c_prefill_done - c_start,
                decode_ms_per_token=1e3 * (t_end - t_prefill_done) / max(1, n_out - 1),
                decode_cpu_ms_per_token=1e3 * (c_end - c_prefill_done) / max(1, n_out - 1))


def burst(llm, prompts: list[str], max_tokens: int, bytes_per_block: int) -> dict:
    from vllm import SamplingParams
    engine, sched = llm.llm_engine, scheduler_of(llm)
    total = usable_blocks(llm)
    free0 = free_blocks(llm)
    preempt = count_preemptions(llm)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"b{i}", p, params)
    outputs, steps = {}, 0
    peak_running, peak_used, used_time_integral, peak_cold, peak_total = 0, 0, 0.0, 0, 0
    decode_s = decode_tokens = prefill_steps = 0
    t0 = last = time.perf_counter()
    c0 = time.process_time()
    while engine.has_unfinished_requests():
        before = {rid: (r.num_computed_tokens, r.num_prompt_tokens) for rid, r in sched.requests.items()}
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = list(out.outputs[0].token_ids)
        now = time.perf_counter()
        steps += 1
        advanced = [(sched.requests[rid].num_computed_tokens if rid in sched.requests else None, done, prompt)
                    for rid, (done, prompt) in before.items()]
        prefill = any(after is not None and after > done and done < prompt for after, done, prompt in advanced)
        if prefill:
            prefill_steps += 1
        else:            # a step that ran decode rows only: one token per running request
            decode_s += now - last
            decode_tokens += sum(1 for after, done, prompt in advanced if after is None or after > done)
        used = total - free_blocks(llm)
        peak_running = max(peak_running, len(sched.running))
        peak_used = max(peak_used, used)
        cold = cold_tier_bytes(llm)
        peak_cold, peak_total = max(peak_cold, cold), max(peak_total, used * bytes_per_block + cold)
        used_time_integral += used * (now - last)   # blocks held during the step just finished (as of its end)
        last = now
    wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    assert free_blocks(llm) == free0, "blocks leaked by the burst"
    n_out = sum(len(t) for t in outputs.values())
    return dict(requests=len(prompts), finished=len(outputs), steps=steps, wall_s=wall, cpu_s=cpu,
                output_tokens=n_out, output_tok_per_s=n_out / wall, prefill_steps=prefill_steps,
                decode_phase_s=decode_s, decode_phase_tok_per_s=decode_tokens / max(decode_s, 1e-9),
                peak_running=peak_running, preemptions=preempt[0],
                peak_kv_blocks=peak_used, peak_kv_bytes=peak_used * bytes_per_block, peak_cold_bytes=peak_cold,
                peak_total_bytes=peak_total,
                mean_kv_bytes=used_time_integral / wall * bytes_per_block,
                pool_blocks=total, pool_bytes=total * bytes_per_block,
                outputs=outputs)


def batch_decode(llm, prompt: str, batch: int, max_tokens: int) -> dict:
    """``batch`` copies of one prompt at once: mean time of the steps in which all of them decode (ms per step =
    ms per output token of each request at that batch size)."""
    from vllm import SamplingParams
    engine, sched = llm.llm_engine, scheduler_of(llm)
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"batch{i}", prompt, params)
    times, last = [], time.perf_counter()
    while engine.has_unfinished_requests():
        full_decode = len(sched.running) == batch and not sched.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in sched.running)
        engine.step()
        now = time.perf_counter()
        if full_decode:
            times.append(now - last)
        last = now
    times = sorted(times)[:max(1, len(times) - len(times) // 10)]      # drop the slowest tenth (other jobs)
    return dict(batch=batch, prompt_tokens=len(sched.requests) or None, steps=len(times),
                decode_ms_per_step=1e3 * sum(times) / max(1, len(times)))


def run_engine(name: str, hybridkv: dict | None, blocks: int, args, prompts, single_prompts) -> dict:
    t0 = time.perf_counter()
    llm = make_llm(MODEL, hybridkv, dtype=args.dtype, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                   enable_prefix_caching=False, enforce_eager=True, max_num_seqs=args.n,
                   num_gpu_blocks_override=blocks)
    startup = time.perf_counter() - t0
    sched = scheduler_of(llm)
    groups = len(sched.kv_cache_config.kv_cache_groups)
    total_bytes = kv_bytes(llm)
    config_sum = kv_bytes_config_sum(llm)
    bpb = total_bytes // num_blocks(llm)
    assert bpb * num_blocks(llm) == total_bytes
    print(f"[{name}] started in {startup:.1f}s: {groups} KV-cache group(s), {num_blocks(llm)} blocks x {bpb} B "
          f"= {total_bytes / 2**20:.2f} MiB", flush=True)
    load = [os.getloadavg()[0]]
    single_request(llm, single_prompts[0], 4, bpb)          # warm-up (untimed)
    singles = []
    for p in single_prompts:
        reps = [single_request(llm, p, args.single_tokens, bpb) for _ in range(args.reps)]
        assert all(r["held_blocks_per_group"] == reps[0]["held_blocks_per_group"] for r in reps)
        best = dict(reps[0])
        for key in ("prefill_s", "prefill_cpu_s", "decode_ms_per_token", "decode_cpu_ms_per_token"):
            best[key] = min(r[key] for r in reps)            # best of reps: least disturbed by other jobs
            best[key + "_reps"] = [r[key] for r in reps]
        singles.append(best)
    load.append(os.getloadavg()[0])
    for s in singles:
        print(f"[{name}] single {s['prompt_tokens']} tok: holds {s['held_bytes'] / 2**20:.2f} MiB "
              f"{s['held_blocks_per_group']}, prefill {s['prefill_s']:.2f}s, "
              f"decode {s['decode_ms_per_token']:.1f} ms/tok", flush=True)
    bursts = [burst(llm, prompts, args.max_tokens, bpb) for _ in range(args.reps)]
    load.append(os.getloadavg()[0])
    for key in ("peak_running", "peak_kv_blocks", "preemptions", "steps"):
        if len({x[key] for x in bursts}) > 1:
            print(f"[{name}] note: burst {key} differs between reps: {[x[key] for x in bursts]}", flush=True)
    b = dict(min(bursts, key=lambda x: x["wall_s"]))          # the least disturbed rep
    b["wall_s_reps"] = [x["wall_s"] for x in bursts]
    b["cpu_s_reps"] = [x["cpu_s"] for x in bursts]
    b["output_tok_per_cpu_s"] = b["output_tokens"] / b["cpu_s"]
    print(f"[{name}] burst: peak running {b['peak_running']}, peak KV {b['peak_kv_bytes'] / 2**20:.2f} MiB, "
          f"mean KV {b['mean_kv_bytes'] / 2**20:.2f} MiB, {b['wall_s']:.1f}s, {b['output_tok_per_s']:.2f} tok/s, "
          f"{b['preemptions']} preemptions", flush=True)
    res = dict(name=name, hybridkv=hybridkv, startup_s=startup, kv_cache_groups=groups, num_blocks=num_blocks(llm),
               kv_bytes=total_bytes, kv_cache_tensors_size_sum=config_sum, loadavg_1min=load, bytes_per_block=bpb,
               singles=singles, burst=b)
    del sched, llm
    gc.collect()
    res["batches"] = run_batches(name, hybridkv, blocks * args.batch_pool_factor, args)
    return res


def run_batches(name: str, hybridkv: dict | None, blocks: int, args) -> list[dict]:
    """Batch runs in an engine whose pool holds the whole batch uncompressed (stock cannot run 8 long requests at
    once in the burst's pool): ``--batch-pool-factor`` times the burst engine's blocks, the same for every engine."""
    if not args.batch_lengths:
        return []
    llm = make_llm(MODEL, hybridkv, dtype=args.dtype, max_model_len=MAX_MODEL_LEN, block_size=BLOCK_SIZE,
                   enable_prefix_caching=False, enforce_eager=True, max_num_seqs=args.batch,
                   num_gpu_blocks_override=blocks)
    batches = []
    for n_tokens, p in zip(args.batch_lengths, args.batch_prompts):
        b8 = batch_decode(llm, p, args.batch, args.batch_tokens)
        b8["prompt_tokens"] = n_tokens
        batches.append(b8)
        print(f"[{name}] batch {args.batch} x {n_tokens} tok: decode {b8['decode_ms_per_step']:.1f} ms/step over "
              f"{b8['steps']} steps", flush=True)
    del llm
    gc.collect()
    return batches


# ------------------------------------------------------------------------------------------------- report
def _mib(x: float) -> str:
    return f"{x / 2**20:.2f}"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def report(results: list[dict], meta: dict) -> str:
    stock = results[0]
    hyb = results[1:]
    sb = stock["burst"]
    full_blocks = -(-(max(meta["burst_prompt_tokens"]) + meta["max_tokens"]) // BLOCK_SIZE)  # one full-length request
    lines = ["# Serving benchmark on CPU: stock vLLM vs HybridKV (same KV-cache bytes)", "",
             f"- command: `{meta['command']}`",
             f"- date: {meta['date']} · total wall time: {meta['wall_s'] / 60:.1f} min",
             f"- machine: {meta['cpu']} · `nproc` = {meta['nproc']} (shared with other jobs; timings are noisy)",
             f"- vLLM {meta['vllm']} (CPU build), torch {meta['torch']}, Python {meta['python']}; env: "
             + ", ".join(f"{k}={v}" for k, v in meta["env"].items()),
             f"- model: `models/smollm2-vl` (30 layers x 3 KV heads = 90 KV heads), dtype {meta['dtype']}, "
             f"enforce_eager, block_size {BLOCK_SIZE}, prefix caching off, max_model_len {MAX_MODEL_LEN}, "
             f"max_num_seqs {meta['n']}",
             f"- KV cache: {_mib(stock['kv_bytes'])} MiB for every engine (stock: {stock['num_blocks']} blocks of "
             f"{stock['bytes_per_block']} B; "
             + "; ".join(f"{r['name']}: {r['num_blocks']} blocks of {r['bytes_per_block']} B in "
                         f"{r['kv_cache_groups']} groups = {_mib(r['kv_bytes'])} MiB" for r in hyb) + ")",
             "- KV bytes are the distinct storages behind the worker's KV tensors (checked equal for every engine). "
             "In vLLM 0.32 the per-group `kv_cache_config.kv_cache_tensors` entries alias one allocation, so their "
             "size sum over-counts HybridKV by its number of groups (" + ", ".join(
                 f"{r['name']}: {_mib(r['kv_cache_tensors_size_sum'])} MiB" for r in results) + ")",
             f"- burst: {meta['n']} text prompts of {min(meta['burst_prompt_tokens'])}-"
             f"{max(meta['burst_prompt_tokens'])} tokens (GPL-3), submitted at once, greedy, {meta['max_tokens']} "
             f"output tokens each (ignore_eos); a request at full length needs "
             f"{full_blocks} stock blocks, so the stock pool holds ~{stock['num_blocks'] // full_blocks} at once",
             "- profiles: " + "; ".join(f"{k}: {v[0]}/{v[1]} static heads" for k, v in meta["profiles"].items()),
             *([f"- {meta['note']}"] if meta.get("note") else []),
             "", "## Burst (ratios HybridKV / stock)", "",
             "| metric | stock | " + " | ".join(r["name"] for r in hyb) + " |",
             "|---|---|" + "---|" * len(hyb)]

    def row(label, key, fmt, ratio=True):
        cells = [fmt(sb[key])]
        for r in hyb:
            v = r["burst"][key]
            cells.append(fmt(v) + (f" ({_ratio(v, sb[key])})" if ratio else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    row("peak concurrent running requests", "peak_running", str)
    row("peak KV in use (MiB)", "peak_kv_bytes", _mib)
    row("peak cold tier (MiB)", "peak_cold_bytes", _mib)
    row("peak pool + cold tier (MiB)", "peak_total_bytes", _mib)
    row("mean KV in use, time-weighted (MiB)", "mean_kv_bytes", _mib)
    row(f"wall time (s), best of {meta['reps']}", "wall_s", lambda x: f"{x:.1f}")
    row("output tokens/s (wall)", "output_tok_per_s", lambda x: f"{x:.2f}")
    row("process CPU time (s)", "cpu_s", lambda x: f"{x:.1f}")
    row("output tokens per CPU-second", "output_tok_per_cpu_s", lambda x: f"{x:.2f}")
    row("decode-phase output tokens/s (steps without prefill)", "decode_phase_tok_per_s", lambda x: f"{x:.2f}")
    row("decode-phase time (s)", "decode_phase_s", lambda x: f"{x:.1f}")
    row("steps that ran prefill", "prefill_steps", str)
    row("preemptions", "preemptions", str, ratio=False)
    row("engine steps", "steps", str)
    agree = []
    for r in hyb:
        same = sum(r["burst"]["outputs"].get(k) == v for k, v in sb["outputs"].items())
        agree.append(f"{same}/{len(sb['outputs'])}")
    lines.append("| greedy outputs identical to stock | - | " + " | ".join(agree) + " |")
    prefix = []
    for r in hyb:
        lens = []
        for k, v in sb["outputs"].items():
            w, n = r["burst"]["outputs"].get(k, []), 0
            while n < min(len(v), len(w)) and v[n] == w[n]:
                n += 1
            lens.append(n)
        prefix.append(f"{sum(lens) / len(lens):.1f} (min {min(lens)})")
    lines.append("| tokens generated identically to stock before diverging, mean | - | " + " | ".join(prefix) + " |")

    lines += ["", "## One request alone: KV held after prefill, latency (ratios HybridKV / stock)", "",
              "KV bytes = vLLM's own accounting: sum over KV-cache groups of the request's non-null blocks x bytes "
              "per block, read at the first decode step (the budget tiers have returned the pruned prompt gap). "
              f"Prefill and decode time per token at batch 1 over {meta['single_tokens']} output tokens, best of "
              f"{meta['reps']} runs (after one untimed warm-up request per engine).", "",
              "| prompt tokens | metric | stock | " + " | ".join(r["name"] for r in hyb) + " |",
              "|---|---|---|" + "---|" * len(hyb)]
    for i, s in enumerate(stock["singles"]):
        for label, key, fmt in (("KV held in the pool (MiB)", "held_bytes", _mib),
                                ("cold tier (MiB)", "cold_bytes", _mib),
                                ("pool + cold tier (MiB)", "total_bytes", _mib),
                                ("prefill (s)", "prefill_s", lambda x: f"{x:.2f}"),
                                ("decode (ms/token)", "decode_ms_per_token", lambda x: f"{x:.1f}"),
                                ("decode CPU (ms/token)", "decode_cpu_ms_per_token", lambda x: f"{x:.1f}")):
            cells = [fmt(s[key])] + [fmt(r["singles"][i][key]) + f" ({_ratio(r['singles'][i][key], s[key])})"
                                     for r in hyb]
            lines.append(f"| {s['prompt_tokens']} | {label} | " + " | ".join(cells) + " |")
    if stock.get("batches"):
        lines += ["", f"## {meta['batch']} requests decoding together (ratios HybridKV / stock)", "",
                  f"{meta['batch']} copies of one prompt submitted at once; mean time of the steps in which all of "
                  "them decode (ms per step = ms per output token of each request), slowest tenth dropped.", "",
                  "| prompt tokens | metric | stock | " + " | ".join(r["name"] for r in hyb) + " |",
                  "|---|---|---|" + "---|" * len(hyb)]
        for i, s in enumerate(stock["batches"]):
            cells = [f"{s['decode_ms_per_step']:.1f}"] + [
                f"{r['batches'][i]['decode_ms_per_step']:.1f} "
                f"({_ratio(r['batches'][i]['decode_ms_per_step'], s['decode_ms_per_step'])})" for r in hyb]
            lines.append(f"| {s['prompt_tokens']} | decode (ms/step) | " + " | ".join(cells) + " |")
    lines += ["", "Blocks held per KV-cache group after prefill:", ""]
    for r in hyb:
        lines.append(f"- {r['name']}: " + "; ".join(f"{s['prompt_tokens']} tok -> {s['held_blocks_per_group']}"
                                                    for s in r["singles"]))
    lines.append("- stock: " + "; ".join(f"{s['prompt_tokens']} tok -> {s['held_blocks_per_group']}"
                                          for s in stock["singles"]))
    lines += ["", "1-min load average at engine start / after singles / after bursts: " + "; ".join(
        f"{r['name']} {', '.join(f'{x:.2f}' for x in r['loadavg_1min'])}" for r in results)]
    lines += ["", "Engine start-up (s): " + ", ".join(f"{r['name']} {r['startup_s']:.1f}" for r in results), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving_cpu.md")
    ap.add_argument("--quick", action="store_true", help="smoke mode: 3 short-output requests, 2 engines")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--n", type=int, default=16, help="burst size (and max_num_seqs)")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens of each burst request")
    ap.add_argument("--burst-tokens", type=int, default=700, help="burst prompt length (about; +-100)")
    ap.add_argument("--singles", default="600,1400,3000", help="prompt lengths of the batch-1 runs")
    ap.add_argument("--batch", type=int, default=8, help="requests decoding together in the batch runs")
    ap.add_argument("--batch-lengths", default="1400", help="prompt lengths of the batch runs ('' for none)")
    ap.add_argument("--batch-tokens", type=int, default=24, help="output tokens in the batch runs")
    ap.add_argument("--batch-pool-factor", type=int, default=3,
                    help="pool of the batch runs' engines, in multiples of the burst engines' (same for all)")
    ap.add_argument("--skip-singles-and-burst", action="store_true", help="batch runs only")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--configs", default="shipped",
                    help="HybridKV configurations: any of shipped, synthetic, synthetic-0.2 (comma-separated)")
    ap.add_argument("--stock-blocks", type=int, default=150,
                    help="stock pool size in blocks (>= 128 for max_model_len 4096); the KV bytes every engine gets")
    ap.add_argument("--cpus", default=None,
                    help="VLLM_CPU_OMP_THREADS_BIND for every engine (e.g. '0': one thread on core 0, which keeps "
                         "timings sane when another job holds the other core); default: vLLM's 'auto'")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="re-render the markdown report from a saved JSON (no engines are run)")
    args = ap.parse_args()
    if args.from_json is not None:
        saved = json.loads(args.from_json.read_text())
        args.out.write_text(report(saved["results"], saved["meta"]))
        print(f"wrote {args.out} from {args.from_json}")
        return
    if args.cpus is not None:
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.cpus
    t_run = time.perf_counter()
    if args.quick:
        args.n, args.max_tokens, args.burst_tokens, args.batch, args.batch_tokens = 3, 8, 400, 2, 4
        args.batch_lengths = "400"
    args.single_tokens = 8 if args.quick else 16
    assert args.stock_blocks * BLOCK_SIZE >= MAX_MODEL_LEN

    tok = tokenizer()
    burst_lengths = [args.burst_tokens - 100 + (200 * i) // max(1, args.n - 1) for i in range(args.n)]
    prompts = [prompt_of_tokens(tok, n, f"Question {i}: what is this text about? Answer briefly.")
               for i, n in enumerate(burst_lengths)]
    single_lengths = [1400] if args.quick else [int(x) for x in args.singles.split(",")]
    single_prompts = [prompt_of_tokens(tok, n, "Summarize the text.") for n in single_lengths]
    args.batch_lengths = [int(x) for x in args.batch_lengths.split(",") if x]
    args.batch_prompts = [prompt_of_tokens(tok, n, "Summarize the text.") for n in args.batch_lengths]
    burst_tokens = [len(tok(p).input_ids) for p in prompts]
    print(f"burst prompt tokens: {burst_tokens}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="hkv_bench_"))
    synth = synthetic_profile(tmp / "synthetic.json", MODEL)
    known = {"shipped": ("HybridKV shipped b=0.1", SHIPPED_PROFILE, 0.1),
             "synthetic": ("HybridKV synthetic b=0.1", synth, 0.1),
             "synthetic-0.2": ("HybridKV synthetic b=0.2", synth, 0.2)}
    configs = [known[c] for c in args.configs.split(",")]

    if args.skip_singles_and_burst:
        rows = [dict(name="stock", batches=run_batches("stock", None, args.stock_blocks * args.batch_pool_factor,
                                                        args))]
        for name, profile, budget in configs:
            groups = num_groups_planned(profile, budget)
            rows.append(dict(name=name, batches=run_batches(name, {"profile": str(profile), "budget": budget},
                                                             args.stock_blocks * groups * args.batch_pool_factor,
                                                             args)))
        lines = [f"# {args.batch} requests decoding together: stock vLLM vs HybridKV (CPU build)", "",
                 "- command: `python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]) + "`",
                 f"- date: {_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}; dtype {args.dtype}; "
                 f"pool {args.stock_blocks * args.batch_pool_factor} stock blocks' bytes for every engine (holds the "
                 "batch uncompressed); greedy, ignore_eos", "",
                 f"Mean time of the steps in which all {args.batch} requests decode (ms per step = ms per output token "
                 "of each request), slowest tenth dropped.", "",
                 "| prompt tokens | " + " | ".join(r["name"] for r in rows) + " |", "|---|" + "---|" * len(rows)]
        for i, n_tokens in enumerate(args.batch_lengths):
            ms = [r["batches"][i]["decode_ms_per_step"] for r in rows]
            lines.append(f"| {n_tokens} | {ms[0]:.1f} | " + " | ".join(f"{m:.1f} ({_ratio(m, ms[0])})" for m in ms[1:])
                         + " |")
        args.out.write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    results = [run_engine("stock", None, args.stock_blocks, args, prompts, single_prompts)]
    stock_bytes = results[0]["kv_bytes"]
    for name, profile, budget in configs:
        hkv = {"profile": str(profile), "budget": budget}
        groups = num_groups_planned(profile, budget)
        # A HybridKV block id spans 90 / groups one-head layers; the stock one spans 30 layers x 3 heads.
        blocks = stock_bytes // (results[0]["bytes_per_block"] // groups)
        res = run_engine(name, hkv, blocks, args, prompts, single_prompts)
        assert res["kv_bytes"] == stock_bytes, (res["kv_bytes"], stock_bytes)
        res["profile"] = str(profile.relative_to(ROOT) if profile.is_relative_to(ROOT) else "synthetic (seed 0)")
        res["hybridkv"] = dict(hkv, profile=res["profile"])          # no machine-specific paths in the report
        results.append(res)

    import torch
    import vllm
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    meta = dict(command="python " + " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:]),
                date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                wall_s=time.perf_counter() - t_run, cpu=cpu,
                nproc=subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
                vllm=vllm.__version__, torch=torch.__version__, python=platform.python_version(),
                dtype=args.dtype, n=args.n, reps=args.reps, max_tokens=args.max_tokens, batch=args.batch,
                single_tokens=args.single_tokens,
                burst_prompt_tokens=burst_tokens, single_prompt_tokens=single_lengths,
                stock_blocks=args.stock_blocks,
                env={k: os.environ.get(k, "(unset)") for k in (
                    "VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE", "HF_HUB_OFFLINE",
                    "VLLM_CPU_OMP_THREADS_BIND")},
                profiles={"shipped": static_heads(SHIPPED_PROFILE), "synthetic": static_heads(synth)})
    text = report(results, meta)
    print("\n" + text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(dict(meta=meta, results=results), indent=1))
    print(f"\nwrote {args.out} and {args.out.with_suffix('.json')} in {meta['wall_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
