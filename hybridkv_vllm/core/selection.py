"""Token selection: text-prior pruning of static heads, chunk retrieval of dynamic heads (DESIGN §4).

Static heads are pruned once, when the prompt completes: sinks, the recent window, then text tokens by score,
then visual tokens by score (:func:`select_static`). Dynamic heads keep the prompt in a cold tier and, every decode
step, attend to the prompt chunks whose Quest upper bound is highest (:func:`chunk_summaries`, :func:`score_chunks`,
:func:`select_chunks`). All math is fp32; ties go to the lower index (stable sort on ``(-score, index)``).

Layout: this module is head-major (``k [H, P, D]``), as in DESIGN §4; :mod:`reference` converts from ``[S, H, D]``.

Choices (where DESIGN §4 is silent)
-----------------------------------
- Within the sinks, lower index first; within the recent window (tokens or chunks), **newest first**: when the
  budget is smaller than sinks + recent, the newest tokens win.
- Sinks/recent are taken from the selectable region ``[0, selectable_len)`` only.
- Max pooling pads with ``-inf`` (``pool_kernel // 2`` left, the rest right), so any kernel keeps the length.
- ``select_chunks(scores, num_chunks, k)``: ``num_chunks`` is the number of valid chunks (columns of ``scores``
  past it are ignored, so callers may pass padded score tables).
- Dynamic heads retrieve among the prompt's complete chunks only (``P // chunk`` of them, summarised once when
  the prompt completes: that is what moves to the cold tier), :func:`retrieval_chunks` of them per step; the
  tail block and the generated tokens stay hot, uncounted, as for static heads. So ``recent_chunks`` are the
  prompt's last complete chunks (where the instruction usually is), and ``k = tokens_for(P) / chunk``.
- Chunk scores ignore the softmax scale (a positive factor does not change the ranking).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from hybridkv_vllm.core.errors import ConfigError


UNIT_TOKENS = 8        # the default retrieval unit of dynamic heads, in tokens (SelectionConfig.sub_chunks)


@dataclass(frozen=True, slots=True)
class SelectionConfig:
    """Selection hyperparameters (DESIGN §4); ``chunk_size`` equals the KV block size in vLLM."""

    sink_tokens: int = 4
    recent_tokens: int = 32
    # [choice] the static heads' observation window: 16 queries, chosen on the validation set with the floor and
    # the sink / recent spans (benchmarks/results/fidelity/validation_windows.md: NIAH equal to 32's, teacher-forced
    # agreement 77.6 % vs 76.8 %, 3 of 384 tokens; the rule fixed before the run let only a tie keep the default)
    obs_window: int = 16
    pool_kernel: int = 7
    chunk_size: int = 16
    sink_chunks: int = 1
    recent_chunks: int = 1
    # [choice] retrieval granularity: dynamic heads score and retrieve units of ``chunk_size // sub_chunks`` tokens
    # (the cold region stays block-aligned, budgets stay whole blocks, the sink and recent spans whole chunks).
    # 0 (the default) means units of UNIT_TOKENS = 8 tokens where the chunk is a multiple of 8 (2 units of a
    # 16-token block, 4 of a 32-token one), else whole chunks: 8-token units were chosen on the validation set, not
    # the evaluation prompts (benchmarks/results/fidelity/validation_budget_split.md); their cost is two fp32
    # summaries of D channels per 8 tokens in the cold tier instead of per block.
    sub_chunks: int = 0

    def __post_init__(self) -> None:
        for name in ("sink_tokens", "recent_tokens", "sink_chunks", "recent_chunks"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ConfigError(f"{name}={value!r}: expected an integer >= 0")
        for name in ("obs_window", "pool_kernel", "chunk_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name}={value!r}: expected an integer >= 1")
        if not isinstance(self.sub_chunks, int) or self.sub_chunks < 0:
            raise ConfigError(f"sub_chunks={self.sub_chunks!r}: expected an integer >= 1 (or 0: units of "
                              f"{UNIT_TOKENS} tokens)")
        if self.sub_chunks == 0:                       # frozen dataclass: resolve the default once, here
            auto = self.chunk_size // UNIT_TOKENS if self.chunk_size % UNIT_TOKENS == 0 else 1
            object.__setattr__(self, "sub_chunks", auto)
        if self.chunk_size % self.sub_chunks:
            raise ConfigError(f"sub_chunks={self.sub_chunks} must divide chunk_size={self.chunk_size}")

    def retrieval_units(self) -> SelectionConfig:
        """The selection of dynamic heads in retrieval units: ``chunk_size // sub_chunks`` tokens each, the sink and
        recent spans still whole chunks (``sink_chunks * sub_chunks`` units)."""
        s = self.sub_chunks
        return replace(self, chunk_size=self.chunk_size // s, sink_chunks=self.sink_chunks * s,
                       recent_chunks=self.recent_chunks * s, sub_chunks=1)


# ------------------------------------------------------------------------------------------------ priority order
def _priority_order(group: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """Indices sorted by ``(group, key, index)`` ascending. ``group`` int64 ``[n]``, ``key`` float64 ``[n]``."""
    order = torch.sort(key, stable=True).indices
    return order[torch.sort(group[order], stable=True).indices]


def _priority_select(scores: torch.Tensor, is_text: torch.Tensor, n_sink: int, n_recent: int,
                     budget: int) -> torch.Tensor:
    """Top-``budget`` indices of ``[n]`` by: sinks (ascending), recent (newest first), text, others (by score).

    Returns ``int64`` indices sorted ascending.
    """
    n = int(scores.shape[0])
    idx = torch.arange(n, dtype=torch.long)
    group = torch.where(is_text, 2, 3).to(torch.long)
    key = -scores.to(torch.float64)
    recent = idx >= n - n_recent
    group[recent] = 1
    key[recent] = -idx[recent].to(torch.float64)
    sink = idx < n_sink
    group[sink] = 0
    key[sink] = idx[sink].to(torch.float64)
    chosen = _priority_order(group, key)[: max(0, min(budget, n))]
    return torch.sort(chosen).values


# ----------------------------------------------------------------------------------------------- static heads
def _max_pool_same(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """1-D max pooling with stride 1 and the same length. ``x [H, P]`` -> ``[H, P]``."""
    if kernel <= 1 or x.shape[-1] == 0:
        return x
    left = kernel // 2
    padded = F.pad(x[:, None, :], (left, kernel - 1 - left), value=float("-inf"))
    return F.max_pool1d(padded, kernel_size=kernel, stride=1)[:, 0, :]


def text_prior_scores(q_obs: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, scale: float,
                      pool_kernel: int = 7) -> torch.Tensor:
    """Observation-window attention scores of every prompt key (SnapKV-style, GQA-summed).

    Parameters
    ----------
    q_obs : torch.Tensor
        ``[Hq, W, D]`` queries of the last ``obs_window`` prompt tokens (RoPE applied).
    k : torch.Tensor
        ``[H, P, D]`` prompt keys; key ``i`` at position ``i``.
    q_pos : torch.Tensor
        ``int64 [W]`` positions of the observation queries (each ``< P``).
    scale : float
        Softmax scale.
    pool_kernel : int
        Max-pooling width (stride 1, same length).

    Returns
    -------
    torch.Tensor
        ``float32 [H, P]``: causal fp32 softmax summed over the window and the GQA group, then max-pooled.
    """
    hq, w, d = q_obs.shape
    h, p, _ = k.shape
    if hq % h or k.shape[2] != d or tuple(q_pos.shape) != (w,):
        raise ConfigError(f"q_obs {tuple(q_obs.shape)}, k {tuple(k.shape)}, q_pos {tuple(q_pos.shape)}: "
                          "expected [Hq, W, D], [H, P, D], [W] with Hq a multiple of H")
    if w == 0 or p == 0:
        return torch.zeros(h, p, dtype=torch.float32, device=k.device)
    g = hq // h
    qg = q_obs.to(torch.float32).reshape(h, g * w, d)                           # [H, G*W, D]
    logits = torch.einsum("hqd,hkd->hqk", qg, k.to(torch.float32)) * scale     # [H, G*W, P]
    pos = q_pos.to(k.device).repeat(g)                                          # [G*W]
    causal = torch.arange(p, device=k.device)[None, :] <= pos[:, None]          # [G*W, P]
    probs = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)
    return _max_pool_same(probs.sum(dim=1), pool_kernel)


def select_static(scores: torch.Tensor, is_visual: torch.Tensor, budget_tokens: int, selectable_len: int,
                  cfg: SelectionConfig = SelectionConfig()) -> torch.Tensor:
    """Kept prompt tokens of a static head (text-prior priority).

    Parameters
    ----------
    scores : torch.Tensor
        ``float [P]`` text-prior scores of one KV head.
    is_visual : torch.Tensor
        ``bool [P]``.
    budget_tokens : int
        Tokens to keep (>= 0).
    selectable_len : int
        ``P_aligned``: only positions ``< selectable_len`` can be selected.
    cfg : SelectionConfig

    Returns
    -------
    torch.Tensor
        ``int64 [min(budget_tokens, selectable_len)]`` ascending positions: the first ``sink_tokens``, the last
        ``recent_tokens`` of the selectable region, then text tokens by score, then visual tokens by score.
    """
    p = int(scores.shape[0])
    if tuple(is_visual.shape) != (p,) or not 0 <= selectable_len <= p or budget_tokens < 0:
        raise ConfigError(f"scores {tuple(scores.shape)}, is_visual {tuple(is_visual.shape)}, "
                          f"selectable_len={selectable_len}, budget_tokens={budget_tokens}: expected [P], [P], "
                          "0 <= selectable_len <= P, budget_tokens >= 0")
    s = scores[:selectable_len].detach().cpu()
    text = ~is_visual[:selectable_len].detach().cpu().to(torch.bool)
    return _priority_select(s, text, cfg.sink_tokens, cfg.recent_tokens, budget_tokens)


# ---------------------------------------------------------------------------------------------- dynamic heads
def num_chunks(length: int, chunk_size: int) -> int:
    """Chunks covering ``length`` tokens (the last one possibly partial)."""
    return -(-length // chunk_size)


def chunk_summaries(k: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel-wise min and max of each chunk's keys (Quest).

    Parameters
    ----------
    k : torch.Tensor
        ``[H, S, D]`` keys; chunks are ``chunk_size`` tokens aligned at position 0.
    chunk_size : int

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``kmin``, ``kmax``: ``float32 [H, C, D]``, ``C = ceil(S / chunk_size)``; the last chunk summarises only
        the tokens it holds.
    """
    h, s, d = k.shape
    c = num_chunks(s, chunk_size)
    pad = c * chunk_size - s
    kf = k.to(torch.float32)
    lo = F.pad(kf, (0, 0, 0, pad), value=float("inf")).reshape(h, c, chunk_size, d)
    hi = F.pad(kf, (0, 0, 0, pad), value=float("-inf")).reshape(h, c, chunk_size, d)
    return lo.amin(dim=2), hi.amax(dim=2)


