"""Hot-buffer swap-in: copy the cold-tier pages of newly chosen chunks into the hot slots of dynamic heads.

Contract
--------
A *page* is one KV block of one KV head in whatever layout the attention kernel reads (here: ``[R, D]`` rows, e.g.
the K tile then the V tile of a one-head block, ``R = 2 * bs``); the pool and the cold tier store pages alike, so a
swap-in is a page copy.
    pool     ``[NP, R, D]``    the fast pool's pages (written in place)
    cold     ``[NC, R, D]``    the cold tier's pages (same dtype)
    dst      ``[B, H, K]``  int   the pool page of each hot slot (any value where ``moved`` is false)
    src      ``[B, H, K]``  int   the cold page each slot must hold (any value where ``moved`` is false)
    moved    ``[B, H, K]``  bool  the slots to copy (``core.hot_buffer.assign_slots``)
Effect: ``pool[dst[i]] = cold[src[i]]`` for every ``i`` with ``moved[i]``; nothing else changes. Two entries may
name the same ``dst`` only with the same ``src`` and ``moved`` (a caller pads a head's unused slots with a copy of
its slot 0).

No output shape depends on data and nothing waits for the host: the kernel's grid is ``(B * H * K, cdiv(R * D,
BLOCK))`` and a program whose slot did not move returns at once, so only the moved pages cost bandwidth. The
reference has the same fixed shapes: it rewrites every listed page, a moved one with its cold page and any other
with its own content.
"""
from __future__ import annotations

import torch

from ._triton import HAS_TRITON, next_pow2, tl, triton, use_triton


@triton.jit
def _swap_in_kernel(pool_ptr, cold_ptr, dst_ptr, src_ptr, moved_ptr, page_elems,
                    stride_pool, stride_cold, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    piece = tl.program_id(1)
    if tl.load(moved_ptr + i) == 0:
        return
    dst = tl.load(dst_ptr + i).to(tl.int64)
    src = tl.load(src_ptr + i).to(tl.int64)
    e = piece * BLOCK + tl.arange(0, BLOCK)
    m = e < page_elems
    x = tl.load(cold_ptr + src * stride_cold + e, mask=m)
    tl.store(pool_ptr + dst * stride_pool + e, x, mask=m)


def _check(pool, cold, dst, src, moved):
    if pool.dim() != 3 or cold.shape[1:] != pool.shape[1:] or cold.dtype != pool.dtype:
        raise ValueError(f"pool [NP, R, D] and cold [NC, R, D] must agree: {tuple(pool.shape)} vs {tuple(cold.shape)}")
    if not (dst.shape == src.shape == moved.shape) or moved.dtype != torch.bool:
        raise ValueError(f"dst, src and moved (bool) must share one shape: {tuple(dst.shape)}, {tuple(src.shape)}, "
                         f"{tuple(moved.shape)} {moved.dtype}")


def launch(pool, cold, dst, src, moved, block: int = 1024):
    _check(pool, cold, dst, src, moved)
    if pool.stride(2) != 1 or pool.stride(1) != pool.shape[2] or cold.stride(2) != 1 or cold.stride(1) != cold.shape[2]:
        raise ValueError("pages must be contiguous [R, D] tiles")
    n = moved.numel()
    if n == 0:
        return
    page = pool.shape[1] * pool.shape[2]
    block = min(block, next_pow2(page))
    _swap_in_kernel[(n, triton.cdiv(page, block))](
        pool, cold, dst.reshape(-1).contiguous(), src.reshape(-1).contiguous(), moved.reshape(-1).contiguous(),
        page, pool.stride(0), cold.stride(0), BLOCK=block)


def reference(pool, cold, dst, src, moved):
    """The definition, with the kernel's fixed shapes (see the module contract)."""
    _check(pool, cold, dst, src, moved)
    d = dst.reshape(-1).long().clamp(0, pool.shape[0] - 1)
    s = src.reshape(-1).long().clamp(0, max(cold.shape[0] - 1, 0))
    m = moved.reshape(-1)[:, None, None]
    if cold.shape[0] == 0:
        return
    pool.index_copy_(0, d, torch.where(m, cold.index_select(0, s), pool.index_select(0, d)))


def run(pool, cold, dst, src, moved, *, backend: str = "auto"):
    """Swap the moved slots in (module contract). Triton on CUDA, the reference otherwise."""
    if use_triton(pool, cold, dst, backend=backend):
        return launch(pool, cold, dst, src, moved)
    return reference(pool, cold, dst, src, moved)


__all__ = ["run", "launch", "reference", "HAS_TRITON"]
