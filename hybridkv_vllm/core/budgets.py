"""Top-down KV budget allocator: total -> head type (ratio ``r``) -> head (DESIGN §3).

With ``N = L * H`` heads, ``n_s`` static and ``n_d`` dynamic, a head's budget as a fraction of the prompt is

- static:  ``f_h = budget * N * n_s / (n_s + r n_d) * w_h / sum_static(w)``
- dynamic: ``f_h = budget * N * r / (n_s + r n_d)``

capped at 1 (a head cannot keep more than the whole prompt): heads the formula gives more than 1 keep the whole
prompt and the excess goes to the others in proportion (water-filling: ``f'_h = min(1, lam * f_h)`` with ``lam >= 1``
chosen so the total ``budget * N`` is unchanged). So at ``budget = 1`` every head keeps everything (dense, DESIGN §5),
and no budget is wasted on a head past its prompt. Its token budget for a prompt of ``P`` tokens (whole blocks;
``P_aligned = bs * (P // bs)``) is
``min(P_aligned, max(floor_blocks * bs, bs * floor(f_h * P / bs)))``. The prompt's partial tail block
``[P_aligned, P)`` is always kept on top and is not counted.

Note on the DESIGN §3 invariant ``sum <= max(T(P), N * floor)``: the formula above raises heads below the floor
without taking those tokens from other heads, so with skewed static weights the sum can exceed that bound.
The bound the formula does satisfy (and the tests check) is ``sum <= T(P) + n_raised * floor_tokens``, with
``n_raised`` the heads lifted to the floor; it reduces to the DESIGN bound when no head or every head is floored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from hybridkv_vllm.core.errors import BudgetError

if TYPE_CHECKING:
    from hybridkv_vllm.core.profile import HeadProfile


@dataclass(frozen=True, slots=True)
class BudgetConfig:
    """Budget hyperparameters.

    Parameters
    ----------
    budget : float
        Share of the full KV cache to keep, in (0, 1].
    r : float
        Per-head budget ratio dynamic : static (> 0).
    block_size : int
        KV block size in tokens (= selection chunk size); budgets are whole blocks.
    floor_blocks : int
        Minimum blocks per head (>= 0).
    """

    budget: float
    # [choice] 2 (a dynamic head gets twice a static head's share) was chosen on the validation set, not the
    # evaluation prompts: benchmarks/results/fidelity/validation_budget_split.md
    r: float = 2.0
    block_size: int = 16
    floor_blocks: int = 2

    def __post_init__(self) -> None:
        if not isinstance(self.budget, (int, float)) or not 0.0 < float(self.budget) <= 1.0:
            raise BudgetError(f"budget={self.budget!r}: expected a fraction in (0, 1]")
        if not isinstance(self.r, (int, float)) or not float(self.r) > 0.0:
            raise BudgetError(f"r={self.r!r}: expected a ratio > 0")
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise BudgetError(f"block_size={self.block_size!r}: expected an integer >= 1")
        if not isinstance(self.floor_blocks, int) or self.floor_blocks < 0:
            raise BudgetError(f"floor_blocks={self.floor_blocks!r}: expected an integer >= 0")

    @property
    def floor_tokens(self) -> int:
        return self.floor_blocks * self.block_size


@dataclass(frozen=True)
class BudgetPlan:
    """Per-head budget fractions of one model under one :class:`BudgetConfig`.

    Attributes
    ----------
    fractions : torch.Tensor
        ``float64 [L, H]``: each head's share of the prompt (may exceed 1; :meth:`tokens_for` caps it).
    is_static : torch.Tensor
        ``bool [L, H]``: the head types the plan was made for.
    cfg : BudgetConfig
    """

    fractions: torch.Tensor
    is_static: torch.Tensor
    cfg: BudgetConfig

    @property
    def num_heads(self) -> int:
        return int(self.fractions.numel())

    def total_tokens(self, prompt_len: int) -> float:
        """``T(P) = budget * N * P``."""
        return float(self.cfg.budget) * self.num_heads * prompt_len

    def tokens_for(self, prompt_len: int) -> torch.Tensor:
        """``int64 [L, H]`` token budgets (whole blocks) for a prompt of ``prompt_len`` tokens: :func:`kept_blocks`
        for every head at once (``kept * bs``, or the aligned prompt where it keeps everything)."""
        if not isinstance(prompt_len, int) or prompt_len < 0:
            raise BudgetError(f"prompt_len={prompt_len!r}: expected an integer >= 0")
        bs = self.cfg.block_size
        p_aligned = bs * (prompt_len // bs)
        blocks = torch.floor(self.fractions * prompt_len / bs).to(torch.int64)
        tokens = torch.clamp(blocks * bs, min=self.cfg.floor_tokens)
        return torch.clamp(tokens, max=p_aligned)


def _types_and_weights(heads: HeadProfile | tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(heads, tuple):
        if len(heads) != 2:
            raise BudgetError(f"expected (is_static [L, H], weights [L, H]), got a tuple of {len(heads)}")
        is_static, weights = heads
    else:
        is_static, weights = heads.is_static, heads.weights
    is_static = torch.as_tensor(is_static, dtype=torch.bool).cpu()
    weights = torch.as_tensor(weights, dtype=torch.float64).cpu()
    if is_static.dim() != 2 or is_static.shape != weights.shape or is_static.numel() == 0:
        raise BudgetError(f"is_static {tuple(is_static.shape)} and weights {tuple(weights.shape)}: "
                          "expected the same non-empty [L, H] shape")
    static_w = weights[is_static]
    if static_w.numel() and not bool(torch.all(torch.isfinite(static_w) & (static_w > 0))):
        raise BudgetError(f"static head weights must be finite and > 0, got min {float(static_w.min())!r}")
    return is_static, weights


def allocate(heads: HeadProfile | tuple[torch.Tensor, torch.Tensor], cfg: BudgetConfig) -> BudgetPlan:
    """Allocate per-head budget fractions top-down (DESIGN §3).

    Parameters
    ----------
    heads : HeadProfile or (torch.Tensor, torch.Tensor)
        A profile, or ``(is_static bool [L, H], weights float [L, H])`` (weights of dynamic heads are ignored).
    cfg : BudgetConfig

    Returns
    -------
    BudgetPlan
    """
    is_static, weights = _types_and_weights(heads)
    n = is_static.numel()
    n_s = int(is_static.sum())
    n_d = n - n_s
    b, r = float(cfg.budget), float(cfg.r)
    denom = n_s + r * n_d
    fractions = torch.full(is_static.shape, b * n * r / denom, dtype=torch.float64)
    if n_s:
        w = torch.where(is_static, weights, torch.zeros_like(weights))
        static_f = b * n * n_s / denom * w / w.sum()
        fractions = torch.where(is_static, static_f, fractions)
    return BudgetPlan(fractions=cap_at_one(fractions), is_static=is_static, cfg=cfg)


def cap_at_one(fractions: torch.Tensor) -> torch.Tensor:
    """``min(1, lam * f)`` with the ``lam >= 1`` that keeps ``sum(f)`` (or ``N`` if ``sum(f) >= N``): water-filling."""
    flat = fractions.flatten().to(torch.float64)
    total = min(float(flat.sum()), float(flat.numel()))
    if float(flat.max()) <= 1.0:
        return fractions.clone()
    order = torch.sort(flat, descending=True).values
    suffix = torch.flip(torch.cumsum(torch.flip(order, [0]), 0), [0])      # suffix[k] = sum(order[k:])
    for capped in range(1, flat.numel() + 1):
        rest = float(suffix[capped]) if capped < flat.numel() else 0.0
        lam = (total - capped) / rest if rest > 0 else float("inf")
        if capped == flat.numel() or lam * float(order[capped]) <= 1.0:
            return torch.clamp(fractions * lam, max=1.0) if rest > 0 else torch.ones_like(fractions)
    return torch.ones_like(fractions)


def uniform_plan(num_layers: int, num_kv_heads: int, cfg: BudgetConfig) -> BudgetPlan:
    """Every head gets the same fraction (``budget``): all heads static with equal weights (for baselines)."""
    shape = (num_layers, num_kv_heads)
    return allocate((torch.ones(shape, dtype=torch.bool), torch.ones(shape, dtype=torch.float64)), cfg)


def tp_owned_heads(num_kv_heads: int, world: int) -> list[list[int]]:
    """Per tensor-parallel rank, the KV heads it holds, by vLLM's partitioning: ``H % world == 0`` gives rank ``r``
    the contiguous heads ``[r H / world, (r + 1) H / world)``; ``world % H == 0`` gives it the replicated head
    ``r H // world``. Slot ``j`` of every rank is its ``j``-th head (its attention layer's local KV head ``j``)."""
    if world < 1:
        raise BudgetError(f"tensor-parallel world {world}: expected >= 1")
    if num_kv_heads % world == 0:
        per = num_kv_heads // world
        return [list(range(r * per, (r + 1) * per)) for r in range(world)]
    if world % num_kv_heads == 0:
        return [[r * num_kv_heads // world] for r in range(world)]
    raise BudgetError(f"num_kv_heads {num_kv_heads} and tensor-parallel world {world}: neither divides the other")


def fold_for_tp(plan: BudgetPlan, world: int, rank: int | None = None) -> BudgetPlan:
    """The plan of the head *slots* that every tensor-parallel rank shares (``[L, H / world]``).

    vLLM keeps one KV-cache configuration for all ranks: a KV-cache group (a budget tier) and its block table are
    the same on every rank, and the scheduler frees blocks per group, with no rank in sight. So the slot ``j`` of
    layer ``l`` (on each rank, that rank's ``j``-th head of layer ``l``) gets one budget on every rank: the largest
    fraction among the heads the ranks place there (promotion only, the rule :func:`~core.tiers.plan_tiers` uses
    for a tier). ``is_static`` is ``rank``'s own head types; ``rank`` None (the scheduler, which has no rank) gives
    a slot dynamic if it is dynamic on any rank, the larger cold-tier reservation.
    """
    if world == 1:
        return plan
    owned = tp_owned_heads(plan.fractions.shape[1], world)
    fractions = torch.stack([plan.fractions[:, heads] for heads in owned]).amax(0)
    if rank is None:
        is_static = torch.stack([plan.is_static[:, heads] for heads in owned]).all(0)
    else:
        is_static = plan.is_static[:, owned[rank]]
    return BudgetPlan(fractions=fractions, is_static=is_static, cfg=plan.cfg)


def kept_blocks(prompt_len: int, fraction: float, block_size: int, floor_blocks: int,
                min_prompt_tokens: int) -> int | None:
    """Blocks a budget-tier head keeps for a prompt of ``prompt_len`` tokens, or None if it is not compressed.

    THE budget rule, stated once: ``max(floor, floor(f * P / bs))`` blocks, None where that keeps every complete
    block (nothing to free) or the prompt is shorter than ``min_prompt_tokens``. :meth:`BudgetPlan.tokens_for` is
    its vectorised twin over every head (``min(P_aligned, ...)`` in tokens: a None is the whole aligned prompt;
    ``tests/core/test_core_budgets.py`` holds the two equal). Shared by the scheduler-side manager (which frees
    blocks ``[kept, P // bs)``) and the worker (which compacts into and reads from blocks ``[0, kept)``). None: the
    prompt is shorter than ``min_prompt_tokens`` or nothing would be freed; the request then runs uncompressed in
    every tier.
    """
    if prompt_len < max(min_prompt_tokens, 1):
        return None
    aligned = prompt_len // block_size
    blocks = max(floor_blocks, math.floor(fraction * prompt_len / block_size))
    return None if blocks >= aligned else blocks


def is_compressed(prompt_len: int, block_size: int, floor_blocks: int, min_prompt_tokens: int) -> bool:
    """Whether a request is compressed at all (its budget tiers free something at the floor budget)."""
    return kept_blocks(prompt_len, 0.0, block_size, floor_blocks, min_prompt_tokens) is not None
