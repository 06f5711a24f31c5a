"""Engine-agnostic HybridKV core: imports torch, numpy and jsonschema only (never vllm, never transformers).

Modules (one concept each): :mod:`profile` (head profile artefact), :mod:`sparsity` (classification statistic),
:mod:`budgets` (top-down allocator), :mod:`selection` (static text-prior / dynamic chunk selection),
:mod:`policy` (per-head policies and baselines), :mod:`reference` (the attention oracle), :mod:`errors`.
"""
from hybridkv_vllm.core.budgets import BudgetConfig, BudgetPlan, allocate, uniform_plan
from hybridkv_vllm.core.errors import BudgetError, ConfigError, HybridKVError, ProfileError
from hybridkv_vllm.core.policy import (FullPolicy, HeadKind, HybridKVPolicy, LayerRules, RandomPolicy,
                                       SnapKVPolicy, StreamingPolicy, make_policy)
from hybridkv_vllm.core.profile import ClassificationParams, HeadEntry, HeadProfile, ModelIdentity
from hybridkv_vllm.core.reference import CompressedLayerCache, dense_attention, sparse_decode_attention
from hybridkv_vllm.core.selection import (SelectionConfig, chunk_summaries, retrieval_chunks, score_chunks,
                                          select_chunks, select_static, text_prior_scores)
from hybridkv_vllm.core.sparsity import (SparsityAccumulator, mass_concentration, reference_query_positions,
                                        selection_recall)

__all__ = [
    "BudgetConfig", "BudgetPlan", "allocate", "uniform_plan",
    "BudgetError", "ConfigError", "HybridKVError", "ProfileError",
    "FullPolicy", "HeadKind", "HybridKVPolicy", "LayerRules", "RandomPolicy", "SnapKVPolicy", "StreamingPolicy",
    "make_policy",
    "ClassificationParams", "HeadEntry", "HeadProfile", "ModelIdentity",
    "CompressedLayerCache", "dense_attention", "sparse_decode_attention",
    "SelectionConfig", "chunk_summaries", "retrieval_chunks", "score_chunks", "select_chunks", "select_static",
    "text_prior_scores",
    "SparsityAccumulator", "mass_concentration", "reference_query_positions", "selection_recall",
]
