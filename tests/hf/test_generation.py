"""HF integration: HybridKV generation through the "hybridkv" attention function.

- at a 100 % budget every policy reproduces standard (SDPA) generation: identical greedy tokens, close logits;
- compressed runs are deterministic and differ from the full cache only after the prompt (prefill is dense);
- the per-head kept sets follow the policy's budgets.
"""
import pytest
import torch

from hybridkv_vllm.core import BudgetConfig, HeadProfile, ModelIdentity, make_policy
from hybridkv_vllm.core.budgets import allocate, uniform_plan
from hybridkv_vllm.core.policy import HeadKind
from hybridkv_vllm.hf.attention import HFIntegrationError, activate
from hybridkv_vllm.hf.generate import Session
from hybridkv_vllm.hf.inputs import encode_chat
from hybridkv_vllm.hf.state import HybridKVState
from hybridkv_vllm.profiler.images import load_image

NEW_TOKENS = 12


def synthetic_profile(lm, static_every: int = 2) -> HeadProfile:
    """Every ``static_every``-th KV head static, all static heads with the same score (so equal weights)."""
    ident = ModelIdentity.from_hf_config(lm.model.config)
    idx = torch.arange(ident.num_layers * ident.num_kv_heads).reshape(ident.num_layers, ident.num_kv_heads)
    scores = torch.where(idx % static_every == 0, 0.95, 0.5).to(torch.float64)
    return HeadProfile.from_scores(ident, scores, theta=0.9, provenance={"created": "test", "tool_version": "test"})


def standard_generate(lm, enc):
    with torch.no_grad():
        out = lm.model.generate(**enc.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[0, enc.prompt_len:], torch.stack(out.logits)[:, 0].float()


def hybridkv_generate(lm, enc, policy):
    state = HybridKVState(policy, enc.visual_mask, int(lm.text_config.num_hidden_layers))
    with torch.no_grad(), activate(state):
        out = lm.model.generate(**enc.inputs, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                                return_dict_in_generate=True)
    return out.sequences[0, enc.prompt_len:], torch.stack(out.logits)[:, 0].float()


def check_full_budget(lm, enc, profile):
    ref_tokens, ref_logits = standard_generate(lm, enc)
    for name in ("full", "hybridkv", "streaming", "snapkv", "random"):
        tokens, logits = hybridkv_generate(lm, enc, make_policy(name, profile, BudgetConfig(1.0)))
        assert torch.equal(tokens, ref_tokens), name
        torch.testing.assert_close(logits, ref_logits, atol=2e-3, rtol=1e-4, msg=name)


@pytest.mark.model
def test_full_budget_equals_standard_generation_llama(smollm2):
    enc = encode_chat(smollm2, "Name three planets of the solar system and one fact about each.")
    check_full_budget(smollm2, enc, synthetic_profile(smollm2))


@pytest.mark.model
def test_full_budget_equals_standard_generation_qwen25vl(smollm2_vl):
    enc = encode_chat(smollm2_vl, "Describe the picture.", [load_image("skimage:coffee.png")])
    assert int(enc.visual_mask.sum()) > 0
    check_full_budget(smollm2_vl, enc, synthetic_profile(smollm2_vl))


def test_full_budget_equals_standard_generation_tiny(tiny_vl):
    enc = encode_chat(tiny_vl, "What is in the image?", [load_image("skimage:horse.png")])
    check_full_budget(tiny_vl, enc, synthetic_profile(tiny_vl))


@pytest.mark.model
def test_shipped_profile_full_budget_is_dense(smollm2_vl):
    from pathlib import Path

    profile = HeadProfile.load(Path(__file__).resolve().parents[2] / "configs/profiles/smollm2-vl.json")
    plan = make_policy("hybridkv", profile, BudgetConfig(1.0)).plan
    p = 16 * 40
    assert bool((plan.tokens_for(p) == p).all())


def test_compressed_is_deterministic_and_dense_until_decode(tiny_vl):
    enc = encode_chat(tiny_vl, "Count the objects in both images.",
                      [load_image("skimage:coffee.png"), load_image("skimage:camera.png")])
    profile = synthetic_profile(tiny_vl)
    full = make_policy("full", profile, BudgetConfig(1.0))
    session = Session(tiny_vl, enc, full)
    ref = session.greedy(full, 10, stop_at_eos=False)
    for name in ("hybridkv", "streaming", "snapkv", "random"):
        policy = make_policy(name, profile, BudgetConfig(0.1))
        a = session.forced(policy, ref.tokens)
        b = Session(tiny_vl, enc, full).forced(policy, ref.tokens)       # fresh prefill: same result
        torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0, msg=name)
        # the first distribution comes from the (dense) prefill: identical to the full cache's
        torch.testing.assert_close(a.logits[0], ref.logits[0], atol=0, rtol=0)
        # later steps attend to a subset: they differ somewhere
        assert not torch.allclose(a.logits[1:], ref.logits[1:], atol=1e-6), name


