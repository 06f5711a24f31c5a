"""Shared builders for the kernel tests: seeded inputs and paged caches with scattered blocks and garbage slots."""
from __future__ import annotations

import torch

from hybridkv_kernels.sparse_decode import kv_views

GARBAGE = 1.0e4  # unused cache slots: large but finite, so a stray read changes the result without NaN-ing refs
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}  # (atol, rtol)


def gen(seed: int, device="cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def randn(g, *shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill an output with NaN (floats) or a sentinel (ints) before a kernel writes it."""
    return t.fill_(float("nan") if t.is_floating_point() else -12345)


def paged_cache(g, seq_lens, H, D, bs, dtype, layout="nb2", extra_blocks=3, device="cpu"):
    """Random K/V per request scattered into a paged cache (``layout`` as ``sparse_decode.kv_views``).

    Returns ``(cache, k_view, v_view, block_table [B, M] int32, dense_k [list of [S, H, D]], dense_v)``.
    Every slot not holding a token (partial last blocks, spare blocks) holds ``GARBAGE``.
    """
    B = len(seq_lens)
    M = max(1, max(-(-s // bs) for s in seq_lens))
    NB = B * M + extra_blocks
    perm = torch.randperm(NB, generator=g)
    table = perm[: B * M].view(B, M).to(torch.int32)
    if layout == "nb2":
        cache = torch.full((NB, 2, bs, H, D), GARBAGE, dtype=dtype)
    elif layout == "heads":
        cache = torch.full((H, NB, 2, bs, D), GARBAGE, dtype=dtype)
    else:  # "flash" and "cpu": [NB, H, bs, 2D]
        cache = torch.full((NB, H, bs, 2 * D), GARBAGE, dtype=dtype)
    cache = cache.to(device)
    kv, vv = kv_views(cache, layout, D)
    dense_k, dense_v = [], []
    for b, s in enumerate(seq_lens):
        k = randn(g, s, H, D, dtype=dtype, device=device)
        v = randn(g, s, H, D, dtype=dtype, device=device)
        for t in range(s):
            blk = int(table[b, t // bs])
            kv[blk, t % bs] = k[t]
            vv[blk, t % bs] = v[t]
        dense_k.append(k)
        dense_v.append(v)
    return cache, kv, vv, table.to(device), dense_k, dense_v


def seed_of(*params) -> int:
    """A per-parametrisation seed that is stable across processes (``hash`` of a str is not)."""
    import zlib

    return zlib.crc32(repr(params).encode())
