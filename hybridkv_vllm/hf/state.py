"""Per-generation HybridKV state: one :class:`core.reference.CompressedLayerCache` per text layer.

The state is the :class:`~hybridkv_vllm.hf.attention.AttentionHandler` of one sequence (batch 1):

- **prompt** (the first forward through a layer, query length = context length, DESIGN: "the first forward whose
  query length > 1 ends the prompt"): dense causal attention; then the layer's cache is built from the policy's
  :class:`LayerRules` for this prompt length and ``prefill``-ed with the prompt K/V, the visual mask and the last
  ``obs_window`` prompt queries, which prunes the static heads (text-prior selection);
- **decode** (every later forward, one query per new token): ``CompressedLayerCache.decode``: static heads attend
  to their kept set + tail block + generated tokens, dynamic heads to their top-k prompt chunks + the same tail,
  FULL heads to everything.

HF's cache keeps the full K/V (it is the model's own cache); what each head *attends to* is decided here, so this
is the oracle, not a memory saver. :meth:`HybridKVState.fork` starts another policy from the same prompt without a
second prefill (the harness compares methods that way).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv_vllm.core.policy import Policy
from hybridkv_vllm.core.reference import CompressedLayerCache
from hybridkv_vllm.hf.attention import HFIntegrationError
from hybridkv_vllm.hf.dense import dense_causal

__all__ = ["HFLayerCache", "HybridKVState", "PromptLayer"]


class HFLayerCache(CompressedLayerCache):
    """:class:`CompressedLayerCache` that reads HF's cached K/V instead of keeping a copy of it."""

    def sync(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Point at the layer's current K/V ``[S, H, D]`` (HF appended the new token already)."""
        self.k, self.v = k, v


@dataclass(frozen=True)
class PromptLayer:
    """What one layer's prompt forward leaves behind: ``k``/``v [P, H, D]``, ``q_obs [W, Hq, D]``, the scale."""

    k: torch.Tensor
    v: torch.Tensor
    q_obs: torch.Tensor
    scale: float


class HybridKVState:
    """HybridKV attention for one sequence under ``policy`` (see the module docstring).

    Parameters
    ----------
    policy : a :mod:`core.policy` policy (``make_policy(name, profile, BudgetConfig(...))``).
    visual_mask : ``bool [P]`` visual-token positions of the prompt.
    num_layers : decoder layers of the model.
    """

    def __init__(self, policy: Policy, visual_mask: torch.Tensor, num_layers: int) -> None:
        self.policy = policy
        self.visual_mask = visual_mask.to(torch.bool).cpu()
        self.num_layers = num_layers
        self.prompt: list[PromptLayer | None] = [None] * num_layers
        self.caches: list[CompressedLayerCache | None] = [None] * num_layers

    @property
    def prompt_len(self) -> int:
        return int(self.visual_mask.shape[0])

    @property
    def prompt_done(self) -> bool:
        return all(c is not None for c in self.caches)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """See :class:`~hybridkv_vllm.hf.attention.AttentionHandler` (``q [Hq, T, D]``, ``k``/``v [H, S, D]``)."""
        t, s = q.shape[1], k.shape[1]
        cache = self.caches[layer]
        if cache is None:
            if t != s or s != self.prompt_len:
                raise HFIntegrationError(
                    f"layer {layer}: the first forward must be the whole prompt in one piece ({self.prompt_len} "
                    f"tokens), got {t} new of {s} cached tokens (chunked prefill is not supported)")
            out = dense_causal(q, k, v, scale)
            w = min(self.policy.selection.obs_window, s)
            self.prompt[layer] = PromptLayer(k=k.transpose(0, 1), v=v.transpose(0, 1),
                                             q_obs=q[:, s - w:].transpose(0, 1), scale=scale)
            self._build(layer)
            return out
        if s != cache.length + t:
            raise HFIntegrationError(f"layer {layer}: cache holds {cache.length} tokens, forward brings {t} new "
                                     f"with {s} in total")
        kt, vt = k.transpose(0, 1), v.transpose(0, 1)                  # [S, H, D] views, no copy
        outs = []
        for i in range(t):
            cache.sync(kt[:s - t + i + 1], vt[:s - t + i + 1])
            outs.append(cache.attend(q[:, i]))
        return torch.stack(outs)

    def _build(self, layer: int) -> None:
        rec = self.prompt[layer]
        cache = HFLayerCache(self.policy.rules(layer, self.prompt_len), rec.scale)
        cache.prefill(rec.k, rec.v, self.visual_mask, rec.q_obs)
        self.caches[layer] = cache

    def fork(self, policy: Policy) -> HybridKVState:
        """A fresh state for ``policy`` at the end of this state's prompt (no second prefill needed).

        The model's own KV cache must be rolled back to the prompt before decoding with the fork
        (:meth:`hybridkv_vllm.hf.generate.Session.state_for` does both).
        """
        if any(p is None for p in self.prompt):
            raise HFIntegrationError("fork() needs a state whose prompt has been prefilled in every layer")
        other = HybridKVState(policy, self.visual_mask, self.num_layers)
        other.prompt = list(self.prompt)
        for layer in range(self.num_layers):
            other._build(layer)
        return other

    def kept_counts(self) -> torch.Tensor:
        """``int64 [L, H]``: prompt positions each head attends to right after the prompt (for reports/tests)."""
        rows = []
        for cache in self.caches:
            if cache is None:
                raise HFIntegrationError("kept_counts() before the prompt was prefilled")
            kept = cache.kept(torch.zeros(self._q_heads(), cache.k.shape[2]))
            rows.append([int((idx < cache.prompt_len).sum()) for idx in kept])
        return torch.tensor(rows, dtype=torch.long)

    def _q_heads(self) -> int:
        rec = next(p for p in self.prompt if p is not None)
        return int(rec.q_obs.shape[1])
