"""Text-centric head statistic used to classify heads (DESIGN §2): how much of the text's attention survives
pruning at prefill, measured at fixed reference lengths.

For each KV head and reference length ``r``: the ``window`` text queries before ``r`` (the observation window)
pick the ``ceil(keep * r)`` keys of ``[0, r)`` they attend to most (attention pooled over the window and the GQA
group, fp32 softmax), which is what static pruning keeps at a ``keep`` budget. The ``window`` text queries after
``r`` then attend causally as usual; the **selection recall** is the share of their attention (averaged over the
GQA group and the queries) that falls on the kept keys or on the tokens after ``r`` (which a static head holds
uncompressed, like generated tokens). Static iff recall ``>= theta``: with ``keep = 0.1`` and ``theta = 0.9``,
pruning the head to 10 % of its context at prefill keeps 90 % of what the following text attends to. A head that
attends to a few stable tokens (sinks, recent text) scores near 1; a diffuse head, or one whose targets move with
the query (retrieval), scores low and is served by retrieval instead.

Why reference lengths (profile schema v2). Any such share depends on the context length: on licence texts of ~3k
tokens the median head's ``k90`` (fewest keys holding 90 % of a query's attention) grows like ``n^0.55``
(SmolLM2-135M) or ``n^0.72`` (Qwen2.5-0.5B). Schema v1 scored the text after the image of 150-550-token prompts with
``1 - k90 / n``, so a profile described the calibration prompts' lengths rather than the model (9 of 90 heads
static on SmolLM2, 0 of 48 on Qwen2.5-0.5B; 78 and 32 with the same statistic at 3k tokens). Here every score is
taken at the same context lengths whatever the calibration prompts' lengths: per reference length, averaged over
the prompts that reach it; then over reference lengths, each weighing the same. A profile states the lengths it
describes (``classification.reference_tokens``); profile at the lengths you serve. Why recall rather than
concentration: scored at the same reference lengths, ``1 - k90 / n`` made 62 of SmolLM2's 90 heads static and NIAH
fell to 0 of 9 at a 10 % budget (the concentrated heads include retrieval heads, whose targets move), against 6 of
9 with recall and 6 of 9 with the v1 profile (9 static); see benchmarks/results/fidelity/ablation_head_statistic.md.

Choices (where DESIGN §2 is silent)
-----------------------------------
- "Keys before it" is standard causal attention: the query at position ``p`` sees keys ``0..p`` (itself
  included). Key ``i`` of ``k`` sits at position ``i``.
- Only text tokens are queries (text-centric): visual positions inside a window are dropped; a reference length
  whose windows hold no text gives that prompt no score there.
- The selection is plain top-k of pooled attention (no sinks, recent window or pooling kernel): the statistic
  asks how stable a head's attention is, not how a particular selection rule performs.
- Accumulated floats are float64; the softmax itself is fp32.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.profile import ClassificationParams, HeadProfile, ModelIdentity, default_provenance


def reference_query_positions(is_visual: torch.Tensor, reference_tokens: Sequence[int],
                              window: int = 32) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Classification queries of one prompt: per reference length ``r`` it reaches (``r + window <= P``), the text
    positions of the observation window ``[r - window, r)`` and of the following window ``[r, r + window)``.

    Parameters
    ----------
    is_visual : torch.Tensor
        ``bool [P]``: True at visual (image/video) token positions.
    reference_tokens : sequence of int
        Context lengths at which heads are scored (each >= ``window``).
    window : int
        Queries per window.

    Returns
    -------
    dict[int, tuple[torch.Tensor, torch.Tensor]]
        ``{r: (obs, fut)}``, ascending ``int64`` positions, for each reached ``r`` whose windows both hold text.
    """
    if window < 1 or any(int(r) < window for r in reference_tokens):
        raise ConfigError(f"reference_tokens {list(reference_tokens)} must each be >= window {window} >= 1")
    p = int(is_visual.shape[0])
    text = ~is_visual.to(torch.bool).cpu()
    out = {}
    for r in (int(x) for x in reference_tokens):
        if r + window > p:
            continue
        obs = torch.arange(r - window, r, dtype=torch.long)
        fut = torch.arange(r, r + window, dtype=torch.long)
        obs, fut = obs[text[obs]], fut[text[fut]]
        if obs.numel() and fut.numel():
            out[r] = (obs, fut)
    return out


