"""Text-prior scores at prefill without an attention matrix (DESIGN §4 ``text_prior_scores``, before pooling).

Contract
--------
Inputs
    q_obs   ``[W, Hq, D]``  bf16/fp16/fp32   observation-window queries (the last ``obs_window`` prompt tokens)
    k       ``[P, H, D]``   same dtype       prompt keys (token-major, as vLLM hands them to the backend)
    q_pos   ``[W]``         int32            absolute position of each query: key ``j`` is visible iff ``j <= q_pos``
    scale   float
    span    ``(start, end)``                 optional key span to report (e.g. the visual tokens); the softmax is
                                             still normalised over each query's whole causal context
Output (caller-preallocated): ``out [H, end - start]`` fp32 (default span ``(0, P)``)

    out[h, j - start] = sum_{g in group(h)} sum_w softmax_j'(q_obs[w, g] . k[j', h] * scale | j' <= q_pos[w])[j]

An empty span writes nothing; a query with no visible key contributes 0.
Workspace (caller-owned, optional, ``alloc_workspace``): ``row_max, row_sum [Hq, S, W]`` fp32, the base-2
log-sum-exp parts of each row per key split (``S = row_splits(P)``, merged into split 0).
Pooling (DESIGN: 1-D max pool, stride 1, same length) is cheap and done in torch: ``pool``.

Kernels: ``_row_stats_kernel`` (grid ``(Hq, cdiv(W, BLOCK_W), S)``) streams its key split once with an online
max/sum; ``_merge_stats_kernel`` merges the ``S`` splits;
``_column_sum_kernel`` (grid ``(H, cdiv(span, BLOCK_P))``) recomputes each key tile's logits against the group's
queries and sums the normalised probabilities, so no ``[W, P]`` matrix is ever stored.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ._triton import HAS_TRITON, INTERPRET, LOG2E, next_pow2, tl, triton, use_triton


# ----------------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _row_stats_kernel(
    q_ptr,  # [W, Hq, D]
    k_ptr,  # [P, H, D]
    pos_ptr,  # [W] int32
    m_ptr, l_ptr,  # [Hq, S, W] fp32: per key split, base-2 row max and row sum
    qk_scale, W, P, keys_per_split,
    stride_qw, stride_qh, stride_kp, stride_kh, stride_sh, stride_ss,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    hq = tl.program_id(0)
    h = hq // G
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    sp = tl.program_id(2)
    wm = w < W
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    pos = tl.load(pos_ptr + w, mask=wm, other=-1)
    q = tl.load(q_ptr + w[:, None] * stride_qw + hq * stride_qh + d[None, :], mask=wm[:, None] & dm[None, :],
                other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_W], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_W], tl.float32)
    j_lo = sp * keys_per_split
    j_hi = tl.minimum(tl.minimum(tl.max(pos, axis=0) + 1, P), j_lo + keys_per_split)
    for j0 in range(j_lo, j_hi, BLOCK_P):
        j = j0 + tl.arange(0, BLOCK_P)
        jm = j < j_hi
        k = tl.load(k_ptr + j[:, None] * stride_kp + h * stride_kh + d[None, :],
                    mask=jm[:, None] & dm[None, :], other=0.0)
        if DOT_F32:
            s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        vis = (j[None, :] <= pos[:, None]) & jm[None, :]
        s = tl.where(vis, s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s - m_safe[:, None]), axis=1)
        m_i = m_new
    tl.store(m_ptr + hq * stride_sh + sp * stride_ss + w, m_i, mask=wm)
    tl.store(l_ptr + hq * stride_sh + sp * stride_ss + w, l_i, mask=wm)


@triton.jit
def _merge_stats_kernel(
    m_ptr, l_ptr,  # [Hq, S, W] fp32, merged into split 0
    W, num_splits,
    stride_sh, stride_ss,
    BLOCK_W: tl.constexpr, BLOCK_S: tl.constexpr,
):
    hq = tl.program_id(0)
    w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
    sp = tl.arange(0, BLOCK_S)
    msk = (sp < num_splits)[:, None] & (w < W)[None, :]
    off = hq * stride_sh + sp[:, None] * stride_ss + w[None, :]
    m = tl.load(m_ptr + off, mask=msk, other=float("-inf"))
    lsum = tl.load(l_ptr + off, mask=msk, other=0.0)
    m_all = tl.max(m, axis=0)
    m_safe = tl.where(m_all > float("-inf"), m_all, 0.0)
    l_all = tl.sum(tl.where(lsum > 0, lsum * tl.exp2(m - m_safe[None, :]), 0.0), axis=0)
    tl.store(m_ptr + hq * stride_sh + w, m_all, mask=w < W)
    tl.store(l_ptr + hq * stride_sh + w, l_all, mask=w < W)


@triton.jit
def _column_sum_kernel(
    q_ptr,  # [W, Hq, D]
    k_ptr,  # [P, H, D]
    pos_ptr,  # [W] int32
    m_ptr, l_ptr,  # [Hq, W] fp32
    out_ptr,  # [H, span] fp32
    qk_scale, W, P, span_start, span_end,
    stride_qw, stride_qh, stride_kp, stride_kh, stride_sh, stride_oh,
    G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_P: tl.constexpr,
    DOT_F32: tl.constexpr,
):
    h = tl.program_id(0)
    j = span_start + tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    jm = j < span_end
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    k = tl.load(k_ptr + j[:, None] * stride_kp + h * stride_kh + d[None, :], mask=jm[:, None] & dm[None, :],
                other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
    acc = tl.zeros([BLOCK_P], tl.float32)
    for g in tl.static_range(G):
        hq = h * G + g
        for w0 in range(0, W, BLOCK_W):
            w = w0 + tl.arange(0, BLOCK_W)
            wm = w < W
            pos = tl.load(pos_ptr + w, mask=wm, other=-1)
            m = tl.load(m_ptr + hq * stride_sh + w, mask=wm, other=0.0)
            lsum = tl.load(l_ptr + hq * stride_sh + w, mask=wm, other=0.0)
            q = tl.load(q_ptr + w[:, None] * stride_qw + hq * stride_qh + d[None, :],
                        mask=wm[:, None] & dm[None, :], other=0.0)
            if DOT_F32:
                s = tl.dot(q.to(tl.float32), tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(q, tl.trans(k))
            vis = (j[None, :] <= pos[:, None]) & jm[None, :] & (lsum > 0)[:, None]
            p = tl.exp2(s * qk_scale - tl.where(lsum > 0, m, 0.0)[:, None]) / tl.where(lsum > 0, lsum, 1.0)[:, None]
            acc += tl.sum(tl.where(vis, p, 0.0), axis=0)
    tl.store(out_ptr + h * stride_oh + (j - span_start), acc, mask=jm)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------
def _check(q_obs, k, q_pos, span, out):
    if q_obs.dim() != 3 or k.dim() != 3 or q_obs.shape[2] != k.shape[2] or q_obs.shape[1] % k.shape[1]:
        raise ValueError(f"q_obs must be [W, Hq, D] and k [P, H, D] with H | Hq; got {tuple(q_obs.shape)}, "
                         f"{tuple(k.shape)}")
    P = k.shape[0]
    start, end = span if span is not None else (0, P)
    if not 0 <= start <= end <= P:
        raise ValueError(f"span {span} outside [0, {P}]")
    if q_pos.shape != (q_obs.shape[0],):
        raise ValueError(f"q_pos must be [{q_obs.shape[0]}], got {tuple(q_pos.shape)}")
    if out.shape != (k.shape[1], end - start) or out.dtype != torch.float32:
        raise ValueError(f"out must be fp32 [{k.shape[1]}, {end - start}], got {out.dtype} {tuple(out.shape)}")
    return start, end


def row_splits(num_keys: int, keys_per_split: int = 1024) -> int:
    """Key splits of the row-statistics pass (shape-only): ``cdiv(P, keys_per_split)``, at most 64."""
    return max(1, min(64, triton.cdiv(num_keys, keys_per_split)))


def alloc_workspace(num_q_heads: int, window: int, num_keys: int, device):
    """``(row_max, row_sum)``, each ``[Hq, S, W]`` fp32 with ``S = row_splits(P)``."""
    S = row_splits(num_keys)
    return tuple(torch.empty(num_q_heads, S, window, dtype=torch.float32, device=device) for _ in range(2))


def launch(q_obs, k, q_pos, scale, out, span=None, workspace=None, block_w: int = 32, block_p: int = 64):
    start, end = _check(q_obs, k, q_pos, span, out)
    W, Hq, D = q_obs.shape
    P, H, _ = k.shape
    if q_obs.stride(2) != 1 or k.stride(2) != 1 or out.stride(1) != 1:
        raise ValueError("q_obs, k and out need a contiguous last dim")
    if W == 0:
        out.zero_()
        return out
    m, l = workspace if workspace is not None else alloc_workspace(Hq, W, P, q_obs.device)
    S = m.shape[1]
    kps = triton.cdiv(triton.cdiv(max(P, 1), S), block_p) * block_p
    bw = max(16, min(block_w, next_pow2(W)))
    dot_f32 = q_obs.dtype == torch.float32 or (INTERPRET and q_obs.dtype == torch.bfloat16)
    common = dict(G=Hq // H, D=D, BLOCK_D=max(16, next_pow2(D)), BLOCK_W=bw, BLOCK_P=block_p, DOT_F32=dot_f32)
    qk_scale = float(scale) * LOG2E
    _row_stats_kernel[(Hq, triton.cdiv(W, bw), S)](
        q_obs, k, q_pos, m, l, qk_scale, W, P, kps, q_obs.stride(0), q_obs.stride(1), k.stride(0), k.stride(1),
        m.stride(0), m.stride(1), **common)
    if S > 1:
        _merge_stats_kernel[(Hq, triton.cdiv(W, bw))](m, l, W, S, m.stride(0), m.stride(1), BLOCK_W=bw,
                                                      BLOCK_S=max(2, next_pow2(S)))
    if end > start:
        _column_sum_kernel[(H, triton.cdiv(end - start, block_p))](
            q_obs, k, q_pos, m, l, out, qk_scale, W, P, start, end,
            q_obs.stride(0), q_obs.stride(1), k.stride(0), k.stride(1), m.stride(0), out.stride(0), **common)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Reference (the definition, and the CPU path)
# ----------------------------------------------------------------------------------------------------------------
def reference(q_obs, k, q_pos, scale, span=None):
    """``[H, end - start]`` fp32 (unpooled)."""
    W, Hq, D = q_obs.shape
    P, H, _ = k.shape
    start, end = span if span is not None else (0, P)
    s = torch.einsum("whd,phd->hwp", q_obs.float(),
                     k.float().repeat_interleave(Hq // H, dim=1)) * scale  # [Hq, W, P]
    vis = torch.arange(P, device=k.device)[None, :] <= q_pos.to(k.device).long()[:, None]  # [W, P]
    p = torch.softmax(s.masked_fill(~vis[None], float("-inf")), dim=-1).nan_to_num(0.0)
    return p.sum(1).view(H, Hq // H, P).sum(1)[:, start:end].contiguous()


def pool(scores: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max pooling along the last dim, stride 1, same length; ``-inf`` padding, ``kernel // 2`` on the left
    and the rest on the right (as ``core.selection``). ``[H, P]`` -> ``[H, P]``."""
    if kernel <= 1 or scores.shape[-1] == 0:
        return scores
    left = kernel // 2
    padded = F.pad(scores[:, None, :], (left, kernel - 1 - left), value=float("-inf"))
    return F.max_pool1d(padded, kernel_size=kernel, stride=1)[:, 0, :]


# ----------------------------------------------------------------------------------------------------------------
# Dispatch
# ----------------------------------------------------------------------------------------------------------------
def run(q_obs, k, q_pos, scale, out, span=None, workspace=None, *, backend="auto"):
    """Unpooled text-prior scores into ``out [H, span]`` fp32 (module contract). Returns ``out``."""
    if use_triton(q_obs, k, out, backend=backend):
        return launch(q_obs, k, q_pos, scale, out, span=span, workspace=workspace)
    _check(q_obs, k, q_pos, span, out)
    out.copy_(reference(q_obs, k, q_pos, scale, span=span))
    return out


__all__ = ["run", "launch", "reference", "pool", "row_splits", "alloc_workspace", "HAS_TRITON"]
