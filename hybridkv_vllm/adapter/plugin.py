"""``vllm.general_plugins`` entry point: runs in every vLLM process (API server, engine core, workers).

It registers the backend name ``HYBRIDKV`` (so ``--attention-backend HYBRIDKV`` parses everywhere), the budget
KV-cache spec with its manager (needed in the engine core, where the scheduler lives), and the guarded patches
(patches.py). Idempotent: vLLM may call it more than once per process.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys

logger = logging.getLogger("hybridkv")

BACKEND_PATH = "hybridkv_vllm.adapter.backend.HybridKVBackend"
_done = False


def _is_api_server_main() -> bool:
    argv = [os.path.basename(a) for a in sys.argv[:2]]
    return multiprocessing.parent_process() is None and (argv[1:] == ["serve"] or "api_server.py" in argv[:1])


def _share_metrics_across_processes() -> None:
    """Engine-core and worker metrics reach ``/metrics`` only in Prometheus multiprocess mode, which must be on
    before prometheus_client creates any value; vLLM turns it on only for several API servers."""
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or not _is_api_server_main():
        return
    if "prometheus_client.values" in sys.modules:
        logger.warning("hybridkv: set PROMETHEUS_MULTIPROC_DIR to a fresh directory to see the plugin's metrics")
        return
    from vllm.v1.metrics.prometheus import setup_multiprocess_prometheus
    setup_multiprocess_prometheus()


def backend_member():
    """``AttentionBackendEnum.HYBRIDKV`` in this process, registering the plugin first (used by unpickling)."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum
    return AttentionBackendEnum["HYBRIDKV"]


def register() -> None:
    global _done
    if _done:
        return
    _share_metrics_across_processes()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    if "HYBRIDKV" not in AttentionBackendEnum.__members__:
        register_backend("HYBRIDKV", BACKEND_PATH)
    # vLLM pickles its config (holding this member) into the engine-core process before plugins load there;
    # a member created at run time cannot be found by value in that process, so it pickles as a call that
    # registers it first.
    AttentionBackendEnum["HYBRIDKV"].__reduce_ex__ = lambda protocol: (backend_member, ())
    from hybridkv_vllm.adapter import patches
    from hybridkv_vllm.adapter.kv_spec import register_spec
    register_spec()
    patches.apply_all(BACKEND_PATH)
    _done = True
