"""Helpers for tests that run vLLM's CPU build in-process (the engine helpers live in the package:
``hybridkv_vllm.adapter.engine_probe``, shared with the benchmarks)."""
from __future__ import annotations

import os
from pathlib import Path

from hybridkv_vllm.adapter.engine_probe import (free_blocks, held_blocks, make_llm,  # noqa: F401 (re-exported)
                                                 run_to_completion, scheduler_of)
from hybridkv_vllm.eval.prompts import haystack_chat_prompt
from hybridkv_vllm.profiler.synthetic import synthetic_profile as _synthetic_profile

ROOT = Path(__file__).resolve().parents[2]
MODEL = ROOT / "models" / "smollm2-vl"
HAYSTACK = Path("/usr/share/common-licenses/GPL-3")

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def synthetic_profile(path: Path, seed: int = 0, low: float = 0.8, model: Path = MODEL) -> Path:
    return _synthetic_profile(path, model, seed=seed, low=low)


def text_prompt(n_chars: int, question: str = "What is this text about? Answer briefly.") -> str:
    return haystack_chat_prompt(n_chars, question)


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


#: Greedy equality across implementations (vLLM's CPU kernels vs transformers + the core reference, both float32):
#: the two compute the same logits up to summation order, a few 1e-4 apart on this machine, more on another
#: ISA. Where the reference's two best logits are closer than this, either side may pick either token and the
#: continuations part; nowhere else may they differ.
NEAR_TIE = 2e-2


def assert_greedy_matches(got: list[int], want: list[int], want_logits, what: str) -> None:
    """``got`` (vLLM) equals ``want`` (the reference, whose step logits are ``want_logits [n, V]``) token for token,
    up to a near tie of the reference (``NEAR_TIE``), at which ``got``'s token must be one of the tied ones;
    after it nothing is compared (the prompts differ from there on)."""
    assert len(got) == len(want), f"{what}: {len(got)} tokens, the reference made {len(want)}"
    for i, (g, w) in enumerate(zip(got, want)):
        if g == w:
            continue
        logits = want_logits[i].float()
        best = float(logits.max())
        margin = best - float(logits[g])
        assert margin < NEAR_TIE, (f"{what}: greedy token {i} is {g}, the reference's is {w}, and the reference "
                                   f"ranks {g} {margin:.4f} below its best (not a near tie: < {NEAR_TIE}); "
                                   f"equal before: {want[:i]}")
        return
