"""Greedy and teacher-forced decoding with a :class:`HybridKVState` (batch 1, HF model + ``DynamicCache``).

``model.generate`` works too (``with activate(HybridKVState(...)): model.generate(...)``); these helpers exist so
one prefill serves many policies (:class:`Session`: prefill once, ``fork`` per policy, crop the cache back) and so
the harness gets per-step logits.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from hybridkv_vllm.core.policy import Policy
from hybridkv_vllm.hf.attention import activate
from hybridkv_vllm.hf.inputs import EncodedPrompt, LoadedModel
from hybridkv_vllm.hf.state import HybridKVState

__all__ = ["Decoded", "Session", "generate"]


@dataclass(frozen=True)
class Decoded:
    """``tokens [n]`` produced or forced, and ``logits [n, V]`` (fp32): row i is the distribution of token i."""

    tokens: torch.Tensor
    logits: torch.Tensor


class Session:
    """One prompt, prefilled once (densely), decoded under any number of policies.

    Parameters
    ----------
    lm : the loaded model.
    prompt : the encoded prompt.
    policy : the policy of the first state (any; the prefill is dense under every policy).
    """

    def __init__(self, lm: LoadedModel, prompt: EncodedPrompt, policy: Policy) -> None:
        self.lm = lm
        self.prompt = prompt
        self.num_layers = int(lm.text_config.num_hidden_layers)
        base = getattr(lm.model, "model", None)
        if hasattr(base, "rope_deltas"):
            base.rope_deltas = None        # Qwen2.5-VL caches M-RoPE deltas of the previous prompt
        self.cache = DynamicCache(config=lm.model.config)
        self.state = HybridKVState(policy, prompt.visual_mask, self.num_layers)
        with torch.no_grad(), activate(self.state):
            out = lm.model(**prompt.inputs, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.first_logits = out.logits[0, -1].float()

    def state_for(self, policy: Policy) -> HybridKVState:
        """A state for ``policy`` at the end of the prompt; rolls the model's cache back to the prompt."""
        extra = self.cache.get_seq_length() - self.prompt.prompt_len
        if extra > 0:
            self.cache.crop(-extra)
        return self.state.fork(policy)

    def _step(self, state: HybridKVState, token: int) -> torch.Tensor:
        ids = torch.tensor([[token]], dtype=torch.long)
        with torch.no_grad(), activate(state):
            out = self.lm.model(input_ids=ids, past_key_values=self.cache, use_cache=True)
        return out.logits[0, -1].float()

    def greedy(self, policy: Policy, max_new_tokens: int, stop_at_eos: bool = True) -> Decoded:
        """Greedy decoding of up to ``max_new_tokens`` under ``policy`` (stops after an EOS token if asked)."""
        state = self.state_for(policy)
        logits, tokens = [self.first_logits], []
        eos = set(self.lm.eos_token_ids)
        while True:
            tok = int(torch.argmax(logits[-1]))
            tokens.append(tok)
            if len(tokens) >= max_new_tokens or (stop_at_eos and tok in eos):
                break
            logits.append(self._step(state, tok))
        return Decoded(tokens=torch.tensor(tokens, dtype=torch.long), logits=torch.stack(logits))

    def forced(self, policy: Policy, tokens: Sequence[int]) -> Decoded:
        """Teacher-forced: the distributions of ``tokens[i]`` given the prompt and ``tokens[:i]`` under ``policy``."""
        state = self.state_for(policy)
        logits = [self.first_logits]
        for tok in list(tokens)[:-1]:
            logits.append(self._step(state, int(tok)))
        return Decoded(tokens=torch.as_tensor(list(tokens), dtype=torch.long), logits=torch.stack(logits))


def generate(lm: LoadedModel, prompt: EncodedPrompt, policy: Policy, max_new_tokens: int = 32,
             stop_at_eos: bool = True) -> torch.Tensor:
    """Greedy generation with HybridKV under ``policy``; returns the new token ids ``[n]``."""
    return Session(lm, prompt, policy).greedy(policy, max_new_tokens, stop_at_eos).tokens