def score_chunks(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    """Quest upper bound ``sum_d max(q_d kmin_d, q_d kmax_d)``, summed over the GQA group.

    ``q [Hq, D]``, ``kmin``/``kmax [H, C, D]`` -> ``float32 [H, C]``.
    """
    h, c, d = kmin.shape
    if q.dim() != 2 or q.shape[0] % h or q.shape[1] != d or kmax.shape != kmin.shape:
        raise ConfigError(f"q {tuple(q.shape)}, kmin {tuple(kmin.shape)}, kmax {tuple(kmax.shape)}: "
                          "expected [Hq, D], [H, C, D], [H, C, D]")
    qg = q.to(torch.float32).reshape(h, q.shape[0] // h, 1, d)                 # [H, G, 1, D]
    bound = torch.maximum(qg * kmin[:, None], qg * kmax[:, None]).sum(dim=-1)   # [H, G, C]
    return bound.sum(dim=1)


def retrieval_chunks(budget_tokens: int, prompt_len: int, chunk_size: int) -> int:
    """Prompt chunks a dynamic head retrieves into its hot buffer at a decode step [choice].

    ``min(budget_tokens // chunk_size, prompt_len // chunk_size)``: the head's :meth:`BudgetPlan.tokens_for`
    budget in whole chunks, out of the prompt's complete chunks. Everything from ``P_aligned`` on (the prompt's
    tail block and the generated tokens) stays hot uncounted, as for a static head, so at a 100 % budget every
    prompt chunk is retrieved and the head attends densely (DESIGN §5).
    """
    if min(budget_tokens, prompt_len) < 0 or chunk_size < 1:
        raise ConfigError(f"budget_tokens={budget_tokens}, prompt_len={prompt_len}, chunk_size={chunk_size}: "
                          "expected budget_tokens, prompt_len >= 0 and chunk_size >= 1")
    return min(budget_tokens // chunk_size, prompt_len // chunk_size)


def select_chunks(scores: torch.Tensor, num_chunks: int, k: int,
                  cfg: SelectionConfig = SelectionConfig()) -> torch.Tensor:
    """Chunks a dynamic head attends to this step.

    Parameters
    ----------
    scores : torch.Tensor
        ``float [H, C_max]`` chunk scores; only the first ``num_chunks`` columns are valid.
    num_chunks : int
        Valid chunks ``C`` (the last holds the newest token).
    k : int
        Chunks to select per head (>= 0).
    cfg : SelectionConfig

    Returns
    -------
    torch.Tensor
        ``int64 [H, min(k, C)]``, each row ascending: the first ``sink_chunks``, the last ``recent_chunks``
        (newest first), then the highest scores (ties: lower index).
    """
    if scores.dim() != 2 or not 0 <= num_chunks <= scores.shape[1] or k < 0:
        raise ConfigError(f"scores {tuple(scores.shape)}, num_chunks={num_chunks}, k={k}: expected [H, C_max], "
                          "0 <= num_chunks <= C_max, k >= 0")
    valid = scores[:, :num_chunks].detach().cpu()
    every = torch.ones(num_chunks, dtype=torch.bool)
    rows = [_priority_select(row, every, cfg.sink_chunks, cfg.recent_chunks, k) for row in valid]
    if not rows:
        return torch.zeros(0, min(k, num_chunks), dtype=torch.long)
    return torch.stack(rows)
