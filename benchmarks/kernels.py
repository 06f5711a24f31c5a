"""Benchmark the HybridKV kernels on a GPU (CUDA events, median; L2 evicted before every timed call).

Shapes are those of Qwen2.5-VL-7B decode: 28 query heads / 4 KV heads, head dim 128, bf16, block (chunk) 16,
contexts 8k-32k, batch 1-32, budgets 10-20 %. The paged cache uses the ``[NB, 2, bs, H, D]`` layout.

Reported per kernel: its time, its PyTorch reference's time, the bytes it must move, and the achieved bandwidth
as a fraction of the device-to-device copy bandwidth measured in the same run (``dst.copy_(src)`` on 1 GiB,
counted as bytes read + bytes written). The sparse decode is also compared with dense paged decode over the full
context (the same kernel given every block, and torch SDPA over a pre-gathered contiguous context), and timed
replayed from a CUDA graph (which also shows the step needs no host synchronisation).

    python benchmarks/kernels.py --out benchmarks/results/kernels_h100.md     # on a GPU
    TRITON_INTERPRET=1 python benchmarks/kernels.py --quick                    # CPU dry run of every code path
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

_ROOT = Path(__file__).resolve().parents[1]
try:
    import hybridkv_kernels  # noqa: F401
except ImportError:  # a bare checkout: load kernels/ under its import name
    _spec = importlib.util.spec_from_file_location("hybridkv_kernels", _ROOT / "kernels" / "__init__.py",
                                                   submodule_search_locations=[str(_ROOT / "kernels")])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["hybridkv_kernels"] = _mod
    _spec.loader.exec_module(_mod)

import triton  # noqa: E402

from hybridkv_kernels import chunk_scoring, compaction, sparse_decode, text_prior  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
DEV = "cuda" if CUDA else "cpu"


# ---------------------------------------------------------------------------------------------------- timing
class Timer:
    """Median time of ``fn`` in microseconds; on CUDA with events and L2 evicted (clean) before each call."""

    def __init__(self, iters: int, warmup: int):
        self.iters, self.warmup = iters, warmup
        self.flush = torch.empty(256 * 2**20, dtype=torch.int8, device=DEV) if CUDA else None

    def __call__(self, fn, iters: int | None = None) -> float:
        iters = iters or self.iters
        for _ in range(self.warmup):
            fn()
        if not CUDA:
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                fn()
                ts.append((time.perf_counter() - t) * 1e6)
            return statistics.median(ts)
        torch.cuda.synchronize()
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for s, e in zip(starts, ends):
            # evict L2 by *reading* 256 MiB: a zero_() flush would leave ~50 MB of dirty lines whose write-back
            # (~17 µs on an H100) would be charged to the timed kernel
            self.flush.sum(dtype=torch.int32)
            s.record()
            fn()
            e.record()
        torch.cuda.synchronize()
        return statistics.median(s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends))


    def graph(self, fn, iters: int | None = None) -> float:
        """Like ``__call__`` but replays ``fn`` captured in a CUDA graph (no Python launch overhead); falls back
        to eager timing (printed) if capture fails."""
        if not CUDA:
            return self(fn, iters)
        try:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(2):
                    fn()
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
        except Exception as exc:  # noqa: BLE001
            print(f"graph capture failed ({type(exc).__name__}: {exc}); timing eagerly"[:300])
            torch.cuda.synchronize()
            return self(fn, iters)
        us = self(g.replay, iters)
        del g
        return us


def copy_bandwidth(timer: Timer) -> float:
    """Device-to-device copy bandwidth in GB/s, (read + write) bytes / time, 1 GiB buffers."""
    n = (2**30) if CUDA else (2**22)
    src = torch.empty(n, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    us = timer(lambda: dst.copy_(src), iters=30)
    return 2 * n / us / 1e3


# ---------------------------------------------------------------------------------------------------- setup
def make_cache(B, ctx, H, D, bs, dtype, gen, layout="nb2"):
    n_blocks = ctx // bs
    NB = B * n_blocks + 8
    shape = (NB, 2, bs, H, D) if layout == "nb2" else (H, NB, 2, bs, D)
    cache = torch.randn(*shape, dtype=dtype, device=DEV, generator=gen)
    table = torch.randperm(NB, device=DEV, generator=gen)[: B * n_blocks].view(B, n_blocks).to(torch.int32)
    return cache, table


def sparse_lists(table, H, ctx, bs, budget, gen):
    """Per (request, head): ``k = budget * ctx / bs`` blocks = the sink, ``k - 2`` random, the newest (full)."""
    B, n_blocks = table.shape
    k = max(2, int(round(budget * n_blocks)))
    noise = torch.rand(B, H, n_blocks, device=DEV, generator=gen)
    noise[:, :, 0] = 2.0
    noise[:, :, -1] = 2.0
    chunks = torch.topk(noise, k, dim=2).indices.sort(dim=2).values
    ids = table[:, None, :].expand(B, H, n_blocks).gather(2, chunks).to(torch.int32).contiguous()
    ntok = torch.full((B, H), k * bs, dtype=torch.int32, device=DEV)
    return ids, ntok, k


def decode_bytes(ntok, D, elt) -> int:
    return int(ntok.sum()) * D * elt * 2  # K and V rows actually read (q, ids, partials are negligible)


# ---------------------------------------------------------------------------------------------------- benches
def bench_sparse_config_sweep(timer, shapes, Hq, H, D, bs, dtype, gen):
    """Sparse-decode launch configurations x split plans on a few shapes (graph-replayed).

    Returns (header, rows, best (config, plan)) with ``plan = (waves, min_tokens_per_split)``."""
    if CUDA:
        configs = [dict(block_n=bn, num_warps=w, num_stages=st) for bn, w, st in
                   ((64, 4, 2), (64, 4, 3), (64, 8, 3), (32, 4, 3), (128, 4, 2), (128, 8, 3))]
        plans = [(w, m) for w in (1, 2, 4, 8) for m in (128, 256, 512)]
    else:
        configs, plans = [dict(block_n=16, num_warps=4, num_stages=2)], [(2, 256), (8, 128)]
    times = {(i, j): [] for i in range(len(configs)) for j in range(len(plans))}
    for B, ctx, budget in shapes:
        cache, table = make_cache(B, ctx, H, D, bs, dtype, gen)
        kc, vc = sparse_decode.kv_views(cache, "nb2")
        ids, ntok, _ = sparse_lists(table, H, ctx, bs, budget, gen)
        q = torch.randn(B, Hq, D, dtype=dtype, device=DEV, generator=gen)
        out = torch.empty_like(q)
        for j, (waves, min_tok) in enumerate(plans):
            S = sparse_decode.plan_splits(B, H, ids.shape[2] * bs, DEV, waves=waves, min_tokens_per_split=min_tok,
                                          fit=False)
            ws = sparse_decode.Workspace.alloc(B, Hq, D, S, DEV)
            for i, cfg in enumerate(configs):
                try:
                    us = timer.graph(lambda: sparse_decode.launch(q, kc, vc, ids, ntok, 0.088, out, workspace=ws,
                                                                  **cfg), iters=max(10, timer.iters // 3))
                except Exception as exc:  # noqa: BLE001 - an invalid config (e.g. out of shared memory) is skipped
                    print(f"config {cfg} failed: {type(exc).__name__}: {exc}"[:200])
                    us = float("inf")
                times[(i, j)].append(us)
        del cache
        if CUDA:
            torch.cuda.empty_cache()
    best = min(times, key=lambda ij: math.prod(times[ij]))
    header = " | ".join(f"B={B} ctx={ctx} {budget:.0%}" for B, ctx, budget in shapes)
    rows = [(configs[i], plans[j], times[(i, j)]) for (i, j) in sorted(times)]
    return header, rows, (configs[best[0]], plans[best[1]])


def bench_select_sweep(timer, shapes, Hq, H, D, bs, dtype, gen):
    """Chunk scoring split into its two kernels; the select kernel at several warp counts."""
    rows, best = [], {}
    for B, ctx, budget in shapes:
        cache, table = make_cache(B, ctx, H, D, bs, dtype, gen)
        kc, _ = sparse_decode.kv_views(cache, "nb2")
        q = torch.randn(B, Hq, D, dtype=dtype, device=DEV, generator=gen)
        kmin = torch.empty(cache.shape[0], H, D, dtype=dtype, device=DEV)
        kmax = torch.empty_like(kmin)
        seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
        compaction.summaries_from_table(kc, table, seq, kmin, kmax)
        k = max(2, int(round(budget * table.shape[1])))
        scores = torch.empty(B, H, table.shape[1], dtype=torch.float32, device=DEV)
        sel = torch.empty(B, H, k, dtype=torch.int32, device=DEV)
        sel_ids, sel_ntok = torch.empty_like(sel), torch.empty(B, H, dtype=torch.int32, device=DEV)
        t_scores = timer.graph(lambda: chunk_scoring.launch_scores(q, kmin, kmax, table, seq, scores, chunk_size=bs))
        for w in ((4, 8, 16) if CUDA else (4,)):
            t_sel = timer.graph(lambda: chunk_scoring.launch_select(scores, table, seq, k, sel, chunk_size=bs,
                                                                    out_block_ids=sel_ids, out_num_tokens=sel_ntok,
                                                                    num_warps=w))
            rows.append((B, ctx, budget, t_scores, w, t_sel))
        del cache
    by_w = {}
    for *_, w, t in rows:
        by_w.setdefault(w, []).append(t)
    best = min(by_w, key=lambda w: math.prod(by_w[w]))
    return rows, best


def bench_split_plans(timer, copy_gbs, contexts, batches, budgets, Hq, H, D, bs, dtype, cfg, plan, gen):
    """Sparse decode (graph-replayed) per shape: the two-kernel combine (a workspace without counters) vs the fused
    in-kernel combine, with the default split plan and with ``plan_splits(fit=True)`` (whole waves)."""
    waves, min_tok = plan
    variants = [("before (2-kernel, waves plan)", dict(fit=False), False, {}, None),
                ("2-kernel, default plan", {}, False, {}, None),
                ("default (fused if S <= 8)", {}, True, {}, None),
                ("fused, waves plan", dict(fit=False), True, {}, None)]
    rows = []
    for ctx in contexts:
        for B in batches:
            cache, table = make_cache(B, ctx, H, D, bs, dtype, gen)
            kc, vc = sparse_decode.kv_views(cache, "nb2")
            for budget in budgets:
                ids, ntok, _ = sparse_lists(table, H, ctx, bs, budget, gen)
                q = torch.randn(B, Hq, D, dtype=dtype, device=DEV, generator=gen)
                ref = sparse_decode.reference(q, kc, vc, ids, ntok, D ** -0.5).float()
                nbytes = decode_bytes(ntok, D, cache.element_size())
                res = []
                for name, pkw, fused, ckw, chunk in variants:
                    sparse_decode.COMBINE_CHUNK_S = chunk
                    S = sparse_decode.plan_splits(B, H, ids.shape[2] * bs, DEV, waves=waves,
                                                  min_tokens_per_split=min_tok, **pkw)
                    ws = sparse_decode.Workspace.alloc(B, Hq, D, S, DEV)
                    if not fused:
                        ws = sparse_decode.Workspace(ws.o, ws.lse)
                    out = torch.empty_like(q)
                    c = {**cfg, **ckw}
                    t = timer.graph(lambda: sparse_decode.launch(q, kc, vc, ids, ntok, D ** -0.5, out, workspace=ws,
                                                                 **c))
                    err = (out.float() - ref).abs().max().item()
                    res.append((name, S, t, nbytes / t / 1e3 / copy_gbs, err))
                sparse_decode.COMBINE_CHUNK_S = None
                rows.append((B, ctx, budget, nbytes / 1e6, res))
                print(rows[-1], flush=True)
            del cache, table
            if CUDA:
                torch.cuda.empty_cache()
    return [v[0] for v in variants], rows


def bench_decode(timer, copy_gbs, B, ctx, budget, Hq, H, D, bs, dtype, cfg, plan, select_warps, gen,
                 cache_and_table=None, layout="nb2", full=True):
    cache, table = cache_and_table or make_cache(B, ctx, H, D, bs, dtype, gen, layout)
    kc, vc = sparse_decode.kv_views(cache, layout)
    q = torch.randn(B, Hq, D, dtype=dtype, device=DEV, generator=gen)
    scale = D ** -0.5
    ids, ntok, k = sparse_lists(table, H, ctx, bs, budget, gen)
    out = torch.empty_like(q)
    waves, min_tok = plan
    S = sparse_decode.plan_splits(B, H, ids.shape[2] * bs, DEV, waves=waves, min_tokens_per_split=min_tok)
    ws = sparse_decode.Workspace.alloc(B, Hq, D, S, DEV)
    sparse = lambda: sparse_decode.launch(q, kc, vc, ids, ntok, scale, out, workspace=ws, **cfg)  # noqa: E731
    t_eager = timer(sparse)
    t_sparse = timer.graph(sparse)
    t_ref = timer(lambda: sparse_decode.reference(q, kc, vc, ids, ntok, scale), iters=max(5, timer.iters // 10)) \
        if full else float("nan")
    # correctness on the benchmark shapes
    err = (out.float() - sparse_decode.reference(q, kc, vc, ids, ntok, scale).float()).abs().max().item()

    # dense paged decode: every block, same kernel
    all_ids = table[:, None, :].expand(B, H, table.shape[1]).contiguous()
    all_ntok = torch.full((B, H), ctx, dtype=torch.int32, device=DEV)
    dense_out = torch.empty_like(q)
    Sd = sparse_decode.plan_splits(B, H, ctx, DEV, waves=waves, min_tokens_per_split=min_tok)
    wsd = sparse_decode.Workspace.alloc(B, Hq, D, Sd, DEV)
    t_dense = timer.graph(lambda: sparse_decode.launch(q, kc, vc, all_ids, all_ntok, scale, dense_out,
                                                       workspace=wsd, **cfg))
    # torch SDPA over a pre-gathered contiguous context (gather not timed)
    t_sdpa = float("nan")
    if full and B * ctx * H * D * 2 * cache.element_size() <= 4 * 2**30:
        kd = sparse_decode.gather_kv(kc, all_ids)  # [B, H, ctx, D]
        vd = sparse_decode.gather_kv(vc, all_ids)
        qd = q[:, :, None, :]
        try:
            t_sdpa = timer.graph(lambda: F.scaled_dot_product_attention(qd, kd, vd, scale=scale, enable_gqa=True))
        except Exception as exc:  # noqa: BLE001
            print(f"SDPA failed: {exc}"[:200])
        del kd, vd

    # chunk scoring (dynamic heads): summaries in the cache dtype
    NB = kc.shape[0]
    kmin = torch.empty(NB, H, D, dtype=dtype, device=DEV)
    kmax = torch.empty_like(kmin)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    compaction.summaries_from_table(kc, table, seq, kmin, kmax)
    sel = torch.empty(B, H, k, dtype=torch.int32, device=DEV)
    sel_ids, sel_ntok = torch.empty_like(sel), torch.empty(B, H, dtype=torch.int32, device=DEV)
    scores = torch.empty(B, H, table.shape[1], dtype=torch.float32, device=DEV)
    t_score = timer.graph(lambda: chunk_scoring.launch(q, kmin, kmax, table, seq, k, sel, chunk_size=bs,
                                                       scores=scores, out_block_ids=sel_ids, out_num_tokens=sel_ntok,
                                                       select_warps=select_warps))
    t_score_ref = timer(lambda: chunk_scoring.reference(q, kmin, kmax, table, seq, k, chunk_size=bs),
                        iters=max(5, timer.iters // 10)) if full else float("nan")
    ref_sel = chunk_scoring.reference(q, kmin, kmax, table, seq, k, chunk_size=bs)[0]
    sel_match = (sel == ref_sel).float().mean().item()

    nbytes = decode_bytes(ntok, D, cache.element_size())
    dbytes = decode_bytes(all_ntok, D, cache.element_size())
    score_bytes = B * H * table.shape[1] * D * 2 * kmin.element_size()
    row = dict(B=B, ctx=ctx, budget=budget, k=k, splits=S, t_sparse=t_sparse, t_eager=t_eager, t_ref=t_ref,
               t_dense=t_dense, t_sdpa=t_sdpa, t_score=t_score, t_score_ref=t_score_ref,
               bw_frac=nbytes / t_sparse / 1e3 / copy_gbs,
               dense_bw_frac=dbytes / t_dense / 1e3 / copy_gbs, bytes_ratio=dbytes / nbytes,
               speedup=t_dense / t_sparse, speedup_step=t_dense / (t_sparse + t_score),
               score_bw_frac=score_bytes / t_score / 1e3 / copy_gbs, max_err=err, sel_match=sel_match,
               mbytes=nbytes / 1e6)
    return row


def bench_prefill(timer, copy_gbs, ctx, B, budget, Hq, H, D, bs, dtype, gen):
    """Compaction of static heads, summary refresh, text-prior scores (once per prompt)."""
    cache, table = make_cache(B, ctx, H, D, bs, dtype, gen)
    kc, vc = sparse_decode.kv_views(cache, "nb2")
    K = int(budget * ctx) // bs * bs
    kept = torch.rand(B, H, ctx, device=DEV, generator=gen).topk(K, dim=2).indices.sort(dim=2).values.to(torch.int32)
    nk = torch.full((B, H), K, dtype=torch.int32, device=DEV)
    ws = compaction.alloc_compact_workspace(kc, B, K)
    t_comp = timer.graph(lambda: compaction.launch_compact(kc, vc, table, kept, nk, ws))
    t_comp_ref = timer(lambda: compaction.reference_compact(kc, vc, table, kept, nk), iters=max(5, timer.iters // 10))
    comp_bytes = 4 * B * H * K * D * 2 * cache.element_size()  # K+V: read src, write ws, read ws, write dst

    NB = cache.shape[0]
    kmin = torch.empty(NB, H, D, dtype=dtype, device=DEV)
    kmax = torch.empty_like(kmin)
    seq = torch.full((B,), ctx, dtype=torch.int32, device=DEV)
    ids, nt = compaction.table_entries(table, seq, bs)
    t_sum = timer.graph(lambda: compaction.launch_summaries(kc, ids, nt, kmin, kmax))
    t_sum_ref = timer(lambda: compaction.reference_summaries(kc, ids, nt, kmin, kmax), iters=max(5, timer.iters // 10))
    sum_bytes = B * ctx * H * D * cache.element_size() + 2 * B * (ctx // bs) * H * D * kmin.element_size()

    W = 32
    q_obs = torch.randn(W, Hq, D, dtype=dtype, device=DEV, generator=gen)
    k = kc[table[0].long()].reshape(ctx, H, D).contiguous()
    q_pos = torch.arange(ctx - W, ctx, dtype=torch.int32, device=DEV)
    out = torch.empty(H, ctx, dtype=torch.float32, device=DEV)
    tp_ws = text_prior.alloc_workspace(Hq, W, ctx, DEV)
    t_tp = timer.graph(lambda: text_prior.launch(q_obs, k, q_pos, D ** -0.5, out, workspace=tp_ws))
    t_tp_ref = timer(lambda: text_prior.reference(q_obs, k, q_pos, D ** -0.5), iters=max(5, timer.iters // 10))
    tp_err = (out - text_prior.reference(q_obs, k, q_pos, D ** -0.5)).abs().max().item()
    frac = lambda nbytes, us: nbytes / us / 1e3 / copy_gbs  # noqa: E731
    tp_bytes = 2 * ctx * H * D * k.element_size()  # both passes read every key
    return [
        ("compact (static heads)", f"B={B} P={ctx} keep {K}/head", t_comp, t_comp_ref, frac(comp_bytes, t_comp), ""),
        ("chunk summaries (all blocks)", f"B={B} P={ctx}", t_sum, t_sum_ref, frac(sum_bytes, t_sum), ""),
        ("text prior (W=32)", f"P={ctx}", t_tp, t_tp_ref, frac(tp_bytes, t_tp), f"max err {tp_err:.1e}"),
    ]


# ---------------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (CPU / interpreter dry run)")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--out", type=str, default=None, help="also write the markdown here")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--plans", action="store_true", help="also compare combine paths x split plans (sparse decode)")
    ap.add_argument("--only-plans", action="store_true", help="only that comparison (implies --plans, --no-sweep)")
    args = ap.parse_args()

    Hq, H, D, bs, dtype = 28, 4, 128, 16, torch.bfloat16
    if args.quick:
        Hq, H, D, bs = 4, 2, 16, 16
        contexts, batches, budgets, iters = [256], [1, 2], [0.2], 3
        sweep_shapes = [(1, 256, 0.2)]
    else:
        contexts, batches, budgets, iters = [8192, 16384, 32768], [1, 8, 32], [0.10, 0.20], args.iters
        sweep_shapes = [(1, 32768, 0.2), (8, 32768, 0.2), (32, 32768, 0.2), (32, 8192, 0.1)]
    timer = Timer(iters=iters, warmup=3)
    gen = torch.Generator(device=DEV).manual_seed(0)
    lines = []

    def p(line: str) -> None:  # collect, and keep the file current so a timed-out run still leaves its rows
        lines.append(line)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text("\n".join(lines) + "\n")
    name = (torch.cuda.get_device_name() if CUDA
            else f"CPU ({platform.processor() or platform.machine()}), Triton interpreter")
    copy_gbs = copy_bandwidth(timer)
    p("# HybridKV kernel benchmark\n")
    p(f"- device: **{name}**; torch {torch.__version__}, triton {triton.__version__}; "
      f"{_dt.datetime.now(_dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    p(f"- command: `python benchmarks/kernels.py {' '.join(sys.argv[1:])}`")
    p(f"- measured device-to-device copy bandwidth: **{copy_gbs:.0f} GB/s** ({'1 GiB' if CUDA else '4 MiB'} "
      "`copy_`, read + write bytes)")
    p(f"- shapes: Hq={Hq}, H={H}, D={D}, {str(dtype).replace('torch.', '')}, block = chunk = {bs}; cache layout "
      f"`[NB, 2, bs, H, D]`; times are medians of {iters} calls (µs), L2 evicted (by a 256 MiB read) before "
      "each call\n")

    cfg = dict(sparse_decode.LAUNCH)
    plan = (sparse_decode.WAVES, sparse_decode.MIN_TOKENS_PER_SPLIT)
    select_warps = None
    if not (args.no_sweep or args.only_plans):
        header, rows, (cfg, plan) = bench_sparse_config_sweep(timer, sweep_shapes, Hq, H, D, bs, dtype, gen)
        p("## Sparse decode: launch configurations x split plans (µs, graph-replayed)\n")
        p(f"| config | waves | min tokens/split | {header} |")
        p("|---|---|---|" + "---|" * len(sweep_shapes))
        for c, (waves, min_tok), ts in rows:
            p(f"| {c} | {waves} | {min_tok} | " + " | ".join(f"{t:.1f}" for t in ts) + " |")
        p(f"\nchosen (best geometric mean): `{cfg}`, waves={plan[0]}, min_tokens_per_split={plan[1]}\n")
        srows, select_warps = bench_select_sweep(timer, sweep_shapes, Hq, H, D, bs, dtype, gen)
        p("## Chunk scoring: score kernel and select kernel (µs, graph-replayed)\n")
        p("| B | ctx | budget | score kernel | select warps | select kernel |")
        p("|---|---|---|---|---|---|")
        for B, ctx, budget, t_scores, w, t_sel in srows:
            p(f"| {B} | {ctx} | {budget:.0%} | {t_scores:.1f} | {w} | {t_sel:.1f} |")
        p(f"\nchosen select warps: {select_warps}\n")
        print("\n".join(lines), flush=True)

    if args.plans or args.only_plans:
        names, prow = bench_split_plans(timer, copy_gbs, contexts, batches, budgets, Hq, H, D, bs, dtype, cfg, plan,
                                        gen)
        p("## Sparse decode: combine path x split plan (µs, graph-replayed; S = splits, % = of copy bandwidth)\n")
        p("`2-kernel` = partials + `_combine_kernel` (a workspace without counters, the earlier code path); `fused` = "
          "the last split program of each (request, head) merges the partials (when S <= FUSED_MAX_SPLITS); "
          "waves plan = `plan_splits(fit=False)`, default plan = `plan_splits()`; launch config "
          f"`{cfg}`\n")
        p("| B | ctx | budget | MB read | " + " | ".join(f"{n} S | {n} µs | {n} %" for n in names) + " | max err |")
        p("|---|---|---|---|" + "---|---|---|" * len(names) + "---|")
        for B, ctx, budget, mb, res in prow:
            cells = " | ".join(f"{S} | {t:.1f} | {f:.0%}" for _, S, t, f, _ in res)
            p(f"| {B} | {ctx} | {budget:.0%} | {mb:.1f} | {cells} | {max(e for *_, e in res):.1e} |")
        p("")
        if CUDA:  # registers / spills / shared memory of every compiled sparse-decode kernel
            for dev_cache in getattr(sparse_decode._sparse_decode_kernel, "device_caches", {}).values():
                for kern in dev_cache[0].values():
                    cst = getattr(kern, "src", None)
                    cst = {k: v for k, v in getattr(cst, "constants", {}).items()} if cst is not None else {}
                    p(f"- compiled: regs {getattr(kern, 'n_regs', '?')}, spills {getattr(kern, 'n_spills', '?')}, "
                      f"shared {kern.metadata.shared}, warps {kern.metadata.num_warps}; {cst}")
            p("")
        if args.only_plans:
            print("\n".join(lines))
            return

    p("## Decode: sparse paged decode vs dense paged decode\n")
    p("All Triton/SDPA times are CUDA-graph replays (the sparse step captures: no host synchronisation); "
      "`eager µs` = the same sparse call launched from Python. bytes = K+V rows the sparse kernel must read; "
      "`% copy` = achieved bandwidth / copy bandwidth; dense = the same kernel over every block; SDPA = torch SDPA "
      "(enable_gqa) over a pre-gathered contiguous context; score = chunk scoring + top-k of the dynamic heads "
      "(bf16 summaries, 1/16 of the K+V bytes); step speed-up = dense / (sparse + score); sel = ref: fraction of "
      "selected indices equal to the PyTorch reference\n")
    p("| B | ctx | budget | k blocks | splits | MB read | sparse µs | % copy | eager µs | dense µs | "
      "dense % copy | SDPA µs | bytes ratio | speed-up | score µs | step speed-up | torch ref µs | score ref µs | "
      "max err | sel = ref |")
    p("|" + "---|" * 20)
    for ctx in contexts:
        for B in batches:
            cache_table = make_cache(B, ctx, H, D, bs, dtype, gen)
            for budget in budgets:
                r = bench_decode(timer, copy_gbs, B, ctx, budget, Hq, H, D, bs, dtype, cfg, plan, select_warps, gen,
                                 cache_table)
                p(f"| {r['B']} | {r['ctx']} | {r['budget']:.0%} | {r['k']} | {r['splits']} | {r['mbytes']:.1f} | "
                  f"{r['t_sparse']:.1f} | {r['bw_frac']:.0%} | {r['t_eager']:.1f} | "
                  f"{r['t_dense']:.1f} | {r['dense_bw_frac']:.0%} | {r['t_sdpa']:.1f} | {r['bytes_ratio']:.1f}x | "
                  f"{r['speedup']:.2f}x | {r['t_score']:.1f} | {r['speedup_step']:.2f}x | {r['t_ref']:.0f} | "
                  f"{r['t_score_ref']:.0f} | {r['max_err']:.1e} | {r['sel_match']:.0%} |")
                print(lines[-1], flush=True)
            del cache_table
            if CUDA:
                torch.cuda.empty_cache()

    p("\n## Decode in the per-KV-head layout (DESIGN §6 virtual layers: `[H, NB, 2, bs, D]`, a head's block is one "
      "contiguous 4 KiB tile)\n")
    p("| B | ctx | budget | MB read | sparse µs | % copy | dense µs | dense % copy | bytes ratio | speed-up | "
      "max err |")
    p("|---|---|---|---|---|---|---|---|---|---|---|")
    head_shapes = [(8, 32768), (32, 16384), (32, 32768)] if not args.quick else [(1, contexts[0])]
    for B, ctx in head_shapes:
        cache_table = make_cache(B, ctx, H, D, bs, dtype, gen, layout="heads")
        for budget in budgets:
            r = bench_decode(timer, copy_gbs, B, ctx, budget, Hq, H, D, bs, dtype, cfg, plan, select_warps, gen,
                             cache_table, layout="heads", full=False)
            p(f"| {B} | {ctx} | {budget:.0%} | {r['mbytes']:.1f} | {r['t_sparse']:.1f} | {r['bw_frac']:.0%} | "
              f"{r['t_dense']:.1f} | {r['dense_bw_frac']:.0%} | {r['bytes_ratio']:.1f}x | {r['speedup']:.2f}x | "
              f"{r['max_err']:.1e} |")
            print(lines[-1], flush=True)
        del cache_table
        if CUDA:
            torch.cuda.empty_cache()

    p("\n## Prefill-time kernels (once per prompt)\n")
    p("| kernel | shape | Triton µs (graph) | torch ref µs | % copy | note |")
    p("|---|---|---|---|---|---|")
    for ctx in contexts:
        for kernel, shape, t, t_ref, frac, note in bench_prefill(timer, copy_gbs, ctx, batches[0] if args.quick else 1,
                                                                 budgets[-1], Hq, H, D, bs, dtype, gen):
            p(f"| {kernel} | {shape} | {t:.1f} | {t_ref:.0f} | {frac:.0%} | {note} |")
            print(lines[-1], flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
