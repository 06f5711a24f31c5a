"""Per-request control and the cold tier's run-time bound, in vLLM's CPU engine: blocks held (vLLM's own managers)
follow each request's own budget or opt-out; requests past ``cold_tier_gib`` are served uncompressed in the pool,
counted and never fail; a bad value is refused by name and the engine keeps serving."""
from __future__ import annotations

import gc

import pytest
import torch
from vllm import SamplingParams
from vllm.exceptions import VLLMValidationError
from vllm.inputs import TokensPrompt

from hybridkv_vllm.adapter import runtime
from hybridkv_vllm.adapter.cold_tier import page_bytes
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.tiers import TierBudgets, plan_tiers

from engine_utils import (counter_total, expected_blocks, full_blocks, held_blocks, make_llm, run_to_completion,
                          scheduler_of)

pytestmark = pytest.mark.engine
BUDGET, BS = 0.1, 32


def _prompt(tokenizer, n: int, seed: int) -> TokensPrompt:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(100, tokenizer.vocab_size - 100, (n,), generator=gen).tolist()
    return TokensPrompt(prompt_token_ids=ids)


def _params(budget=None, max_tokens=12) -> SamplingParams:
    extra = None if budget is None else {"hybridkv_budget": budget}
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, extra_args=extra)


def _check_held(llm, profile_path, requests: dict, budgets: dict, seen: dict) -> None:
    """At a decode step: each running request's blocks per group equal what its own budget predicts."""
    for internal_id, request in requests.items():
        rid = internal_id.rsplit("-", 1)[0]                     # vLLM appends a suffix to the caller's id
        if rid not in budgets or request.num_computed_tokens <= request.num_prompt_tokens:
            continue
        budget = budgets[rid]
        held = held_blocks(llm, internal_id)
        if budget == "off":
            expect = full_blocks(llm, request.num_computed_tokens)
        else:
            expect = expected_blocks(llm, profile_path, budget, request.num_prompt_tokens,
                                     request.num_computed_tokens)
        assert held == expect, (rid, budget, held, expect)
        seen[rid] = seen.get(rid, 0) + 1


@pytest.fixture
def llm_factory():
    made = []
    yield lambda *args, **kwargs: made.append(make_llm(*args, **kwargs)) or made[-1]
    made.clear()
    gc.collect()


def test_blocks_follow_each_requests_budget_and_bad_values_are_refused(model_dir, profile_path, llm_factory,
                                                                       runner):
    llm = llm_factory(model_dir, {"profile": str(profile_path), "budget": BUDGET})
    tok = llm.get_tokenizer()
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    budgets = {"server": BUDGET, "own-0.3": 0.3, "own-0.05": 0.05, "opt-out": "off"}
    opt_outs = counter_total("hybridkv:requests_bypassed_total", reason="opt_out")
    for i, (rid, budget) in enumerate(budgets.items()):
        engine.add_request(rid, _prompt(tok, 1500 + 40 * i, i), _params(None if rid == "server" else budget))
    seen: dict = {}
    outputs = run_to_completion(llm, on_step=lambda step: _check_held(
        llm, profile_path, scheduler.requests, budgets, seen))
    assert set(outputs) == set(budgets) and all(len(o.outputs[0].token_ids) == 12 for o in outputs.values())
    assert set(seen) == set(budgets) and min(seen.values()) >= 5
    assert counter_total("hybridkv:requests_bypassed_total", reason="opt_out") == opt_outs + 1

    # A bad value is refused before it reaches the engine, naming it; the engine keeps serving.
    with pytest.raises(VLLMValidationError, match="hybridkv_budget"):      # HTTP 400 in the API server
        llm.generate([_prompt(tok, 400, 9)], _params(1.5))
    again = llm.generate([_prompt(tok, 400, 9)], _params(0.5))
    assert len(again[0].outputs[0].token_ids) == 12
    assert not runtime.get_runtime(engine.vllm_config).admission.settings        # every decision released


