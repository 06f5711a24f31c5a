"""Tier planning (pure): balanced groups vLLM will not pad, promotion only, and the block rule shared by the
budget manager and the worker equals the core allocator's token budgets."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_vllm.core.tiers import PRUNED, RETRIEVE, kept_blocks, plan_tiers
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.profile import HeadProfile, ModelIdentity


def _plan(is_static, weights, budget=0.1, bs=16):
    return allocate((torch.as_tensor(is_static), torch.as_tensor(weights, dtype=torch.float64)),
                    BudgetConfig(budget=budget, block_size=bs))


@st.composite
def head_tables(draw):
    layers, heads = draw(st.integers(1, 12)), draw(st.integers(1, 4))
    flags = draw(st.lists(st.booleans(), min_size=layers * heads, max_size=layers * heads))
    weights = draw(st.lists(st.floats(0.001, 1.0), min_size=layers * heads, max_size=layers * heads))
    return (torch.tensor(flags).reshape(layers, heads), torch.tensor(weights).reshape(layers, heads),
            draw(st.floats(0.01, 1.0)), draw(st.integers(1, 16)))


@settings(max_examples=150, deadline=None)
@given(head_tables())
def test_tiers_are_balanced_and_only_promote(table):
    is_static, weights, budget, max_groups = table
    plan = _plan(is_static, weights, budget)
    tiers = plan_tiers(plan, max_groups=max_groups)
    L, H = is_static.shape
    # Every head in exactly one tier; every tier the same size, dividing L*H: vLLM adds no padding layers.
    members = [head for tier in tiers.tiers for head in tier.heads]
    assert sorted(members) == [(l, h) for l in range(L) for h in range(H)]
    assert all(len(t.heads) == tiers.group_size for t in tiers.tiers)
    assert (L * H) % tiers.group_size == 0 and len(tiers.tiers) <= max(max_groups, 1) or tiers.group_size == L * H
    effective = tiers.effective_fractions(plan)
    for tier in tiers.tiers:
        assert tier.fraction == max(float(plan.fractions[a, b]) for a, b in tier.heads)
        for l, h in tier.heads:
            assert tiers.modes[l][h] == (PRUNED if bool(is_static[l, h]) else RETRIEVE)
            assert effective[l, h] == tier.fraction >= plan.fractions[l, h]        # never less than allocated


@settings(max_examples=200, deadline=None)
@given(st.floats(0.0, 3.0), st.integers(0, 5000), st.sampled_from([16, 32]), st.integers(0, 4))
def test_kept_blocks_is_the_allocator_rule(fraction, prompt_len, bs, floor_blocks):
    """The manager frees [kept, P//bs) and the worker reads [0, kept): kept*bs equals BudgetPlan.tokens_for."""
    plan = allocate((torch.tensor([[True]]), torch.tensor([[1.0]], dtype=torch.float64)),
                    BudgetConfig(budget=1.0, block_size=bs, floor_blocks=floor_blocks))
    plan = type(plan)(fractions=torch.tensor([[fraction]], dtype=torch.float64), is_static=plan.is_static, cfg=plan.cfg)
    tokens = int(plan.tokens_for(prompt_len)[0, 0])
    kept = kept_blocks(prompt_len, fraction, bs, floor_blocks, min_prompt_tokens=0)
    if kept is None:                                   # nothing to free: the head keeps every aligned block
        assert tokens == bs * (prompt_len // bs)
    else:
        assert kept * bs == tokens < bs * (prompt_len // bs)


def test_short_prompts_bypass():
    assert kept_blocks(200, 0.01, 32, 2, min_prompt_tokens=256) is None
    assert kept_blocks(2000, 0.01, 32, 2, min_prompt_tokens=256) == 2


def test_tier_plan_of_a_tensor_parallel_slice():
    """Each TP rank plans tiers over its own KV heads only (profile sliced like vLLM shards the heads)."""
    identity = ModelIdentity(architecture="X", num_layers=4, num_q_heads=8, num_kv_heads=4, head_dim=64,
                             fingerprint="sha256:" + "0" * 64)
    scores = torch.tensor([[0.95, 0.5, 0.97, 0.2]] * 4, dtype=torch.float64)
    profile = HeadProfile.from_scores(identity, scores, theta=0.9)
    for rank in range(2):
        part = profile.slice_for_tp(rank, 2)
        assert part.num_kv_heads == 2
        assert torch.equal(part.is_static, profile.is_static[:, 2 * rank:2 * rank + 2])
        tiers = plan_tiers(allocate(part, BudgetConfig(budget=0.1, block_size=16)))
        assert sorted(h for t in tiers.tiers for h in t.heads) == [(l, h) for l in range(4) for h in range(2)]


@settings(max_examples=100, deadline=None)
@given(head_tables(), st.floats(0.01, 1.0), st.integers(0, 6000))
def test_request_budgets_follow_the_allocator(table, request_budget, prompt_len):
    """A request's own budget: each tier keeps its largest head's share of the allocator run at that budget; the
    server's budget gives the tiers' own fractions; more budget never keeps less; the cold pages counted for
    admission are one per complete chunk of every dynamic head whose tier frees blocks."""
    from hybridkv_vllm.core.tiers import TierBudgets

    is_static, weights, budget, max_groups = table
    heads = (is_static, weights.to(torch.float64))
    cfg = BudgetConfig(budget=budget, block_size=16, floor_blocks=2)
    tiers = plan_tiers(allocate(heads, cfg), max_groups=max_groups)
    budgets = TierBudgets(heads, cfg, tiers, min_prompt_tokens=256)
    assert budgets.fractions() == budgets.fractions(budget) == tuple(t.fraction for t in tiers.tiers)
    other = allocate(heads, BudgetConfig(budget=request_budget, block_size=16, floor_blocks=2))
    assert budgets.fractions(request_budget) == pytest.approx(
        [max(float(other.fractions[l, h]) for l, h in t.heads) for t in tiers.tiers], rel=1e-12)
    kept = budgets.kept(prompt_len, request_budget)
    assert kept == tuple(kept_blocks(prompt_len, f, 16, 2, 256) for f in budgets.fractions(request_budget))
    more = budgets.kept(prompt_len, min(1.0, request_budget * 2))
    every = prompt_len // 16                                           # None: the tier keeps every block
    assert all((a if a is not None else every) >= (b if b is not None else every) for a, b in zip(more, kept))
    dynamic = [(l, h) for l in range(is_static.shape[0]) for h in range(is_static.shape[1]) if not is_static[l, h]]
    expect = sum(prompt_len // 16 for l, h in dynamic if kept[tiers.tier_of[l][h]] is not None) \
        if budgets.compressed(prompt_len) else 0
    assert budgets.cold_pages(prompt_len, request_budget) == expect
