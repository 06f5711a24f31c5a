"""Budget allocator (DESIGN §3): formulas, invariants (hypothesis), errors."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_vllm.core.budgets import BudgetConfig, allocate, uniform_plan
from hybridkv_vllm.core.errors import BudgetError


@st.composite
def heads_strategy(draw):
    L = draw(st.integers(1, 4))
    H = draw(st.integers(1, 4))
    static = draw(st.lists(st.booleans(), min_size=L * H, max_size=L * H))
    weights = draw(st.lists(st.floats(1e-3, 1.0), min_size=L * H, max_size=L * H))
    return (torch.tensor(static).reshape(L, H), torch.tensor(weights, dtype=torch.float64).reshape(L, H))


budgets = st.floats(1e-3, 1.0, exclude_min=False)
ratios = st.floats(0.1, 4.0)
prompt_lens = st.integers(0, 3000)
block_sizes = st.sampled_from([1, 4, 16])
floors = st.integers(0, 3)


def _expected_fractions(is_static, weights, b, r):
    """Independent per-head evaluation of the DESIGN §3 formulas."""
    L, H = is_static.shape
    n = L * H
    n_s = sum(bool(x) for x in is_static.flatten())
    n_d = n - n_s
    w_sum = sum(float(w) for s, w in zip(is_static.flatten(), weights.flatten()) if s)
    out = []
    for s, w in zip(is_static.flatten().tolist(), weights.flatten().tolist()):
        out.append(b * n * n_s / (n_s + r * n_d) * w / w_sum if s else b * n * r / (n_s + r * n_d))
    raw = torch.tensor(out, dtype=torch.float64).reshape(L, H)
    if float(raw.max()) <= 1.0:
        return raw
    lo, hi = 1.0, 1.0 / float(raw[raw > 0].min())          # water-filling by bisection: sum(min(1, lam f)) = b N
    target = min(float(raw.sum()), raw.numel())
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if float(torch.clamp(raw * mid, max=1.0).sum()) < target else (lo, mid)
    return torch.clamp(raw * hi, max=1.0)


@settings(max_examples=150, deadline=None)
@given(heads_strategy(), budgets, ratios, prompt_lens, block_sizes, floors)
def test_allocator_invariants(heads, b, r, P, bs, fb):
    is_static, weights = heads
    cfg = BudgetConfig(budget=b, r=r, block_size=bs, floor_blocks=fb)
    plan = allocate((is_static, weights), cfg)
    torch.testing.assert_close(plan.fractions, _expected_fractions(is_static, weights, b, r), rtol=1e-9, atol=1e-12)
    assert float(plan.fractions.max()) <= 1.0 + 1e-12
    assert math.isclose(float(plan.fractions.sum()), b * is_static.numel(), rel_tol=1e-9)
    tok = plan.tokens_for(P)
    assert tok.dtype == torch.int64 and tok.shape == is_static.shape
    p_aligned = bs * (P // bs)
    floor = fb * bs
    assert bool((tok % bs == 0).all()) and bool((tok <= p_aligned).all())
    assert bool((tok >= min(p_aligned, floor)).all())
    raised = int(((plan.fractions * P / bs).floor() * bs < floor).sum())
    assert int(tok.sum()) <= plan.total_tokens(P) + raised * floor + 1e-6
    if raised in (0, is_static.numel()):
        assert int(tok.sum()) <= max(plan.total_tokens(P), is_static.numel() * floor) + 1e-6
    # deterministic
    assert torch.equal(allocate((is_static.clone(), weights.clone()), cfg).tokens_for(P), tok)


@settings(max_examples=100, deadline=None)
@given(heads_strategy(), budgets, budgets, ratios, prompt_lens, block_sizes, floors)
def test_monotone_in_budget(heads, b1, b2, r, P, bs, fb):
    lo, hi = sorted((b1, b2))
    t_lo = allocate(heads, BudgetConfig(lo, r, bs, fb)).tokens_for(P)
    t_hi = allocate(heads, BudgetConfig(hi, r, bs, fb)).tokens_for(P)
    assert bool((t_lo <= t_hi).all())


def test_tokens_for_by_hand():
    # 1 layer, 2 static heads (weights 1 and 3) + 2 dynamic heads, budget 0.5, r = 1: N = 4.
    is_static = torch.tensor([[True, True, False, False]])
    weights = torch.tensor([[1.0, 3.0, 1.0, 1.0]], dtype=torch.float64)
    plan = allocate((is_static, weights), BudgetConfig(0.5, r=1.0, block_size=16, floor_blocks=2))
    torch.testing.assert_close(plan.fractions, torch.tensor([[0.25, 0.75, 0.5, 0.5]], dtype=torch.float64))
    # P = 200: P_aligned = 192; 0.25*200/16 = 3.125 -> 3 blocks = 48; 0.75*200/16 = 9.375 -> 144; 0.5 -> 96.
    assert plan.tokens_for(200).tolist() == [[48, 144, 96, 96]]
    # P = 40: floors (32) bite, P_aligned = 32 caps.
    assert plan.tokens_for(40).tolist() == [[32, 32, 32, 32]]
    assert plan.tokens_for(10).tolist() == [[0, 0, 0, 0]]


def test_ratio_moves_budget_to_dynamic_heads():
    is_static = torch.tensor([[True, False]])
    w = torch.ones(1, 2, dtype=torch.float64)
    plan = allocate((is_static, w), BudgetConfig(0.3, r=2.0))
    assert plan.fractions[0, 1].item() == pytest.approx(2 * plan.fractions[0, 0].item())
    assert plan.fractions.sum().item() == pytest.approx(0.6)


def test_profile_and_uniform_plan(profile):
    cfg = BudgetConfig(0.2)
    plan = allocate(profile, cfg)
    assert torch.equal(plan.is_static, profile.is_static)
    uni = uniform_plan(profile.num_layers, profile.num_kv_heads, cfg)
    assert torch.allclose(uni.fractions, torch.full_like(uni.fractions, 0.2))
    assert plan.fractions.sum().item() == pytest.approx(uni.fractions.sum().item())


@pytest.mark.parametrize("kwargs,name", [
    (dict(budget=0.0), "budget=0.0"), (dict(budget=1.5), "budget=1.5"), (dict(budget=-0.1), "budget=-0.1"),
    (dict(budget=0.5, r=0.0), "r=0.0"), (dict(budget=0.5, r=-1.0), "r=-1.0"),
    (dict(budget=0.5, block_size=0), "block_size=0"), (dict(budget=0.5, floor_blocks=-1), "floor_blocks=-1"),
])
def test_budget_config_errors(kwargs, name):
    with pytest.raises(BudgetError, match=name.replace(".", r"\.")):
        BudgetConfig(**kwargs)


def test_allocate_input_errors():
    cfg = BudgetConfig(0.5)
    with pytest.raises(BudgetError, match="same non-empty"):
        allocate((torch.ones(2, 2, dtype=torch.bool), torch.ones(2, 3)), cfg)
    with pytest.raises(BudgetError, match="> 0"):
        allocate((torch.ones(1, 2, dtype=torch.bool), torch.tensor([[1.0, 0.0]])), cfg)
    with pytest.raises(BudgetError, match="prompt_len"):
        allocate((torch.ones(1, 2, dtype=torch.bool), torch.ones(1, 2)), cfg).tokens_for(-1)


def test_full_budget_is_dense_with_unequal_static_weights():
    """Heads the formula gives more than the whole prompt are capped and the excess goes to the others."""
    plan = allocate((torch.ones(1, 2, dtype=torch.bool), torch.tensor([[0.01, 0.1]], dtype=torch.float64)),
                    BudgetConfig(1.0))
    assert plan.fractions.tolist() == [[1.0, 1.0]]
    assert plan.tokens_for(320).tolist() == [[320, 320]]
    half = allocate((torch.ones(1, 3, dtype=torch.bool), torch.tensor([[0.01, 0.01, 1.0]], dtype=torch.float64)),
                    BudgetConfig(0.5))        # raw fractions 0.0147, 0.0147, 1.47 -> the heavy head is capped
    assert half.fractions[0, 2].item() == 1.0
    torch.testing.assert_close(half.fractions.sum(), torch.tensor(1.5, dtype=torch.float64))
    assert half.fractions[0, 0].item() == pytest.approx(0.25)


# ------------------------------------------------------------------------------------------------ tensor parallel
@given(heads_strategy(), st.sampled_from([1, 2, 4, 8]))
@settings(max_examples=60, deadline=None)
def test_tp_fold_gives_every_rank_one_plan_and_its_own_head_types(heads, world):
    """The oracle is the plan itself, read head by head through vLLM's partitioning (``slice_for_tp``'s rule):
    slot j of layer l gets the largest fraction of the heads the ranks put there, no head keeps less than the
    allocator gave it, and each rank keeps its own heads' types."""
    from hybridkv_vllm.core.budgets import fold_for_tp, tp_owned_heads

    is_static, _ = heads
    H = is_static.shape[1]
    if H % world and world % H:
        with pytest.raises(BudgetError, match="neither divides"):
            tp_owned_heads(H, world)
        return
    plan = allocate(heads, BudgetConfig(budget=0.2))
    owned = tp_owned_heads(H, world)
    assert all(len(o) == len(owned[0]) for o in owned)
    shared = fold_for_tp(plan, world)
    for rank in range(world):
        mine = fold_for_tp(plan, world, rank)
        assert torch.equal(mine.fractions, shared.fractions)                       # one KV-cache config
        for j, head in enumerate(owned[rank]):
            assert torch.equal(mine.is_static[:, j], plan.is_static[:, head])       # its own head types
            assert bool((mine.fractions[:, j] >= plan.fractions[:, head]).all())    # promotion only
    for j in range(len(owned[0])):
        assert torch.equal(shared.fractions[:, j], torch.stack([plan.fractions[:, o[j]] for o in owned]).amax(0))
        assert torch.equal(shared.is_static[:, j], torch.stack([plan.is_static[:, o[j]] for o in owned]).all(0))
    if world == 1:
        assert fold_for_tp(plan, 1, 0) is plan