def test_cold_tier_bound_serves_the_overflow_uncompressed(model_dir, profile_path, llm_factory, runner):
    lens = [1500, 1540, 1580]
    profile = HeadProfile.load(profile_path)
    cfg = BudgetConfig(budget=BUDGET, block_size=BS)
    budgets = TierBudgets(profile, cfg, plan_tiers(allocate(profile, cfg)), min_prompt_tokens=256)
    page = page_bytes(BS, profile.model.head_dim, torch.float32)
    one = budgets.cold_pages(lens[0]) * page
    bound = 1.5 * one                                              # room for one of these requests, not two
    llm = llm_factory(model_dir, {"profile": str(profile_path), "budget": BUDGET, "cold_tier_gib": bound / 2**30})
    tok = llm.get_tokenizer()
    engine, scheduler = llm.llm_engine, scheduler_of(llm)
    state = runtime.get_runtime(engine.vllm_config)
    full_before = counter_total("hybridkv:requests_bypassed_total", reason="cold_tier_full")
    prompts = {f"r{i}": _prompt(tok, n, 10 + i) for i, n in enumerate(lens)}
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, _params(max_tokens=16))
    compressed, uncompressed, cold_peak = set(), set(), [0]

    def watch(step):
        cold_peak[0] = max(cold_peak[0], state.cold.nbytes)
        assert state.admission.reserved <= bound
        for internal_id, request in scheduler.requests.items():
            if request.num_computed_tokens <= request.num_prompt_tokens:
                continue
            held, full = held_blocks(llm, internal_id), full_blocks(llm, request.num_computed_tokens)
            (uncompressed if held == full else compressed).add(internal_id.rsplit("-", 1)[0])
            assert held == full or held == expected_blocks(llm, profile_path, BUDGET, request.num_prompt_tokens,
                                                           request.num_computed_tokens)

    outputs = run_to_completion(llm, on_step=watch)
    assert set(outputs) == set(prompts) and all(len(o.outputs[0].token_ids) == 16 for o in outputs.values())
    assert len(compressed) == 1 and len(uncompressed) == 2 and not compressed & uncompressed
    assert 0 < cold_peak[0] <= bound
    assert counter_total("hybridkv:requests_bypassed_total", reason="cold_tier_full") == full_before + 2
    # served uncompressed means the full cache: the same tokens as the request opting out, alone
    late = sorted(uncompressed)[0]
    engine.add_request("alone", prompts[late], _params("off", max_tokens=16))
    assert run_to_completion(llm)["alone"].outputs[0].token_ids == outputs[late].outputs[0].token_ids
    # once the others finished, the cold tier has room again
    engine.add_request("later", prompts["r1"], _params(max_tokens=16))
    seen_compressed = []
    run_to_completion(llm, on_step=lambda step: seen_compressed.append(
        any(rid.startswith("later-") for rid in state.cold.entries)))
    assert any(seen_compressed)
    engine.step()                    # the worker hears of finished requests in the next step (as for its own state)
    assert state.admission.reserved == 0 and not state.admission.settings and state.cold.nbytes == 0


@pytest.mark.parametrize("runner", ["v1"], indirect=True)     # V2's preemption: test_lifecycle (time)
def test_own_budgets_survive_preemption(model_dir, profile_path, llm_factory, runner):
    """A request with its own budget, preempted and recomputed, comes back with the same decision: the blocks it
    holds after resuming follow its budget (an opted-out one stays uncompressed), and everything is released.
    (Its tokens may differ from an uninterrupted run: recompute prefills the generated tokens densely, so their
    keys and values are not the ones compressed decoding produced; that is vLLM's recompute, with any policy.)"""
    budgets = {"a": 0.6, "b": "off", "c": None}
    llm = llm_factory(model_dir, {"profile": str(profile_path), "budget": BUDGET}, num_gpu_blocks_override=470,
                      max_num_seqs=3, max_model_len=992)
    tok, engine, scheduler = llm.get_tokenizer(), llm.llm_engine, scheduler_of(llm)
    for i, (rid, budget) in enumerate(budgets.items()):
        engine.add_request(rid, _prompt(tok, 560 + 30 * i, 20 + i), _params(budget, max_tokens=200))
    seen, preempted, resumed_checks = {}, set(), []

    def watch(step):
        for internal_id, request in scheduler.requests.items():
            rid = internal_id.rsplit("-", 1)[0]
            if request.num_preemptions:
                preempted.add(rid)
                if request.num_computed_tokens > request.num_prompt_tokens:
                    resumed_checks.append(rid)
        _check_held(llm, profile_path, scheduler.requests, {k: v if v is not None else BUDGET
                                                            for k, v in budgets.items()}, seen)

    outputs = run_to_completion(llm, on_step=watch)
    assert set(outputs) == set(budgets) and all(len(o.outputs[0].token_ids) == 200 for o in outputs.values())
    assert preempted & {"a", "b"}, "no request with its own setting was preempted; shrink the pool"
    assert set(resumed_checks) & {"a", "b"}                  # blocks checked after resuming, too
    engine.step()
    state = runtime.get_runtime(engine.vllm_config)
    assert not state.admission.settings and state.admission.reserved == 0 and not state.cold.entries
