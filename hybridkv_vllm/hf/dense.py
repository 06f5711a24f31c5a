"""Dense causal attention in the HF layout, used for prefill (DESIGN §5: prefill always attends densely)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["dense_causal"]


def dense_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the T newest positions over all S keys (GQA), via SDPA.

    Parameters
    ----------
    q : [Hq, T, D] queries at positions ``S-T .. S-1``.
    k, v : [H, S, D].
    scale : softmax scale.

    Returns
    -------
    [T, Hq, D]
    """
    t, s = q.shape[1], k.shape[1]
    g = q.shape[0] // k.shape[0]
    kk = k.repeat_interleave(g, dim=0) if g > 1 else k
    vv = v.repeat_interleave(g, dim=0) if g > 1 else v
    if t == s:
        out = F.scaled_dot_product_attention(q[None], kk[None], vv[None], is_causal=True, scale=scale)
    else:
        pos_q = torch.arange(s - t, s, device=q.device)
        mask = torch.arange(s, device=q.device)[None, :] <= pos_q[:, None]            # [T, S]
        out = F.scaled_dot_product_attention(q[None], kk[None], vv[None], attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)
