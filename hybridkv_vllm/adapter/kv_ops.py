"""The KV-ops seam: every operation the per-layer path performs on the KV cache, in two implementations.

The per-layer path (backend.py) is written once against :class:`KVOps`; what differs between a CPU and a GPU is
only how these operations run and where a key element sits inside a page:

=====================  ===================================================  ==========================================
operation              ``CpuKVOps`` (vLLM's CPU build)                      ``TritonKVOps`` (``hybridkv_kernels``)
=====================  ===================================================  ==========================================
``write``              ``cpu_attn_reshape_and_cache``, all heads, one call  row-major pages, two index writes
``attend``             ``cpu_attention_with_kv_cache``, all heads, one      decode rows: ``sparse_decode`` (one
                       call (each (head, row) pair is one kernel row)       launch); prefill rows: the core reference
``read`` / ``write_``  torch through the ISA's key permutation              torch (row-major)
``pages``
``select``             ``chunk_scoring`` reference (vectorised torch)       ``chunk_scoring`` Triton kernels
``swap_in``            ``swap_in`` reference (fixed shapes)                 ``swap_in`` Triton kernel
``summaries``          torch min / max of the read keys                     ``compaction`` summary kernel
``compact``            read, select, write (torch)                          ``compaction`` gather / scatter kernels
=====================  ===================================================  ==========================================

Each operation's definition is the PyTorch reference beside its kernel (``hybridkv_kernels``) or in the core
(``core.reference.dense_attention``); tests hold both implementations to it.

Addressing. vLLM 0.32 places every KV-cache tensor in one backing allocation, and a one-head virtual layer's
block is one *page* ``[2 * bs, D]`` (K tile, then V tile). So the whole KV cache is one page array (``pool``), and
block ``b`` of KV head ``h`` of a layer is global page ``base[h] + b * stride[h]`` (:class:`LayerHeads`): one
index addresses every head of a layer, whichever KV-cache group (tier) it belongs to.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

import hybridkv_kernels as hk
from hybridkv_vllm.core.reference import dense_attention
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.core.step_plan import StepPlan


@dataclass(frozen=True)
class LayerHeads:
    """Where a layer's KV heads live: fixed once the KV cache is bound."""

    tiers: torch.Tensor           # int64 [H]: the tier (KV-cache group) of each head
    base: torch.Tensor            # int64 [H]: global page of block 0
    stride: torch.Tensor          # int64 [H]: global pages per block id
    dynamic: torch.Tensor         # int64 [Hd]: the layer's dynamic (retrieving) heads
    cold_heads: torch.Tensor      # int64 [Hd]: their index among the model's dynamic heads (cold-tier rows)
    static: torch.Tensor          # int64 [Hs]: the layer's static (pruned) heads
    signature: tuple[int, ...]    # tiers, as a key for values shared by layers with the same tiers

    def global_pages(self, tables: torch.Tensor, heads: torch.Tensor | None = None) -> torch.Tensor:
        """``[T, R, M]`` tier tables -> ``[H, R, M]`` global pages of this layer's heads (or of ``heads``)."""
        tiers, base, stride = self.tiers, self.base, self.stride
        if heads is not None:
            tiers, base, stride = tiers[heads], base[heads], stride[heads]
        return tables[tiers] * stride[:, None, None] + base[:, None, None]

    def global_slots(self, slots: torch.Tensor, block_size: int) -> torch.Tensor:
        """``[T, N]`` tier slot mappings -> ``[H, N]`` global slots (``-1`` stays ``-1``)."""
        s = slots[self.tiers]
        page = self.base[:, None] + torch.div(s, block_size, rounding_mode="floor") * self.stride[:, None]
        return torch.where(s < 0, -1, page * block_size + s.remainder(block_size))


