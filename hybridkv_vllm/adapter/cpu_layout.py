"""Where vLLM's CPU kernels put each key element inside a KV block.

``cpu_attn_reshape_and_cache`` stores values row-major ``[bs, D]`` but keys in an ISA-specific order (for
the ``vec`` ISA a block's keys are channel-major ``[D, bs]``; AMX packs differently). Rather than hard-code
each, :func:`key_layout` writes a probe through vLLM's own op once and reads back the permutation, so the
compaction and retrieval code can read and write keys of any ISA through one gather index.
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def key_layout(isa: str, dtype: torch.dtype, block_size: int, head_size: int) -> torch.Tensor:
    """``int64 [bs * D]``: ``flat_block[perm[t * D + d]]`` holds key element ``(t, d)`` of a one-head block."""
    from vllm import _custom_ops as ops

    bs, d = block_size, head_size
    coords = []
    for axis in (0, 1):                        # two passes keep every probe value exact in bf16/fp16
        cache = torch.full((1, 1, 2 * bs, d), -1.0, dtype=dtype)
        key_cache, value_cache = cache.chunk(2, dim=2)
        grid = torch.arange(bs)[:, None].expand(bs, d) if axis == 0 else torch.arange(d)[None, :].expand(bs, d)
        probe = grid.to(dtype).reshape(bs, 1, d).contiguous()
        ops.cpu_attn_reshape_and_cache(probe, probe, key_cache, value_cache, torch.arange(bs, dtype=torch.int64),
                                       isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype="auto")
        coords.append(key_cache.reshape(-1).to(torch.int64))
    flat_index = coords[0] * d + coords[1]     # element stored at each flat position
    perm = torch.empty(bs * d, dtype=torch.int64)
    perm[flat_index] = torch.arange(bs * d)
    if not torch.equal(torch.sort(flat_index).values, torch.arange(bs * d)):
        raise RuntimeError(f"unexpected CPU key-cache layout for isa={isa}, dtype={dtype}")
    return perm


def read_keys(key_cache: torch.Tensor, block_ids: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``[n, bs, D]`` keys of one head from blocks ``block_ids`` of a ``[num_blocks, 1, bs, D]`` key view."""
    n, bs, d = block_ids.numel(), key_cache.shape[2], key_cache.shape[3]
    flat = key_cache[block_ids.long(), 0].reshape(n, bs * d)
    return flat[:, perm].reshape(n, bs, d)


def write_keys(key_cache: torch.Tensor, block_ids: torch.Tensor, keys: torch.Tensor, perm: torch.Tensor) -> None:
    """Write ``keys [n, bs, D]`` into blocks ``block_ids`` in the kernel's layout."""
    n, bs, d = keys.shape
    flat = torch.empty(n, bs * d, dtype=key_cache.dtype)
    flat[:, perm] = keys.reshape(n, bs * d).to(key_cache.dtype)
    key_cache[block_ids.long(), 0] = flat.reshape(n, bs, d)
