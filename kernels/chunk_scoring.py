"""Chunk scoring and fixed-k chunk selection for dynamic heads (DESIGN §4 ``score_chunks`` + ``select_chunks``).

Contract
--------
One decode query per request; chunks are the paged KV blocks (``chunk_size == block_size``), chunk ``c`` of
request ``b`` and KV head ``h`` lives in physical block ``block_table[b, (h,) c]``.

Inputs
    q            ``[B, Hq, D]``     bf16/fp16/fp32   the decode query of each request (``Hq = G * H``)
    kmin, kmax   ``[NB, H, D]``     any float        per physical block and KV head: channel-wise min / max of its keys
                                                      (see ``compaction.build_chunk_summaries``)
    block_table  ``[B, M]`` or ``[B, H, M]`` int32    logical chunk -> physical block (2-D: shared by all heads)
    seq_lens     ``[B]``            int32            tokens in each request's context, the decode token included;
                                                      request ``b`` has ``n_b = ceil(seq_lens[b] / chunk_size)`` chunks
    k            int                                 fixed number of chunks to keep per (request, head): the
                                                      width of the outputs
    k_per        ``[B, H]``         int32 (optional) each (request, head)'s own number of chunks (<= k; 0: none)
Outputs (caller-preallocated, every element written)
    out          ``[B, H, k]``      int32            selected logical chunk indices, ascending, then ``-1`` padding
    out_block_ids``[B, H, k]``      int32 (optional) the physical block of each selected chunk, ``-1`` padding
    out_num_tokens ``[B, H]``       int32 (optional) tokens covered by the selection (only the newest chunk may be
                                                      partial); with ``out_block_ids`` this is exactly the input of
                                                      ``sparse_decode.run``
Workspace (caller-owned, optional): ``scores [B, H, M]`` fp32 (the raw Quest scores; garbage beyond ``n_b``).

Semantics
    score[b, h, c] = sum_{g in group(h)} sum_d max(q[b,g,d] * kmin[blk,h,d], q[b,g,d] * kmax[blk,h,d])  (Quest)
    Chunks ``c >= n_b`` are never selected. Selection priority (as ``core.selection.select_chunks``): the first
    ``sink_chunks`` (lower index first), then the last ``recent_chunks`` (newest first; the newest holds the decode
    token), then scores descending; ties -> lower index first (``-0.0`` ties with ``0.0``).
    The selection holds ``min(k, n_b)`` chunks (``min(k_per[b, h], k, n_b)`` with ``k_per``), written ascending;
    the rest of the row is ``-1``.
    (With ``k < sink_chunks + recent_chunks`` the newest chunk can be dropped: the caller keeps ``k`` >= both.)

No output shape depends on data; no host synchronisation (CUDA-graph safe).

Kernels: ``_chunk_score_kernel`` (grid ``(B, H, cdiv(M, BLOCK_C))``) writes the scores; ``_chunk_select_kernel``
(grid ``(B, H)``) finds the k-th largest order-preserving int key by bisection (at most 32 steps, no
sort), breaks ties by index with a cumulative sum, and compacts the selected indices in ascending order.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, table_3d, tl, triton, use_triton

# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _chunk_score_kernel(
    q_ptr,  # [B, Hq, D]
    kmin_ptr,  # [NB, H, D]
    kmax_ptr,  # [NB, H, D] (same strides as kmin)
    bt_ptr,  # [B, H, M] int32 (head stride may be 0)
    seq_ptr,  # [B] int32
    scores_ptr,  # [B, H, M] fp32
    stride_qb, stride_qh,
    stride_sb, stride_sh,
    stride_tb, stride_th, stride_tm,
    stride_ob, stride_oh,
    CHUNK: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    t = tl.program_id(2)
    seq = tl.load(seq_ptr + b)
    n_chunks = (seq + CHUNK - 1) // CHUNK
    if t * BLOCK_C >= n_chunks:
        return
    c = t * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < n_chunks
    blk = tl.load(bt_ptr + b * stride_tb + h * stride_th + c * stride_tm, mask=cm, other=0).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    off = blk[:, None] * stride_sb + h * stride_sh + d[None, :]
    m2 = cm[:, None] & dm[None, :]
    kmn = tl.load(kmin_ptr + off, mask=m2, other=0.0).to(tl.float32)
    kmx = tl.load(kmax_ptr + off, mask=m2, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_C], dtype=tl.float32)
    for g in tl.static_range(G):
        qg = tl.load(q_ptr + b * stride_qb + (h * G + g) * stride_qh + d, mask=dm, other=0.0).to(tl.float32)
        acc += tl.sum(tl.maximum(qg[None, :] * kmn, qg[None, :] * kmx), axis=1)
    tl.store(scores_ptr + b * stride_ob + h * stride_oh + c, acc, mask=cm)


@triton.jit
def _chunk_select_kernel(
    scores_ptr,  # [B, H, M] fp32
    bt_ptr,  # [B, H, M] int32
    seq_ptr,  # [B] int32
    out_ptr,  # [B, H, K] int32
    ids_ptr,  # [B, H, K] int32 (written if WRITE_IDS)
    ntok_ptr,  # [B, H] int32 (written if WRITE_IDS)
    kper_ptr,  # [B, H] int32 (read if HAS_KPER): each (request, head)'s own k <= K
    M, K,
    stride_sb, stride_sh,
    stride_tb, stride_th, stride_tm,
    stride_ob, stride_oh,
    stride_ib, stride_ih,
    stride_nb, stride_nh,
    stride_kb, stride_kh,
    CHUNK: tl.constexpr, SINK: tl.constexpr, RECENT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_IDS: tl.constexpr, HAS_KPER: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq = tl.load(seq_ptr + b)
    n_chunks = (seq + CHUNK - 1) // CHUNK
    c = tl.arange(0, BLOCK_M)
    valid = (c < n_chunks) & (c < M)
    s = tl.load(scores_ptr + b * stride_sb + h * stride_sh + c, mask=valid, other=0.0)
    # order-preserving float -> int map (negative floats: flip the magnitude bits)
    bits = s.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)
    key = tl.where(s == 0.0, 0, key)  # -0.0 ties with +0.0
    # forced chunks get keys above every float key: sinks (lower index first) > recent (newest first)
    key = tl.where(c >= n_chunks - RECENT, 2147483647 - SINK - (n_chunks - 1 - c), key)
    key = tl.where(c < SINK, 2147483647 - c, key)
    key = tl.where(valid, key, -2147483648)
    kk = tl.minimum(n_chunks, K)
    if HAS_KPER:
        kk = tl.minimum(kk, tl.maximum(tl.load(kper_ptr + b * stride_kb + h * stride_kh), 0))
    # bisection for a threshold T: the largest t with count(key >= t) >= kk (at most 32 steps); it stops early
    # as soon as count(key >= mid) == kk exactly (mid then falls between the kk-th and (kk+1)-th key)
    lo = tl.min(key, axis=0)
    hi = tl.max(key, axis=0)
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        cnt = tl.sum((key >= mid).to(tl.int32), axis=0)
        ok = cnt >= kk
        lo = tl.where(ok, mid, lo)
        hi = tl.where(cnt == kk, mid, tl.where(ok, hi, mid - 1))
    gt = valid & (key > lo)
    n_gt = tl.sum(gt.to(tl.int32), axis=0)
    eq = valid & (key == lo)
    rank = tl.cumsum(eq.to(tl.int32), axis=0)
    sel = gt | (eq & (rank <= kk - n_gt))
    pos = tl.cumsum(sel.to(tl.int32), axis=0) - 1
    n_sel = tl.sum(sel.to(tl.int32), axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + pos, c, mask=sel)
    j = tl.arange(0, BLOCK_K)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + j, tl.full([BLOCK_K], -1, tl.int32), mask=pad)
    if WRITE_IDS:
        blk = tl.load(bt_ptr + b * stride_tb + h * stride_th + c * stride_tm, mask=sel, other=-1)
        tl.store(ids_ptr + b * stride_ib + h * stride_ih + pos, blk, mask=sel)
        tl.store(ids_ptr + b * stride_ib + h * stride_ih + j, tl.full([BLOCK_K], -1, tl.int32), mask=pad)
        ntok = tl.minimum(tl.maximum(seq - c * CHUNK, 0), CHUNK)
        n_tok = tl.sum(tl.where(sel, ntok, 0), axis=0)
        tl.store(ntok_ptr + b * stride_nb + h * stride_nh, n_tok)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _check(q, kmin, kmax, block_table, seq_lens, k, out):
    if q.dim() != 3 or kmin.dim() != 3 or kmin.shape != kmax.shape:
        raise ValueError(f"q must be [B, Hq, D] and kmin/kmax [NB, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(kmin.shape)}, {tuple(kmax.shape)}")
    B, Hq, D = q.shape
    H = kmin.shape[1]
    if kmin.shape[2] != D or Hq % H:
        raise ValueError(f"head dims disagree: q {tuple(q.shape)} vs summaries {tuple(kmin.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if out.shape != (B, H, k) or out.dtype != torch.int32:
        raise ValueError(f"out must be int32 [{B}, {H}, {k}], got {out.dtype} {tuple(out.shape)}")
    if seq_lens.shape != (B,):
        raise ValueError(f"seq_lens must be [{B}], got {tuple(seq_lens.shape)}")
    return B, Hq, H, D


def launch_scores(q, kmin, kmax, block_table, seq_lens, scores, *, chunk_size, block_c: int = 64):
    """First kernel: Quest scores of every chunk into ``scores [B, H, M]`` fp32."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    bt = table_3d(block_table, H)
    M = bt.shape[2]
    if q.stride(2) != 1 or kmin.stride(2) != 1 or kmin.stride() != kmax.stride() or scores.stride(2) != 1:
        raise ValueError("q, kmin, kmax and scores need a contiguous last dim and kmin/kmax equal strides")
    block_c = min(block_c, next_pow2(M))
    _chunk_score_kernel[(B, H, triton.cdiv(M, block_c))](
        q, kmin, kmax, bt, seq_lens, scores,
        q.stride(0), q.stride(1), kmin.stride(0), kmin.stride(1),
        bt.stride(0), bt.stride(1), bt.stride(2), scores.stride(0), scores.stride(1),
        CHUNK=chunk_size, G=Hq // H, D=D, BLOCK_D=next_pow2(D), BLOCK_C=block_c,
    )


