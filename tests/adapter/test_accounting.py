"""The plugin's block accounting without an engine: blocks held and tokens kept, per request budget, equal what
the core allocator gives each head (a tier keeping its largest head's share), and the gauges publish the sum."""
from __future__ import annotations

import pytest
import torch
from prometheus_client import CollectorRegistry

from hybridkv_vllm.adapter import metrics as M
from hybridkv_vllm.adapter.accounting import StepAccounting
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.step_plan import plan_rows
from hybridkv_vllm.core.tiers import RETRIEVE, TierBudgets, plan_tiers

BS = 16


def _setup(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    is_static = torch.rand(6, 2, generator=g) < 0.5
    is_static[0, 0], is_static[0, 1] = True, False
    heads = (is_static, torch.rand(6, 2, generator=g, dtype=torch.float64) + 0.1)
    cfg = BudgetConfig(budget=0.1, block_size=BS, floor_blocks=2)
    tiers = plan_tiers(allocate(heads, cfg), max_groups=4)
    return heads, tiers, StepAccounting(budgets=TierBudgets(heads, cfg, tiers, min_prompt_tokens=64), block_bytes=100)


def _oracle_held(heads, tiers, budget: float, prompt_len: int, num_tokens: int) -> int:
    tokens = allocate(heads, BudgetConfig(budget=budget, block_size=BS, floor_blocks=2)).tokens_for(prompt_len)
    full, aligned = -(-num_tokens // BS), prompt_len // BS
    held = 0
    for tier in tiers.tiers:
        kept = max(int(tokens[l, h]) for l, h in tier.heads) // BS
        held += kept + full - aligned if kept < aligned else full
    return held


@pytest.mark.parametrize("budget", [None, 0.05, 0.3, 1.0])
@pytest.mark.parametrize("prompt_len", [100, 700, 2049])
def test_blocks_held_follow_the_allocator_at_each_requests_budget(budget, prompt_len):
    heads, tiers, acc = _setup()
    num_tokens = prompt_len + 7
    held, full = acc.held_blocks(prompt_len, num_tokens, budget)
    assert full == len(tiers.tiers) * -(-num_tokens // BS)
    assert held == _oracle_held(heads, tiers, budget or 0.1, prompt_len, num_tokens)
    kept, total = acc.tokens_kept(prompt_len, budget)
    n_dyn = sum(1 for row in tiers.modes for m in row if m == RETRIEVE)
    assert total == {"static": prompt_len * (12 - n_dyn), "dynamic": prompt_len * n_dyn}
    assert all(0 < kept[k] <= total[k] for k in kept if total[k])


def test_gauges_publish_the_sum_over_compressed_rows_after_their_prompt():
    _, tiers, acc = _setup(1)
    registry = CollectorRegistry()
    M.reset_for_tests()
    try:
        M.configure(model_name="m", engine=0, registry=registry)
        lens, computed = [700, 900, 50], [705, 899, 60]                   # decoding, completing, short
        qsl = [0, 1, 2, 3]
        rows = plan_rows(["a", "b", "c"], lens, qsl, [c + 1 for c in computed], BS, 2, 64, budgets=[None, 0.3, None])
        acc.observe(object(), rows, cold_tier_bytes=1234)
        value = lambda name: registry.get_sample_value(name, {"model_name": "m", "engine": "0"})  # noqa: E731
        want_held = sum(acc.held_blocks(r.prompt_len, r.seq_len, r.budget)[0] for r in rows
                        if r.compressed and r.after_prompt)
        assert want_held > 0 and value("hybridkv:kv_blocks_held") == want_held
        assert value("hybridkv:cold_tier_bytes") == 1234
        assert registry.get_sample_value("hybridkv:requests_compressed_total", {"model_name": "m", "engine": "0"}) == 1
    finally:
        M.reset_for_tests()
