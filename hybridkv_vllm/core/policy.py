"""Per-head KV policies: HybridKV and the baselines it is compared with (used by the reference and the eval).

A policy is a small frozen dataclass with two verbs:

- ``rules(layer, prompt_len) -> LayerRules``: each KV head's :class:`HeadKind` and token budget for a prompt;
- ``select(view, kv_head, budget) -> LongTensor``: the prompt tokens a STATIC head keeps at prompt end.

============  ==========================================================================================
policy        rule
============  ==========================================================================================
``full``      every head FULL (nothing evicted)
``hybridkv``  profile's static heads: text-prior :func:`select_static`; dynamic heads: chunk retrieval;
              budgets from :func:`allocate` on the profile
``streaming`` every head STATIC, uniform budget: the ``sink_tokens`` first tokens + the newest ones
``snapkv``    every head STATIC, uniform budget: sinks, recent, then observation-window score (no text prior)
``random``    every head STATIC, uniform budget: uniformly random tokens, seeded per (seed, layer, head)
============  ==========================================================================================

Baselines use :func:`uniform_plan` with the same :class:`BudgetConfig`: all heads static with equal weights, so
each head's fraction is ``budget`` and the total ``budget * N * P`` equals HybridKV's (fair comparison).

Choice: ``BudgetConfig.block_size`` must equal ``SelectionConfig.chunk_size`` (DESIGN §4: chunk = KV block);
policies raise :class:`ConfigError` otherwise.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Protocol

import torch

from hybridkv_vllm.core.budgets import BudgetConfig, BudgetPlan, allocate, uniform_plan
from hybridkv_vllm.core.errors import ConfigError
from hybridkv_vllm.core.profile import HeadProfile
from hybridkv_vllm.core.selection import SelectionConfig, select_static


class HeadKind(enum.Enum):
    """How a KV head's cache is treated during decode."""

    FULL = "full"          # every token
    STATIC = "static"      # tokens kept at prompt end + tail block + generated tokens
    DYNAMIC = "dynamic"    # top-k chunks of the full context, re-chosen every decode step


@dataclass(frozen=True)
class PromptView:
    """What a static selector sees of one layer at prompt end.

    Attributes
    ----------
    scores : torch.Tensor | None
        ``float32 [H, P]`` text-prior scores (None when no observation queries were given).
    is_visual : torch.Tensor
        ``bool [P]``.
    selectable_len : int
        ``P_aligned``; selections are ``< selectable_len``.
    layer : int
    """

    scores: torch.Tensor | None
    is_visual: torch.Tensor
    selectable_len: int
    layer: int

    def head_scores(self, kv_head: int) -> torch.Tensor:
        if self.scores is None:
            raise ConfigError("this policy needs text-prior scores: pass q_obs to the cache's prefill")
        return self.scores[kv_head]


@dataclass(frozen=True)
class LayerRules:
    """Per-KV-head rules of one layer for one prompt.

    Attributes
    ----------
    kinds : tuple[HeadKind, ...]
        ``[H]``.
    budgets : torch.Tensor
        ``int64 [H]`` token budgets (whole chunks, tail block not counted; FULL heads: ``P``).
    policy : Policy
        The policy whose :meth:`select` picks a static head's tokens.
    layer : int
    """

    kinds: tuple[HeadKind, ...]
    budgets: torch.Tensor
    policy: Policy
    layer: int


class Policy(Protocol):
    @property
    def selection(self) -> SelectionConfig: ...

    def rules(self, layer: int, prompt_len: int) -> LayerRules: ...

    def tokens_for(self, prompt_len: int) -> torch.Tensor: ...

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor: ...


def _check_chunking(budget: BudgetConfig, selection: SelectionConfig) -> None:
    if budget.block_size != selection.chunk_size:
        raise ConfigError(f"BudgetConfig.block_size={budget.block_size} must equal "
                          f"SelectionConfig.chunk_size={selection.chunk_size}")


def _rules_from_plan(policy: Policy, plan: BudgetPlan, kinds: torch.Tensor, layer: int,
                     prompt_len: int) -> LayerRules:
    """``kinds``: ``bool [L, H]`` True for STATIC, False for DYNAMIC."""
    if not 0 <= layer < plan.fractions.shape[0]:
        raise ConfigError(f"layer={layer}: expected in [0, {plan.fractions.shape[0]})")
    row = tuple(HeadKind.STATIC if s else HeadKind.DYNAMIC for s in kinds[layer].tolist())
    return LayerRules(kinds=row, budgets=plan.tokens_for(prompt_len)[layer], policy=policy, layer=layer)