def launch_select(scores, block_table, seq_lens, k, out, *, chunk_size, sink_chunks=1, recent_chunks=1,
                  out_block_ids=None, out_num_tokens=None, k_per=None, num_warps: int | None = None):
    """Second kernel: fixed-k selection from ``scores`` into ``out`` (and the block lists)."""
    B, H, M = scores.shape
    bt = table_3d(block_table, H)
    write_ids = out_block_ids is not None
    if write_ids != (out_num_tokens is not None):
        raise ValueError("out_block_ids and out_num_tokens go together")
    ids = out_block_ids if write_ids else out
    ntok = out_num_tokens if write_ids else seq_lens.view(B, 1)
    block_m = next_pow2(M)
    kper = k_per if k_per is not None else ntok
    _chunk_select_kernel[(B, H)](
        scores, bt, seq_lens, out, ids, ntok, kper, M, k,
        scores.stride(0), scores.stride(1), bt.stride(0), bt.stride(1), bt.stride(2),
        out.stride(0), out.stride(1), ids.stride(0), ids.stride(1), ntok.stride(0), ntok.stride(1),
        kper.stride(0), kper.stride(1),
        CHUNK=chunk_size, SINK=sink_chunks, RECENT=recent_chunks,
        BLOCK_M=block_m, BLOCK_K=next_pow2(k), WRITE_IDS=write_ids, HAS_KPER=k_per is not None,
        num_warps=num_warps or (4 if block_m <= 1024 else 8),
    )


