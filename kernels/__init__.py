"""hybridkv_kernels: Triton kernels for HybridKV, each beside the PyTorch reference that defines it.

Every module reads top-down: contract (shapes, dtypes), ``@triton.jit`` kernels, launchers writing into
caller-preallocated outputs, the PyTorch reference (also the CPU path), and one dispatch function that runs the
launcher on CUDA and the reference elsewhere (``backend="auto" | "triton" | "torch"``).

=====================  =========================================================================================
module                 dispatch
=====================  =========================================================================================
``chunk_scoring``      ``run(q, kmin, kmax, block_table, seq_lens, k, out, *, chunk_size, ...)``: Quest scores +
                       fixed-k chunk selection per (request, KV head), optionally the block lists for decode
``sparse_decode``      ``run(q, key_cache, value_cache, block_ids, num_tokens, scale, out, *, workspace)``: paged
                       decode attention over explicit block lists (split-K, GQA-aware); ``kv_views`` for layouts
``compaction``         ``compact(...)``: static heads' kept tokens to the first slots (in place);
                       ``build_chunk_summaries(...)`` / ``summaries_from_table(...)``: per-block kmin / kmax
``text_prior``         ``run(q_obs, k, q_pos, scale, out, span)``: observation-window scores at prefill; ``pool``
``swap_in``            ``run(pool, cold, dst, src, moved)``: dynamic heads' hot-buffer pages from the cold tier
=====================  =========================================================================================

Decode path: no host synchronisation, no data-dependent shapes (fixed ``k``, ``-1`` padding, workspaces sized from
shapes), so one step can be captured in a CUDA graph. Numbers: ``benchmarks/results/kernels_h100.md``.
"""
from . import chunk_scoring, compaction, sparse_decode, swap_in, text_prior
from ._triton import HAS_TRITON

__all__ = ["chunk_scoring", "compaction", "sparse_decode", "swap_in", "text_prior", "HAS_TRITON"]
