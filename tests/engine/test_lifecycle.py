"""Chunked prefill and preemption-with-recompute give the same tokens as an uninterrupted run (up to a near tie
of the uninterrupted run's logprobs after every preemption: ``LIFECYCLE_TIE``)."""
from __future__ import annotations

import gc

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.request import RequestStatus

from hybridkv_vllm.adapter import runtime

from engine_utils import HAYSTACK, make_llm, model_runner, run_to_completion, scheduler_of

pytestmark = pytest.mark.engine
BUDGET, CHUNK, NEW_TOKENS = 0.3, 256, 200


def _prompts(tokenizer) -> dict[str, list[int]]:
    ids = tokenizer(HAYSTACK.read_text())["input_ids"]
    # 778 = 3 chunks of 256 + 10: the last chunk holds only 10 of the 16 observation-window queries.
    return {"edge": ids[:3 * CHUNK + 10], "a": ids[1000:1600], "b": ids[3000:3500]}


def _run(llm, prompts, max_tokens, watch=None, logprobs=None) -> dict[str, tuple[list[int], list | None]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=logprobs)
    for name, ids in prompts.items():
        llm.llm_engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
    outputs = run_to_completion(llm, on_step=watch)
    return {name: (list(out.outputs[0].token_ids), out.outputs[0].logprobs) for name, out in outputs.items()}


#: A chunked prefill computes the prompt's keys in other batch shapes than one whole prefill, so they differ in the
#: last bits; where two retrieval units' Quest bounds are that close, the two runs retrieve different units, and
#: the logits move by about a unit's share of the attention (a few hundredths here), more than summation order
#: alone (``engine_utils.NEAR_TIE``). Where the uninterrupted run's two best tokens are closer than this, the runs
#: may part; before that point, and through every preemption, they must agree token for token.
LIFECYCLE_TIE = 0.1


def test_chunked_prefill_and_preemption_match_uninterrupted_run(model_dir, profile_path):
    """Under Model Runner V2 (which drops a preempted request and receives it again as new; V1's preemption path is
    test_request_control.test_own_budgets_survive_preemption[v1]). The uninterrupted oracle runs under V1: the same
    kernels and sampling, a third of V2's time here (V2's own Triton kernels run on the interpreter)."""
    config = {"profile": str(profile_path), "budget": BUDGET}
    with model_runner("v1"):
        reference = make_llm(model_dir, config)
    prompts = _prompts(reference.get_tokenizer())
    expected = _run(reference, prompts, max_tokens=NEW_TOKENS, logprobs=2)   # whole prompts in one step
    del reference
    gc.collect()

    # Chunks of 256 tokens and a pool too small for all three requests at once: requests are prefilled in
    # chunks, and running ones are preempted (recomputed later) when decode needs blocks.
    with model_runner("v2"):
        squeezed = make_llm(model_dir, config, enable_chunked_prefill=True, max_num_batched_tokens=CHUNK,
                            num_gpu_blocks_override=470, max_num_seqs=3, max_model_len=992)
    scheduler = scheduler_of(squeezed)
    cold = runtime.get_runtime(squeezed.llm_engine.vllm_config).cold
    preempted, chunked = {}, set()                  # preempted: request -> output tokens at its last preemption

    def watch(step):
        for request in list(scheduler.requests.values()):
            if request.status == RequestStatus.PREEMPTED:
                preempted[request.request_id] = request.num_output_tokens
            if request.status == RequestStatus.PREEMPTED:      # its blocks are gone: so is its cold-tier copy
                assert request.request_id not in cold.entries, (step, request.request_id)
            if 0 < request.num_computed_tokens < request.num_prompt_tokens:
                chunked.add(request.request_id)

    got = _run(squeezed, prompts, max_tokens=NEW_TOKENS, watch=watch)
    del squeezed
    gc.collect()
    assert chunked, "no prompt was prefilled in chunks"
    assert preempted, "no request was preempted; shrink the pool"
    assert set(got) == set(expected)
    for name, (want, logprobs) in expected.items():
        tokens = got[name][0]
        assert len(tokens) == len(want) == NEW_TOKENS
        parted = next((i for i, (x, y) in enumerate(zip(tokens, want)) if x != y), None)
        if parted is None:
            continue
        best = sorted((lp.logprob for lp in logprobs[parted].values()), reverse=True)
        margin = best[0] - best[1]
        assert margin < LIFECYCLE_TIE and tokens[parted] in logprobs[parted], (
            f"{name}: token {parted} differs ({tokens[parted]} vs {want[parted]}) with the uninterrupted run's two "
            f"best {margin:.4f} apart (not a near tie)")
        assert parted > preempted.get(name, -1), f"{name}: parted at token {parted}, before its recompute"