# ------------------------------------------------------------------------------------------------------ policies
@dataclass(frozen=True)
class FullPolicy:
    """No compression: every head attends to every token."""

    num_layers: int
    num_kv_heads: int
    selection: SelectionConfig = SelectionConfig()

    def tokens_for(self, prompt_len: int) -> torch.Tensor:
        """``int64 [L, H]``: every head keeps the whole prompt."""
        return torch.full((self.num_layers, self.num_kv_heads), prompt_len, dtype=torch.long)

    def rules(self, layer: int, prompt_len: int) -> LayerRules:
        budgets = self.tokens_for(prompt_len)[layer]
        return LayerRules(kinds=(HeadKind.FULL,) * self.num_kv_heads, budgets=budgets, policy=self, layer=layer)

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        return torch.arange(view.selectable_len, dtype=torch.long)


@dataclass(frozen=True)
class HybridKVPolicy:
    """HybridKV: static heads pruned by text prior, dynamic heads retrieve chunks (budgets from the profile)."""

    profile: HeadProfile
    budget: BudgetConfig
    selection: SelectionConfig = SelectionConfig()
    plan: BudgetPlan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_chunking(self.budget, self.selection)
        object.__setattr__(self, "plan", allocate(self.profile, self.budget))

    def tokens_for(self, prompt_len: int) -> torch.Tensor:
        """``int64 [L, H]`` token budgets (:meth:`BudgetPlan.tokens_for`)."""
        return self.plan.tokens_for(prompt_len)

    def rules(self, layer: int, prompt_len: int) -> LayerRules:
        return _rules_from_plan(self, self.plan, self.plan.is_static, layer, prompt_len)

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        return select_static(view.head_scores(kv_head), view.is_visual, budget, view.selectable_len, self.selection)


@dataclass(frozen=True)
class _UniformStaticPolicy:
    """Base of the baselines: every head STATIC with the uniform budget ``budget.budget``."""

    num_layers: int
    num_kv_heads: int
    budget: BudgetConfig
    selection: SelectionConfig = SelectionConfig()
    plan: BudgetPlan = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_chunking(self.budget, self.selection)
        object.__setattr__(self, "plan", uniform_plan(self.num_layers, self.num_kv_heads, self.budget))

    def tokens_for(self, prompt_len: int) -> torch.Tensor:
        """``int64 [L, H]`` token budgets (:meth:`BudgetPlan.tokens_for`)."""
        return self.plan.tokens_for(prompt_len)

    def rules(self, layer: int, prompt_len: int) -> LayerRules:
        return _rules_from_plan(self, self.plan, self.plan.is_static, layer, prompt_len)

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        raise NotImplementedError            # each baseline below chooses its tokens


@dataclass(frozen=True)
class StreamingPolicy(_UniformStaticPolicy):
    """StreamingLLM: the first ``sink_tokens`` tokens and the newest ones."""

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        n = view.selectable_len
        budget = min(budget, n)
        n_sink = min(self.selection.sink_tokens, budget)
        return torch.cat([torch.arange(n_sink), torch.arange(n - (budget - n_sink), n)]).to(torch.long)


@dataclass(frozen=True)
class SnapKVPolicy(_UniformStaticPolicy):
    """SnapKV-like: sinks, recent window, then observation-window scores over all tokens (no text prior)."""

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        no_visual = torch.zeros_like(view.is_visual, dtype=torch.bool)
        return select_static(view.head_scores(kv_head), no_visual, budget, view.selectable_len, self.selection)


@dataclass(frozen=True)
class RandomPolicy(_UniformStaticPolicy):
    """Uniformly random kept tokens, reproducible per ``(seed, layer, kv_head)``."""

    seed: int = 0

    def select(self, view: PromptView, kv_head: int, budget: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + view.layer * 1_009 + kv_head)
        perm = torch.randperm(view.selectable_len, generator=gen)[: min(budget, view.selectable_len)]
        return torch.sort(perm).values


POLICIES = ("full", "hybridkv", "streaming", "snapkv", "random")


def make_policy(name: str, profile: HeadProfile, budget: BudgetConfig,
                selection: SelectionConfig = SelectionConfig(), seed: int = 0) -> Policy:
    """Build a policy by name (one of :data:`POLICIES`) for the model of ``profile``."""
    L, H = profile.num_layers, profile.num_kv_heads
    if name == "full":
        return FullPolicy(L, H, selection)
    if name == "hybridkv":
        return HybridKVPolicy(profile, budget, selection)
    if name == "streaming":
        return StreamingPolicy(L, H, budget, selection)
    if name == "snapkv":
        return SnapKVPolicy(L, H, budget, selection)
    if name == "random":
        return RandomPolicy(L, H, budget, selection, seed=seed)
    raise ConfigError(f"policy={name!r}: expected one of {POLICIES}")
