"""A KV-cache spec and manager that return a static-head tier's pruned prompt blocks to vLLM's block pool.

``HybridKVBudgetSpec`` derives from ``AttentionSpec`` (not ``FullAttentionSpec``) so that each budget tier
stays its own KV-cache group with its own block table. Its manager is vLLM's ``FullAttentionManager`` except
for ``remove_skipped_blocks``: once a request's prompt has been processed, blocks ``[kept, P // bs)`` are
nulled in the request's block list and freed, exactly as vLLM's R-SWA manager frees its gap. The scheduler,
admission, preemption and ``vllm:kv_cache_usage_perc`` therefore see the freed blocks with no patch.

The worker never reads a freed block: its block table is append-only and keeps the stale ids, so the
HYBRIDKV builder rewrites each compressed row to ``table[:kept] ++ table[P // bs:]`` (see backend.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from vllm.config import VllmConfig
from vllm.utils.math_utils import cdiv
from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from hybridkv_vllm.adapter import runtime
from hybridkv_vllm.core.budgets import kept_blocks


@dataclass(frozen=True, kw_only=True)
class HybridKVBudgetSpec(AttentionSpec):
    """One static-head tier: keeps ``kept_blocks(P, fraction, ...)`` blocks of each prompt plus the tail."""

    fraction: float
    floor_blocks: int
    min_prompt_tokens: int
    tier: int = -1          # the tier's index: tiers with equal budgets stay distinct groups, in the tiers' order

    def kept_blocks(self, prompt_len: int) -> int | None:
        return kept_blocks(prompt_len, self.fraction, self.block_size, self.floor_blocks, self.min_prompt_tokens)

    def max_memory_usage_bytes(self, vllm_config: VllmConfig) -> int:
        # The whole prompt is resident until the step that completes it, so admission must plan full length.
        return cdiv(vllm_config.model_config.max_model_len, self.block_size) * self.page_size_bytes

    @property
    def prefix_cacheable(self) -> bool:
        return False

    def is_uniform_with_collection(self, kv_cache_specs: dict[str, KVCacheSpec]) -> bool:
        # Only identical budgets may share one group (one block table, one freeing rule).
        return all(spec == self for spec in kv_cache_specs.values())


class HybridKVBudgetManager(FullAttentionManager):
    """Frees the pruned prompt gap of a budget tier once the prompt is processed, by the request's own budget or
    opt-out as the scheduler decided it when the request was first scheduled (requests.py)."""

    def remove_skipped_blocks(self, request_id: str, processed_computed_tokens: int,
                              num_prompt_tokens: int | None = None) -> None:
        if num_prompt_tokens is None or processed_computed_tokens < num_prompt_tokens:
            return
        state = runtime.current_runtime()
        if state is None:            # no runtime in this process: no request can have been given its own setting
            kept = self.kv_cache_spec.kept_blocks(num_prompt_tokens)
        else:
            kept = state.admission.kept_blocks(request_id, self.kv_cache_spec.tier, num_prompt_tokens)
        if kept is None:
            return
        self._remove_blocks_in_range(request_id, kept, num_prompt_tokens // self.block_size)


_registered = False


def register_spec() -> None:
    """Register the spec with vLLM's registry (idempotent; built-ins first, see the registry's lazy init)."""
    global _registered
    if _registered:
        return
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(HybridKVBudgetSpec, HybridKVBudgetManager,
                                 uniform_type_base_spec=HybridKVBudgetSpec)
    _registered = True