def test_kept_sets_follow_budgets(tiny_vl):
    """Every head, STATIC or DYNAMIC, keeps its allocator budget + the prompt part of the partial tail block.

    The oracle is the core allocator (``allocate`` on the profile for hybridkv, ``uniform_plan`` for streaming),
    not the policy's own rules; one formula for both head kinds, and no other kind may appear.
    """
    enc = encode_chat(tiny_vl, "Describe it. " * 20, [load_image("skimage:coffee.png")])
    profile = synthetic_profile(tiny_vl)
    session = Session(tiny_vl, enc, make_policy("full", profile, BudgetConfig(1.0)))
    cfg = BudgetConfig(0.2)
    p = enc.prompt_len
    tail = p - cfg.block_size * (p // cfg.block_size)
    oracles = {"hybridkv": (allocate(profile, cfg), profile.is_static),
               "streaming": (uniform_plan(profile.num_layers, profile.num_kv_heads, cfg),
                             torch.ones_like(profile.is_static))}
    for name, (plan, is_static) in oracles.items():
        policy = make_policy(name, profile, cfg)
        want = plan.tokens_for(p) + tail
        kinds = [policy.rules(layer, p).kinds for layer in range(profile.num_layers)]
        assert kinds == [tuple(HeadKind.STATIC if s else HeadKind.DYNAMIC for s in row)
                         for row in is_static.tolist()], name
        assert torch.equal(torch.stack([policy.rules(layer, p).budgets for layer in range(profile.num_layers)]),
                           plan.tokens_for(p)), name
        counts = session.state_for(policy).kept_counts()
        assert torch.equal(counts, want), (name, counts.tolist(), want.tolist())
        assert bool((counts < p).any()), name           # the budget compresses something: not trivially dense
    assert profile.is_static.any() and (~profile.is_static).any()      # both kinds were checked


def test_batch_of_two_is_rejected(tiny_vl):
    profile = synthetic_profile(tiny_vl)
    enc = encode_chat(tiny_vl, "Hello there, how are you?")
    state = HybridKVState(make_policy("full", profile, BudgetConfig(1.0)), enc.visual_mask, 2)
    ids = enc.input_ids.repeat(2, 1)
    with torch.no_grad(), activate(state), pytest.raises(HFIntegrationError, match="batch size 1"):
        tiny_vl.model(input_ids=ids)


def test_prompt_length_mismatch_is_rejected(tiny_vl):
    profile = synthetic_profile(tiny_vl)
    enc = encode_chat(tiny_vl, "Hello there, how are you?")
    state = HybridKVState(make_policy("full", profile, BudgetConfig(1.0)), enc.visual_mask[:-1], 2)
    with torch.no_grad(), activate(state), pytest.raises(HFIntegrationError, match="whole prompt"):
        tiny_vl.model(**enc.inputs)


def test_without_handler_model_is_plain_sdpa(tiny_vl):
    enc = encode_chat(tiny_vl, "Hello there, how are you?")
    with torch.no_grad():
        a = tiny_vl.model(**enc.inputs).logits
        tiny_vl.model.set_attn_implementation("sdpa")
        try:
            b = tiny_vl.model(**enc.inputs).logits
        finally:
            tiny_vl.model.set_attn_implementation("hybridkv")
    torch.testing.assert_close(a, b)
