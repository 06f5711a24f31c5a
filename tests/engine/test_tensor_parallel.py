"""Tensor parallelism end to end on vLLM's CPU build, under Model Runner V2: ``tensor_parallel_size=2`` (one core per
rank) serving qwen25-vl (2 KV heads: one per rank) with HYBRIDKV gives TP=1's greedy tokens (up to a near tie of TP=1's
logprobs), every rank plans the same tiers over its head slot with its own head types and cold tier, and vLLM's
one block pool gets every block back."""
from __future__ import annotations

import gc
import os

import pytest
from vllm import SamplingParams

from hybridkv_vllm.core.budgets import BudgetConfig, allocate, fold_for_tp
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.tiers import PRUNED, kept_blocks, plan_tiers

from engine_utils import (ROOT, free_blocks, held_blocks, make_llm, model_runner, run_to_completion, scheduler_of,
                          text_prompt)

pytestmark = pytest.mark.engine
MODEL = ROOT / "models" / "qwen25-vl"
PROFILE = ROOT / "configs" / "profiles" / "qwen25-vl.json"
BUDGET, NEW_TOKENS = 0.2, 12
#: TP=2 splits each layer's attention and MLP across two ranks and sums partial results (an all-reduce), so logits
#: differ from TP=1's in the last bits and, through retrieval, a little more (as chunked prefill does:
#: test_lifecycle.LIFECYCLE_TIE): where TP=1's two best tokens are closer than this, the runs may part.
TP_TIE = 0.1


def _rank_state(worker):
    """Runs in each TP worker (vLLM's collective_rpc): what this rank's HybridKV runtime planned and holds."""
    from vllm.distributed import get_tensor_model_parallel_rank

    from hybridkv_vllm.adapter.runtime import current_runtime
    state = current_runtime()
    return {"rank": get_tensor_model_parallel_rank(), "fractions": [t.fraction for t in state.tiers.tiers],
            "tier_of": state.tiers.tier_of, "modes": state.tiers.modes, "cold_entries": len(state.cold.entries)}


def _generate(llm, prompts: dict[str, str], watch=None):
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=2)
    for name, prompt in prompts.items():
        llm.llm_engine.add_request(name, prompt, params)
    outputs = run_to_completion(llm, on_step=watch)
    return {name: (list(out.outputs[0].token_ids), out.outputs[0].logprobs) for name, out in outputs.items()}


def test_tp2_equals_tp1_and_every_rank_compresses(monkeypatch):
    if not (MODEL / "config.json").exists():
        pytest.fail(f"{MODEL} missing: run `make setup`")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")          # one core per rank
    # the spawned workers register the Triton stand-in too (Model Runner V2 on the CPU build)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "standin_site"),
                                                      os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    config = {"profile": str(PROFILE), "budget": BUDGET, "min_prompt_tokens": 256}
    prompts = {"long": text_prompt(4000), "other": text_prompt(2600, "Who may copy it?")}
    with model_runner("v2"):
        one = make_llm(MODEL, config, max_num_seqs=4)
        expected = _generate(one, prompts)
        del one
        gc.collect()
        engines = [make_llm(MODEL, config, max_num_seqs=4, tensor_parallel_size=2, distributed_executor_backend="mp")]
    two = engines[0]
    try:
        free_at_start = free_blocks(two)
        scheduler, groups = scheduler_of(two), scheduler_of(two).kv_cache_config.kv_cache_groups
        held, ranks_mid = {}, []

        def watch(step):
            if step == 6:                          # both prompts done, decoding: blocks freed, cold tiers filled
                for internal_id, request in scheduler.requests.items():     # vLLM suffixes the caller's id
                    held[internal_id] = (held_blocks(two, internal_id), request.num_prompt_tokens,
                                         request.num_computed_tokens)
                ranks_mid.extend(two.collective_rpc(_rank_state))

        got = _generate(two, prompts, watch)
        two.llm_engine.step()                      # the workers learn that the requests finished
        ranks_end = two.collective_rpc(_rank_state)
        assert free_blocks(two) == free_at_start                       # vLLM's one pool got every block back
    finally:
        engines.clear()                            # the TP workers stop with the engine
        two = None
        gc.collect()

    for name, (want, logprobs) in expected.items():
        tokens = got[name][0]
        assert len(tokens) == NEW_TOKENS
        parted = next((i for i, (x, y) in enumerate(zip(tokens, want)) if x != y), None)
        if parted is not None:
            best = sorted((lp.logprob for lp in logprobs[parted].values()), reverse=True)
            assert best[0] - best[1] < TP_TIE and tokens[parted] in logprobs[parted], (
                f"{name}: TP=2 token {parted} is {tokens[parted]}, TP=1's {want[parted]}, "
                f"{best[0] - best[1]:.4f} apart (not a near tie); equal before: {want[:parted]}")

    # The oracle of the plan: the core's fold of the whole model's allocation, per rank.
    plan = allocate(HeadProfile.load(PROFILE), BudgetConfig(budget=BUDGET, block_size=32))
    shared = plan_tiers(fold_for_tp(plan, 2))
    assert sorted(r["rank"] for r in ranks_mid) == [0, 1]
    for state in ranks_mid:
        own = plan_tiers(fold_for_tp(plan, 2, state["rank"]))
        assert state["fractions"] == [t.fraction for t in shared.tiers]          # one KV-cache config for all
        assert [list(t) for t in state["tier_of"]] == [list(t) for t in shared.tier_of]
        assert [list(m) for m in state["modes"]] == [list(m) for m in own.modes]   # its own head types
        rank_static = plan.is_static[:, state["rank"]]                           # 2 KV heads: head r on rank r
        assert [m[0] == PRUNED for m in state["modes"]] == rank_static.tolist()
    # Blocks were really freed, by the shared plan's rule (each group = a tier of head slots: its fraction's kept
    # blocks plus the tail), every rank held its dynamic heads' prompts in its own cold tier while they ran, and let
    # go of them at the end.
    assert len(held) == len(prompts)
    for name, (blocks, prompt_len, tokens) in held.items():
        want = []
        for group in groups:
            kept = kept_blocks(prompt_len, shared.tiers[group.kv_cache_spec.tier].fraction, 32, 2, 256)
            full = -(-tokens // 32)
            want.append(full if kept is None else kept + full - prompt_len // 32)
        assert blocks == want and sum(blocks) < len(groups) * -(-tokens // 32), (name, blocks, want)
    dynamic_ranks = [s for s in ranks_mid if any(m[0] != PRUNED for m in s["modes"])]
    assert dynamic_ranks and all(s["cold_entries"] == len(prompts) for s in dynamic_ranks)
    assert all(s["cold_entries"] == 0 for s in ranks_end)
