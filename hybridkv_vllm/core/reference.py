"""Plain-PyTorch attention over a compressed KV cache: the oracle every engine path is tested against (DESIGN §5).

- :func:`dense_attention`: causal GQA attention, fp32 softmax.
- :func:`sparse_decode_attention`: one decode query over a per-KV-head set of kept positions.
- :class:`CompressedLayerCache`: one layer of one sequence (batch 1) under a policy's :class:`LayerRules`:
  dense prefill, pruning of static heads at prompt end, per-step chunk retrieval for dynamic heads.

Dynamic heads model the paper's cold tier: when the prompt completes, its complete chunks (``[0, P_aligned)``)
move to the cold tier and are summarised once; every decode step the query scores them and the top
:func:`~selection.retrieval_chunks` are brought into a budget-sized hot buffer. The prompt's tail block and the
generated tokens stay hot (uncounted, as for static heads).

Layout here is token-major (``k [S, H, D]``), as HF/vLLM hand K/V over; :mod:`selection` is head-major.

Choices (where DESIGN §4-5 are silent)
--------------------------------------
- A decode step first appends the new token's K/V, then its query attends (so it sees itself).
- Dynamic heads: the budget counts prompt chunks only, like static heads. A step selects
  :func:`~selection.retrieval_chunks` = ``budget // chunk`` of the ``P // chunk`` complete prompt chunks and
  attends to them plus ``[P_aligned, S)``. Hence at a 100 % budget every head attends to the whole context.
- The cache stores the full K/V (it is an oracle); eviction is expressed by the kept index sets.
"""
from __future__ import annotations

import torch

from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.policy import HeadKind, LayerRules, PromptView
from hybridkv_vllm.core.selection import (SelectionConfig, chunk_summaries, retrieval_chunks, score_chunks,
                                          select_chunks, text_prior_scores)


def _group(q_heads: int, kv_heads: int) -> int:
    if kv_heads < 1 or q_heads % kv_heads:
        raise ConfigError(f"num_q_heads {q_heads} is not a multiple of num_kv_heads {kv_heads}")
    return q_heads // kv_heads


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                    q_offset: int | None = None) -> torch.Tensor:
    """Causal attention of a query block over keys ``0..S-1``.

    Parameters
    ----------
    q : torch.Tensor
        ``[T, Hq, D]`` queries at positions ``q_offset .. q_offset + T - 1``.
    k, v : torch.Tensor
        ``[S, H, D]``; query head ``j`` uses KV head ``j // (Hq // H)``.
    scale : float
    q_offset : int, optional
        Position of the first query; default ``S - T`` (the queries are the last ``T`` tokens).

    Returns
    -------
    torch.Tensor
        ``[T, Hq, D]`` in ``q.dtype`` (fp32 softmax and accumulation).
    """
    t, hq, d = q.shape
    s, h, _ = k.shape
    g = _group(hq, h)
    offset = s - t if q_offset is None else q_offset
    if offset < 0 or offset + t > s:
        raise ConfigError(f"queries at [{offset}, {offset + t}) do not fit in {s} keys")
    kf = k.to(torch.float32).repeat_interleave(g, dim=1)                       # [S, Hq, D]
    vf = v.to(torch.float32).repeat_interleave(g, dim=1)
    logits = torch.einsum("thd,shd->hts", q.to(torch.float32), kf) * scale     # [Hq, T, S]
    pos = torch.arange(offset, offset + t, device=q.device)
    causal = torch.arange(s, device=q.device)[None, :] <= pos[:, None]         # [T, S]
    probs = torch.softmax(logits.masked_fill(~causal[None], float("-inf")), dim=-1)
    return torch.einsum("hts,shd->thd", probs, vf).to(q.dtype)


