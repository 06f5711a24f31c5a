"""The KV-ops seam: every operation the per-layer path performs on the KV cache, in two implementations.

The per-layer path (backend.py) is written once against :class:`KVOps`; what differs between a CPU and a GPU is
only how these operations run and where a key element sits inside a page:

=====================  ===================================================  ==========================================
operation              ``CpuKVOps`` (vLLM's CPU build)                      ``TritonKVOps`` (``hybridkv_kernels``)
=====================  ===================================================  ==========================================
``write``              ``cpu_attn_reshape_and_cache``, all heads, one call  row-major pages, two index writes
``attend``             ``cpu_attention_with_kv_cache``, all heads, one      decode rows: ``sparse_decode`` (one
                       call (each (head, row) pair is one kernel row)       launch); prefill rows: vLLM's
                                                                            ``unified_attention`` (one launch)
``read`` / ``write_``  torch through the ISA's key permutation              torch (row-major)
``pages``
``select``             ``chunk_scoring`` reference (vectorised torch)       ``chunk_scoring`` Triton kernels
``fill_hot``           every live hot slot rewritten (``swap_in``           slots reassigned (``core.hot_buffer``),
                       reference, fixed shapes)                             only missing chunks copied (``swap_in``)
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

import functools
from dataclasses import dataclass

import torch

import hybridkv_kernels as hk
from hybridkv_vllm.core.hot_buffer import assign_slots
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.core.step_plan import StepPlan


@dataclass(frozen=True)
class LayerHeads:
    """Where a layer's KV heads live: fixed once the KV cache is bound."""

    index: int                    # the layer's index
    tiers: torch.Tensor           # int64 [H]: the tier (KV-cache group) of each head
    base: torch.Tensor            # int64 [H]: global page of block 0
    stride: torch.Tensor          # int64 [H]: global pages per block id
    dynamic: torch.Tensor         # int64 [Hd]: the layer's dynamic (retrieving) heads
    cold_start: int               # their rows in the cold tier: [cold_start, cold_start + Hd) (model-wide numbering)
    static: torch.Tensor          # int64 [Hs]: the layer's static (pruned) heads
    signature: tuple[int, ...]    # tiers, as a key for values shared by layers with the same tiers

    # host copies, made once per bound layer (planning never reads the device)
    @functools.cached_property
    def dynamic_host(self) -> torch.Tensor:
        return self.dynamic.cpu()

    @functools.cached_property
    def static_host(self) -> torch.Tensor:
        return self.static.cpu()

    @functools.cached_property
    def tiers_host(self) -> torch.Tensor:
        return torch.tensor(self.signature, dtype=torch.long)


@dataclass
class LayerStep:
    """One layer's share of a step plan: global pages and slots of its heads (views of tensors made once per
    step for every layer, :func:`plan_layers`)."""

    pages: torch.Tensor           # int64 [H, R, M]: rewritten tables as global pages
    prompt_pages: torch.Tensor    # int64 [H, R, M]: the tables as vLLM gave them, as global pages
    slots: torch.Tensor           # int64 [H, N]: global slots (-1: padding)
    seq_lens: torch.Tensor        # int32 [H, R]
    # Retrieval, in *units* (``selection.sub_chunks`` per chunk = block; unit address = page x units + j; with one
    # unit per chunk, a unit is a chunk and its address a page):
    cold_table: torch.Tensor | None = None    # int64 [Rr, Hd, C x units]: cold unit addresses of the decode rows
    k: torch.Tensor | None = None             # int64 [Rr, Hd]: units each retrieves (0: none)
    hot: torch.Tensor | None = None           # int64 [Rr, Hd, K]: pool unit addresses of their hot unit slots
    live: torch.Tensor | None = None          # bool [Rr, Hd, K]: slot j < k
    hot_or_first: torch.Tensor | None = None  # int64 [Rr, Hd, K]: ``hot``, dead slots repeating slot 0
    every_head_retrieves: bool = True         # k > 0 for every (row, dynamic head)
    live_count: torch.Tensor | None = None    # int64 []: live slots
    forced: torch.Tensor | None = None        # float64 [Rr, 1, C x units]: keys of forced / invalid units
    is_forced: torch.Tensor | None = None     # bool [Rr, 1, C x units]: where ``forced`` applies (else the score)
    units: int = 1                            # retrieval units per chunk
    k_max: int = 0                            # unit slots this step (the decode plan's k_max x units)


