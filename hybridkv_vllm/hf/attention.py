"""The ``"hybridkv"`` attention function for HF transformers (``AttentionInterface``) and its routing.

transformers calls an attention function as ``fn(module, query, key, value, attention_mask, scaling=..., **kw)``
with ``query [B, Hq, T, D]`` and, after ``past_key_values.update``, the **full** cached ``key``/``value``
``[B, H, S, D]`` of layer ``module.layer_idx`` (S = tokens so far, the T new ones last). It returns
``[B, T, Hq, D]``. Generation has no channel for per-request state into that call, so the active
:class:`AttentionHandler` is held in a :class:`contextvars.ContextVar`, set only inside ``with activate(handler):``.

Routing: decoder self-attention of a text layer (``module.layer_idx`` set, causal) goes to the active handler;
everything else (the vision tower's windowed attention, or no handler active) runs plain SDPA, so a model loaded
with ``attn_implementation="hybridkv"`` behaves exactly like ``"sdpa"`` outside ``activate``. A custom
implementation name gets no mask from transformers (``attention_mask is None``); the handler applies causality
itself, which is why batch size 1 without padding is required.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Protocol

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

__all__ = ["ATTN_IMPLEMENTATION", "AttentionHandler", "HFIntegrationError", "activate", "hybridkv_attention",
           "register"]

ATTN_IMPLEMENTATION = "hybridkv"


class HFIntegrationError(ValueError):
    """The transformers integration was used outside what it supports (batch > 1, padding masks, ...)."""


class AttentionHandler(Protocol):
    """What the attention function delegates a text layer's attention to."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
        """Attention of the T newest positions of one sequence.

        Parameters
        ----------
        layer : decoder layer index.
        q : [Hq, T, D] queries at positions ``S-T .. S-1`` (rotary applied).
        k, v : [H, S, D] every cached key / value of the layer, the T new ones last.
        scale : softmax scale.

        Returns
        -------
        [T, Hq, D] attention output (any float dtype; cast by the caller).
        """


_ACTIVE: contextvars.ContextVar[AttentionHandler | None] = contextvars.ContextVar("hybridkv_handler", default=None)


@contextlib.contextmanager
def activate(handler: AttentionHandler) -> Iterator[AttentionHandler]:
    """Route text-layer attention to ``handler`` inside the ``with`` block (re-entrant, restored on exit)."""
    register()
    token = _ACTIVE.set(handler)
    try:
        yield handler
    finally:
        _ACTIVE.reset(token)


def hybridkv_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                       **kwargs) -> tuple[torch.Tensor, None]:
    """``AttentionInterface`` entry point (see the module docstring for shapes and routing)."""
    handler = _ACTIVE.get()
    layer = getattr(module, "layer_idx", None)
    causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
    if handler is None or layer is None or not causal:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[0] != 1:
        raise HFIntegrationError(f"hybridkv attention supports batch size 1, got batch {query.shape[0]}")
    if attention_mask is not None:
        raise HFIntegrationError("hybridkv attention got an attention mask (padding); use batch size 1, no padding")
    scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
    out = handler.attend(int(layer), query[0], key[0], value[0], scale)
    return out.to(query.dtype).unsqueeze(0), None


def register() -> None:
    """Register ``"hybridkv"`` with transformers' ``AttentionInterface`` (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, hybridkv_attention)