def launch(q, kmin, kmax, block_table, seq_lens, k, out, *, chunk_size, sink_chunks=1, recent_chunks=1,
           scores=None, out_block_ids=None, out_num_tokens=None, k_per=None, block_c: int = 64,
           select_warps: int | None = None):
    """Triton path; writes ``out`` (and ``out_block_ids`` / ``out_num_tokens`` if given). Returns ``out``."""
    B, Hq, H, D = _check(q, kmin, kmax, block_table, seq_lens, k, out)
    M = block_table.shape[-1]
    if scores is None:
        scores = torch.empty(B, H, M, dtype=torch.float32, device=q.device)
    launch_scores(q, kmin, kmax, block_table, seq_lens, scores, chunk_size=chunk_size, block_c=block_c)
    launch_select(scores, block_table, seq_lens, k, out, chunk_size=chunk_size, sink_chunks=sink_chunks,
                  recent_chunks=recent_chunks, out_block_ids=out_block_ids, out_num_tokens=out_num_tokens,
                  k_per=k_per, num_warps=select_warps)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference (the definition, and the CPU path)
# ----------------------------------------------------------------------------------------------------------------
def reference_scores(q, kmin, kmax, block_table, seq_lens=None):
    """Quest scores ``[B, H, M]`` fp32 for every table entry (entries past ``n_b`` are computed on clamped ids)."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    bt = table_3d(block_table, H).long().clamp(min=0)
    heads = torch.arange(H, device=q.device)[None, :, None]
    kmn = kmin[bt, heads].float()  # [B, H, M, D]
    kmx = kmax[bt, heads].float()
    qg = q.float().view(B, H, Hq // H, D)
    s = torch.zeros(bt.shape, dtype=torch.float32, device=q.device)
    for g in range(Hq // H):
        qq = qg[:, :, g, None, :]
        s += torch.maximum(qq * kmn, qq * kmx).sum(-1)
    return s


def priority_keys(n: torch.Tensor, width: int, sink_chunks: int, recent_chunks: int) -> torch.Tensor:
    """The selection's order as sort keys, stated once (the reference below and the adapter's plan use it; the
    kernel's bisection encodes the same order): ``float64 [..., width]`` for chunks ``c < width`` of rows with ``n``
    valid chunks (``n [..., 1]``): sinks (``c < sink_chunks``, lower index first) above recent chunks (the last
    ``recent_chunks``, newest first) above scores; ``nan`` where the query's score decides, ``-inf`` past ``n``.
    Exactly ``core.selection._priority_select``; forced keys sit far above any score: ``1e200 * (2 .. 4)``."""
    c = torch.arange(width, device=n.device)
    cf = c.double() / width
    valid = c < n
    keys = torch.where(valid, float("nan"), float("-inf"))
    keys = torch.where(valid & (c >= n - recent_chunks), 1e200 * (2 + cf), keys)
    return torch.where(valid & (c < sink_chunks), 1e200 * (4 - cf), keys)


def reference(q, kmin, kmax, block_table, seq_lens, k, *, chunk_size, sink_chunks=1, recent_chunks=1, k_per=None):
    """Returns ``(chunk_idx [B, H, k], block_ids [B, H, k], num_tokens [B, H])``, all int32, ``-1`` padded."""
    B, Hq, D = q.shape
    H = kmin.shape[1]
    bt = table_3d(block_table, H)
    M = bt.shape[2]
    s = reference_scores(q, kmin, kmax, bt)
    dev = q.device
    seq = seq_lens.to(dev).long()[:, None, None]
    n = (seq + chunk_size - 1) // chunk_size
    # one descending sort on the composite key (see priority_keys); the sort is stable, so equal scores keep the
    # lower index first (-0.0 ties with 0.0)
    forced = priority_keys(n, M, sink_chunks, recent_chunks)
    key = torch.where(torch.isnan(forced), s.double(), forced)
    top = torch.sort(key, dim=2, descending=True, stable=True).indices[:, :, :k]
    if top.shape[2] < k:
        top = torch.cat([top, top.new_zeros(B, H, k - top.shape[2])], dim=2)
    kk = torch.minimum(n, torch.full_like(n, k))
    if k_per is not None:
        kk = torch.minimum(kk, k_per.to(dev).long().clamp(min=0)[:, :, None])
    j = torch.arange(k, device=dev)[None, None, :]
    big = torch.iinfo(torch.int64).max
    idx = torch.sort(torch.where(j < kk, top, big), dim=2).values
    keep = idx != big
    chunk_idx = torch.where(keep, idx, -1)
    blk = bt.long().gather(2, chunk_idx.clamp(min=0).clamp(max=M - 1))
    block_ids = torch.where(keep, blk, -1)
    ntok = ((seq - chunk_idx * chunk_size).clamp(0, chunk_size) * keep).sum(2)
    return chunk_idx.to(torch.int32), block_ids.to(torch.int32), ntok.to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def run(q, kmin, kmax, block_table, seq_lens, k, out, *, chunk_size, sink_chunks=1, recent_chunks=1,
        scores=None, out_block_ids=None, out_num_tokens=None, k_per=None, backend="auto"):
    """Select ``k`` chunks per (request, KV head) into ``out`` (see the module contract). Returns ``out``.

    Triton on CUDA, the PyTorch reference otherwise; both write into the caller's buffers.
    """
    if use_triton(q, kmin, block_table, out, backend=backend):
        return launch(q, kmin, kmax, block_table, seq_lens, k, out, chunk_size=chunk_size, sink_chunks=sink_chunks,
                      recent_chunks=recent_chunks, scores=scores, out_block_ids=out_block_ids,
                      out_num_tokens=out_num_tokens, k_per=k_per)
    _check(q, kmin, kmax, block_table, seq_lens, k, out)
    idx, ids, ntok = reference(q, kmin, kmax, block_table, seq_lens, k, chunk_size=chunk_size,
                               sink_chunks=sink_chunks, recent_chunks=recent_chunks, k_per=k_per)
    out.copy_(idx)
    if out_block_ids is not None:
        out_block_ids.copy_(ids)
        out_num_tokens.copy_(ntok)
    return out


__all__ = ["run", "launch", "launch_scores", "launch_select", "priority_keys", "reference", "reference_scores",
           "HAS_TRITON"]
