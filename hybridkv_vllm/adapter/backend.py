"""The HYBRIDKV attention backend on vLLM's CPU build.

Structure (vLLM's four parts): ``HybridKVBackend`` (names the parts), ``HybridKVMetadataBuilder`` (once per
KV-cache group and step: plans each request row and rewrites the block tables of compressed rows),
``HybridKVImpl`` (per layer: writes K/V, attends, compacts) and ``HybridKVHeadLayer`` (the one-head virtual
layers that give every KV head its own KV-cache group; see tiers.py).

Every KV head sits in a budget tier (tiers.py): once its prompt is processed a compressed request keeps blocks
``[0, kept)`` plus the tail (prompt's partial block + generated tokens), and the budget manager frees
``[kept, P // bs)`` right after the step that completes the prompt (kv_spec.py). The builder rewrites each such
row to ``table[:kept] ++ table[P // bs:]``; what the ``kept`` blocks hold depends on the head (mode from the plan):

* ``pruned`` (static): in the step that completes the prompt the head scores the prompt with its
  observation-window queries and compacts the selected tokens into blocks ``[0, kept)``, for good.
* ``retrieve`` (dynamic): in that step the head's complete prompt chunks are copied to the cold tier
  (cold_tier.py) with their Quest min/max key summaries; every decode step the query scores the summaries
  (GQA-summed), selects the sink chunk, the prompt's last complete chunk and the top scores, and the selected
  chunks not resident yet are copied into blocks ``[0, kept)``, the head's hot buffer.

A request shorter than ``min_prompt_tokens``, or a tier that would free nothing, attends densely. Prefill always
attends densely. Attention itself is vLLM's own CPU paged kernel on the rewritten tables.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.utils.math_utils import cdiv
from vllm.v1.attention.backend import AttentionMetadataBuilder, AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (CPUAttentionBackend, CPUAttentionBackendImpl,
                                                 CPUAttentionMetadata, _get_attn_isa)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec

from hybridkv_vllm.adapter import cpu_layout
from hybridkv_vllm.adapter.cold_tier import ColdChunks, plan_swap_in
from hybridkv_vllm.adapter.kv_spec import HybridKVBudgetSpec, register_spec
from hybridkv_vllm.adapter.runtime import get_runtime
from hybridkv_vllm.adapter.tiers import PRUNED, RETRIEVE, kept_blocks
from hybridkv_vllm.core.selection import score_chunks, select_chunks, select_static, text_prior_scores

logger = logging.getLogger("hybridkv")

BACKEND_NAME = "HYBRIDKV"
HEAD_SUFFIX = ".hkv_h"


# ------------------------------------------------------------------------------------------------- metadata
@dataclass
class RowPlan:
    """One request row of a step, as one KV-cache group sees it."""

    prompt_len: int | None        # None: unknown to HybridKV (e.g. a warm-up batch) -> uncompressed
    computed: int                 # tokens already in the cache before this step
    q_start: int
    q_end: int
    seq_len: int
    kept: int | None              # budget tier: blocks kept; None: this tier does not compress this row
    compressed: bool              # the request is compressed at all (min_prompt_tokens, floor)

    @property
    def completes_prompt(self) -> bool:
        return self.prompt_len is not None and self.computed < self.prompt_len <= self.seq_len

    @property
    def after_prompt(self) -> bool:
        return self.prompt_len is not None and self.computed >= self.prompt_len


@dataclass
class HybridKVMetadata:
    attn: CPUAttentionMetadata     # ready to run; budget tiers: compressed rows already rewritten
    rows: list[RowPlan]
    block_table: torch.Tensor      # the worker's table for this group (stale ids beyond what rows may read)


class HybridKVMetadataBuilder(AttentionMetadataBuilder[HybridKVMetadata]):
    supports_update_block_table = False

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.spec = kv_cache_spec
        self.runtime = get_runtime(vllm_config)
        model = vllm_config.model_config
        parallel = vllm_config.parallel_config
        self.group = model.get_num_attention_heads(parallel) // model.get_num_kv_heads(parallel)
        self.head_size = kv_cache_spec.head_size
        self.block_size = kv_cache_spec.block_size
        self.dtype = model.dtype
        self.kv_cache_dtype = vllm_config.cache_config.cache_dtype
        self.isa = _get_attn_isa(self.dtype, self.block_size, self.head_size, self.kv_cache_dtype)
        self.is_budget = isinstance(kv_cache_spec, HybridKVBudgetSpec)

    def _plan_rows(self, cm: CommonAttentionMetadata) -> list[RowPlan]:
        cfg = self.runtime.config
        bs = self.block_size
        starts = cm.query_start_loc_cpu.tolist()
        seq_lens = cm.seq_lens.cpu().tolist()
        rows = []
        for r in range(cm.num_reqs):
            prompt_len = self.runtime.batch.prompt_len(r)
            q_start, q_end, seq_len = starts[r], starts[r + 1], seq_lens[r]
            compressed = prompt_len is not None and kept_blocks(prompt_len, 0.0, bs, cfg.floor_blocks,
                                                                cfg.min_prompt_tokens) is not None
            kept = self.spec.kept_blocks(prompt_len) if (self.is_budget and compressed) else None
            rows.append(RowPlan(prompt_len, seq_len - (q_end - q_start), q_start, q_end, seq_len, kept,
                                compressed))
        return rows

    def _rewrite(self, rows: list[RowPlan], table: torch.Tensor, seq_lens: torch.Tensor):
        """Compressed rows past their prompt read ``table[:kept] ++ table[P // bs:]`` (never a freed block)."""
        bs = self.block_size
        todo = [(r, row) for r, row in enumerate(rows) if row.kept is not None and row.after_prompt]
        if not todo:
            return table, seq_lens
        table, seq_lens = table.clone(), seq_lens.clone()
        for r, row in todo:
            first_tail = row.prompt_len // bs
            kept_ids = table[r, :row.kept].clone()
            tail_ids = table[r, first_tail:cdiv(row.seq_len, bs)].clone()
            table[r, :row.kept] = kept_ids
            table[r, row.kept:row.kept + tail_ids.numel()] = tail_ids
            seq_lens[r] = row.kept * bs + row.seq_len - first_tail * bs
        return table, seq_lens

    def scheduler_metadata(self, cm: CommonAttentionMetadata, seq_lens: torch.Tensor) -> torch.Tensor:
        return ops.cpu_attn_get_scheduler_metadata(
            num_reqs=cm.num_reqs, num_heads=self.group, num_kv_heads=1, head_dim=self.head_size,
            seq_lens=seq_lens, dtype=self.dtype, query_start_loc=cm.query_start_loc, causal=cm.causal,
            sliding_window_size=-1, isa=self.isa, enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
            dynamic_causal=None, kv_cache_dtype=self.kv_cache_dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HybridKVMetadata:
        cm = common_attn_metadata
        rows = self._plan_rows(cm)
        table, seq_lens = self._rewrite(rows, cm.block_table_tensor, cm.seq_lens)
        attn = CPUAttentionMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=seq_lens,
            block_table=table, slot_mapping=cm.slot_mapping,
            scheduler_metadata=self.scheduler_metadata(cm, seq_lens), causal=cm.causal)
        self.runtime.accounting.observe(self.runtime.batch, rows, self.runtime.cold.nbytes)
        return HybridKVMetadata(attn=attn, rows=rows, block_table=cm.block_table_tensor)


# ----------------------------------------------------------------------------------------------- head layers
class HybridKVHeadLayer(AttentionLayerBase):
    """A one-head virtual layer: owns KV head ``h`` of its parent layer in the KV-cache tier of that head."""

    def __init__(self, name: str, parent, spec: KVCacheSpec) -> None:
        self.layer_name = name
        self.parent = parent
        self.impl = parent.impl
        self.spec = spec
        self.kv_cache = torch.tensor([])
        self.attn_type = AttentionType.DECODER
        self.kv_sharing_target_layer_name = None

    def get_attn_backend(self):
        return self.parent.get_attn_backend()

    def get_kv_cache_spec(self, vllm_config: VllmConfig) -> KVCacheSpec:
        return self.spec


def _head_spec(runtime, tier, block_size: int, head_size: int, dtype: torch.dtype) -> AttentionSpec:
    return HybridKVBudgetSpec(block_size=block_size, num_kv_heads=1, head_size=head_size, dtype=dtype,
                              fraction=tier.fraction, floor_blocks=runtime.config.floor_blocks,
                              min_prompt_tokens=runtime.config.min_prompt_tokens)


# ------------------------------------------------------------------------------------------------------ impl
class HybridKVImpl(CPUAttentionBackendImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        from hybridkv_vllm.core.errors import ConfigError
        if alibi_slopes is not None or sliding_window is not None or sinks is not None or logits_soft_cap:
            raise ConfigError("HYBRIDKV supports plain causal decoder attention only (no ALiBi, sliding window, "
                              "attention sinks or soft-capping in this model's layers)")
        super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                         logits_soft_cap, attn_type, kv_sharing_target_layer_name, sinks)
        self.vllm_config = get_current_vllm_config()
        self.runtime = get_runtime(self.vllm_config)      # validates profile, budget and flags at start-up
        self.group = num_heads // num_kv_heads
        self.head_names: list[str] = []
        self.modes: tuple[str, ...] = ()

    # -- setup: after the weights are loaded, the layer exists under its name; give each head its own layer
    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        layer = next(m for m in self.vllm_config.compilation_config.static_forward_context.values()
                     if getattr(m, "impl", None) is self and not isinstance(m, HybridKVHeadLayer))
        self.attach(layer)

    def attach(self, layer) -> None:
        if self.head_names:
            return
        register_spec()
        runtime, bs = self.runtime, self.vllm_config.cache_config.block_size
        index = extract_layer_index(layer.layer_name)
        self.modes = runtime.tiers.modes[index]
        specs = [_head_spec(runtime, runtime.tiers.tier(index, h), bs, self.head_size, layer.kv_cache_torch_dtype)
                 for h in range(self.num_kv_heads)]
        layer.get_kv_cache_spec = lambda vllm_config, _spec=specs[0]: _spec    # this instance only
        forward_context = self.vllm_config.compilation_config.static_forward_context
        self.layer_name = layer.layer_name
        self.head_names = [layer.layer_name]
        for h in range(1, self.num_kv_heads):
            name = f"{layer.layer_name}{HEAD_SUFFIX}{h}"
            forward_context[name] = HybridKVHeadLayer(name, layer, specs[h])
            self.head_names.append(name)
        self.isa = _get_attn_isa(self.vllm_config.model_config.dtype, bs, self.head_size, self.kv_cache_dtype)
        self.key_perm = cpu_layout.key_layout(self.isa, layer.kv_cache_torch_dtype, bs, self.head_size)

    # -- forward
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by HYBRIDKV")
        if attn_metadata is None:
            return output
        context = get_forward_context()
        all_metadata = context.attn_metadata
        n = attn_metadata.attn.num_actual_tokens
        g = self.group
        for h, name in enumerate(self.head_names):
            md = attn_metadata if h == 0 else all_metadata[name]
            cache = kv_cache if h == 0 else context.no_compile_layers[name].kv_cache
            key_cache, value_cache = self._split(cache)
            if key is not None:
                ops.cpu_attn_reshape_and_cache(key[:n, h:h + 1], value[:n, h:h + 1], key_cache, value_cache,
                                               md.attn.slot_mapping, self.isa, k_scale=layer._k_scale_float,
                                               v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
            q = query[:n, h * g:(h + 1) * g].contiguous()
            if self.modes[h] == RETRIEVE:
                self._retrieve(md, q, key_cache, value_cache, h)
            run = md.attn
            out = torch.empty_like(q)
            ops.cpu_attention_with_kv_cache(
                query=q, key_cache=key_cache, value_cache=value_cache, output=out,
                query_start_loc=run.query_start_loc, seq_lens=run.seq_lens, scale=self.scale, causal=run.causal,
                alibi_slopes=None, sliding_window=-1, block_table=run.block_table, softcap=0,
                scheduler_metadata=run.scheduler_metadata, s_aux=None, dynamic_causal=None,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype)
            output[:n, h * g:(h + 1) * g] = out
            started = time.perf_counter()
            if self.modes[h] == PRUNED:
                self._stash_observation_queries(md, q, h)
                compressed = self._compact(md, q, key_cache, value_cache, h)
            else:
                compressed = self._offload(md, key_cache, value_cache, h)
            if compressed:
                self.runtime.accounting.compress_seconds += time.perf_counter() - started
        return output

    @staticmethod
    def _split(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        num_blocks, heads, block_size, _ = cache.shape
        return cache.view(num_blocks, heads, 2 * block_size, -1).chunk(2, dim=2)

    # -- dynamic heads: cold tier + hot buffer
    def _offload(self, md: HybridKVMetadata, key_cache: torch.Tensor, value_cache: torch.Tensor, h: int) -> bool:
        """In the step that completes a compressed prompt: its complete chunks go to the cold tier."""
        offloaded = False
        for r, row in enumerate(md.rows):
            if row.kept is None or not row.completes_prompt or r >= len(self.runtime.batch.rows):
                continue
            ids = md.block_table[r, :row.prompt_len // key_cache.shape[2]].long()
            keys = cpu_layout.read_keys(key_cache, ids, self.key_perm).to(torch.float32)        # [C, bs, D]
            chunks = ColdChunks(keys=key_cache[ids, 0].clone(), values=value_cache[ids, 0].clone(),
                                kmin=keys.amin(dim=1), kmax=keys.amax(dim=1), resident=list(range(row.kept)))
            self.runtime.cold.put(self.runtime.batch.rows[r].req_id, (self.layer_name, h), chunks)
            offloaded = True
        return offloaded

    def _retrieve(self, md: HybridKVMetadata, q: torch.Tensor, key_cache: torch.Tensor,
                  value_cache: torch.Tensor, h: int) -> None:
        """Decode rows: bring the prompt chunks this step's query scores highest into the hot buffer."""
        accounting = self.runtime.accounting
        for r, row in enumerate(md.rows):
            if row.kept is None or not row.after_prompt or row.q_end - row.q_start != 1:
                continue
            req_id = self.runtime.batch.rows[r].req_id if r < len(self.runtime.batch.rows) else None
            cold = self.runtime.cold.get(req_id, (self.layer_name, h))
            if cold is None:          # never expected; degrade this request only, never the whole engine
                logger.error("HybridKV: no cold-tier entry for request %r (%s, head %d): it attends to its hot "
                             "buffer as it is", req_id, self.layer_name, h)
                continue
            scores = score_chunks(q[row.q_start], cold.kmin[None], cold.kmax[None])           # [1, C]
            chosen = select_chunks(scores, scores.shape[1], row.kept, self.runtime.selection)[0].tolist()
            swaps = plan_swap_in(cold.resident, chosen)
            if swaps:
                slots, chunk_ids = (torch.tensor(x, dtype=torch.long) for x in zip(*swaps))
                hot = md.block_table[r, slots].long()
                key_cache[hot, 0] = cold.keys[chunk_ids]
                value_cache[hot, 0] = cold.values[chunk_ids]
            accounting.chunk_loads += len(swaps)
            accounting.swap_in_bytes += len(swaps) * 2 * cold.keys[0].numel() * cold.keys.element_size()
            accounting.chunks_scored += scores.shape[1]

    # -- static heads: text-prior pruning when the prompt completes
    def _stash_observation_queries(self, md: HybridKVMetadata, q: torch.Tensor, h: int) -> None:
        """Chunked prefill: keep the observation-window queries of chunks that end before the prompt does."""
        window = self.runtime.selection.obs_window
        for r, row in enumerate(md.rows):
            if row.kept is None or row.prompt_len is None or row.completes_prompt or row.after_prompt:
                continue
            lo, hi = max(row.computed, row.prompt_len - window), min(row.seq_len, row.prompt_len)
            if lo < hi and r < len(self.runtime.batch.rows):
                stash = self.runtime.obs_stash.setdefault((self.runtime.batch.rows[r].req_id, self.layer_name, h), {})
                for pos in range(lo, hi):
                    stash[pos] = q[row.q_start + pos - row.computed].clone()

    def _observation_queries(self, r: int, row: RowPlan, q: torch.Tensor, h: int):
        """``(q_obs [W, G, D], positions [W])``: the last ``obs_window`` prompt queries, stashed ones included."""
        p = row.prompt_len
        start = max(0, p - self.runtime.selection.obs_window)
        req_id = self.runtime.batch.rows[r].req_id if r < len(self.runtime.batch.rows) else None
        stash = self.runtime.obs_stash.pop((req_id, self.layer_name, h), {})
        earlier = [pos for pos in range(start, row.computed) if pos in stash]
        here = range(max(start, row.computed), p)
        queries = [stash[pos] for pos in earlier] + [q[row.q_start + pos - row.computed] for pos in here]
        return torch.stack(queries), torch.tensor(earlier + list(here), dtype=torch.long)

    def _compact(self, md: HybridKVMetadata, q: torch.Tensor, key_cache: torch.Tensor,
                 value_cache: torch.Tensor, h: int) -> bool:
        sel_cfg = self.runtime.selection
        bs = key_cache.shape[2]
        compacted = False
        for r, row in enumerate(md.rows):
            if row.kept is None or not row.completes_prompt:
                continue
            compacted = True
            p = row.prompt_len
            q_obs, obs_pos = self._observation_queries(r, row, q, h)                            # [W, G, D]
            ids = md.block_table[r, :cdiv(p, bs)]
            keys = cpu_layout.read_keys(key_cache, ids, self.key_perm).reshape(-1, self.head_size)[:p]
            values = value_cache[ids.long(), 0].reshape(-1, self.head_size)[:p]
            scores = text_prior_scores(q_obs.transpose(0, 1), keys[None], obs_pos, self.scale,
                                       sel_cfg.pool_kernel)[0]
            visual = self.runtime.batch.rows[r].visual_mask(p) if r < len(self.runtime.batch.rows) \
                else torch.zeros(p, dtype=torch.bool)
            chosen = select_static(scores, visual, row.kept * bs, (p // bs) * bs, sel_cfg)
            kept_ids = ids[:row.kept]
            cpu_layout.write_keys(key_cache, kept_ids, keys[chosen].reshape(row.kept, bs, -1), self.key_perm)
            value_cache[kept_ids.long(), 0] = values[chosen].reshape(row.kept, bs, -1)
        return compacted


# --------------------------------------------------------------------------------------------------- backend
class HybridKVBackend(CPUAttentionBackend):
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return BACKEND_NAME

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_impl_cls():
        return HybridKVImpl

    @staticmethod
    def get_builder_cls():
        return HybridKVMetadataBuilder
