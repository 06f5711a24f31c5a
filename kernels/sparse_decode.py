"""Sparse paged decode attention: one query token per request over an explicit block list per (request, KV head).

Contract
--------
Inputs
    q            ``[B, Hq, D]``        bf16/fp16/fp32   the decode query (``Hq = G * H``); any strides, last dim 1
    key_cache    ``[NB, bs, H, D]``    same dtype       paged keys, any strides with a contiguous last dim
    value_cache  ``[NB, bs, H, D]``    same dtype       paged values (may be a different view of the same storage)
    block_ids    ``[B, H, L]``         int32            physical blocks each (request, KV head) attends to, in order
    num_tokens   ``[B, H]``            int32            tokens attended: token ``t`` is slot ``t % bs`` of block
                                                        ``block_ids[b, h, t // bs]``, ``t < num_tokens[b, h]``
                                                        (clamped to ``L * bs``); only the last listed block may be
                                                        partial; entries past the last used one are never read
    scale        float                                  softmax scale
Output (caller-preallocated): ``out [B, Hq, D]`` (any float dtype; every element written).
Workspace (caller-owned, see ``Workspace.alloc``): ``o [B, Hq, S, D]`` fp32 and ``lse [B, Hq, S]`` fp32 partials of
the ``S`` context splits (flash-decoding); ``S = 1`` skips the reduce kernel and needs no workspace.

    out[b, hq] = softmax_t(q[b, hq] . K[t] * scale) @ V[t], over the listed tokens t of KV head ``hq // G``
    A (request, head) with ``num_tokens == 0`` gives 0.

This one list covers both HybridKV head kinds:
    static head  : ``table[:nB] ++ table[P // bs : ceil(seq / bs)]``, ``num_tokens = nB * bs + seq - (P // bs) * bs``
    dynamic head : ``chunk_scoring.run(..., out_block_ids, out_num_tokens)`` writes it directly.

Paged layouts (``kv_views``): every layout is a pair of ``[NB, bs, H, D]`` strided views, so one kernel serves all:
    ``"nb2"``   ``[NB, 2, bs, H, D]``: a K plane then a V plane per block (the shape earlier vLLM releases gave
                FlashInfer / TRITON_ATTN; the benchmark's layout)
    ``"flash"`` ``[NB, H, bs, 2D]`` logical: what the installed vLLM 0.32 gives FLASH_ATTN and TRITON_ATTN (checked in
                ``v1/attention/backends/flash_attn.py:1252``: ``kv_cache.transpose(1, 2).split(D, -1)``); the
                physical order may be LBNHC, and the strides handle it
    ``"cpu"``   ``[NB, H, bs, 2D]`` (vLLM CPU_ATTN: ``view(NB, H, 2bs, D)``, a K tile then a V tile per block/head)
    ``"heads"`` ``[H, NB, 2, bs, D]``: one single-head cache per KV head (DESIGN §6 virtual layers) stacked, so a
                head's block is one contiguous ``bs * D`` tile (with real virtual layers, call once per layer, H=1)

Kernels: ``_sparse_decode_kernel`` (grid ``(B, H, S)``): each program loads the ``G`` queries of its KV head once,
walks its share of the listed tokens ``BLOCK_N`` at a time (addresses gathered through ``block_ids``), keeps an
online softmax (exp2, fp32 ``m``, ``l``, ``acc``), and writes either the output (``S == 1``) or a normalised
partial + log-sum-exp. With ``workspace.counter`` (``Workspace.alloc`` gives one) and ``S <= FUSED_MAX_SPLITS``
the last of the ``S`` programs of a (request, KV head) to finish merges the partials in the same launch (an acq_rel
atomic count, reset to 0 by that program); otherwise ``_combine_kernel`` (grid ``(B, Hq)``) merges them. Splits
divide each request's own token count, so short and long requests share one launch; the split count depends only on
shapes. No host synchronisation; CUDA-graph safe with a fixed workspace.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from ._triton import HAS_TRITON, INTERPRET, LOG2E, next_pow2, tl, triton, use_triton


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _sparse_decode_kernel(
    q_ptr,  # [B, Hq, D]
    k_ptr,  # [NB, bs, H, D]
    v_ptr,  # [NB, bs, H, D]
    ids_ptr,  # [B, H, L] int32
    ntok_ptr,  # [B, H] int32
    out_ptr,  # [B, Hq, D]            (ONE_SPLIT)
    po_ptr,  # [B, Hq, S, D] fp32     (not ONE_SPLIT)
    plse_ptr,  # [B, Hq, S] fp32      (not ONE_SPLIT)
    cnt_ptr,  # [B, >=H] int32 zeros  (FUSED: arrival counters, reset by the reducing program)
    qk_scale,  # scale * log2(e)
    L, num_splits,
    stride_qb, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ib, stride_ih, stride_il,
    stride_nb, stride_nh,
    stride_ob, stride_oh,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_cb,
    BS: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, ONE_SPLIT: tl.constexpr, DOT_F32: tl.constexpr,
    FUSED: tl.constexpr, G_C: tl.constexpr, CHUNK_S: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    n_tok = tl.minimum(tl.load(ntok_ptr + b * stride_nb + h * stride_nh), L * BS)
    per_split = tl.cdiv(tl.cdiv(n_tok, num_splits), BLOCK_N) * BLOCK_N
    start = s * per_split
    end = tl.minimum(start + per_split, n_tok)

    g = tl.arange(0, G_PAD)
    d = tl.arange(0, BLOCK_D)
    gm = g < G
    dm = d < D
    q = tl.load(q_ptr + b * stride_qb + (h * G + g)[:, None] * stride_qh + d[None, :],
                mask=gm[:, None] & dm[None, :], other=0.0)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    ids_base = ids_ptr + b * stride_ib + h * stride_ih
    k_base = k_ptr + h.to(tl.int64) * stride_kh  # int64: a cache can exceed 2**31 elements
    v_base = v_ptr + h.to(tl.int64) * stride_vh
    for t0 in range(start, end, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        tm = t < end
        blk = tl.load(ids_base + (t // BS) * stride_il, mask=tm, other=0).to(tl.int64)
        slot = t % BS
        kv_m = tm[:, None] & dm[None, :]
        k = tl.load(k_base + (blk * stride_kb + slot * stride_kt)[:, None] + d[None, :],
                    mask=kv_m, other=0.0)
        if DOT_F32:
            qk = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = tl.where(tm[None, :], qk * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + (blk * stride_vb + slot * stride_vt)[:, None] + d[None, :],
                    mask=kv_m, other=0.0)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    hq = h * G + g
    om = gm[:, None] & dm[None, :]
    if ONE_SPLIT:
        tl.store(out_ptr + b * stride_ob + hq[:, None] * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=om)
    else:
        tl.store(po_ptr + b * stride_pb + hq[:, None] * stride_ph + s * stride_ps + d[None, :], o, mask=om)
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        tl.store(plse_ptr + b * stride_lb + hq * stride_lh + s, lse, mask=gm)
        if FUSED:
            # split-K combine folded in: the last of the (b, h)'s S programs to arrive merges the partials.
            # Barrier, then a gpu-scope acq_rel atomic (the cooperative-groups grid-sync pattern): every
            # thread's partial stores are released before the count, and the last arriver acquires all of them.
            tl.debug_barrier()
            cnt = cnt_ptr + b * stride_cb + h
            arrived = tl.atomic_add(cnt, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.store(cnt, 0)  # every program of this (b, h) has counted: reset for the next launch / replay
                gc = tl.arange(0, G_C)
                sc = tl.arange(0, CHUNK_S)
                gcm = gc < G
                hqc = h * G + gc
                l_base = plse_ptr + b * stride_lb + hqc[:, None] * stride_lh
                o_base = po_ptr + b * stride_pb + hqc[:, None, None] * stride_ph + d[None, None, :]
                m_r = tl.full([G_C], float("-inf"), tl.float32)
                w_r = tl.zeros([G_C], tl.float32)
                a_r = tl.zeros([G_C, BLOCK_D], tl.float32)
                for s0 in range(0, num_splits, CHUNK_S):
                    sp = s0 + sc
                    lm = gcm[:, None] & (sp < num_splits)[None, :]
                    lse_c = tl.load(l_base + sp[None, :], mask=lm, other=float("-inf"), cache_modifier=".cg")
                    m_n = tl.maximum(m_r, tl.max(lse_c, axis=1))
                    safe = tl.where(m_n > float("-inf"), m_n, 0.0)
                    w = tl.exp2(lse_c - safe[:, None])  # 0 where lse = -inf (empty split / padding)
                    o_c = tl.load(o_base + sp[None, :, None] * stride_ps,
                                  mask=(lm & (w > 0))[:, :, None] & dm[None, None, :], other=0.0,
                                  cache_modifier=".cg")
                    r = tl.exp2(m_r - safe)
                    a_r = a_r * r[:, None] + tl.sum(o_c * w[:, :, None], axis=1)
                    w_r = w_r * r + tl.sum(w, axis=1)
                    m_r = m_n
                res = a_r / tl.where(w_r > 0, w_r, 1.0)[:, None]
                tl.store(out_ptr + b * stride_ob + hqc[:, None] * stride_oh + d[None, :],
                         res.to(out_ptr.dtype.element_ty), mask=gcm[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(
    po_ptr,  # [B, Hq, S, D] fp32
    plse_ptr,  # [B, Hq, S] fp32
    out_ptr,  # [B, Hq, D]
    num_splits,
    stride_pb, stride_ph, stride_ps,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0)
    hq = tl.program_id(1)
    sp = tl.arange(0, BLOCK_S)
    d = tl.arange(0, BLOCK_D)
    sm = sp < num_splits
    dm = d < D
    lse = tl.load(plse_ptr + b * stride_lb + hq * stride_lh + sp, mask=sm, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.where(lse > float("-inf"), tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0)), 0.0)
    o = tl.load(po_ptr + b * stride_pb + hq * stride_ph + sp[:, None] * stride_ps + d[None, :],
                mask=sm[:, None] & dm[None, :] & (w[:, None] > 0), other=0.0)
    wsum = tl.sum(w, axis=0)
    res = tl.sum(o * w[:, None], axis=0) / tl.where(wsum > 0, wsum, 1.0)
    tl.store(out_ptr + b * stride_ob + hq * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=dm)


# ----------------------------------------------------------------------------------------------------------------
# Plan, workspace, launcher
# ----------------------------------------------------------------------------------------------------------------
# Defaults picked by the sweep in benchmarks/kernels.py on an H100 (benchmarks/results/kernels_h100.md):
WAVES = 2.0  # split planning: about two programs per SM ...
MIN_TOKENS_PER_SPLIT = 128  # ... but at least two 64-token tiles per split
LAUNCH = dict(block_n=64, num_warps=8, num_stages=3)
# Fused combine (``Workspace.alloc`` gives counters): used up to FUSED_MAX_SPLITS splits (beyond, the serial merge
# in one program costs more than the separate combine kernel: B=1, S=26-52 measured 1-4 us slower). It merges
# COMBINE_CHUNK_S splits a step (None: 2 for S <= 4, else 8; both keep the kernel at 80 registers, 3 programs per
# SM; 4 and 16 took it to 91-96 registers, 2 programs per SM, and were 10-15 % slower at B=32).
FUSED_MAX_SPLITS = 8
COMBINE_CHUNK_S: int | None = None

@lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def plan_splits(batch: int, num_kv_heads: int, max_tokens: int, device: torch.device | str, *,
                waves: float = WAVES, min_tokens_per_split: int = MIN_TOKENS_PER_SPLIT, fit: bool | None = None,
                slots_per_sm: int = 2) -> int:
    """Context splits ``S`` from shapes only: about ``waves`` programs per SM, at least ``min_tokens_per_split``
    tokens per split (defaults measured on an H100, ``benchmarks/results/kernels_h100.md``).

    ``fit=True`` instead picks the ``S`` (same cap) minimising ``ceil(B * H * S / (sms * slots_per_sm)) *
    (max_tokens / S + min_tokens_per_split)``: whole waves of programs, each paying its tokens plus a fixed cost of
    about ``min_tokens_per_split`` tokens. ``fit=None`` (default) fits when the (request, KV head) pairs are fewer
    than half the SMs (B=8, H=4: S=8 instead of 9, 2-4 % faster with the fused combine; B=1 gets the same S
    either way) and keeps the ``waves`` rule otherwise (B=32: S=3 beat the fit's S=2 by 2-3 %)."""
    device = torch.device(device)
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 4
    pairs = max(batch * num_kv_heads, 1)
    cap = int(min(max(1, triton.cdiv(max_tokens, min_tokens_per_split)), 256))
    if fit is None:
        fit = 2 * pairs < sms
    if fit:
        slots = max(1, sms * slots_per_sm)
        return min(range(1, cap + 1),
                   key=lambda s: (-(-pairs * s // slots) * (max_tokens / s + min_tokens_per_split), s))
    want = math.ceil(waves * sms / pairs)
    return int(max(1, min(want, cap)))


@dataclass(frozen=True)
class Workspace:
    """Caller-owned partials of the context splits: ``o [B, Hq, S, D]`` fp32, ``lse [B, Hq, S]`` fp32, and
    ``counter [B, Hq]`` int32 zeros (arrival counts: the last split program of each (request, KV head) merges the
    partials in the same launch and sets its count back to 0, so one workspace serves every call and graph replay).
    A workspace built without ``counter`` uses a separate combine kernel instead."""

    o: torch.Tensor
    lse: torch.Tensor
    counter: torch.Tensor | None = None

    @property
    def num_splits(self) -> int:
        return self.lse.shape[2]

    @classmethod
    def alloc(cls, batch: int, num_q_heads: int, head_dim: int, num_splits: int, device) -> "Workspace":
        return cls(torch.empty(batch, num_q_heads, num_splits, head_dim, dtype=torch.float32, device=device),
                   torch.empty(batch, num_q_heads, num_splits, dtype=torch.float32, device=device),
                   torch.zeros(batch, num_q_heads, dtype=torch.int32, device=device))


def kv_views(kv_cache: torch.Tensor, layout: str, head_dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(key_cache, value_cache)`` as ``[NB, bs, H, D]`` strided views of one layer's paged cache (no copy)."""
    if layout == "nb2":  # [NB, 2, bs, H, D]
        return kv_cache[:, 0], kv_cache[:, 1]
    if layout == "flash":  # logical [NB, H, bs, 2D]
        d = head_dim or kv_cache.shape[-1] // 2
        k, v = kv_cache.transpose(1, 2).split(d, dim=-1)
        return k, v
    if layout == "cpu":  # [NB, H, bs, 2D] = [NB, H, 2bs, D]: K tile then V tile
        nb, h, bs, d2 = kv_cache.shape
        k, v = kv_cache.view(nb, h, 2 * bs, d2 // 2).chunk(2, dim=2)
        return k.transpose(1, 2), v.transpose(1, 2)
    if layout == "heads":  # [H, NB, 2, bs, D]: H single-head caches (DESIGN §6 virtual layers), stacked
        return kv_cache[:, :, 0].permute(1, 2, 0, 3), kv_cache[:, :, 1].permute(1, 2, 0, 3)
    raise ValueError(f"layout must be 'nb2', 'flash', 'cpu' or 'heads', got {layout!r}")


def _dot_f32(dtype: torch.dtype) -> bool:
    """fp32 inputs use IEEE fp32 dots; bf16 too under the interpreter (its bf16 ``tl.dot`` is wrong in Triton 3.9)."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _check(q, key_cache, value_cache, block_ids, num_tokens, out):
    if q.dim() != 3 or key_cache.dim() != 4 or key_cache.shape != value_cache.shape:
        raise ValueError(f"q must be [B, Hq, D], caches [NB, bs, H, D]; got {tuple(q.shape)}, "
                         f"{tuple(key_cache.shape)}, {tuple(value_cache.shape)}")
    B, Hq, D = q.shape
    H = key_cache.shape[2]
    if key_cache.shape[3] != D or Hq % H:
        raise ValueError(f"head dims disagree: q {tuple(q.shape)} vs cache {tuple(key_cache.shape)}")
    if block_ids.dim() != 3 or block_ids.shape[:2] != (B, H) or num_tokens.shape != (B, H):
        raise ValueError(f"block_ids must be [{B}, {H}, L] and num_tokens [{B}, {H}]; got "
                         f"{tuple(block_ids.shape)}, {tuple(num_tokens.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out must be {tuple(q.shape)}, got {tuple(out.shape)}")
    return B, Hq, H, D


def launch(q, key_cache, value_cache, block_ids, num_tokens, scale, out, *, workspace: Workspace | None = None,
           num_splits: int | None = None, block_n: int | None = None, num_warps: int | None = None,
           num_stages: int | None = None):
    """Triton path. ``workspace`` fixes ``S`` (CUDA graphs); else ``S = num_splits or plan_splits(...)``."""
    B, Hq, H, D = _check(q, key_cache, value_cache, block_ids, num_tokens, out)
    if q.stride(2) != 1 or key_cache.stride(3) != 1 or value_cache.stride(3) != 1 or out.stride(2) != 1:
        raise ValueError("q, out and the caches need a contiguous head dim")
    bs = key_cache.shape[1]
    L = block_ids.shape[2]
    if workspace is not None:
        S = workspace.num_splits
    else:
        S = num_splits or plan_splits(B, H, L * bs, q.device)
        if S > 1:
            workspace = Workspace.alloc(B, Hq, D, S, q.device)
    G = Hq // H
    block_n = block_n or LAUNCH["block_n"]
    num_warps = num_warps or LAUNCH["num_warps"]
    num_stages = num_stages or LAUNCH["num_stages"]
    if not INTERPRET:
        block_n = max(block_n, 16)  # tl.dot needs N >= 16 on GPUs
    dummy = out
    po, plse = (workspace.o, workspace.lse) if S > 1 else (dummy, dummy)
    cnt = workspace.counter if 1 < S <= FUSED_MAX_SPLITS and workspace.counter is not None else None
    fused = cnt is not None
    if fused and (cnt.dtype != torch.int32 or cnt.dim() != 2 or cnt.shape[0] < B or cnt.shape[1] < H
                  or cnt.stride(1) != 1):
        raise ValueError(f"workspace.counter must be int32 [>={B}, >={H}] with a unit last stride, got "
                         f"{cnt.dtype} {tuple(cnt.shape)}")
    G_C = next_pow2(G)
    BLOCK_D = max(16, next_pow2(D))
    chunk_s = COMBINE_CHUNK_S or (2 if S <= 4 else 8)  # combine tile [G_C, CHUNK_S, BLOCK_D] fp32
    _sparse_decode_kernel[(B, H, S)](
        q, key_cache, value_cache, block_ids, num_tokens, out, po, plse, cnt if fused else dummy,
        float(scale) * LOG2E, L, S,
        q.stride(0), q.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_ids.stride(0), block_ids.stride(1), block_ids.stride(2),
        num_tokens.stride(0), num_tokens.stride(1),
        out.stride(0), out.stride(1),
        po.stride(0), po.stride(1), po.stride(2) if S > 1 else 0,
        plse.stride(0), plse.stride(1),
        cnt.stride(0) if fused else 0,
        BS=bs, G=G, G_PAD=max(16, next_pow2(G)), D=D, BLOCK_D=BLOCK_D, BLOCK_N=block_n,
        ONE_SPLIT=S == 1, DOT_F32=_dot_f32(q.dtype), FUSED=fused, G_C=G_C, CHUNK_S=chunk_s,
        num_warps=num_warps, num_stages=num_stages,
    )
    if S > 1 and not fused:
        _combine_kernel[(B, Hq)](
            po, plse, out, S,
            po.stride(0), po.stride(1), po.stride(2), plse.stride(0), plse.stride(1),
            out.stride(0), out.stride(1),
            D=D, BLOCK_D=next_pow2(D), BLOCK_S=max(2, next_pow2(S)),
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference (the definition, and the CPU path)
# ----------------------------------------------------------------------------------------------------------------
def gather_kv(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """``[NB, bs, H, D]`` cache + ``[B, H, L]`` block lists -> ``[B, H, L * bs, D]`` (padding ids read block 0)."""
    B, H, L = block_ids.shape
    bs = cache.shape[1]
    ids = block_ids.long().clamp(min=0)[..., None]  # [B, H, L, 1]
    slots = torch.arange(bs, device=cache.device)[None, None, None, :]
    heads = torch.arange(H, device=cache.device)[None, :, None, None]
    return cache[ids, slots, heads].reshape(B, H, L * bs, cache.shape[3])


def reference(q, key_cache, value_cache, block_ids, num_tokens, scale):
    """``[B, Hq, D]`` in ``q.dtype``: fp32 softmax attention over the listed tokens (0 where none)."""
    B, Hq, D = q.shape
    H = key_cache.shape[2]
    L = block_ids.shape[2]
    bs = key_cache.shape[1]
    k = gather_kv(key_cache, block_ids).float()  # [B, H, T, D]
    v = gather_kv(value_cache, block_ids).float()
    qg = q.float().view(B, H, Hq // H, D)
    s = torch.einsum("bhgd,bhtd->bhgt", qg, k) * scale
    t = torch.arange(L * bs, device=q.device)
    live = t[None, None, :] < num_tokens.to(q.device).long()[:, :, None]  # [B, H, T]
    s = s.masked_fill(~live[:, :, None, :], float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    o = torch.einsum("bhgt,bhtd->bhgd", p, v)
    return o.reshape(B, Hq, D).to(q.dtype)


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def run(q, key_cache, value_cache, block_ids, num_tokens, scale, out, *, workspace: Workspace | None = None,
        num_splits: int | None = None, backend: str = "auto"):
    """Sparse decode attention into ``out`` (module contract). Triton on CUDA, the reference otherwise."""
    if use_triton(q, key_cache, block_ids, out, backend=backend):
        return launch(q, key_cache, value_cache, block_ids, num_tokens, scale, out, workspace=workspace,
                      num_splits=num_splits)
    _check(q, key_cache, value_cache, block_ids, num_tokens, out)
    out.copy_(reference(q, key_cache, value_cache, block_ids, num_tokens, scale))
    return out


__all__ = ["run", "launch", "reference", "gather_kv", "kv_views", "plan_splits", "Workspace", "HAS_TRITON"]
