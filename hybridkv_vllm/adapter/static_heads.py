"""Static heads' work in a layer: text-prior pruning when a compressed prompt completes (once per request).

The observation window's queries (the last ``obs_window`` prompt tokens) score every prompt key (SnapKV-style,
GQA-summed, ``core.selection.text_prior_scores``); ``core.selection.select_static`` keeps sinks, the recent
window, every text token before visual ones, then visual tokens by score; the kept tokens move into blocks
``[0, kept)`` (``KVOps.compact``), and the budget manager frees the rest of the prompt. With chunked prefill the
window's queries can arrive in earlier steps: :class:`ObservationStash` keeps them until the prompt completes.
This runs in the step that completes a prompt only (per completing row: prompts differ in length); decode steps
never reach it.
"""
from __future__ import annotations

import torch

from hybridkv_vllm.adapter.kv_ops import KVOps, LayerHeads, LayerStep
from hybridkv_vllm.core.selection import SelectionConfig, select_static, text_prior_scores
from hybridkv_vllm.core.step_plan import RowPlan, StepPlan


class ObservationStash:
    """(request id, layer) -> {position: query [Hq, D]} for window queries of prompt chunks before the last."""

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str], dict[int, torch.Tensor]] = {}

    def keep(self, plan: StepPlan, layer: str, query: torch.Tensor, window: int) -> None:
        for r in plan.prefill_rows:
            row = plan.rows[r]
            if not row.compressed or row.completes_prompt or row.after_prompt or row.req_id is None:
                continue
            lo, hi = max(row.computed, row.prompt_len - window), min(row.seq_len, row.prompt_len)
            if lo < hi:
                stash = self.entries.setdefault((row.req_id, layer), {})
                for pos in range(lo, hi):
                    stash[pos] = query[row.q_start + pos - row.computed].clone()

    def window(self, row: RowPlan, layer: str, query: torch.Tensor, window: int):
        """``(q_obs [W, Hq, D], positions [W])``: the last ``window`` prompt queries, stashed ones included."""
        start = max(0, row.prompt_len - window)
        stash = self.entries.pop((row.req_id, layer), {})
        earlier = [pos for pos in range(start, row.computed) if pos in stash]
        here = range(max(start, row.computed), row.prompt_len)
        queries = [stash[pos] for pos in earlier] + [query[row.q_start + pos - row.computed] for pos in here]
        return torch.stack(queries), torch.tensor(earlier + list(here), dtype=torch.long)

    def drop(self, live: set[str] | None = None, gone: set[str] | None = None) -> None:
        for key in [k for k in self.entries if (live is not None and k[0] not in live) or (gone and k[0] in gone)]:
            del self.entries[key]

    def request_ids(self) -> set[str]:
        return {key[0] for key in self.entries}


def prune(ops: KVOps, plan: StepPlan, heads: LayerHeads, step: LayerStep, pool: torch.Tensor, query: torch.Tensor,
          row_index: int, layer: str, stash: ObservationStash, visual: torch.Tensor, selection: SelectionConfig,
          scale: float) -> None:
    """Compact the kept tokens of the layer's static heads for one completing row."""
    row = plan.rows[row_index]
    stat = heads.static_host
    kept = plan.kept[heads.tiers_host[stat], row_index]                             # [Hs] blocks (host)
    q_obs, positions = stash.window(row, layer, query, selection.obs_window)       # [W, Hq, D]
    if not bool((kept > 0).any()):
        return
    stat, kept = stat[kept > 0].to(pool.device), kept[kept > 0]
    bs, p = plan.block_size, row.prompt_len
    h, g, d = len(heads.signature), query.shape[1] // len(heads.signature), query.shape[2]
    pages = step.prompt_pages[stat, row_index, :-(-p // bs)]                      # [Hs, ceil(P / bs)]
    keys = ops.read_pages(pool, pages)[0].reshape(stat.numel(), -1, d)[:, :p]
    q = q_obs.view(-1, h, g, d)[:, stat].permute(1, 2, 0, 3).reshape(stat.numel() * g, -1, d)
    scores = text_prior_scores(q, keys, positions, scale, selection.pool_kernel)    # [Hs, P]
    width = int(kept.max()) * bs
    kept_tokens = torch.zeros(stat.numel(), width, dtype=torch.long, device=pool.device)
    for i in range(stat.numel()):
        chosen = select_static(scores[i], visual.to(scores.device), int(kept[i]) * bs, (p // bs) * bs, selection)
        kept_tokens[i, :chosen.numel()] = chosen
    ops.compact(pool, pages, kept_tokens, (kept * bs).to(pool.device))