def plan_layers(plan: StepPlan, layers: list[LayerHeads], cold, selection: SelectionConfig) -> list[LayerStep]:
    """Every listed layer's :class:`LayerStep`, with one set of tensor operations for all of them."""
    bs = plan.block_size
    tiers = torch.stack([h.tiers for h in layers])                                     # [L, H]
    base, stride = torch.stack([h.base for h in layers]), torch.stack([h.stride for h in layers])
    pages = plan.tables[tiers] * stride[..., None, None] + base[..., None, None]       # [L, H, R, M]
    prompt_pages = plan.prompt_tables[tiers] * stride[..., None, None] + base[..., None, None]
    s = plan.slots[tiers]                                                              # [L, H, N]
    page = base[..., None] + torch.div(s, bs, rounding_mode="floor") * stride[..., None]
    slots = torch.where(s < 0, -1, page * bs + s.remainder(bs))
    seq_lens = plan.seq_lens[tiers]
    steps = [LayerStep(pages[i], prompt_pages[i], slots[i], seq_lens[i]) for i in range(len(layers))]
    dec = plan.decode
    if dec is not None:
        sub = selection.sub_chunks
        units = selection.retrieval_units()
        width = dec.k_max * sub
        dev = pages.device
        # [Rr, Hdyn, C x sub] unit addresses; a head without a cold entry (its tier keeps this prompt whole: k = 0)
        # reads page 0, never selected, so that no kernel dereferences -1
        cold_pages = cold.table[dec.cold_slots].clamp(min=0)
        cold_tables = cold_pages if sub == 1 else \
            (cold_pages[..., None] * sub + torch.arange(sub, device=dev)).flatten(2)
        # Selection keys that do not depend on the query (chunk_scoring's priority order, in one descending sort)
        n = torch.div(dec.chunk_tokens.long(), units.chunk_size, rounding_mode="floor")[:, None, None]
        forced = hk.chunk_scoring.priority_keys(n, cold_tables.shape[2], units.sink_chunks, units.recent_chunks)
        is_forced = ~torch.isnan(forced)
        j = torch.arange(width, device=dev)
        for i, heads in enumerate(layers):
            if heads.dynamic.numel():
                lo, hi = heads.cold_start, heads.cold_start + heads.dynamic.numel()
                step = steps[i]
                step.cold_table = cold_tables[:, lo:hi]
                step.k = dec.k[heads.tiers[heads.dynamic]].transpose(0, 1)
                hot_pages = pages[i][heads.dynamic][:, dec.rows, :dec.k_max].transpose(0, 1)     # [Rr, Hd, k_max]
                step.hot = hot_pages                              # one unit per page: unit addresses are pages
                if sub > 1:                                       # (eager ops cost microseconds each: only if needed)
                    step.k = step.k * sub
                    step.hot = hot_pages.repeat_interleave(sub, dim=2) * sub + j % sub
                step.units, step.k_max = sub, width
                step.live = j < step.k[..., None]
                step.hot_or_first = torch.where(step.live, step.hot, step.hot[..., :1])
                step.every_head_retrieves = bool((dec.k_host[heads.tiers_host[heads.dynamic_host]] > 0).all())
                step.live_count = step.live.sum()
                step.forced, step.is_forced = forced, is_forced
    return steps


