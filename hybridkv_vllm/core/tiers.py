"""KV-cache tiers: how per-head budgets become vLLM KV-cache groups.

vLLM gives every KV-cache group one block table per request, shared by all layers of the group, and
requires every group to hold the same number of layers (or it pads). HybridKV budgets are per KV head, so
each KV head becomes a one-head *virtual layer* and heads with the same budget rule share a group (a *tier*).

Every tier is a budget tier: once a request's prompt is processed it keeps blocks ``[0, kept)`` plus the tail
(the prompt's partial block and the generated tokens) and returns ``[kept, P // bs)`` to vLLM's pool. What a
head does with its ``kept`` blocks depends on its type (``modes``):

* ``pruned`` (static head): the text-prior selection of the prompt, compacted into them once;
* ``retrieve`` (dynamic head): a hot buffer; the prompt's complete chunks live in the cold tier
  (cold_tier.py) and every decode step brings the top-k chunks for the current query into the buffer.

Heads are sorted by budget fraction and cut into tiers of ``g`` heads; a tier's fraction is its largest
member's (promotion only: no head ever keeps less than the allocator gave it). ``g`` divides ``L * H`` so
vLLM adds no padding layers; among the divisors that give at most ``max_groups`` groups, the one that keeps
the fewest extra tokens wins (ties: fewer groups).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hybridkv_vllm.core.budgets import BudgetConfig, BudgetPlan, allocate, fold_for_tp, is_compressed, kept_blocks

# What one KV head does at decode.
RETRIEVE = "retrieve"   # dynamic head: top-k cold prompt chunks in a hot buffer + the hot tail
PRUNED = "pruned"       # static head: the kept prompt tokens + the hot tail


@dataclass(frozen=True)
class Tier:
    """One KV-cache group's worth of heads with one budget rule."""

    index: int
    fraction: float                         # kept share of the prompt (the largest member's)
    heads: tuple[tuple[int, int], ...]      # (layer, kv_head)


@dataclass(frozen=True)
class TierPlan:
    tiers: tuple[Tier, ...]
    group_size: int
    modes: tuple[tuple[str, ...], ...]      # [L][H]: RETRIEVE / PRUNED
    tier_of: tuple[tuple[int, ...], ...]    # [L][H]: tier index

    def tier(self, layer: int, head: int) -> Tier:
        return self.tiers[self.tier_of[layer][head]]

    def effective_fractions(self, plan: BudgetPlan) -> torch.Tensor:
        """``float64 [L, H]``: the fraction each head really gets (its tier's)."""
        out = plan.fractions.clone()
        for tier in self.tiers:
            for layer, head in tier.heads:
                out[layer, head] = tier.fraction
        return out

    def summary(self) -> str:
        return f"{len(self.tiers)} tiers of {self.group_size} heads: " + \
            ", ".join(f"{t.fraction:.3f}" for t in self.tiers)


def _candidate_group_sizes(num_heads: int, max_groups: int) -> list[int]:
    return [g for g in range(num_heads, 0, -1) if num_heads % g == 0 and num_heads // g <= max_groups]


def _tiers_for_group_size(heads: list[tuple[float, int, int]], g: int):
    """(extra kept share, [(fraction, heads)]) for group size ``g``; ``heads`` sorted by fraction, descending."""
    cost, tiers = 0.0, []
    for start in range(0, len(heads), g):
        chunk = heads[start:start + g]
        top = chunk[0][0]
        cost += sum(top - f for f, _, _ in chunk)
        tiers.append((top, tuple((l, h) for _, l, h in chunk)))
    return cost, tiers


def plan_tiers(plan: BudgetPlan, max_groups: int = 16) -> TierPlan:
    """Group the heads of ``plan`` into balanced tiers (see module docstring)."""
    num_layers, num_kv_heads = plan.fractions.shape
    num_heads = num_layers * num_kv_heads
    heads = sorted(((float(plan.fractions[l, h]), l, h) for l in range(num_layers) for h in range(num_kv_heads)),
                   key=lambda x: (-x[0], x[1], x[2]))
    best = None
    for g in _candidate_group_sizes(num_heads, max_groups):
        cost, raw = _tiers_for_group_size(heads, g)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, g, raw)
    assert best is not None                      # 1 divides every head count
    _, g, raw = best
    tiers = tuple(Tier(i, fraction, members) for i, (fraction, members) in enumerate(raw))
    tier_of = [[-1] * num_kv_heads for _ in range(num_layers)]
    for tier in tiers:
        for l, h in tier.heads:
            tier_of[l][h] = tier.index
    modes = tuple(tuple(PRUNED if bool(plan.is_static[l, h]) else RETRIEVE for h in range(num_kv_heads))
                  for l in range(num_layers))
    return TierPlan(tiers=tiers, group_size=g, modes=modes, tier_of=tuple(tuple(row) for row in tier_of))


