"""The Triton implementation of the decode executor inside vLLM's CPU engine (kernels under TRITON_INTERPRET=1):
greedy tokens equal the core reference in transformers, on the tiny model with a few tokens (the interpreter runs
every kernel program in Python), with static and dynamic heads, and the dynamic heads really read the cold tier."""
from __future__ import annotations

import gc
import os

import pytest
from vllm import SamplingParams

from hybridkv_vllm.adapter import metrics
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.selection import SelectionConfig
from hybridkv_vllm.core.tiers import TieredPolicy, plan_tiers

from engine_utils import HAYSTACK, ROOT, assert_greedy_matches, make_llm, model_runner, synthetic_profile

pytestmark = [pytest.mark.engine, pytest.mark.triton]
TINY = ROOT / "models" / "tiny-vl"
BUDGET, BS, MIN_PROMPT, NEW_TOKENS = 0.3, 32, 64, 6


@pytest.mark.parametrize("sub", [1, 4])
def test_triton_executor_in_the_cpu_engine_equals_the_core_reference(tmp_path, sub, monkeypatch):
    """``sub``: retrieval units per 32-token block (4: 8-token units, copied piecewise by the swap-in kernel).
    The prompt attends through vLLM's own Triton kernel (``adapter/vllm_triton.py``), once per decoder layer."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.fail("run with TRITON_INTERPRET=1 (make test sets it)")
    if not (TINY / "config.json").exists():
        pytest.fail(f"{TINY} missing: run `make setup`")
    from hybridkv_vllm.hf.generate import Session
    from hybridkv_vllm.hf.inputs import encode_chat, load_model

    profile_path = synthetic_profile(tmp_path / "tiny.json", seed=3, model=TINY)
    profile = HeadProfile.load(profile_path)
    assert {str(e.type) for layer in profile.layers for e in layer} == {"static", "dynamic"}
    plan = allocate(profile, BudgetConfig(budget=BUDGET, block_size=BS))
    policy = TieredPolicy(profile, plan, plan_tiers(plan), SelectionConfig(chunk_size=BS, sub_chunks=sub),
                          MIN_PROMPT)
    text = HAYSTACK.read_text()[:900] + "\nWhat is this about?"
    lm = load_model(TINY)
    prompt = encode_chat(lm, text, [])
    decoded = Session(lm, prompt, policy).greedy(policy, NEW_TOKENS, stop_at_eos=False)
    del lm
    gc.collect()

    from hybridkv_vllm.adapter import vllm_triton
    kernel, prefill_launches = vllm_triton.unified_attention(), []
    monkeypatch.setattr(vllm_triton, "unified_attention",
                        lambda: lambda **kw: (prefill_launches.append(kw["max_seqlen_q"]), kernel(**kw)))
    with model_runner("v2"):         # CUDA's runner, with the CUDA path's KV ops
        llm = make_llm(TINY, {"profile": str(profile_path), "budget": BUDGET, "min_prompt_tokens": MIN_PROMPT,
                              "kv_ops": "triton", "sub_chunks": sub},
                       max_model_len=1024, limit_mm_per_prompt={"image": 0, "video": 0})
    loads_before = metrics.get_metrics().chunk_loads._value.get()
    prefill_launches.clear()                                        # start-up's dummy runs are not the request
    try:
        got = llm.chat([{"role": "user", "content": text}],
                       SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))[0]
        assert got.prompt_token_ids == prompt.input_ids[0].tolist()
        assert len(got.prompt_token_ids) > 4 * BS
        assert_greedy_matches(list(got.outputs[0].token_ids), decoded.tokens.tolist(), decoded.logits, "triton")
        assert metrics.get_metrics().chunk_loads._value.get() > loads_before
        layers = len(profile.layers)
        assert len(prefill_launches) >= layers and len(prefill_launches) % layers == 0
        assert sum(prefill_launches[::layers]) == len(got.prompt_token_ids)     # every prompt token, once per layer
    finally:
        del llm
        gc.collect()