@functools.cache
def cpu_ops():
    """vLLM's CPU attention kernels: ``vllm._cpu_ops`` from vLLM 0.34 on, ``vllm._custom_ops`` before."""
    try:
        from vllm import _cpu_ops as ops
    except ImportError:
        from vllm import _custom_ops as ops
    return ops


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

    def tile_keys(self, tiles: torch.Tensor) -> torch.Tensor:
        """The keys ``[n, bs, D]``, in token order, of page contents ``tiles [n, 2 * bs, D]``."""
        raise NotImplementedError

    def write_pages(self, pool, pages, k, v) -> None:
        raise NotImplementedError

    # -- shared: the project's kernels or their references
    def select(self, q, cold, step: LayerStep, dec) -> torch.Tensor:
        """Chunks each (row, dynamic head) retrieves: ``[Rr, Hd, k_max]``; the first ``k`` entries count
        (``chunk_scoring``: here ascending, ``-1`` padded)."""
        cold_table, chunk_tokens, k_max, k_per = step.cold_table, dec.chunk_tokens, step.k_max, step.k
        rows, heads = cold_table.shape[:2]
        units = self.selection.retrieval_units()                          # scored and retrieved units
        kmin = cold.kmin[:, None, :].expand(cold.kmin.shape[0], heads, cold.kmin.shape[1])   # head stride 0
        kmax = cold.kmax[:, None, :].expand(cold.kmax.shape[0], heads, cold.kmax.shape[1])
        out = torch.empty(rows, heads, k_max, dtype=torch.int32, device=q.device)
        hk.chunk_scoring.run(q, kmin, kmax, cold_table, chunk_tokens, k_max, out,
                             chunk_size=units.chunk_size, sink_chunks=units.sink_chunks,
                             recent_chunks=units.recent_chunks, k_per=k_per.to(torch.int32),
                             backend=self.backend)
        return out

    def fill_hot(self, pool, cold, step: LayerStep, chosen, cold_slots, cold_start: int, loads) -> None:
        """Make the hot slots of every (row, dynamic head) hold the ``chosen [Rr, Hd, K]`` chunks; adds the chunks
        copied to ``loads``."""
        raise NotImplementedError

    def _copy_in(self, pool, cold, step: LayerStep, src, live, moved) -> None:
        """``hybridkv_kernels.swap_in`` of the ``moved`` slots; a head's dead slots repeat its slot 0 (the
        kernel's contract: one page, one source). ``src`` and ``step.hot`` are unit addresses; with several units
        per page the kernel copies *pieces*: a page ``[2 bs, D]`` is ``2 x units`` pieces ``[bs / units, D]``
        (the K pieces, then the V pieces, for the row-major pages of this implementation)."""
        hot = step.hot
        dst, src = torch.where(live, hot, hot[..., :1]), torch.where(live, src, src[..., :1])
        moved = torch.where(live, moved, moved[..., :1])
        s = step.units
        if s == 1:
            hk.swap_in.run(pool, cold.pages, dst, src, moved, backend=self.backend)
            return
        u = self.block_size // s

        def piece(addr):                                      # K piece of a unit address, then its V piece
            k = torch.div(addr, s, rounding_mode="floor") * (2 * s) + addr.remainder(s)
            return torch.cat([k, k + s], dim=-1)

        hk.swap_in.run(pool.view(-1, u, pool.shape[2]), cold.pages.view(-1, u, pool.shape[2]), piece(dst),
                       piece(src), torch.cat([moved, moved], dim=-1), backend=self.backend)

    def summaries(self, cold, pages, tiles) -> None:
        """Quest summaries (fp32 channel-wise min / max) of every retrieval unit of the full cold ``pages [n]``,
        whose content is ``tiles [n, 2 * bs, D]`` (read from the pool, where the cold tier's summaries live)."""
        n, s = tiles.shape[0], cold.units
        keys = self.tile_keys(tiles).float()                                                # [n, bs, D]
        keys = keys.view(n, s, -1, keys.shape[-1])
        rows = (pages[:, None] * s + torch.arange(s, device=pages.device)).reshape(-1)
        cold.kmin[rows] = keys.amin(dim=2).reshape(n * s, -1)
        cold.kmax[rows] = keys.amax(dim=2).reshape(n * s, -1)

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
        self.key_runs = self._key_runs(selection.sub_chunks)        # made here: it reads values on the host
        self._kv_views: tuple | None = None

    def _kv(self, pool):
        """vLLM's K and V cache views ``[NP, 1, bs, D]`` of the page array (made once per bound page array)."""
        if self._kv_views is None or self._kv_views[0] is not pool:
            bs = self.block_size
            self._kv_views = (pool, pool[:, None, :bs], pool[:, None, bs:])
        return self._kv_views[1:]

    def write(self, pool, key, value, slots, layer) -> None:
        ops = cpu_ops()
        h, n, d = slots.shape[0], key.shape[0], key.shape[2]
        k_cache, v_cache = self._kv(pool)
        ops.cpu_attn_reshape_and_cache(key.transpose(0, 1).reshape(h * n, 1, d),
                                       value.transpose(0, 1).reshape(h * n, 1, d), k_cache, v_cache,
                                       slots.reshape(-1), self.isa, k_scale=layer._k_scale_float,
                                       v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)

    def select(self, q, cold, step: LayerStep, dec) -> torch.Tensor:
        """``chunk_scoring``'s selection in fewer operations than its reference (the GQA group folded into two
        matrix products; the query-independent keys made once per step, ``plan_layers``; one sort), because eager
        operations cost tens of microseconds each here. Returns the chunks in priority order (the first ``k``
        count); the set equals the reference's up to float rounding (``tests/adapter/test_executor.py``)."""
        rows, heads, width = step.cold_table.shape
        g, d = q.shape[1] // heads, q.shape[2]
        ids = step.cold_table.clamp(min=0).reshape(-1)
        bounds = cold.bounds.index_select(0, ids).view(rows * heads, width, 2 * d)        # [kmin | kmax] rows
        # Quest's bound in one matrix product: per channel max(q kmin, q kmax) = min(q, 0) kmin + max(q, 0) kmax
        # (kmax >= kmin), so the GQA group's sum needs only the group's sums of min(q, 0) and of max(q, 0)
        qg = q.float().view(rows, heads, g, d)
        q_split = torch.cat([qg.clamp(max=0).sum(2), qg.clamp(min=0).sum(2)], dim=2).view(rows * heads, 2 * d, 1)
        scores = torch.bmm(bounds, q_split).view(rows, heads, width)
        key = torch.where(step.is_forced, step.forced, scores.double())
        return torch.sort(key, dim=2, descending=True, stable=True).indices[:, :, :step.k_max]

    def fill_hot(self, pool, cold, step: LayerStep, chosen, cold_slots, cold_start: int, loads) -> None:
        """Rewrite every live hot slot from the cold tier: on the CPU the cold tier is host memory like the pool,
        and one copy costs less than tracking which slots changed."""
        src = step.cold_table.gather(2, chosen)
        if step.units > 1:
            self._fill_units(pool, cold, step, src)
            loads += step.live_count
            return
        src = torch.where(step.live, src, src[..., :1])
        if step.every_head_retrieves:                  # dead slots repeat slot 0: the same page, the same source
            pool.index_copy_(0, step.hot_or_first.reshape(-1), cold.pages.index_select(0, src.reshape(-1)))
        else:                                          # a head without hot slots writes its own pages back
            live = torch.where(step.live, step.live, step.live[..., :1])
            hk.swap_in.run(pool, cold.pages, step.hot_or_first, src, live, backend=self.backend)
        loads += step.live_count

    def _fill_units(self, pool, cold, step: LayerStep, src) -> None:
        """Units finer than a page: copy each unit's K and V elements from its cold page into its hot slot's place
        in the pool, as rows of flat views gathered with ``index_select`` and written with ``index_copy_`` (several
        times faster here than advanced indexing). V rows are token-major, so a unit's values are one row of the
        pages viewed ``[-1, bs / units * D]``; its keys sit where the ISA's layout puts them, rows of the pages
        viewed ``[-1, L]`` (``_key_runs``). Shapes are fixed by the plan (no host-dependent mask): a dead slot
        repeats its head's slot 0, and a head without live slots writes its own elements back."""
        s, bs, d = step.units, self.block_size, self.head_size
        runs, length = self.key_runs                                                # [s, R], L
        dst, src = step.hot_or_first, torch.where(step.live, src, src[..., :1])
        dst_page, dst_unit = torch.div(dst, s, rounding_mode="floor"), dst.remainder(s)
        src_page, src_unit = torch.div(src, s, rounding_mode="floor"), src.remainder(s)
        k_rows = 2 * bs * d // length                                               # rows of L per page
        k_dst = (dst_page[..., None] * k_rows + runs[dst_unit]).reshape(-1)
        k_src = (src_page[..., None] * k_rows + runs[src_unit]).reshape(-1)
        v_dst = (dst_page * (2 * s) + s + dst_unit).reshape(-1)
        v_src = (src_page * (2 * s) + s + src_unit).reshape(-1)
        pool_k, cold_k = pool.view(-1, length), cold.pages.view(-1, length)
        pool_v, cold_v = pool.view(-1, bs // s * d), cold.pages.view(-1, bs // s * d)
        keys, values = cold_k.index_select(0, k_src), cold_v.index_select(0, v_src)
        if not step.every_head_retrieves:
            live = step.live[..., :1]
            keys = torch.where(live[..., None].expand(*dst.shape, runs.shape[1]).reshape(-1, 1), keys,
                               pool_k.index_select(0, k_dst))
            values = torch.where(live.expand(dst.shape).reshape(-1, 1), values, pool_v.index_select(0, v_dst))
        pool_k.index_copy_(0, k_dst, keys)
        pool_v.index_copy_(0, v_dst, values)

    def _key_runs(self, s: int) -> tuple[torch.Tensor, int]:
        """Unit ``j``'s key elements of a flattened page as runs of ``L`` contiguous, ``L``-aligned elements:
        ``(rows [s, R], L)`` with rows of the page viewed ``[-1, L]``. Element ``i`` of every unit's sorted run
        list must be the same (token, channel) of that unit, so that units copy onto one another; the longest
        such ``L`` (8 for the ``vec`` ISA's channel-major keys and 8-token units) cuts the indices ``L``-fold."""
        bs, d = self.block_size, self.head_size
        ud = bs // s * d
        pos = torch.stack([self.key_perm[j * ud:(j + 1) * ud] for j in range(s)])  # [s, u D], logical order
        order = pos.argsort(dim=1)
        if bool((order == order[:1]).all()):                   # one logical order of the sorted places
            ordered = pos.gather(1, order)
            for length in (64, 32, 16, 8, 4, 2):
                if ordered.shape[1] % length or ud % length:
                    continue
                r = ordered.view(s, -1, length)
                if bool((r[..., 0] % length == 0).all()) and bool((r == r[..., :1] + torch.arange(length)).all()):
                    return torch.div(r[..., 0], length, rounding_mode="floor"), length
        return pos, 1

    def _virtual_rows(self, plan: StepPlan, heads: LayerHeads, seq_lens: torch.Tensor, group: int):
        """Per step and tier signature: query starts, lengths and scheduler metadata of the ``H x R`` kernel rows;
        layers whose tiers keep the same blocks of every row share them (a row's length in a tier depends on
        nothing else: ``core.step_plan.rewrite_group``), found from the plan's host bookkeeping."""
        key = ("cpu_rows", heads.signature)
        if key not in plan.cache:
            shared = ("cpu_rows_of", group, tuple(map(tuple, plan.kept[heads.tiers_host].tolist())))
            if shared not in plan.cache:
                lens = seq_lens.reshape(-1).to(torch.int32).contiguous()
                ops = cpu_ops()
                from vllm import envs
                h, n = len(heads.signature), plan.num_tokens
                qsl = plan.query_start_loc.long()
                starts = (qsl[None, :-1] + n * torch.arange(h)[:, None]).reshape(-1)
                qsl_v = torch.cat([starts, torch.tensor([h * n])]).to(torch.int32)
                meta = ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=lens.numel(), num_heads=group, num_kv_heads=1, head_dim=self.head_size, seq_lens=lens,
                    dtype=self.dtype, query_start_loc=qsl_v, causal=True, sliding_window_size=-1, isa=self.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None,
                    kv_cache_dtype=self.kv_cache_dtype)
                plan.cache[shared] = (qsl_v, lens, meta)
            plan.cache[key] = plan.cache[shared]
        return plan.cache[key]

    def attend(self, plan, heads, pool, query, pages, seq_lens, scale, output, layer=None) -> None:
        ops = cpu_ops()
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
        tiles = pool[pages.reshape(-1).long()]                                     # [n, 2 bs, D]
        return self.tile_keys(tiles), tiles[:, self.block_size:]

    def tile_keys(self, tiles):
        bs, d, n = self.block_size, self.head_size, tiles.shape[0]
        return tiles[:, :bs].reshape(n, bs * d)[:, self.key_perm].reshape(n, bs, d)

    def write_pages(self, pool, pages, k, v) -> None:
        bs, d = self.block_size, self.head_size
        n = pages.numel()
        flat = torch.empty(n, bs * d, dtype=pool.dtype, device=pool.device)
        flat[:, self.key_perm] = k.reshape(n, bs * d).to(pool.dtype)
        pool[pages.reshape(-1).long()] = torch.cat([flat.view(n, bs, d), v.to(pool.dtype)], dim=1)


