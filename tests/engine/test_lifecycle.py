"""Chunked prefill and preemption-with-recompute give the same tokens as an uninterrupted run."""
from __future__ import annotations

import gc

import pytest
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from vllm.v1.request import RequestStatus

from hybridkv_vllm.adapter import runtime

from engine_utils import HAYSTACK, make_llm, run_to_completion, scheduler_of

pytestmark = pytest.mark.engine
BUDGET, CHUNK, NEW_TOKENS = 0.3, 256, 200


def _prompts(tokenizer) -> dict[str, list[int]]:
    ids = tokenizer(HAYSTACK.read_text())["input_ids"]
    # 778 = 3 chunks of 256 + 10: the last chunk holds only 10 of the 32 observation-window queries.
    return {"edge": ids[:3 * CHUNK + 10], "a": ids[1000:1600], "b": ids[3000:3500]}


def _run(llm, prompts, max_tokens, watch=None) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    for name, ids in prompts.items():
        llm.llm_engine.add_request(name, TokensPrompt(prompt_token_ids=ids), params)
    outputs = run_to_completion(llm, on_step=watch)
    return {name: list(out.outputs[0].token_ids) for name, out in outputs.items()}


def test_chunked_prefill_and_preemption_match_uninterrupted_run(model_dir, profile_path):
    config = {"profile": str(profile_path), "budget": BUDGET}
    reference = make_llm(model_dir, config)
    prompts = _prompts(reference.get_tokenizer())
    expected = _run(reference, prompts, max_tokens=NEW_TOKENS)       # whole prompts in one step, no preemption
    del reference
    gc.collect()

    # Chunks of 256 tokens and a pool too small for all three requests at once: requests are prefilled in
    # chunks, and running ones are preempted (recomputed later) when decode needs blocks.
    squeezed = make_llm(model_dir, config, enable_chunked_prefill=True, max_num_batched_tokens=CHUNK,
                        num_gpu_blocks_override=470, max_num_seqs=3, max_model_len=992)
    scheduler = scheduler_of(squeezed)
    cold = runtime.get_runtime(squeezed.llm_engine.vllm_config).cold
    preempted, chunked = set(), set()

    def watch(step):
        for request in list(scheduler.requests.values()):
            if request.num_preemptions:
                preempted.add(request.request_id)
            if request.status == RequestStatus.PREEMPTED:      # its blocks are gone: so is its cold-tier copy
                assert request.request_id not in cold.entries, (step, request.request_id)
            if 0 < request.num_computed_tokens < request.num_prompt_tokens:
                chunked.add(request.request_id)

    got = _run(squeezed, prompts, max_tokens=NEW_TOKENS, watch=watch)
    del squeezed
    gc.collect()
    assert chunked, "no prompt was prefilled in chunks"
    assert preempted, "no request was preempted; shrink the pool"
    assert got == expected