def pool_of(cache: torch.Tensor, block_size: int, head_dim: int) -> torch.Tensor:
    """The page array ``[NP, 2 * bs, D]`` over the whole storage of a one-head virtual layer's cache (vLLM's CPU
    layout gives the view as ``[NB, 1, bs, 2D]``; a page is contiguous inside either way)."""
    page = 2 * block_size * head_dim
    inner = cache.shape[1] * cache.shape[2] * cache.shape[3]
    if inner != page or cache.stride(3) != 1 or cache.stride(2) != cache.shape[3] or \
            cache.stride(1) != cache.shape[2] * cache.shape[3]:
        raise RuntimeError(f"HybridKV: unexpected KV-cache view {tuple(cache.shape)} / {cache.stride()} for one-head "
                           f"pages of {block_size} x 2 x {head_dim}")
    n = cache.untyped_storage().nbytes() // (page * cache.element_size())
    return torch.as_strided(cache, (n, 2 * block_size, head_dim), (page, head_dim, 1), storage_offset=0)


def page_address(cache: torch.Tensor) -> tuple[int, int]:
    """``(base, stride)`` in pages of a one-head virtual layer's cache view (see :func:`pool_of`)."""
    page = cache.shape[1] * cache.shape[2] * cache.shape[3]
    if cache.storage_offset() % page or cache.stride(0) % page:
        raise RuntimeError(f"HybridKV: KV-cache view offset {cache.storage_offset()} / block stride "
                           f"{cache.stride(0)} is not a whole number of {page}-element pages")
    return cache.storage_offset() // page, cache.stride(0) // page