class TritonKVOps(KVOps):
    """The project's Triton kernels (``TRITON_INTERPRET=1`` runs them on the CPU). Pages are row-major: K rows
    ``[bs, D]`` then V rows. Decode rows attend with ``sparse_decode`` over every (row, head)'s block list in one
    launch; rows with several query tokens (prefill) attend densely through vLLM's own Triton kernel
    (``vllm_triton``), every (head, row) pair one of its sequences."""

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
        rows, tokens = plan.single_rows, plan.single_tokens
        if rows.numel():
            k, v = self._kv(pool, h)
            out = torch.empty(rows.numel(), hq, d, dtype=query.dtype, device=query.device)
            hk.sparse_decode.run(query[tokens], k, v, pages[:, rows].transpose(0, 1).to(torch.int32),
                                 seq_lens[:, rows].transpose(0, 1).contiguous(), scale, out, backend="triton")
            output[tokens] = out
        if plan.prefill_rows:                                        # prefill: once per prompt chunk
            self._prefill(plan, pool, query, pages, seq_lens, scale, output)

    def _prefill_rows(self, plan: StepPlan, h: int, device):
        """Once per step: the prefill rows' query tokens and the ``h x P`` virtual sequences' query starts
        (head-major), from the plan's host rows: no device read. (Every layer has ``h`` KV heads.)"""
        key = ("vllm_prefill", h)
        if key not in plan.cache:
            rows = [plan.rows[r] for r in plan.prefill_rows]
            tokens = [t for row in rows for t in range(row.q_start, row.q_end)]
            lens = [row.q_end - row.q_start for row in rows]
            starts = [0]
            for _ in range(h):
                for n in lens:
                    starts.append(starts[-1] + n)
            plan.cache[key] = (torch.tensor(tokens).to(device, non_blocking=True),
                               torch.tensor(plan.prefill_rows).to(device, non_blocking=True),
                               torch.tensor(starts, dtype=torch.int32).to(device, non_blocking=True),
                               max(lens), max(row.seq_len for row in rows))
        return plan.cache[key]

    def _prefill(self, plan, pool, query, pages, seq_lens, scale, output) -> None:
        """Rows with several query tokens attend densely through vLLM's own Triton kernel (``vllm_triton``): every
        (KV head, row) pair is one of its sequences, with ``num_kv_heads = 1`` over the page array."""
        from hybridkv_vllm.adapter.vllm_triton import unified_attention
        h, (_, hq, d) = pages.shape[0], query.shape
        g, bs = hq // h, self.block_size
        tokens, rows, starts, max_q, max_k = self._prefill_rows(plan, h, query.device)
        m = tokens.numel()
        q = query[tokens].view(m, h, g, d).transpose(0, 1).reshape(h * m, g, d)
        out = torch.empty_like(q)
        unified_attention()(
            q=q, k=pool[:, :bs, None, :], v=pool[:, bs:, None, :], out=out, cu_seqlens_q=starts, max_seqlen_q=max_q,
            seqused_k=seq_lens[:, rows].reshape(-1).to(torch.int32), max_seqlen_k=max_k, softmax_scale=scale,
            causal=True, window_size=(-1, -1), block_table=pages[:, rows].reshape(h * rows.numel(), -1).to(torch.int32),
            softcap=0, q_descale=None, k_descale=None, v_descale=None)
        output[tokens] = out.view(h, m, g, d).transpose(0, 1).reshape(m, hq, d).to(output.dtype)

    def read_pages(self, pool, pages):
        bs = self.block_size
        tiles = pool[pages.reshape(-1).long()]
        return tiles[:, :bs], tiles[:, bs:]

    def tile_keys(self, tiles):
        return tiles[:, :self.block_size]

    def fill_hot(self, pool, cold, step: LayerStep, chosen, cold_slots, cold_start: int, loads) -> None:
        """Reassign the hot slots (``core.hot_buffer.assign_slots``: resident chunks stay) and copy only the
        missing chunks (``swap_in``: a program per slot, idle where nothing moves)."""
        width = chosen.shape[2]
        heads = slice(cold_start, cold_start + chosen.shape[1])
        resident = cold.resident[cold_slots, heads, :width]
        new, moved = assign_slots(resident, chosen, step.k)
        cold.resident[cold_slots, heads, :width] = new
        live = torch.arange(width, device=chosen.device) < step.k[..., None]
        self._copy_in(pool, cold, step, step.cold_table.gather(2, new.clamp(min=0)), live, moved)
        loads += moved.sum()

    def write_pages(self, pool, pages, k, v) -> None:
        pool[pages.reshape(-1).long()] = torch.cat([k, v], dim=1).to(pool.dtype)

    def summaries(self, cold, pages, tiles) -> None:
        """The summary kernel over the tiles' K pieces: a page is ``2 x units`` pieces ``[bs / units, D]``."""
        n, s, dev = tiles.shape[0], cold.units, tiles.device
        u = self.block_size // s
        pieces = tiles.reshape(n * 2 * s, u, 1, tiles.shape[2])
        ids = (torch.arange(n, device=dev)[:, None] * (2 * s) + torch.arange(s, device=dev)).reshape(-1)
        kmin = torch.empty(n * 2 * s, 1, tiles.shape[2], dtype=torch.float32, device=dev)
        kmax = torch.empty_like(kmin)
        ids32 = ids.to(torch.int32)
        hk.compaction.build_chunk_summaries(pieces, ids32, torch.full_like(ids32, u), kmin, kmax, backend="triton")
        rows = (pages[:, None] * s + torch.arange(s, device=pages.device)).reshape(-1)
        cold.kmin[rows], cold.kmax[rows] = kmin[ids, 0], kmax[ids, 0]

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
