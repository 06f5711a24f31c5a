"""Text-centric sparsity statistic used to classify heads (DESIGN §2).

For each KV head: take the text queries after the last visual token, their causal attention over the prompt
(fp32 softmax, averaged over the GQA group), and measure ``k90``, the fewest keys whose largest probabilities
sum to ``>= mass``. The sparsity score is ``s = 1 - k90 / n_keys`` averaged over queries, then over prompts.

Queries are processed ``query_chunk`` at a time: at most a ``[chunk, Hq, n_keys]`` block exists at once.

Choices (where DESIGN §2 is silent)
-----------------------------------
- "Keys before it" is standard causal attention: the query at position ``p`` sees keys ``0..p`` (itself
  included), so ``n_keys = p + 1``. Key ``i`` of ``k`` sits at position ``i``.
- If no text follows the last visual token (the prompt ends on a visual token), the query set falls back to the
  last ``obs_window`` tokens, as for a prompt without visual tokens.
- Accumulated floats are float64; the softmax itself is fp32.
"""
from __future__ import annotations

from typing import Any

import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.profile import ClassificationParams, HeadProfile, ModelIdentity, default_provenance


def query_positions(is_visual: torch.Tensor, obs_window: int = 32) -> torch.Tensor:
    """Positions of the classification queries of one prompt.

    Parameters
    ----------
    is_visual : torch.Tensor
        ``bool [P]``: True at visual (image/video) token positions.
    obs_window : int
        Fallback window: the last ``obs_window`` tokens when no text follows a visual token.

    Returns
    -------
    torch.Tensor
        ``int64 [n_q]`` ascending positions.
    """
    p = int(is_visual.shape[0])
    vis = torch.nonzero(is_visual.to(torch.bool).cpu()).flatten()
    start = int(vis[-1]) + 1 if vis.numel() else p
    if start >= p:
        start = max(0, p - obs_window)
    return torch.arange(start, p, dtype=torch.long)


def _check_qk(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor) -> int:
    if q.dim() != 3 or k.dim() != 3 or q.shape[-1] != k.shape[-1]:
        raise ConfigError(f"q {tuple(q.shape)} and k {tuple(k.shape)}: expected [T, Hq, D] and [S, H, D]")
    if q.shape[1] % k.shape[1]:
        raise ConfigError(f"num_q_heads {q.shape[1]} is not a multiple of num_kv_heads {k.shape[1]}")
    if q_pos.shape != (q.shape[0],):
        raise ConfigError(f"q_pos shape {tuple(q_pos.shape)}, expected ({q.shape[0]},)")
    if q_pos.numel() and (int(q_pos.min()) < 0 or int(q_pos.max()) >= k.shape[0]):
        raise ConfigError(f"q_pos must lie in [0, {k.shape[0]}), got [{int(q_pos.min())}, {int(q_pos.max())}]")
    return q.shape[1] // k.shape[1]


def k_mass(probs: torch.Tensor, mass: float) -> torch.Tensor:
    """Fewest entries whose largest values sum to ``>= mass`` along the last dim (clamped to the row's support).

    ``probs`` ``[..., n]`` (rows summing to 1) -> ``int64 [...]``.
    """
    sorted_p, _ = torch.sort(probs.to(torch.float64), dim=-1, descending=True)
    csum = torch.cumsum(sorted_p, dim=-1)
    k = (csum < mass).sum(dim=-1) + 1
    support = (probs > 0).sum(dim=-1).clamp(min=1)
    return torch.minimum(k, support)