class KVOps:
    """The seam (see the module docstring); pages are ``[2 * bs, D]``: K tile, then V tile."""

    name = "?"
    backend = "torch"                 # hybridkv_kernels dispatch for the shared chunk operations

    def __init__(self, block_size: int, head_size: int, dtype: torch.dtype, selection: SelectionConfig) -> None:
        self.block_size, self.head_size, self.dtype, self.selection = block_size, head_size, dtype, selection

    # -- implementation-specific
    def write(self, pool, key, value, slots, layer) -> None:
        raise NotImplementedError

    def attend(self, plan: StepPlan, heads: LayerHeads, pool, query, pages, seq_lens, scale, output) -> None:
        raise NotImplementedError

    def read_pages(self, pool, pages) -> tuple[torch.Tensor, torch.Tensor]:
        """``(k, v)``, each ``[n, bs, D]`` in token order, of ``pages [n]``."""
        raise NotImplementedError

    def write_pages(self, pool, pages, k, v) -> None:
        raise NotImplementedError

    # -- shared: the project's kernels or their references
    def select(self, q, kmin, kmax, cold_table, chunk_tokens, k_max, k_per) -> torch.Tensor:
        """Chunks each (row, head) retrieves: ``int32 [Rr, Hd, k_max]`` (``chunk_scoring``)."""
        out = torch.empty(*cold_table.shape[:2], k_max, dtype=torch.int32, device=q.device)
        hk.chunk_scoring.run(q, kmin, kmax, cold_table, chunk_tokens, k_max, out,
                             chunk_size=self.block_size, sink_chunks=self.selection.sink_chunks,
                             recent_chunks=self.selection.recent_chunks, k_per=k_per.to(torch.int32),
                             backend=self.backend)
        return out

    def swap_in(self, pool, cold_pages, dst, src, moved) -> None:
        hk.swap_in.run(pool, cold_pages, dst, src, moved, backend=self.backend)

    def summaries(self, cold, pages) -> None:
        """Quest summaries (fp32 channel-wise min / max) of the full cold ``pages [n]``."""
        keys = self.read_pages(cold.pages, pages)[0].float()
        cold.kmin[pages] = keys.amin(dim=1)
        cold.kmax[pages] = keys.amax(dim=1)

    def compact(self, pool, pages, kept_tokens, num_kept) -> None:
        """Static heads: token ``kept_tokens[h, i]`` (logical position in the row of ``pages[h]``) moves to logical
        slot ``i`` for ``i < num_kept[h]``. ``pages [Hs, M]`` global, ``kept_tokens [Hs, K]``, ``num_kept [Hs]``."""
        bs = self.block_size
        for h in range(pages.shape[0]):
            n = int(num_kept[h])
            src = kept_tokens[h, :n].long()
            k, v = self.read_pages(pool, pages[h, :int(src.max()) // bs + 1])
            dst = pages[h, :n // bs]
            self.write_pages(pool, dst, k.reshape(-1, k.shape[-1])[src].reshape(-1, bs, k.shape[-1]),
                             v.reshape(-1, v.shape[-1])[src].reshape(-1, bs, v.shape[-1]))


class CpuKVOps(KVOps):
    """vLLM's CPU kernels, every KV head of a layer in one call: each (head, row) pair is one kernel row."""

    name = "cpu"

    def __init__(self, block_size, head_size, dtype, selection, *, isa: str, kv_cache_dtype: str,
                 key_perm: torch.Tensor) -> None:
        super().__init__(block_size, head_size, dtype, selection)
        self.isa, self.kv_cache_dtype, self.key_perm = isa, kv_cache_dtype, key_perm

    def _kv(self, pool):
        bs = self.block_size
        return pool[:, None, :bs], pool[:, None, bs:]          # [NP, 1, bs, D] each

    def write(self, pool, key, value, slots, layer) -> None:
        from vllm import _custom_ops as ops
        h, n, d = slots.shape[0], key.shape[0], key.shape[2]
        k_cache, v_cache = self._kv(pool)
        ops.cpu_attn_reshape_and_cache(key.transpose(0, 1).reshape(h * n, 1, d),
                                       value.transpose(0, 1).reshape(h * n, 1, d), k_cache, v_cache,
                                       slots.reshape(-1), self.isa, k_scale=layer._k_scale_float,
                                       v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)

    def _virtual_rows(self, plan: StepPlan, heads: LayerHeads, seq_lens: torch.Tensor, group: int):
        """Per step and tier signature: query starts, lengths and scheduler metadata of the ``H x R`` kernel rows."""
        key = ("cpu_rows", heads.signature)
        if key not in plan.cache:
            from vllm import _custom_ops as ops
            from vllm import envs
            h, n = len(heads.signature), plan.num_tokens
            qsl = plan.query_start_loc.long()
            starts = (qsl[None, :-1] + n * torch.arange(h)[:, None]).reshape(-1)
            qsl_v = torch.cat([starts, torch.tensor([h * n])]).to(torch.int32)
            lens = seq_lens.reshape(-1).to(torch.int32).contiguous()
            meta = ops.cpu_attn_get_scheduler_metadata(
                num_reqs=lens.numel(), num_heads=group, num_kv_heads=1, head_dim=self.head_size, seq_lens=lens,
                dtype=self.dtype, query_start_loc=qsl_v, causal=True, sliding_window_size=-1, isa=self.isa,
                enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype)
            plan.cache[key] = (qsl_v, lens, meta)
        return plan.cache[key]

    def attend(self, plan, heads, pool, query, pages, seq_lens, scale, output, layer=None) -> None:
        from vllm import _custom_ops as ops
        n, hq, d = query.shape
        h = pages.shape[0]
        g = hq // h
        qsl_v, lens, meta = self._virtual_rows(plan, heads, seq_lens, g)
        q = query.view(n, h, g, d).transpose(0, 1).reshape(h * n, g, d)
        out = torch.empty_like(q)
        k_cache, v_cache = self._kv(pool)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=k_cache, value_cache=v_cache, output=out, query_start_loc=qsl_v, seq_lens=lens,
            scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=pages.reshape(h * pages.shape[1], -1).to(torch.int32), softcap=0, scheduler_metadata=meta,
            s_aux=None, dynamic_causal=None, k_scale=getattr(layer, "_k_scale_float", 1.0),
            v_scale=getattr(layer, "_v_scale_float", 1.0), kv_cache_dtype=self.kv_cache_dtype)
        output.view(n, h, g, d).copy_(out.view(h, n, g, d).transpose(0, 1))

    def read_pages(self, pool, pages):
        bs, d = self.block_size, self.head_size
        n = pages.numel()
        tiles = pool[pages.reshape(-1).long()]                                     # [n, 2 bs, D]
        k = tiles[:, :bs].reshape(n, bs * d)[:, self.key_perm].reshape(n, bs, d)
        return k, tiles[:, bs:]

    def write_pages(self, pool, pages, k, v) -> None:
        bs, d = self.block_size, self.head_size
        n = pages.numel()
        flat = torch.empty(n, bs * d, dtype=pool.dtype, device=pool.device)
        flat[:, self.key_perm] = k.reshape(n, bs * d).to(pool.dtype)
        pool[pages.reshape(-1).long()] = torch.cat([flat.view(n, bs, d), v.to(pool.dtype)], dim=1)


class TritonKVOps(KVOps):
    """The project's Triton kernels (``TRITON_INTERPRET=1`` runs them on the CPU). Pages are row-major: K rows
    ``[bs, D]`` then V rows. Decode rows attend with ``sparse_decode`` over every (row, head)'s block list in one
    launch; rows with several query tokens (prefill) attend through the core reference (vLLM's own Triton
    prefill kernel takes that part on a GPU)."""

    name = "triton"
    backend = "triton"

    def _kv(self, pool, h: int):
        bs = self.block_size
        k = pool[:, :bs, None, :].expand(pool.shape[0], bs, h, pool.shape[2])     # head stride 0: global pages
        v = pool[:, bs:, None, :].expand(pool.shape[0], bs, h, pool.shape[2])
        return k, v

    def write(self, pool, key, value, slots, layer) -> None:
        bs = self.block_size
        s = slots.transpose(0, 1)                                                  # [n, H]
        # padding tokens (slot -1) write into page 0: block 0 of the first KV-cache tensor is vLLM's null block
        page, off = torch.div(s, bs, rounding_mode="floor").clamp(min=0), s.remainder(bs)
        pool[page, off] = key.to(pool.dtype)
        pool[page, off + bs] = value.to(pool.dtype)

    def attend(self, plan, heads, pool, query, pages, seq_lens, scale, output, layer=None) -> None:
        n, hq, d = query.shape
        h = pages.shape[0]
        rows = plan.single_rows
        if rows.numel():
            tokens = plan.query_start_loc.long()[rows]
            k, v = self._kv(pool, h)
            out = torch.empty(rows.numel(), hq, d, dtype=query.dtype, device=query.device)
            hk.sparse_decode.run(query[tokens], k, v, pages[:, rows].transpose(0, 1).to(torch.int32),
                                 seq_lens[:, rows].transpose(0, 1).contiguous(), scale, out, backend="triton")
            output[tokens] = out
        for r in plan.prefill_rows:                                  # prefill: once per prompt chunk
            row = plan.rows[r]
            count = (row.seq_len + self.block_size - 1) // self.block_size
            kr, vr = self.read_pages(pool, pages[:, r, :count])
            kr = kr.reshape(h, -1, d)[:, :row.seq_len].transpose(0, 1)            # [S, H, D]
            vr = vr.reshape(h, -1, d)[:, :row.seq_len].transpose(0, 1)
            output[row.q_start:row.q_end] = dense_attention(query[row.q_start:row.q_end], kr, vr, scale)

    def read_pages(self, pool, pages):
        bs = self.block_size
        tiles = pool[pages.reshape(-1).long()]
        return tiles[:, :bs], tiles[:, bs:]

    def write_pages(self, pool, pages, k, v) -> None:
        pool[pages.reshape(-1).long()] = torch.cat([k, v], dim=1).to(pool.dtype)

    def summaries(self, cold, pages) -> None:
        bs = self.block_size
        k = cold.pages[:, :bs, None, :]                                           # [NC, bs, 1, D]
        ntok = torch.full_like(pages, bs, dtype=torch.int32)
        hk.compaction.build_chunk_summaries(k, pages.to(torch.int32), ntok, cold.kmin[:, None, :],
                                            cold.kmax[:, None, :], backend="triton")

    def compact(self, pool, pages, kept_tokens, num_kept) -> None:
        h = pages.shape[0]
        k, v = self._kv(pool, h)
        hk.compaction.compact(k, v, pages[None].to(torch.int32), kept_tokens[None].to(torch.int32),
                              num_kept[None].to(torch.int32), backend="triton")


def make_kv_ops(kind: str, **kwargs) -> KVOps:
    cpu_only = ("isa", "kv_cache_dtype", "key_perm")
    if kind == "cpu":
        return CpuKVOps(**kwargs)
    if kind == "triton":
        return TritonKVOps(**{k: v for k, v in kwargs.items() if k not in cpu_only})
    raise ValueError(f"unknown KV-ops implementation {kind!r}")
