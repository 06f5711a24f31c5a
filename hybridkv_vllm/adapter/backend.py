"""The HYBRIDKV attention backend (vLLM's four parts, plus the one-head virtual layers).

``HybridKVBackend`` names the parts; ``HybridKVMetadataBuilder`` (once per KV-cache group = tier and step) adds its
tier's rewritten tables to the step's plan (``core/step_plan.py``; the builder of the last tier finishes it,
``runtime.add_tier``); ``HybridKVImpl`` (per layer) runs ``executor.run_layer`` on the plan for every KV head of
the layer at once through the KV-ops seam (``kv_ops.py``), and in the step that completes a prompt prunes static heads
(``static_heads.py``) and offloads dynamic ones to the cold tier (``dynamic_heads.py``); ``HybridKVHeadLayer`` is
the one-head virtual layer that gives every KV head its own KV-cache group (``core/tiers.py``).

Every KV head sits in a budget tier: once its prompt is processed a compressed request keeps blocks ``[0, kept)``
plus the tail (prompt's partial block + generated tokens), and the budget manager frees ``[kept, P // bs)`` right
after the step that completes the prompt (kv_spec.py); rows then read ``table[:kept] ++ table[P // bs:]``. Static
heads hold their pruned prompt in ``[0, kept)``; dynamic heads a hot buffer that each decode step fills with the
prompt chunks its query scores highest. A request shorter than ``min_prompt_tokens``, or a tier that would free
nothing, attends densely. Prefill always attends densely.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from vllm.config import VllmConfig, get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.attention_layer_base import AttentionLayerBase
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionImpl, AttentionMetadataBuilder,
                                       AttentionType, CommonAttentionMetadata, MultipleOf)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout, KVCacheSpec

from hybridkv_vllm.adapter import cpu_layout, dynamic_heads, static_heads
from hybridkv_vllm.adapter.executor import run_layer
from hybridkv_vllm.adapter.kv_ops import LayerHeads, make_kv_ops, page_address, pool_of
from hybridkv_vllm.adapter.kv_spec import HybridKVBudgetSpec, register_spec
from hybridkv_vllm.adapter.runtime import BLOCK_MULTIPLE, get_runtime
from hybridkv_vllm.core.step_plan import StepPlan, rewrite_group
from hybridkv_vllm.core.tiers import PRUNED, RETRIEVE

BACKEND_NAME = "HYBRIDKV"
HEAD_SUFFIX = ".hkv_h"


# ------------------------------------------------------------------------------------------------- metadata
@dataclass
class HybridKVMetadata:
    plan: StepPlan                 # the step's plan, shared by every group (core/step_plan.py)
    num_actual_tokens: int


class HybridKVMetadataBuilder(AttentionMetadataBuilder[HybridKVMetadata]):
    """Once per KV-cache group (tier) and step: adds the tier's rewritten tables to the step plan.

    CUDA graphs: the step plan is made per step in Python, so attention stays outside captured graphs
    (``NEVER``: vLLM then runs piecewise graphs, attention between them, and refuses ``cudagraph_mode=FULL``)."""

    supports_update_block_table = False
    _cudagraph_support = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec: AttentionSpec, layer_names: list[str], vllm_config: VllmConfig,
                 device: torch.device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        from hybridkv_vllm.core.errors import ConfigError
        if not isinstance(kv_cache_spec, HybridKVBudgetSpec):
            raise ConfigError(f"HYBRIDKV layers {layer_names[:2]} did not get HybridKV's budget KV-cache spec")
        self.spec = kv_cache_spec
        self.runtime = get_runtime(vllm_config)
        self.tier = kv_cache_spec.tier
        # the cold tier on the KV cache's device before the first step admits a prompt into it
        self.runtime.bind_cold_tier(kv_cache_spec.head_size, kv_cache_spec.dtype, device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> HybridKVMetadata:
        cm = common_attn_metadata
        # the rows' lengths on the host: vLLM's host copy (exact without speculative decoding, which is refused),
        # else the device tensor read once per step
        host_lens = cm.seq_lens_cpu_upper_bound if cm.seq_lens_cpu_upper_bound is not None else cm.seq_lens
        plan = self.runtime.plan_for(cm.query_start_loc_cpu, host_lens, cm.num_reqs, cm.num_actual_tokens)
        if not plan.has_group(self.tier):        # a tier's layers may form several attention groups: one table
            self.runtime.add_tier(plan, self.tier, rewrite_group(plan.rows, cm.block_table_tensor, cm.seq_lens,
                                                                 cm.slot_mapping, self._kept_blocks,
                                                                 self.spec.block_size))
        return HybridKVMetadata(plan=plan, num_actual_tokens=cm.num_actual_tokens)

    def _kept_blocks(self, prompt_len: int, budget: float | None) -> int | None:
        """The tier's rule at the request's own budget (the budget manager frees by the same one)."""
        return self.runtime.budgets.kept(prompt_len, budget)[self.tier]


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
                              min_prompt_tokens=runtime.config.min_prompt_tokens, tier=tier.index)


# ------------------------------------------------------------------------------------------------------ impl
class HybridKVImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None) -> None:
        from hybridkv_vllm.core.errors import ConfigError
        if alibi_slopes is not None or sliding_window is not None or sinks is not None or logits_soft_cap:
            raise ConfigError("HYBRIDKV supports plain causal decoder attention only (no ALiBi, sliding window, "
                              "attention sinks or soft-capping in this model's layers)")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads, self.kv_cache_dtype, self.attn_type = num_kv_heads, kv_cache_dtype, attn_type
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.alibi_slopes, self.sliding_window, self.logits_soft_cap, self.sinks = None, -1, 0, None
        self.vllm_config = get_current_vllm_config()
        self.runtime = get_runtime(self.vllm_config)      # validates profile, budget and flags at start-up
        self.group = num_heads // num_kv_heads
        self.head_names: list[str] = []
        self.heads: LayerHeads | None = None
        self._bound: tuple | None = None

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
        self.layer_index = index
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
        dtype = self.vllm_config.model_config.dtype
        isa = perm = None
        if runtime.kv_ops_kind == "cpu":          # vLLM's CPU kernels: their ISA and where a key element sits
            from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
            isa = _get_attn_isa(dtype, bs, self.head_size, self.kv_cache_dtype)
            perm = cpu_layout.key_layout(isa, layer.kv_cache_torch_dtype, bs, self.head_size)
        self.ops = make_kv_ops(runtime.kv_ops_kind, block_size=bs, head_size=self.head_size, dtype=dtype,
                               selection=runtime.selection, isa=isa, kv_cache_dtype=self.kv_cache_dtype,
                               key_perm=perm)

    def _bind(self, kv_cache: torch.Tensor) -> torch.Tensor:
        """The page array and this layer's :class:`LayerHeads`, worked out once per bound KV cache."""
        key = (kv_cache.untyped_storage().data_ptr(), kv_cache.storage_offset())
        if self._bound is None or self._bound[0] != key:
            context = get_forward_context()
            caches = [kv_cache] + [context.no_compile_layers[name].kv_cache for name in self.head_names[1:]]
            base, stride = zip(*(page_address(c) for c in caches))
            pool = pool_of(kv_cache, self.runtime.block_size, self.head_size)
            for c, b, st in zip(caches, base, stride):           # every block of every head inside the page array
                if b < 0 or b + st * (c.shape[0] - 1) >= pool.shape[0]:
                    raise RuntimeError(f"HybridKV: {self.layer_name}: KV-cache view outside its allocation")
            runtime, index = self.runtime, self.layer_index
            modes = runtime.tiers.modes[index]
            dynamic = [h for h, mode in enumerate(modes) if mode == RETRIEVE]
            tiers = tuple(runtime.tiers.tier_of[index])

            def on(values) -> torch.Tensor:              # the layer's index tensors live beside its KV cache
                return torch.tensor(list(values), dtype=torch.long, device=kv_cache.device)

            self.heads = LayerHeads(
                index=index, tiers=on(tiers), base=on(base), stride=on(stride), dynamic=on(dynamic),
                cold_start=runtime.cold_index[index][dynamic[0]] if dynamic else 0,
                static=on([h for h, mode in enumerate(modes) if mode == PRUNED]),
                signature=tiers)
            runtime.layers[index] = self.heads
            runtime.bind_cold_tier(self.head_size, kv_cache.dtype, kv_cache.device)
            self._bound = (key, pool)
        return self._bound[1]

    # -- forward: tensor operations on the step plan, every KV head of the layer at once
    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None):
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("fused output quantization is not supported by HYBRIDKV")
        if attn_metadata is None:
            return output
        plan = attn_metadata.plan
        if not plan.finalized:                    # the builders of every tier ran before any layer (runtime.py)
            raise RuntimeError(f"HybridKV: {self.layer_name}: the step's plan is missing tiers "
                               f"{sorted(set(range(len(self.runtime.tiers.tiers))) - set(plan.groups))}")
        pool = self._bind(kv_cache)
        n, h, d = attn_metadata.num_actual_tokens, self.num_kv_heads, self.head_size
        q = query[:n].view(n, h * self.group, d)
        kv = None if key is None else (key[:n].view(n, h, d), value[:n].view(n, h, d))
        step = self.runtime.layer_step(plan, self.heads)
        run_layer(self.ops, plan, self.heads, step, pool, self.runtime.cold, q, kv,
                  output[:n].view(n, h * self.group, d), self.scale, layer, self.runtime.loads.value)
        if plan.prefill_rows or plan.completing:
            self._prompt_work(plan, step, pool, q)
        return output

    def _prompt_work(self, plan, step, pool, q) -> None:
        """Steps that complete a compressed prompt (once per request): prune static heads, offload dynamic ones."""
        runtime, heads = self.runtime, self.heads
        if heads.static.numel():
            runtime.obs_stash.keep(plan, self.layer_name, q, runtime.selection.obs_window)
        if not plan.completing:
            return
        started = time.perf_counter()
        for r in plan.completing:
            if heads.static.numel():
                rows = runtime.batch.rows
                visual = rows[r].visual_mask(plan.rows[r].prompt_len) if r < len(rows) else \
                    torch.zeros(plan.rows[r].prompt_len, dtype=torch.bool)
                static_heads.prune(self.ops, plan, heads, step, pool, q, r, self.layer_name, runtime.obs_stash,
                                   visual, runtime.selection, self.scale)
            dynamic_heads.offload(self.ops, plan, heads, step, pool, runtime.cold, r)
        runtime.accounting.compress_seconds += time.perf_counter() - started


# --------------------------------------------------------------------------------------------------- backend
class HybridKVBackend(AttentionBackend):
    """The same backend on vLLM's CPU and CUDA platforms: what differs is the KV-ops implementation
    (``hybridkv.kv_ops``, kv_ops.py). Every KV cache is vLLM's one backing allocation viewed block-outermost
    (``LBHNC``), so one block of a one-head virtual layer is one contiguous page (``kv_ops.pool_of``)."""

    forward_includes_kv_cache_update: bool = True
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto", "bfloat16", "float16", "float32"]

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

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [MultipleOf(BLOCK_MULTIPLE)]   # vLLM's CPU kernels need it; the Triton kernels take any multiple of 16

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 224, 256]

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple:
        return (KVCacheLayout.LBHNC,)
