"""The vLLM adapter: the only part of hybridkv_vllm that imports vllm.

plugin.py     entry point (vllm.general_plugins), idempotent in every vLLM process
config.py     --additional-config '{"hybridkv": {...}}' -> HybridKVConfig, validated at startup
tiers.py      profile + budget -> KV-cache tiers of one-head virtual layers (pure; no vllm import)
kv_spec.py    HybridKVBudgetSpec + HybridKVBudgetManager: frees the pruned prompt gap in vLLM's block pool
runtime.py    per-process state: the tier plan, per-layer head modes, the step's batch context
backend.py    HYBRIDKV attention backend: builder (rewritten block tables) and impl (write, attend, compact)
patches.py    every guarded, version-checked vLLM patch, in one place
metrics.py    Prometheus metrics (vLLM style)
"""