def sparse_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kept: list[torch.Tensor],
                            scale: float) -> torch.Tensor:
    """One decode query over the kept positions of each KV head.

    Parameters
    ----------
    q : torch.Tensor
        ``[Hq, D]``.
    k, v : torch.Tensor
        ``[S, H, D]``.
    kept : list[torch.Tensor]
        ``H`` non-empty ``int64`` index tensors (positions ``< S``), one per KV head.
    scale : float

    Returns
    -------
    torch.Tensor
        ``[Hq, D]`` in ``q.dtype``.
    """
    hq, d = q.shape
    s, h, _ = k.shape
    g = _group(hq, h)
    if len(kept) != h:
        raise ConfigError(f"kept has {len(kept)} index sets, expected one per KV head ({h})")
    out = torch.empty(hq, d, dtype=torch.float32, device=q.device)
    for head, idx in enumerate(kept):
        if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= s:
            raise ConfigError(f"kept[{head}] must be non-empty positions in [0, {s})")
        idx = idx.to(k.device)
        qh = q[head * g:(head + 1) * g].to(torch.float32)                       # [G, D]
        kh = k[idx, head].to(torch.float32)                                     # [n, D]
        probs = torch.softmax(qh @ kh.T * scale, dim=-1)                        # [G, n]
        out[head * g:(head + 1) * g] = probs @ v[idx, head].to(torch.float32)
    return out.to(q.dtype)


