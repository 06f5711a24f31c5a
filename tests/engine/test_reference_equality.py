"""The backend computes what the core reference computes: greedy tokens of vLLM (CPU build, HYBRIDKV) equal
greedy tokens of the PyTorch reference in transformers under the same profile, budget and tier plan (up to a
near tie of the reference's logits: ``engine_utils.assert_greedy_matches``)."""
from __future__ import annotations

import gc

import pytest
from vllm import SamplingParams

from hybridkv_vllm.adapter import metrics
from hybridkv_vllm.core.tiers import TieredPolicy, plan_tiers
from hybridkv_vllm.core.budgets import BudgetConfig, allocate
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.selection import SelectionConfig

from engine_utils import HAYSTACK, assert_greedy_matches, make_llm, model_runner

pytestmark = pytest.mark.engine
BUDGET, BS, MIN_PROMPT, NEW_TOKENS = 0.2, 32, 256, 32


def _cases():
    from PIL import Image
    from skimage import data
    text = HAYSTACK.read_text()
    return [
        ("text", text[:5200] + "\nWhat does this license let people do? Answer briefly.", []),
        ("image", "Here is a picture. What is the capital of France, and why is it famous? Answer in two "
                  "sentences.", [Image.fromarray(data.astronaut())]),
        ("short", "Name three colours.", []),                       # under min_prompt_tokens: bypassed
    ]


def _oracle(model_dir, profile_path, cases, sub_chunks: int | None):
    from hybridkv_vllm.hf.generate import Session
    from hybridkv_vllm.hf.inputs import encode_chat, load_model

    profile = HeadProfile.load(profile_path)
    plan = allocate(profile, BudgetConfig(budget=BUDGET, block_size=BS))
    units = {} if sub_chunks is None else {"sub_chunks": sub_chunks}          # None: the product's default
    policy = TieredPolicy(profile, plan, plan_tiers(plan), SelectionConfig(chunk_size=BS, **units), MIN_PROMPT)
    lm = load_model(model_dir)
    out = {}
    for name, text, images in cases:
        prompt = encode_chat(lm, text, images)
        decoded = Session(lm, prompt, policy).greedy(policy, NEW_TOKENS, stop_at_eos=False)
        out[name] = (prompt.input_ids[0].tolist(), decoded.tokens.tolist(), decoded.logits)
    del lm
    gc.collect()
    return out


@pytest.mark.parametrize("model, which, sub, runner", [
    ("smollm2-vl", "half_static", 1, "v2"), ("smollm2-vl", "shipped", None, "v2"),
    ("smollm2-vl", "shipped", 1, "v1"), ("qwen25-vl", "shipped", None, "v1")])
def test_greedy_tokens_equal_core_reference(model_dir, profile_path, model, which, sub, runner):
    """On both model families (SmolLM2-135M: 3 KV heads of GQA 3:1; Qwen2.5-0.5B: 2 KV heads of GQA 7:1, q/k/v
    biases), with each one's shipped profile (static and dynamic heads mixed), and on SmolLM2 with a synthetic
    profile of about equal numbers, retrieving whole 32-token blocks (``sub_chunks`` 1) or the default 8-token
    units (``sub`` None: neither side is told, both take the product's default, 4 units of a 32-token block);
    each case under one of vLLM's model runners: two under V2 (vLLM's CUDA default, whose own Triton kernels run on
    the interpreter here: slow), two under V1 (qwen25-vl among them, for time)."""
    model_dir = model_dir.parent / model
    if not (model_dir / "config.json").exists():
        pytest.fail(f"{model_dir} missing: run `make setup`")
    shipped = model_dir.parents[1] / "configs" / "profiles" / f"{model}.json"
    profile = profile_path if which == "half_static" else shipped
    cases = _cases()
    expected = _oracle(model_dir, profile, cases, sub)
    units = {} if sub is None else {"sub_chunks": sub}
    with model_runner(runner):
        llm = make_llm(model_dir, {"profile": str(profile), "budget": BUDGET, "min_prompt_tokens": MIN_PROMPT,
                                   **units})
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)
    loads_before = metrics.get_metrics().chunk_loads._value.get()
    try:
        for name, text, images in cases:
            content = [{"type": "image_pil", "image_pil": im} for im in images] + [{"type": "text", "text": text}]
            got = llm.chat([{"role": "user", "content": content}], params)[0]
            ids, tokens, logits = expected[name]
            assert got.prompt_token_ids == ids, f"{name}: vLLM and transformers tokenised differently"
            assert_greedy_matches(list(got.outputs[0].token_ids), tokens, logits, name)
        # The dynamic heads really read from the cold tier: chunks were swapped into their hot buffers.
        assert metrics.get_metrics().chunk_loads._value.get() > loads_before
    finally:
        del llm
        gc.collect()