class TierBudgets:
    """A request's budget -> the blocks each tier keeps of its prompt: the one rule that the scheduler-side budget
    manager (which frees blocks ``[kept, P // bs)``), the worker (which reads, compacts and offloads) and the
    cold-tier admission (which counts the pages a request will hold) all apply.

    The server's budget gives each tier its own fraction. A request may carry its own budget (vLLM's per-request
    extra arguments, ``adapter/requests.py``): the allocator is run again at that budget on the same profile and
    ``r``, and each tier takes the largest fraction of its heads (the promotion rule of :func:`plan_tiers`, with
    the tiers fixed: they are vLLM's KV-cache groups). Results are cached per distinct budget (a bounded cache:
    budgets come from requests).

    Under tensor parallelism (``world`` > 1) ``heads`` is the whole model's profile and the tiers group head slots
    (``core.budgets.fold_for_tp``): a request's budget is allocated over every head, then folded, on every rank
    and in the scheduler alike.
    """

    CACHE = 256

    def __init__(self, heads, cfg: BudgetConfig, tiers: TierPlan, min_prompt_tokens: int, world: int = 1) -> None:
        self.heads, self.cfg, self.tiers, self.min_prompt_tokens = heads, cfg, tiers, min_prompt_tokens
        self.world = world
        self._fractions: dict[float, tuple[float, ...]] = {}
        # (prompt length, budget) -> kept blocks per tier: asked per request, tier and step by the scheduler's
        # budget manager, the worker and the accounting, with few distinct keys at a time (bounded: cleared when full)
        self._kept: dict[tuple[int, float | None], tuple[int | None, ...]] = {}
        self._dynamic = [sum(1 for l, h in t.heads if tiers.modes[l][h] == RETRIEVE) for t in tiers.tiers]

    def fractions(self, budget: float | None = None) -> tuple[float, ...]:
        """Each tier's kept share of a prompt at ``budget`` (None: the server's)."""
        if budget is None or budget == self.cfg.budget:
            return tuple(t.fraction for t in self.tiers.tiers)
        out = self._fractions.get(budget)
        if out is None:
            plan = fold_for_tp(allocate(self.heads, replace(self.cfg, budget=float(budget))), self.world)
            out = tuple(max(float(plan.fractions[l, h]) for l, h in t.heads) for t in self.tiers.tiers)
            if len(self._fractions) >= self.CACHE:
                self._fractions.pop(next(iter(self._fractions)))
            self._fractions[budget] = out
        return out

    def kept(self, prompt_len: int, budget: float | None = None) -> tuple[int | None, ...]:
        """Per tier: blocks kept of a prompt of ``prompt_len`` tokens (None: that tier keeps every block)."""
        key = (prompt_len, budget)
        out = self._kept.get(key)
        if out is None:
            cfg = self.cfg
            out = tuple(kept_blocks(prompt_len, f, cfg.block_size, cfg.floor_blocks, self.min_prompt_tokens)
                        for f in self.fractions(budget))
            if len(self._kept) >= 4 * self.CACHE:
                self._kept.clear()
            self._kept[key] = out
        return out

    def compressed(self, prompt_len: int) -> bool:
        return is_compressed(prompt_len, self.cfg.block_size, self.cfg.floor_blocks, self.min_prompt_tokens)

    def cold_pages(self, prompt_len: int, budget: float | None = None) -> int:
        """Cold-tier pages a compressed request holds: one per complete prompt chunk (= block) of every dynamic
        head whose tier frees blocks (``adapter/cold_tier.py``)."""
        if not self.compressed(prompt_len):
            return 0
        heads = sum(n for n, k in zip(self._dynamic, self.kept(prompt_len, budget)) if k is not None)
        return heads * (prompt_len // self.cfg.block_size)


class TieredPolicy:
    """The core reference policy that the vLLM backend implements for one tier plan (the oracle of the tests).

    Per KV head, with its *tier's* budget: ``pruned`` heads are static, ``retrieve`` heads dynamic; a head whose
    tier frees nothing for this prompt, and every head of a prompt the backend does not compress (shorter than
    ``min_prompt_tokens``, or no block to free at the floor), is full. Implements ``core.policy.Policy``.
    """

    def __init__(self, profile, budget_plan: BudgetPlan, tiers: TierPlan, selection, min_prompt_tokens: int):
        self.profile, self.plan, self.tiers, self.selection = profile, budget_plan, tiers, selection
        self.min_prompt_tokens = min_prompt_tokens

    def _head_tokens(self, layer: int, head: int, prompt_len: int) -> int | None:
        cfg = self.plan.cfg
        fraction = self.tiers.tier(layer, head).fraction
        blocks = kept_blocks(prompt_len, fraction, cfg.block_size, cfg.floor_blocks, 0)
        return None if blocks is None else blocks * cfg.block_size

    def tokens_for(self, prompt_len: int) -> torch.Tensor:
        L, H = self.plan.fractions.shape
        return torch.tensor([[self._head_tokens(l, h, prompt_len) or prompt_len for h in range(H)]
                             for l in range(L)], dtype=torch.long)

    def rules(self, layer: int, prompt_len: int):
        from hybridkv_vllm.core.policy import HeadKind, LayerRules

        cfg = self.plan.cfg
        compressed = is_compressed(prompt_len, cfg.block_size, cfg.floor_blocks, self.min_prompt_tokens)
        kinds, budgets = [], []
        for head, mode in enumerate(self.tiers.modes[layer]):
            tokens = self._head_tokens(layer, head, prompt_len)
            if not compressed or tokens is None:
                kinds.append(HeadKind.FULL)
                budgets.append(prompt_len)
            else:
                kinds.append(HeadKind.STATIC if mode == PRUNED else HeadKind.DYNAMIC)
                budgets.append(tokens)
        return LayerRules(kinds=tuple(kinds), budgets=torch.tensor(budgets, dtype=torch.long), policy=self,
                          layer=layer)

    def select(self, view, kv_head: int, budget: int) -> torch.Tensor:
        from hybridkv_vllm.core.selection import select_static
        return select_static(view.head_scores(kv_head), view.is_visual, budget, view.selectable_len, self.selection)
