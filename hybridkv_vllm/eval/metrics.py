"""Fidelity metrics against the full cache."""
from __future__ import annotations

import re

import torch

__all__ = ["mean_kl", "passkey_found", "top1_agreement"]


def mean_kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over positions of ``KL(p_ref || p)`` in nats. ``ref_logits``/``logits``: ``[n, V]``."""
    ref = torch.log_softmax(ref_logits.double(), dim=-1)
    out = torch.log_softmax(logits.double(), dim=-1)
    return float((ref.exp() * (ref - out)).sum(dim=-1).clamp(min=0.0).mean())


def top1_agreement(tokens: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of positions where ``argmax(logits[i]) == tokens[i]`` (``tokens [n]``, ``logits [n, V]``)."""
    return float((logits.argmax(dim=-1) == tokens).double().mean())


def passkey_found(text: str, passkey: str) -> bool:
    """The passkey appears in ``text`` as a whole number (not inside a longer digit run)."""
    return re.search(rf"(?<!\d){re.escape(passkey)}(?!\d)", text) is not None
