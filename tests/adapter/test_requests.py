"""Per-request settings and the cold tier's run-time bound, without an engine: values are parsed or refused by
name, and the admission reserves exactly the pages the cold tier will hold, never passing its bound."""
from __future__ import annotations

import logging

import pytest
import torch

from hybridkv_vllm.adapter.cold_tier import ColdTier, page_bytes
from hybridkv_vllm.adapter.requests import (COLD_TIER_FULL, OPT_OUT, RESOLVED, XARG_BUDGET, Admission,
                                            RequestSetting, RequestSettingError, parse_budget)
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.tiers import TierBudgets, plan_tiers

BS, D = 16, 8


def _budgets(seed: int = 0) -> TierBudgets:
    gen = torch.Generator().manual_seed(seed)
    is_static = torch.rand(4, 2, generator=gen) < 0.5
    is_static[0, 0], is_static[0, 1] = True, False            # both kinds present
    heads = (is_static, torch.rand(4, 2, generator=gen, dtype=torch.float64) + 0.1)
    cfg = BudgetConfig(budget=0.1, block_size=BS, floor_blocks=2)
    return TierBudgets(heads, cfg, plan_tiers(allocate(heads, cfg), max_groups=4), min_prompt_tokens=64)


@pytest.mark.parametrize("value, expect", [(0.2, (0.2, False)), (1, (1.0, False)), ("off", (None, True)),
                                           ("OFF", (None, True))])
def test_values_parse(value, expect):
    assert parse_budget({XARG_BUDGET: value}) == expect
    assert parse_budget(None) == parse_budget({"other": 1}) == (None, False)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), float("inf"), "0.2", "on", True, None, [0.2]])
def test_bad_values_are_named(value):
    with pytest.raises(RequestSettingError) as info:
        parse_budget({XARG_BUDGET: value})
    assert f"vllm_xargs.{XARG_BUDGET}={value!r}" in str(info.value)


def test_admission_reserves_what_the_cold_tier_holds_and_stays_under_its_bound(caplog):
    caplog.set_level(logging.WARNING, logger="hybridkv")
    budgets = _budgets()
    pb = page_bytes(BS, D, torch.float32)
    prompts = [300, 1000, 640, 2000, 500, 1200]
    bound = budgets.cold_pages(1000) * pb + budgets.cold_pages(300) * pb + pb // 2   # two of them fit
    admission = Admission(budgets, pb, bound)
    cold = ColdTier(BS, D, torch.float32, sum(n for n in budgets._dynamic), bound)
    dynamic_tiers = torch.tensor([t for t, n in enumerate(budgets._dynamic) for _ in range(n)])
    decisions = {}
    for i, p in enumerate(prompts):
        setting = admission.admit(f"r{i}", p, None)
        decisions[f"r{i}"] = setting
        assert admission.admit(f"r{i}", p, {XARG_BUDGET: 0.9}) is setting            # decided once
        assert admission.reserved <= bound
        if setting.bypass is None:
            # the worker's cold tier takes exactly the reserved bytes (hot = kept blocks of each head's tier)
            kept = torch.tensor([k or 0 for k in budgets.kept(p)])[dynamic_tiers]
            before = cold.nbytes
            cold.admit(f"r{i}", p // BS, kept)
            assert cold.nbytes - before == setting.cold_bytes
            assert admission.kept_blocks(f"r{i}", 0, p) == budgets.kept(p)[0]
        else:
            assert setting.bypass == COLD_TIER_FULL and setting.cold_bytes == 0
            assert all(admission.kept_blocks(f"r{i}", t, p) is None for t in range(len(budgets.tiers.tiers)))
    assert [d.bypass for d in decisions.values()] == [None, None, COLD_TIER_FULL, COLD_TIER_FULL,
                                                      COLD_TIER_FULL, COLD_TIER_FULL]
    assert admission.refused == 4 and cold.nbytes == admission.reserved
    full = [r for r in caplog.records if "cold tier is full" in r.getMessage()]
    assert len(full) == 1 and "hybridkv.cold_tier_gib" in full[0].getMessage()       # four refused, logged once
    admission.release("r1")
    cold.drop(["r1"])
    assert admission.admit("late", 1000, None).bypass is None                  # room again once r1 finished
    admission.release("never-admitted")                                        # harmless


def test_opt_out_and_own_budget():
    budgets = _budgets(1)
    admission = Admission(budgets, 1, None)
    assert admission.admit("a", 2000, {XARG_BUDGET: "off"}) == RequestSetting(None, OPT_OUT, 0)
    assert admission.kept_blocks("a", 0, 2000) is None
    own = admission.admit("b", 2000, {XARG_BUDGET: 0.5})
    assert own.budget == 0.5 and own.cold_bytes == budgets.cold_pages(2000, 0.5)
    assert [admission.kept_blocks("b", t, 2000) for t in range(len(budgets.tiers.tiers))] == \
        list(budgets.kept(2000, 0.5))
    # what the worker reads back is the scheduler's decision, whatever the client wrote
    assert RequestSetting.of({XARG_BUDGET: 0.9, RESOLVED: own.as_extra_arg()}) == RequestSetting(0.5, None)
    assert RequestSetting.of({XARG_BUDGET: 0.9}) == RequestSetting()
