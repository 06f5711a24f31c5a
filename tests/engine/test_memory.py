"""The freed memory is real: vLLM's own block accounting matches what the profile and budget predict, the
pool gets every block back, and vLLM admits more concurrent compressed requests at the same KV memory."""
from __future__ import annotations

import gc

import pytest
from vllm import SamplingParams

from hybridkv_vllm.adapter import runtime
from hybridkv_vllm.core.tiers import plan_tiers
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.profile import HeadProfile

from engine_utils import (RUNNERS, expected_blocks, free_blocks, held_blocks, make_llm, model_runner,
                          run_to_completion, scheduler_of, text_prompt)

pytestmark = pytest.mark.engine
BUDGET = 0.1
BS = 32


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.fixture(scope="module", params=RUNNERS)
def hybrid_llm(model_dir, profile_path, request):
    with model_runner(request.param):
        llm = make_llm(model_dir, {"profile": str(profile_path), "budget": BUDGET})
    yield llm
    del llm
    gc.collect()


def test_blocks_held_match_profile_and_budget(hybrid_llm, profile_path):
    llm = hybrid_llm
    free_at_start = free_blocks(llm)
    internal_id = llm.llm_engine.add_request("mem", text_prompt(5000),
                                             SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    scheduler = scheduler_of(llm)
    checked = []

    def check(step):
        request = scheduler.requests.get(internal_id)
        if request is None or step not in (2, 20):
            return
        held = held_blocks(llm, internal_id)
        expected = expected_blocks(llm, profile_path, BUDGET, request.num_prompt_tokens, request.num_computed_tokens)
        assert held == expected, (step, held, expected)
        # Real freeing: the groups hold far fewer blocks than the tokens need at full length, and the pool saw it.
        assert sum(held) < len(held) * _cdiv(request.num_computed_tokens, BS)
        assert free_at_start - free_blocks(llm) == sum(held)
        checked.append(step)

    outputs = run_to_completion(llm, on_step=check)
    assert checked == [2, 20]
    assert len(outputs["mem"].outputs[0].token_ids) == 40
    assert free_blocks(llm) == free_at_start


def test_aborts_and_mixed_batch_return_every_block(hybrid_llm):
    """Compressed, bypassed (short) and aborted requests in one batch: survivors are unaffected, pool is whole."""
    llm = hybrid_llm
    engine = llm.llm_engine
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    prompts = {"long1": text_prompt(4000), "short": text_prompt(300, "Say hi."),
               "long2": text_prompt(6000, "Summarize."),
               "abort1": text_prompt(3000), "abort2": text_prompt(200, "Count to five.")}
    alone = {}
    for rid in ("long1", "short"):                      # oracle: each survivor run by itself
        engine.add_request(rid + "-alone", prompts[rid], params)
        alone[rid] = run_to_completion(llm)[rid + "-alone"].outputs[0].token_ids
    free_at_start = free_blocks(llm)
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, params)

    def abort(step):
        if step == 4:
            engine.abort_request(["abort1", "abort2"])

    cold = runtime.get_runtime(llm.llm_engine.vllm_config).cold
    held_cold = []
    outputs = run_to_completion(llm, on_step=lambda step: (abort(step), held_cold.append(len(cold))))
    assert set(outputs) >= {"long1", "short", "long2"}
    assert outputs["long1"].outputs[0].token_ids == alone["long1"]
    assert outputs["short"].outputs[0].token_ids == alone["short"]
    assert free_blocks(llm) == free_at_start
    assert not scheduler_of(llm).requests
    # The cold tier held the long requests' dynamic heads while they ran and let go of every one of them when
    # vLLM told the worker they ended (the step after the last one, as for the worker's own request states).
    assert max(held_cold) >= 2
    engine.step()
    assert len(cold) == 0 and cold.nbytes == 0


def _max_concurrency(llm, prompts, max_tokens: int) -> tuple[int, dict]:
    engine = llm.llm_engine
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{i}", prompt, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))
    peak = [0]

    def watch(step):
        peak[0] = max(peak[0], len(scheduler_of(llm).running))

    outputs = run_to_completion(llm, on_step=watch)
    return peak[0], outputs


def _kv_bytes(llm) -> int:
    """Bytes of the KV cache: every group's block id spans one page of each of its layers, and all groups share
    one pool of ``num_blocks`` ids (vLLM overlays the groups' tensors on one allocation)."""
    config = scheduler_of(llm).kv_cache_config
    group = config.kv_cache_groups[0]
    return config.num_blocks * len(group.layer_names) * group.kv_cache_spec.page_size_bytes


def test_more_concurrent_requests_than_stock_at_same_memory(model_dir, profile_path, runner):
    prompts = [text_prompt(4200 + 50 * i) for i in range(6)]
    stock_blocks = 150                                   # ~3 of these requests at full length
    stock = make_llm(model_dir, None, num_gpu_blocks_override=stock_blocks, max_num_seqs=6)
    stock_bytes = _kv_bytes(stock)
    stock_peak, stock_out = _max_concurrency(stock, prompts, max_tokens=16)
    del stock
    gc.collect()

    # The same bytes: HybridKV's block ids span one-head layers of one tier, so the pool has more of them.
    tiers = plan_tiers(allocate(HeadProfile.load(profile_path), BudgetConfig(budget=BUDGET, block_size=BS)))
    head_page = BS * 2 * 64 * 4                          # one KV head, float32, head_dim 64
    hybrid_blocks = stock_bytes // (tiers.group_size * head_page)
    hybrid = make_llm(model_dir, {"profile": str(profile_path), "budget": BUDGET},
                      num_gpu_blocks_override=hybrid_blocks, max_num_seqs=6)
    assert _kv_bytes(hybrid) == stock_bytes
    hybrid_peak, hybrid_out = _max_concurrency(hybrid, prompts, max_tokens=16)
    print(f"peak concurrent requests at {stock_bytes / 2**20:.1f} MiB of KV: stock {stock_peak}, "
          f"HybridKV {hybrid_peak}")
    assert len(hybrid_out) == len(stock_out) == len(prompts)
    assert hybrid_peak > stock_peak
    del hybrid
    gc.collect()


def test_block_size_64_budgets_follow_vllms_block_size(model_dir, profile_path):
    """vLLM 0.34's default block size: tiers, budgets and freed blocks follow the block size vLLM resolved."""
    with model_runner("v2"):
        llm = make_llm(model_dir, {"profile": str(profile_path), "budget": BUDGET}, block_size=64)
    groups = scheduler_of(llm).kv_cache_config.kv_cache_groups
    assert {g.kv_cache_spec.block_size for g in groups} == {64}
    assert runtime.get_runtime(llm.llm_engine.vllm_config).block_size == 64
    free_at_start = free_blocks(llm)
    internal_id = llm.llm_engine.add_request("bs64", text_prompt(5000),
                                             SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    scheduler, checked = scheduler_of(llm), []

    def check(step):
        request = scheduler.requests.get(internal_id)
        if request is None or step != 12:
            return
        held = held_blocks(llm, internal_id)
        assert held == expected_blocks(llm, profile_path, BUDGET, request.num_prompt_tokens,
                                       request.num_computed_tokens)
        assert sum(held) < len(held) * _cdiv(request.num_computed_tokens, 64)
        checked.append(step)

    outputs = run_to_completion(llm, on_step=check)
    assert checked == [12] and len(outputs["bs64"].outputs[0].token_ids) == 24
    assert free_blocks(llm) == free_at_start