class CompressedLayerCache:
    """One attention layer's KV cache of one sequence under a policy (the oracle the HF integration calls).

    Usage::

        cache = CompressedLayerCache(policy.rules(layer, P), scale)
        cache.prefill(k, v, is_visual, q_obs)     # after the (dense) prefill of the prompt
        out = cache.decode(q, k_new, v_new)       # every decode step: [Hq, D]

    Parameters
    ----------
    rules : LayerRules
        Per-KV-head kinds and budgets for this prompt (``policy.rules(layer, prompt_len)``).
    scale : float
        Softmax scale.
    """

    def __init__(self, rules: LayerRules, scale: float) -> None:
        self.rules = rules
        self.scale = scale
        self.cfg: SelectionConfig = rules.policy.selection
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.prompt_len = 0
        self.static_kept: list[torch.Tensor | None] = []
        self.summaries: tuple[torch.Tensor, torch.Tensor] | None = None    # cold prompt chunks: kmin, kmax [H, C, D]

    # ---- state
    @property
    def length(self) -> int:
        """Tokens in the cache (prompt + generated)."""
        return 0 if self.k is None else int(self.k.shape[0])

    @property
    def prompt_aligned(self) -> int:
        """``P_aligned``: the selectable prompt prefix."""
        return self.cfg.chunk_size * (self.prompt_len // self.cfg.chunk_size)

    def prefill(self, k: torch.Tensor, v: torch.Tensor, is_visual: torch.Tensor,
                q_obs: torch.Tensor | None = None, q_obs_pos: torch.Tensor | None = None) -> None:
        """Store the prompt's K/V and prune the static heads.

        Parameters
        ----------
        k, v : torch.Tensor
            ``[P, H, D]`` prompt keys (RoPE applied) and values.
        is_visual : torch.Tensor
            ``bool [P]``.
        q_obs : torch.Tensor, optional
            ``[W, Hq, D]`` queries of the last ``W`` prompt tokens (``W <= obs_window`` used); needed by
            score-based policies (hybridkv, snapkv).
        q_obs_pos : torch.Tensor, optional
            ``int64 [W]`` their positions; default ``P - W .. P - 1``.
        """
        p, h, _ = k.shape
        if len(self.rules.kinds) != h or tuple(is_visual.shape) != (p,) or v.shape != k.shape:
            raise ConfigError(f"k {tuple(k.shape)}, v {tuple(v.shape)}, is_visual {tuple(is_visual.shape)}: "
                              f"expected [P, {len(self.rules.kinds)}, D] twice and [P]")
        self.k, self.v, self.prompt_len = k, v, p
        view = PromptView(scores=self._obs_scores(q_obs, q_obs_pos), is_visual=is_visual.to(torch.bool),
                          selectable_len=self.prompt_aligned, layer=self.rules.layer)
        self.static_kept = [
            self.rules.policy.select(view, head, int(self.rules.budgets[head]))
            if kind is HeadKind.STATIC else None
            for head, kind in enumerate(self.rules.kinds)
        ]
        unit = self.cfg.retrieval_units().chunk_size                     # retrieval unit (a block or a part of one)
        self.summaries = chunk_summaries(k[:self.prompt_aligned].permute(1, 0, 2), unit)

    def _obs_scores(self, q_obs: torch.Tensor | None, q_obs_pos: torch.Tensor | None) -> torch.Tensor | None:
        if q_obs is None:
            return None
        w = min(int(q_obs.shape[0]), self.cfg.obs_window)
        q_obs = q_obs[-w:] if w else q_obs[:0]
        pos = (torch.arange(self.prompt_len - w, self.prompt_len, dtype=torch.long) if q_obs_pos is None
               else q_obs_pos[-w:] if w else q_obs_pos[:0])
        k, _ = self._require_kv()
        return text_prior_scores(q_obs.permute(1, 0, 2), k.permute(1, 0, 2), pos, self.scale,
                                 self.cfg.pool_kernel)

    def append(self, k_new: torch.Tensor, v_new: torch.Tensor) -> None:
        """Append generated tokens' K/V, ``[H, D]`` or ``[n, H, D]``."""
        k, v = self._require_kv()
        if k_new.dim() == 2:
            k_new, v_new = k_new[None], v_new[None]
        self.k = torch.cat([k, k_new.to(k.dtype)])
        self.v = torch.cat([v, v_new.to(v.dtype)])

    def _require_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.k is None or self.v is None:
            raise ConfigError("the cache is empty: call prefill first")
        return self.k, self.v

    # ---- attention
    def kept(self, q: torch.Tensor) -> list[torch.Tensor]:
        """Positions each KV head attends to for decode query ``q [Hq, D]`` at the current length."""
        self._require_kv()
        s, cs = self.length, self.cfg.retrieval_units().chunk_size
        tail = torch.arange(self.prompt_aligned, s, dtype=torch.long)
        dyn = [h for h, kind in enumerate(self.rules.kinds) if kind is HeadKind.DYNAMIC]
        chunks = self._dynamic_chunks(q, dyn) if dyn else {}
        out: list[torch.Tensor] = []
        for head, kind in enumerate(self.rules.kinds):
            if kind is HeadKind.FULL:
                out.append(torch.arange(s, dtype=torch.long))
            elif kind is HeadKind.STATIC:
                kept = self.static_kept[head]
                assert kept is not None                      # made at prefill for every static head
                out.append(torch.cat([kept, tail]))
            else:
                starts = chunks[head] * cs
                tok = (starts[:, None] + torch.arange(cs)[None, :]).flatten()
                out.append(torch.cat([tok, tail]))
        return out

    def _dynamic_chunks(self, q: torch.Tensor, heads: list[int]) -> dict[int, torch.Tensor]:
        """Cold prompt chunks each dynamic head retrieves for query ``q [Hq, D]``."""
        assert self.summaries is not None                   # made at prefill when a head is dynamic
        kmin, kmax = self.summaries
        units = self.cfg.retrieval_units()
        c, sub = int(kmin.shape[1]), self.cfg.sub_chunks
        scores = score_chunks(q, kmin, kmax)                                   # [H, C units]
        # budgets are whole chunks (= KV blocks), each ``sub_chunks`` retrieval units
        return {h: select_chunks(scores[h:h + 1], c, sub * retrieval_chunks(int(self.rules.budgets[h]),
                                                                            self.prompt_len, self.cfg.chunk_size),
                                 units)[0]
                for h in heads}

    def attend(self, q: torch.Tensor) -> torch.Tensor:
        """Decode attention ``[Hq, D] -> [Hq, D]`` over the kept positions at the current length."""
        k, v = self._require_kv()
        return sparse_decode_attention(q, k, v, self.kept(q), self.scale)

    def decode(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """One decode step: append ``k_new``/``v_new [H, D]``, then attend with ``q [Hq, D]``."""
        self.append(k_new, v_new)
        return self.attend(q)
