"""Where vLLM's CPU kernels put each key element inside a KV block.

``cpu_attn_reshape_and_cache`` stores values row-major ``[bs, D]`` but keys in an ISA-specific order (for
the ``vec`` ISA a block's keys are channel-major ``[D, bs]``; AMX packs differently). Rather than hard-code
each, :func:`key_layout` writes a probe through vLLM's own op once and reads back the permutation, so the CPU
KV-ops implementation (``kv_ops.CpuKVOps.read_pages`` / ``write_pages``) reads and writes keys of any ISA through
one gather index.
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