def mass_concentration(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float,
                       mass: float = 0.9, query_chunk: int = 64) -> torch.Tensor:
    """Per-KV-head sparsity score ``s = 1 - k_mass / n_keys`` averaged over the given queries.

    Parameters
    ----------
    q : torch.Tensor
        ``[T, Hq, D]`` queries (RoPE applied) at positions ``q_pos``.
    k : torch.Tensor
        ``[S, H, D]`` keys of the prompt (RoPE applied); key ``i`` at position ``i``.
    q_pos : torch.Tensor
        ``int64 [T]`` query positions, each ``< S``.
    scale : float
        Softmax scale (usually ``D ** -0.5``).
    mass : float
        Attention mass to cover, in (0, 1].
    query_chunk : int
        Queries processed at once.

    Returns
    -------
    torch.Tensor
        ``float64 [H]`` mean score; zeros when ``T == 0``.
    """
    if not 0.0 < mass <= 1.0 or query_chunk < 1:
        raise ConfigError(f"mass={mass!r} must be in (0, 1] and query_chunk={query_chunk!r} >= 1")
    g = _check_qk(q, k, q_pos)
    t, hq, d = q.shape
    h = k.shape[1]
    total = torch.zeros(h, dtype=torch.float64)
    if t == 0:
        return total
    n_k = int(q_pos.max()) + 1
    keys = k[:n_k].to(torch.float32).permute(1, 0, 2)                            # [H, n_k, D]
    key_idx = torch.arange(n_k, device=q.device)
    for lo in range(0, t, query_chunk):
        qc = q[lo:lo + query_chunk].to(torch.float32)                             # [c, Hq, D]
        pos = q_pos[lo:lo + query_chunk].to(q.device)                            # [c]
        qg = qc.reshape(qc.shape[0], h, g, d).permute(1, 0, 2, 3)                 # [H, c, G, D]
        logits = torch.einsum("hcgd,hkd->hcgk", qg, keys) * scale                # [H, c, G, n_k]
        causal = key_idx[None, :] <= pos[:, None]                                 # [c, n_k]
        logits = logits.masked_fill(~causal[None, :, None, :], float("-inf"))
        probs = torch.softmax(logits, dim=-1).mean(dim=2)                         # [H, c, n_k]
        km = k_mass(probs, mass).to(torch.float64)                                # [H, c]
        n_keys = (pos + 1).to(torch.float64).cpu()                                # [c]
        total += (1.0 - km.cpu() / n_keys[None, :]).sum(dim=1)
    return total / t


class SparsityAccumulator:
    """Streams per-prompt, per-layer scores into the final ``[L, H]`` sparsity scores.

    Feed each prompt's layers with :meth:`update` (computes the statistic) or :meth:`add` (a precomputed
    ``[H]`` score); :meth:`scores` returns the mean over prompts of each layer.

    Parameters
    ----------
    num_layers, num_kv_heads : int
        ``L`` and ``H``.
    mass, query_chunk : float, int
        Passed to :func:`mass_concentration`.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, mass: float = 0.9, query_chunk: int = 64) -> None:
        if num_layers < 1 or num_kv_heads < 1:
            raise ConfigError(f"num_layers={num_layers!r}, num_kv_heads={num_kv_heads!r}: expected >= 1")
        self.mass = mass
        self.query_chunk = query_chunk
        self._sum = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self._count = torch.zeros(num_layers, dtype=torch.long)

    @property
    def num_prompts(self) -> int:
        """Prompts seen by every layer."""
        return int(self._count.min())

    def add(self, layer: int, score: torch.Tensor) -> None:
        """Add one prompt's ``[H]`` score of ``layer``."""
        if not 0 <= layer < self._sum.shape[0] or tuple(score.shape) != (self._sum.shape[1],):
            raise ConfigError(f"add(layer={layer}, score shape {tuple(score.shape)}): expected layer in "
                              f"[0, {self._sum.shape[0]}) and shape ({self._sum.shape[1]},)")
        self._sum[layer] += score.detach().to(torch.float64).cpu()
        self._count[layer] += 1

    def update(self, layer: int, q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float) -> None:
        """Compute :func:`mass_concentration` for one prompt's ``layer`` and add it (shapes as there)."""
        self.add(layer, mass_concentration(q, k, q_pos, scale, self.mass, self.query_chunk))

    def scores(self) -> torch.Tensor:
        """``float64 [L, H]`` mean over prompts; raises if some layer saw no prompt or counts differ."""
        if int(self._count.min()) == 0 or int(self._count.max()) != int(self._count.min()):
            raise ConfigError(f"per-layer prompt counts differ or are zero: {self._count.tolist()}")
        return self._sum / self._count[:, None].to(torch.float64)

    def to_profile(self, identity: ModelIdentity, theta: float = 0.9,
                   provenance: dict[str, Any] | None = None) -> HeadProfile:
        """Classify :meth:`scores` into a :class:`HeadProfile` (DESIGN §2 rule, ``num_prompts`` recorded)."""
        params = ClassificationParams(theta=theta, statistic=f"mass_concentration@{self.mass}")
        prov = dict(provenance) if provenance is not None else default_provenance()
        prov.setdefault("num_prompts", self.num_prompts)
        return HeadProfile.from_scores(identity, self.scores(), theta=theta, classification=params, provenance=prov)
