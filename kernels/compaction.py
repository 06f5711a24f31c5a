"""Compaction of static heads' kept tokens, and chunk summaries (kmin/kmax) for dynamic heads.

Contract: ``compact``
---------------------
In the step that completes a prompt, each static (request, KV head) keeps a sorted token list (DESIGN §4
``select_static``); its tokens move to the first slots of that head's blocks, so blocks ``[nB, P // bs)`` can be
freed (DESIGN §6).
    key_cache, value_cache ``[NB, bs, H, D]`` any float    paged cache views (``sparse_decode.kv_views``), in place
    block_table            ``[B, M]`` or ``[B, H, M]`` int32  logical block -> physical block
    kept                   ``[B, H, K]``  int32             ascending logical token positions; entries at or past
                                                            ``num_kept[b, h]`` are ignored
    num_kept               ``[B, H]``     int32             how many of ``kept`` are real (<= K)
    workspace              ``(k_buf, v_buf)`` each ``[B, H, K, D]`` in the cache dtype (caller-owned; allocated
                                                            when omitted)
Effect: logical slot ``i < num_kept`` of (b, h) holds what logical slot ``kept[b, h, i]`` held; other slots are
untouched. In-place safe for any overlap: one kernel gathers every kept row into the workspace, a second scatters
them (two launches = a grid-wide barrier). Grid ``(B, H, cdiv(K, BLOCK_T))`` each.

Contract: ``build_chunk_summaries``
-----------------------------------
    key_cache   ``[NB, bs, H, D]``
    block_ids   ``[N]`` or ``[N, H]`` int32   physical blocks to (re)summarise (``[N]``: the same block for all heads)
    num_tokens  ``[N]`` or ``[N, H]`` int32   filled slots of each block (entries with ``<= 0`` or id ``< 0`` skipped)
    kmin, kmax  ``[NB, H, D]`` (fp32 or the cache dtype), written in place for the listed blocks only:
                channel-wise min / max over the first ``num_tokens`` keys of the block (DESIGN §4, Quest summary).
``summaries_from_table(key_cache, block_table, seq_lens, kmin, kmax)`` is the whole-request form (chunk == block).
Grid ``(cdiv(N, BLOCK_E), H)``: each program summarises ``BLOCK_E`` blocks of one head.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, table_3d, tl, triton, use_triton


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _gather_kept_kernel(
    k_ptr, v_ptr,  # [NB, bs, H, D]
    bt_ptr,  # [B, H, M] int32
    kept_ptr,  # [B, H, K] int32
    nkept_ptr,  # [B, H] int32
    kbuf_ptr, vbuf_ptr,  # [B, H, K, D]
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb, stride_th, stride_tm,
    stride_pb, stride_ph,
    stride_nb, stride_nh,
    stride_wb, stride_wh, stride_wk,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.load(nkept_ptr + b * stride_nb + h * stride_nh)
    im = i < n
    d = tl.arange(0, BLOCK_D)
    m2 = im[:, None] & (d < D)[None, :]
    pos = tl.load(kept_ptr + b * stride_pb + h * stride_ph + i, mask=im, other=0)
    blk = tl.load(bt_ptr + b * stride_tb + h * stride_th + (pos // BS) * stride_tm, mask=im, other=0).to(tl.int64)
    slot = pos % BS
    k_base = k_ptr + h.to(tl.int64) * stride_kh  # int64: a cache can exceed 2**31 elements
    v_base = v_ptr + h.to(tl.int64) * stride_vh
    kr = tl.load(k_base + (blk * stride_kb + slot * stride_kt)[:, None] + d[None, :], mask=m2)
    vr = tl.load(v_base + (blk * stride_vb + slot * stride_vt)[:, None] + d[None, :], mask=m2)
    w = (b * stride_wb + h * stride_wh + i * stride_wk)[:, None] + d[None, :]
    tl.store(kbuf_ptr + w, kr, mask=m2)
    tl.store(vbuf_ptr + w, vr, mask=m2)


@triton.jit
def _scatter_kept_kernel(
    k_ptr, v_ptr,  # [NB, bs, H, D]
    bt_ptr,  # [B, H, M] int32
    nkept_ptr,  # [B, H] int32
    kbuf_ptr, vbuf_ptr,  # [B, H, K, D]
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_tb, stride_th, stride_tm,
    stride_nb, stride_nh,
    stride_wb, stride_wh, stride_wk,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    i = tl.program_id(2) * BLOCK_T + tl.arange(0, BLOCK_T)
    n = tl.load(nkept_ptr + b * stride_nb + h * stride_nh)
    im = i < n
    d = tl.arange(0, BLOCK_D)
    m2 = im[:, None] & (d < D)[None, :]
    w = (b * stride_wb + h * stride_wh + i * stride_wk)[:, None] + d[None, :]
    kr = tl.load(kbuf_ptr + w, mask=m2)
    vr = tl.load(vbuf_ptr + w, mask=m2)
    blk = tl.load(bt_ptr + b * stride_tb + h * stride_th + (i // BS) * stride_tm, mask=im, other=0).to(tl.int64)
    slot = i % BS
    k_base = k_ptr + h.to(tl.int64) * stride_kh
    v_base = v_ptr + h.to(tl.int64) * stride_vh
    tl.store(k_base + (blk * stride_kb + slot * stride_kt)[:, None] + d[None, :], kr, mask=m2)
    tl.store(v_base + (blk * stride_vb + slot * stride_vt)[:, None] + d[None, :], vr, mask=m2)


@triton.jit
def _summary_kernel(
    k_ptr,  # [NB, bs, H, D]
    ids_ptr,  # [N, H] int32 (head stride may be 0)
    ntok_ptr,  # [N, H] int32 (head stride may be 0)
    kmin_ptr, kmax_ptr,  # [NB, H, D]
    N,
    stride_kb, stride_kt, stride_kh,
    stride_in, stride_ih,
    stride_nn, stride_nh,
    stride_sb, stride_sh,
    BS: tl.constexpr, BLOCK_BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_E: tl.constexpr,
):
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    h = tl.program_id(1)
    em = e < N
    blk = tl.load(ids_ptr + e * stride_in + h * stride_ih, mask=em, other=-1)
    n = tl.minimum(tl.load(ntok_ptr + e * stride_nn + h * stride_nh, mask=em, other=0), BS)
    live = em & (n > 0) & (blk >= 0)
    blk = tl.where(live, blk, 0).to(tl.int64)
    t = tl.arange(0, BLOCK_BS)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m3 = live[:, None, None] & (t[None, :, None] < n[:, None, None]) & dm[None, None, :]
    off = (blk * stride_kb)[:, None, None] + t[None, :, None] * stride_kt + d[None, None, :]
    k = tl.load(k_ptr + h.to(tl.int64) * stride_kh + off, mask=m3, other=0.0).to(tl.float32)
    kmn = tl.min(tl.where(m3, k, float("inf")), axis=1)  # [BLOCK_E, BLOCK_D]
    kmx = tl.max(tl.where(m3, k, float("-inf")), axis=1)
    o = (blk * stride_sb + h * stride_sh)[:, None] + d[None, :]
    m2 = live[:, None] & dm[None, :]
    tl.store(kmin_ptr + o, kmn.to(kmin_ptr.dtype.element_ty), mask=m2)
    tl.store(kmax_ptr + o, kmx.to(kmax_ptr.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------------------
def _check_cache(key_cache, value_cache=None):
    if key_cache.dim() != 4 or key_cache.stride(3) != 1:
        raise ValueError(f"caches must be [NB, bs, H, D] views with a contiguous head dim, "
                         f"got {tuple(key_cache.shape)}")
    if value_cache is not None and (value_cache.shape != key_cache.shape or value_cache.stride(3) != 1):
        raise ValueError(f"value_cache {tuple(value_cache.shape)} must match key_cache {tuple(key_cache.shape)}")


def alloc_compact_workspace(key_cache: torch.Tensor, batch: int, max_kept: int):
    """``(k_buf, v_buf)``, each ``[B, H, K, D]`` in the cache dtype."""
    H, D = key_cache.shape[2], key_cache.shape[3]
    return tuple(torch.empty(batch, H, max_kept, D, dtype=key_cache.dtype, device=key_cache.device) for _ in range(2))


def launch_compact(key_cache, value_cache, block_table, kept, num_kept, workspace=None, block_t: int = 32):
    _check_cache(key_cache, value_cache)
    B, H, K = kept.shape
    D = key_cache.shape[3]
    bt = table_3d(block_table, H)
    kbuf, vbuf = workspace if workspace is not None else alloc_compact_workspace(key_cache, B, K)
    block_t = min(block_t, next_pow2(K))
    grid = (B, H, triton.cdiv(K, block_t))
    common = dict(BS=key_cache.shape[1], D=D, BLOCK_D=next_pow2(D), BLOCK_T=block_t)
    kstr = (*key_cache.stride()[:3], *value_cache.stride()[:3], bt.stride(0), bt.stride(1), bt.stride(2))
    _gather_kept_kernel[grid](key_cache, value_cache, bt, kept, num_kept, kbuf, vbuf, *kstr,
                              kept.stride(0), kept.stride(1), num_kept.stride(0), num_kept.stride(1),
                              kbuf.stride(0), kbuf.stride(1), kbuf.stride(2), **common)
    _scatter_kept_kernel[grid](key_cache, value_cache, bt, num_kept, kbuf, vbuf, *kstr,
                               num_kept.stride(0), num_kept.stride(1),
                               kbuf.stride(0), kbuf.stride(1), kbuf.stride(2), **common)


def _ids_2d(x, H):
    return x[:, None].expand(x.shape[0], H) if x.dim() == 1 else x


def launch_summaries(key_cache, block_ids, num_tokens, kmin, kmax, block_e: int = 4):
    _check_cache(key_cache)
    H, D = key_cache.shape[2], key_cache.shape[3]
    ids, nt = _ids_2d(block_ids, H), _ids_2d(num_tokens, H)
    if kmin.stride() != kmax.stride() or kmin.stride(2) != 1:
        raise ValueError("kmin and kmax need equal strides and a contiguous head dim")
    if ids.shape[0] == 0:
        return
    bs = key_cache.shape[1]
    N = ids.shape[0]
    block_e = min(block_e, next_pow2(N))
    _summary_kernel[(triton.cdiv(N, block_e), H)](
        key_cache, ids, nt, kmin, kmax, N,
        *key_cache.stride()[:3], ids.stride(0), ids.stride(1), nt.stride(0), nt.stride(1),
        kmin.stride(0), kmin.stride(1),
        BS=bs, BLOCK_BS=next_pow2(bs), D=D, BLOCK_D=next_pow2(D), BLOCK_E=block_e,
    )


# ----------------------------------------------------------------------------------------------------------------
# References (the definition, and the CPU path); both work in place like the kernels
# ----------------------------------------------------------------------------------------------------------------
def reference_compact(key_cache, value_cache, block_table, kept, num_kept):
    B, H, K = kept.shape
    bs = key_cache.shape[1]
    bt = table_3d(block_table, H).long()
    dev = key_cache.device
    i = torch.arange(K, device=dev)[None, None, :].expand(B, H, K)
    live = i < num_kept.to(dev).long()[:, :, None]
    heads = torch.arange(H, device=dev)[None, :, None].expand(B, H, K)
    src = kept.long().clamp(min=0)
    src_blk = bt.gather(2, (src // bs).clamp(max=bt.shape[2] - 1))
    dst_blk = bt.gather(2, (i // bs).clamp(max=bt.shape[2] - 1))
    sel = (live,)
    for cache in (key_cache, value_cache):
        rows = cache[src_blk[sel], (src % bs)[sel], heads[sel]].clone()  # gather first, then scatter
        cache[dst_blk[sel], (i % bs)[sel], heads[sel]] = rows


def reference_summaries(key_cache, block_ids, num_tokens, kmin, kmax):
    H = key_cache.shape[2]
    bs = key_cache.shape[1]
    ids, nt = _ids_2d(block_ids, H).long(), _ids_2d(num_tokens, H).long().clamp(max=bs)
    live = (nt > 0) & (ids >= 0)
    heads = torch.arange(H, device=key_cache.device)[None, :].expand_as(ids)
    e_ids, e_heads, e_n = ids[live], heads[live], nt[live]
    rows = key_cache[e_ids, :, e_heads].float()  # [E, bs, D]
    filled = (torch.arange(bs, device=key_cache.device)[None, :] < e_n[:, None])[:, :, None]
    kmin[e_ids, e_heads] = rows.masked_fill(~filled, float("inf")).amin(1).to(kmin.dtype)
    kmax[e_ids, e_heads] = rows.masked_fill(~filled, float("-inf")).amax(1).to(kmax.dtype)


def table_entries(block_table, seq_lens, block_size: int):
    """Whole-request summary entries: ``(block_ids [B*M] or [B*M, H], num_tokens [B*M])`` (fixed shapes)."""
    M = block_table.shape[-1]
    j = torch.arange(M, device=block_table.device)
    nt = (seq_lens.to(block_table.device).long()[:, None] - j[None, :] * block_size).clamp(0, block_size)
    if block_table.dim() == 2:
        return block_table.reshape(-1), nt.reshape(-1).to(torch.int32)
    B, H, _ = block_table.shape
    return block_table.permute(0, 2, 1).reshape(B * M, H), nt.reshape(-1, 1).expand(B * M, H).to(torch.int32)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def compact(key_cache, value_cache, block_table, kept, num_kept, workspace=None, *, backend="auto"):
    """Move each (request, head)'s kept tokens to its first slots, in place (module contract)."""
    if use_triton(key_cache, kept, backend=backend):
        return launch_compact(key_cache, value_cache, block_table, kept, num_kept, workspace)
    _check_cache(key_cache, value_cache)
    return reference_compact(key_cache, value_cache, block_table, kept, num_kept)


def build_chunk_summaries(key_cache, block_ids, num_tokens, kmin, kmax, *, backend="auto"):
    """(Re)write ``kmin``/``kmax`` of the listed blocks (module contract)."""
    if use_triton(key_cache, block_ids, kmin, backend=backend):
        return launch_summaries(key_cache, block_ids, num_tokens, kmin, kmax)
    _check_cache(key_cache)
    return reference_summaries(key_cache, block_ids, num_tokens, kmin, kmax)


def summaries_from_table(key_cache, block_table, seq_lens, kmin, kmax, *, backend="auto"):
    """Summaries of every block of every request (``block_table [B, M]`` or ``[B, H, M]``, ``seq_lens [B]``)."""
    ids, nt = table_entries(block_table, seq_lens, key_cache.shape[1])
    return build_chunk_summaries(key_cache, ids, nt, kmin, kmax, backend=backend)


__all__ = ["compact", "build_chunk_summaries", "summaries_from_table", "alloc_compact_workspace",
           "launch_compact", "launch_summaries", "reference_compact", "reference_summaries", "table_entries",
           "HAS_TRITON"]
