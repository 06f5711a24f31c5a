"""``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core, workers).

It registers the backend name ``HYBRIDKV`` (so ``--attention-backend HYBRIDKV`` parses everywhere), the budget
KV-cache spec with its manager (needed in the engine core, where the scheduler lives), and the guarded patches
(patches.py). Idempotent: vLLM may call it more than once per process.
"""
from __future__ import annotations

import logging

logger = logging.getLogger("hybridkv")

BACKEND_PATH = "hybridkv_vllm.adapter.backend.HybridKVBackend"
_done = False


def register() -> None:
    global _done
    if _done:
        return
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "HYBRIDKV" not in AttentionBackendEnum.__members__:
        register_backend("HYBRIDKV", BACKEND_PATH)
    from hybridkv_vllm.adapter import patches
    from hybridkv_vllm.adapter.kv_spec import register_spec
    register_spec()
    patches.apply_all(BACKEND_PATH)
    _done = True
