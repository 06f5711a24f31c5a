"""Helpers for tests that run vLLM's CPU build in-process."""
from __future__ import annotations

import os
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-vl"
HAYSTACK = Path("/usr/share/common-licenses/GPL-3")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_profile(path: Path, seed: int = 0, low: float = 0.8, model: Path = MODEL) -> Path:
    """A valid profile for ``model`` whose head types are drawn at random (about half static)."""
    from transformers import AutoConfig

    from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity

    identity = ModelIdentity.from_hf_config(AutoConfig.from_pretrained(model))
    g = torch.Generator().manual_seed(seed)
    scores = low + (1 - low) * torch.rand(identity.num_layers, identity.num_kv_heads, generator=g,
                                          dtype=torch.float64) * 0.999
    HeadProfile.from_scores(identity, scores, theta=0.9).save(path)
    return path


def text_prompt(n_chars: int, question: str = "What is this text about? Answer briefly.") -> str:
    text = HAYSTACK.read_text()[:n_chars]
    return f"<|im_start|>user\n{text}\n{question}<|im_end|>\n<|im_start|>assistant\n"


def make_llm(model_dir: Path, hybridkv: dict | None, **kwargs):
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
    """Non-null blocks ``req_id`` holds in each KV-cache group, read from vLLM's own managers."""
    coordinator = scheduler_of(llm).kv_cache_manager.coordinator
    null = scheduler_of(llm).kv_cache_manager.block_pool.null_block
    return [sum(1 for b in m.req_to_blocks.get(req_id, []) if b is not null) for m in coordinator.single_type_managers]


def free_blocks(llm) -> int:
    return scheduler_of(llm).kv_cache_manager.block_pool.get_num_free_blocks()


def run_to_completion(llm, max_steps: int = 10_000, on_step=None) -> dict:
    engine, outputs, step = llm.llm_engine, {}, 0
    while engine.has_unfinished_requests() and step < max_steps:
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out
        step += 1
        if on_step is not None:
            on_step(step)
    return outputs


def _head_of(layer_name: str) -> tuple[int, int]:
    import re
    layer = int(re.search(r"layers\.(\d+)\.", layer_name).group(1))
    head = re.search(r"\.hkv_h(\d+)$", layer_name)
    return layer, int(head.group(1)) if head else 0


def expected_blocks(llm, profile_path, budget: float, prompt_len: int, num_tokens: int,
                    floor_blocks: int = 2) -> list[int]:
    """Blocks a compressed request holds per KV-cache group, from the profile and the budget alone: the core
    allocator's tokens per head at ``budget``, a group keeping its largest head's, plus the tail blocks."""
    from hybridkv_vllm.core.budgets import BudgetConfig, allocate
    from hybridkv_vllm.core.profile import HeadProfile
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    bs = groups[0].kv_cache_spec.block_size
    tokens = allocate(HeadProfile.load(profile_path),
                      BudgetConfig(budget=budget, block_size=bs, floor_blocks=floor_blocks)).tokens_for(prompt_len)
    full = -(-num_tokens // bs)
    expected = []
    for group in groups:
        heads = [_head_of(name) for name in group.layer_names]
        kept = max(int(tokens[l, h]) for l, h in heads) // bs
        expected.append(kept + full - prompt_len // bs if kept < prompt_len // bs else full)
    return expected


def full_blocks(llm, num_tokens: int) -> list[int]:
    """Blocks an uncompressed request holds per group."""
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    return [-(-num_tokens // g.kv_cache_spec.block_size) for g in groups]


def counter_total(name: str, **labels) -> float:
    """Sum of a counter's samples in this process's default registry (in-process engines), over other labels."""
    from prometheus_client import REGISTRY
    total = 0.0
    for family in REGISTRY.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
