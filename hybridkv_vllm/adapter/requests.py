"""Per-request HybridKV settings and the cold tier's run-time bound, decided once per request by the scheduler.

**A request's own budget.** A client sets ``"vllm_xargs": {"hybridkv_budget": 0.2}`` in an OpenAI request (a kept
share in (0, 1], turned into per-tier blocks by ``core.tiers.TierBudgets``), or ``{"hybridkv_budget": "off"}`` to be
served uncompressed; offline, ``SamplingParams(extra_args={"hybridkv_budget": ...})``. vLLM's API server checks the
value as the request arrives (:func:`validate_extra_args`, wrapped around vLLM's request validation in patches.py):
a bad value is an HTTP 400 naming it, and nothing reaches the engine.

**The cold tier's bound at run time.** A compressed request holds cold-tier pages for its dynamic heads' prompt
chunks from the step that completes its prompt until it finishes (``TierBudgets.cold_pages`` pages of
``cold_tier.page_bytes`` each). When the scheduler first sends a request to the worker, :class:`Admission`
reserves those bytes; it releases them when the request finishes (reservations survive preemption: a preempted
request offloads its prompt again when it resumes). A request whose reservation would pass ``cold_tier_gib`` is
served uncompressed: its KV stays in vLLM's pool, whose own admission accounts for it, so nothing fails and no
other request is affected. It is counted in ``hybridkv:requests_bypassed_total{reason="cold_tier_full"}`` (by the
worker, when its prompt completes) and logged once, as a warning naming the settings to change (the metric and the
alert rules carry the rest).

**One decision, two readers.** The scheduler writes its decision into the request's extra arguments
(:data:`RESOLVED`), which reach the worker with the request's first schedule; the budget manager (kv_spec.py) reads
the same decision from :class:`Admission`. Both sides therefore free, read and offload the same blocks.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from hybridkv_vllm.core.tiers import TierBudgets

logger = logging.getLogger("hybridkv")

XARG_BUDGET = "hybridkv_budget"          # the client's key in vllm_xargs / SamplingParams.extra_args
OFF = "off"
RESOLVED = "hybridkv_resolved"           # written by the scheduler: {"budget": float | None, "bypass": str | None}
OPT_OUT, COLD_TIER_FULL = "opt_out", "cold_tier_full"     # bypass reasons (metrics.BYPASS_REASONS)


class RequestSettingError(ValueError):
    """A request's HybridKV setting is invalid (HTTP 400 in the API server)."""


def parse_budget(extra_args: dict[str, Any] | None) -> tuple[float | None, bool]:
    """``(budget, opt_out)`` of a request's extra arguments; ``budget`` None: the server's."""
    if not extra_args or XARG_BUDGET not in extra_args:
        return None, False
    value = extra_args[XARG_BUDGET]
    if isinstance(value, str) and value.strip().lower() == OFF:
        return None, True
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise RequestSettingError(f"vllm_xargs.{XARG_BUDGET}={value!r}: expected a kept share of the KV cache in "
                                  f"(0, 1], or {OFF!r} to serve this request uncompressed")
    return float(value), False


def validate_extra_args(extra_args: dict[str, Any] | None) -> None:
    """The API server's check (raises :class:`RequestSettingError`)."""
    parse_budget(extra_args)


@dataclass(frozen=True)
class RequestSetting:
    budget: float | None = None           # None: the server's budget
    bypass: str | None = None             # served uncompressed: OPT_OUT, COLD_TIER_FULL
    cold_bytes: int = 0                   # cold-tier bytes reserved for it

    def as_extra_arg(self) -> dict[str, Any]:
        return {"budget": self.budget, "bypass": self.bypass}

    @classmethod
    def of(cls, extra_args: dict[str, Any] | None) -> RequestSetting:
        """The scheduler's decision as the worker receives it (the server's defaults when there is none)."""
        resolved = extra_args.get(RESOLVED) if extra_args else None
        if not resolved or (resolved.get("budget") is None and resolved.get("bypass") is None):
            return DEFAULT
        return cls(budget=resolved.get("budget"), bypass=resolved.get("bypass"))


DEFAULT = RequestSetting()


class Admission:
    """The scheduler side's per-request decisions and the cold tier's reservations (one per engine)."""

    def __init__(self, budgets: TierBudgets, page_bytes: int, max_bytes: int | None) -> None:
        self.budgets, self.page_bytes, self.max_bytes = budgets, page_bytes, max_bytes
        self.settings: dict[str, RequestSetting] = {}
        self.reserved = 0
        self.refused = 0

    def admit(self, req_id: str, prompt_len: int, extra_args: dict[str, Any] | None) -> RequestSetting:
        """Decide once for a request (later calls return the first decision)."""
        setting = self.settings.get(req_id)
        if setting is not None:
            return setting
        try:
            budget, opt_out = parse_budget(extra_args)
        except RequestSettingError as err:        # the API server refuses these; an engine-level caller did not
            logger.warning("HybridKV: request %s served with the server's budget: %s", req_id, err)
            budget, opt_out = None, False
        if opt_out:
            setting = RequestSetting(budget, OPT_OUT)
        else:
            nbytes = self.budgets.cold_pages(prompt_len, budget) * self.page_bytes
            if self.max_bytes is not None and nbytes and self.reserved + nbytes > self.max_bytes:
                setting = RequestSetting(budget, COLD_TIER_FULL)
                if not self.refused:
                    logger.warning("HybridKV: the cold tier is full (%.1f of %.1f MiB reserved; request %s needs "
                                   "%.1f MiB): requests past hybridkv.cold_tier_gib are served uncompressed, in "
                                   "vLLM's pool, and counted in hybridkv:requests_bypassed_total"
                                   "{reason=\"cold_tier_full\"} (logged once; raise hybridkv.cold_tier_gib or lower "
                                   "--max-num-seqs)", self.reserved / 2**20, self.max_bytes / 2**20, req_id,
                                   nbytes / 2**20)
                self.refused += 1
            else:
                setting = RequestSetting(budget, None, nbytes)
                self.reserved += nbytes
        self.settings[req_id] = setting
        return setting

    def release(self, req_id: str) -> None:
        setting = self.settings.pop(req_id, None)
        if setting is not None:
            self.reserved -= setting.cold_bytes

    def kept_blocks(self, req_id: str, tier: int, prompt_len: int) -> int | None:
        """Blocks tier ``tier`` keeps of this request's prompt (None: it keeps every block)."""
        setting = self.settings.get(req_id, DEFAULT)
        if setting.bypass is not None:
            return None
        return self.budgets.kept(prompt_len, setting.budget)[tier]