def selection_recall(q_obs: torch.Tensor, q_fut: torch.Tensor, k: torch.Tensor, obs_pos: torch.Tensor,
                     fut_pos: torch.Tensor, ref: int, scale: float, keep: float = 0.1) -> torch.Tensor:
    """Per-KV-head share of the following queries' attention kept by a top-``keep`` selection at ``ref``.

    Parameters
    ----------
    q_obs, q_fut : torch.Tensor
        ``[T_o, Hq, D]`` and ``[T_f, Hq, D]`` queries (RoPE applied) at ``obs_pos`` (each ``< ref``) and
        ``fut_pos`` (each ``>= ref``).
    k : torch.Tensor
        ``[S, H, D]`` keys (RoPE applied), key ``i`` at position ``i``; ``S > max(fut_pos)``.
    ref : int
        The context length at which the selection is made: keys ``[0, ref)`` are candidates.
    scale : float
        Softmax scale.
    keep : float
        Share of the ``ref`` keys kept, in (0, 1]: ``ceil(keep * ref)`` keys.

    Returns
    -------
    torch.Tensor
        ``float64 [H]`` mean over the following queries of their attention on the kept keys and on ``[ref, p]``.
    """
    if not 0.0 < keep <= 1.0:
        raise ConfigError(f"keep={keep!r} must be in (0, 1]")
    if not obs_pos.numel() or not fut_pos.numel():
        raise ConfigError("selection_recall needs at least one observation and one following query")
    if int(obs_pos.max()) >= ref or int(fut_pos.min()) < ref:
        raise ConfigError(f"observation positions must lie before ref={ref} and following ones at or after it")
    g = _check_qk(q_obs, k, obs_pos)
    _check_qk(q_fut, k, fut_pos)
    h = k.shape[1]
    n_k = int(fut_pos.max()) + 1
    keys = k[:n_k].to(torch.float32).permute(1, 0, 2)                              # [H, n_k, D]
    key_idx = torch.arange(n_k, device=k.device)

    def probs(q: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:                 # -> [H, c, n_k], GQA mean
        qg = q.to(torch.float32).reshape(q.shape[0], h, g, -1).permute(1, 0, 2, 3)  # [H, c, G, D]
        logits = torch.einsum("hcgd,hkd->hcgk", qg, keys) * scale
        causal = key_idx[None, :] <= pos.to(k.device)[:, None]                       # [c, n_k]
        logits = logits.masked_fill(~causal[None, :, None, :], float("-inf"))
        return torch.softmax(logits, dim=-1).mean(dim=2)

    pooled = probs(q_obs, obs_pos)[:, :, :ref].mean(dim=1)                           # [H, ref]
    n_keep = min(ref, max(1, math.ceil(keep * ref)))
    kept = torch.zeros(h, n_k, dtype=torch.bool, device=k.device)
    kept.scatter_(1, pooled.topk(n_keep, dim=-1).indices, True)
    kept[:, ref:] = True
    recall = (probs(q_fut, fut_pos) * kept[:, None, :]).sum(dim=-1)                  # [H, T_f]
    return recall.to(torch.float64).mean(dim=1).cpu()


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
    """Streams per-prompt, per-layer ``[H]`` scores (any statistic) into the final ``[L, H]`` scores.

    Scores are kept per group (a reference length): :meth:`scores` averages each group over the prompts that fed
    it, then the groups with equal weight.

    Parameters
    ----------
    num_layers, num_kv_heads : int
        ``L`` and ``H``.
    groups : sequence of int
        Group keys (reference lengths); ``(0,)``: one group.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, groups: Sequence[int] = (0,)) -> None:
        if num_layers < 1 or num_kv_heads < 1 or not groups or len(set(groups)) != len(groups):
            raise ConfigError(f"num_layers={num_layers!r}, num_kv_heads={num_kv_heads!r} (expected >= 1), "
                              f"groups={list(groups)!r} (expected distinct, at least one)")
        self.groups = tuple(int(g) for g in groups)
        self._sum = {g: torch.zeros(num_layers, num_kv_heads, dtype=torch.float64) for g in self.groups}
        self._count = {g: torch.zeros(num_layers, dtype=torch.long) for g in self.groups}
        self._shape = (num_layers, num_kv_heads)

    @property
    def num_prompts(self) -> int:
        """Largest number of prompts any group was fed (per group: those seen by every layer)."""
        return max(int(c.min()) for c in self._count.values())

    def prompts_per_group(self) -> dict[int, int]:
        return {g: int(c.min()) for g, c in self._count.items()}

    def add(self, layer: int, score: torch.Tensor, group: int = 0) -> None:
        """Add one prompt's ``[H]`` score of ``layer`` to ``group``."""
        if group not in self._sum:
            raise ConfigError(f"add(group={group!r}): not one of the groups {list(self.groups)}")
        if not 0 <= layer < self._shape[0] or tuple(score.shape) != (self._shape[1],):
            raise ConfigError(f"add(layer={layer}, score shape {tuple(score.shape)}): expected layer in "
                              f"[0, {self._shape[0]}) and shape ({self._shape[1]},)")
        self._sum[group][layer] += score.detach().to(torch.float64).cpu()
        self._count[group][layer] += 1

    def group_scores(self) -> dict[int, torch.Tensor]:
        """``{group: float64 [L, H]}``, each the mean over the prompts that reached it; raises naming a group no
        prompt reached, or one whose layers saw different numbers of prompts."""
        empty = [g for g, c in self._count.items() if int(c.max()) == 0]
        if empty:
            raise ConfigError(f"no calibration prompt reached reference length(s) {empty}: every reference length "
                              "needs a prompt longer than it, with text around it")
        uneven = {g: c.tolist() for g, c in self._count.items() if int(c.max()) != int(c.min())}
        if uneven:
            raise ConfigError(f"per-layer prompt counts differ: {uneven}")
        return {g: self._sum[g] / self._count[g][:, None].to(torch.float64) for g in self.groups}

    def scores(self) -> torch.Tensor:
        """``float64 [L, H]``: the mean over groups of :meth:`group_scores` (each group weighs the same)."""
        return torch.stack(list(self.group_scores().values())).mean(dim=0)

    def to_profile(self, identity: ModelIdentity, theta: float = 0.9, statistic: str = "selection_recall@0.1",
                   provenance: dict[str, Any] | None = None) -> HeadProfile:
        """Classify :meth:`scores` into a :class:`HeadProfile` (DESIGN §2 rule, ``num_prompts`` recorded)."""
        params = ClassificationParams(theta=theta, statistic=statistic,
                                      reference_tokens=tuple(g for g in self.groups if g > 0))
        prov = dict(provenance) if provenance is not None else default_provenance()
        prov.setdefault("num_prompts", self.num_prompts)
        return HeadProfile.from_scores(identity, self.scores(), theta=theta, classification=params, provenance=prov)
