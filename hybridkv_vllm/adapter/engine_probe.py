"""An in-process vLLM engine for tests and benchmarks, and what its scheduler holds (vLLM's own block accounting).

``make_llm`` builds ``vllm.LLM`` on this machine's settings (eager, no prefix caching, a 4k context, block 32);
``held_blocks`` / ``free_blocks`` read vLLM's KV-cache managers and block pool, the oracle every memory figure of
the project is checked against; ``run_to_completion`` steps the engine by hand so a caller can look in between.
The engine runs in this process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set by the caller before vLLM starts).
"""
from __future__ import annotations

from pathlib import Path


def make_llm(model_dir: Path, hybridkv: dict | None, **kwargs):
    """``vllm.LLM`` with HybridKV's settings (``hybridkv=None``: stock vLLM); ``kwargs`` override the defaults."""
    from vllm import LLM
    extra = {}
    if hybridkv is not None:
        extra = dict(attention_backend="HYBRIDKV", additional_config={"hybridkv": hybridkv})
    args = dict(model=str(model_dir), dtype="float32", max_model_len=4096, enforce_eager=True, block_size=32,
                enable_prefix_caching=False, max_num_seqs=8, limit_mm_per_prompt={"image": 1, "video": 0},
                seed=0)
    args.update(kwargs)
    return LLM(**args, **extra)


def scheduler_of(llm):
    return llm.llm_engine.engine_core.engine_core.scheduler


def held_blocks(llm, req_id: str) -> list[int]:
    """Non-null blocks ``req_id`` (vLLM's internal id) holds in each KV-cache group, from vLLM's own managers."""
    coordinator = scheduler_of(llm).kv_cache_manager.coordinator
    null = scheduler_of(llm).kv_cache_manager.block_pool.null_block
    return [sum(1 for b in m.req_to_blocks.get(req_id, []) if b is not null) for m in coordinator.single_type_managers]


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def run_to_completion(llm, max_steps: int = 10_000, on_step=None) -> dict:
    """Step the engine until no request is left: ``{request id: final output}``; ``on_step(step)`` after each."""
    engine, outputs, step = llm.llm_engine, {}, 0
    while engine.has_unfinished_requests() and step < max_steps:
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        step += 1
        if on_step is not None:
            on_step(step)
    return outputs


def cold_tier_bytes(llm) -> int:
    """Bytes the engine's cold tier holds now (0 for a stock engine)."""
    from hybridkv_vllm.adapter import runtime
    config = llm.llm_engine.vllm_config
    return runtime.get_runtime(config).cold.nbytes if runtime.uses_hybridkv(config) else 0