def test_tp_partitioning_matches_vllms():
    from hybridkv_vllm.core.budgets import tp_owned_heads
    assert tp_owned_heads(4, 2) == [[0, 1], [2, 3]]
    assert tp_owned_heads(2, 8) == [[0], [0], [0], [0], [1], [1], [1], [1]]


@given(heads_strategy(), budgets, ratios, prompt_lens, block_sizes, floors)
@settings(max_examples=150, deadline=None)
def test_tokens_for_is_the_vectorised_twin_of_kept_blocks(heads, budget, r, prompt_len, bs, floor):
    """The budget rule is written once (``kept_blocks``); ``BudgetPlan.tokens_for`` computes it for every head at
    once: ``kept * bs``, or the whole aligned prompt where the rule keeps every block (None)."""
    from hybridkv_vllm.core.budgets import kept_blocks

    plan = allocate(heads, BudgetConfig(budget=budget, r=r, block_size=bs, floor_blocks=floor))
    tokens = plan.tokens_for(prompt_len)
    for (layer, head), fraction in zip(torch.cartesian_prod(torch.arange(tokens.shape[0]),
                                                            torch.arange(tokens.shape[1])).tolist(),
                                       plan.fractions.flatten().tolist()):
        kept = kept_blocks(prompt_len, fraction, bs, floor, 0)
        assert int(tokens[layer, head]) == (prompt_len // bs if kept is None else kept) * bs
