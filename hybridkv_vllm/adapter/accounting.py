"""Per-step accounting of what compression saves, published as the plugin's Prometheus metrics.

Runs in the worker (once per scheduler step, from the first metadata builder that sees the step's batch):
blocks held by compressed requests against what they would hold uncompressed, compressed versus bypassed
requests, tokens kept per head type, compression time at prefill and retrieval traffic. The block figures
follow the same rule as the budget manager that actually frees the blocks (``core.tiers.TierBudgets``, with each
request's own budget), so the gauges and vLLM's ``kv_cache_usage_perc`` tell the same story.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from hybridkv_vllm.adapter import metrics
from hybridkv_vllm.core.tiers import RETRIEVE, TierBudgets


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class StepAccounting:
    budgets: TierBudgets
    block_bytes: int
    compress_seconds: float = 0.0
    chunk_loads: int = 0
    swap_in_bytes: int = 0
    chunks_scored: int = 0
    _last_batch: object = field(default=None, repr=False)

    @property
    def block_size(self) -> int:
        return self.budgets.cfg.block_size

    def held_blocks(self, prompt_len: int, num_tokens: int, budget: float | None = None) -> tuple[int, int]:
        """(blocks held, blocks uncompressed) of one compressed request holding ``num_tokens`` tokens."""
        bs, full = self.block_size, _cdiv(num_tokens, self.block_size)
        kept = self.budgets.kept(prompt_len, budget)
        held = sum(full if k is None else k + full - prompt_len // bs for k in kept)
        return held, full * len(kept)

    def tokens_kept(self, prompt_len: int, budget: float | None = None) -> tuple[dict[str, int], dict[str, int]]:
        kept = {"static": 0, "dynamic": 0}
        total = {"static": 0, "dynamic": 0}
        tail = prompt_len - (prompt_len // self.block_size) * self.block_size
        tiers = self.budgets.tiers
        for tier, blocks in zip(tiers.tiers, self.budgets.kept(prompt_len, budget)):
            for layer, head in tier.heads:
                kind = "dynamic" if tiers.modes[layer][head] == RETRIEVE else "static"
                kept[kind] += prompt_len if blocks is None else blocks * self.block_size + tail
                total[kind] += prompt_len
        return kept, total

    def idle(self) -> None:
        """No request is left in the worker: nothing is held."""
        metrics.set_blocks(0, 0, self.block_bytes)
        self._last_batch = None

    def observe(self, batch, rows, cold_tier_bytes: int = 0) -> None:
        """Publish the step's figures; ``rows`` are the builder's RowPlans. Once per ``batch`` object."""
        if batch is self._last_batch:
            return
        self._last_batch = batch
        held = uncompressed = 0
        for r, row in enumerate(rows):
            if row.prompt_len is None:
                continue
            if row.completes_prompt:
                if row.compressed:
                    kept, total = self.tokens_kept(row.prompt_len, row.budget)
                    metrics.record_compression(kept, total, seconds=None)
                else:
                    setting = batch.rows[r].setting if r < len(batch.rows) else None
                    metrics.record_bypass(setting.bypass if setting and setting.bypass else "short_prompt")
            if row.compressed and row.after_prompt:
                h, u = self.held_blocks(row.prompt_len, row.seq_len, row.budget)
                held, uncompressed = held + h, uncompressed + u
        metrics.set_blocks(held, uncompressed, self.block_bytes, cold_tier_bytes)
        if self.compress_seconds:
            metrics.get_metrics().compression_time.observe(self.compress_seconds)
            self.compress_seconds = 0.0
        if self.chunk_loads or self.chunks_scored:
            metrics.record_retrieval(self.chunk_loads, self.chunks_scored, swap_in_bytes=self.swap_in_bytes)
            self.chunk_loads = self.chunks_scored = self.swap_in_bytes = 0
