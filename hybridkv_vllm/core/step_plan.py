"""One step of the decode executor, planned once (FlashInfer's plan / run split; DESIGN §6).

Every per-row decision of a step is made here, once, in plain Python and small tensor operations; the per-layer
path (``adapter/backend.py`` with a :mod:`~hybridkv_vllm.adapter.kv_ops` implementation) then only runs tensor
operations on the plan's tensors, for all KV heads of a layer at a time.

The plan of a step holds, per budget tier (one KV-cache group of one-head virtual layers, ``core/tiers.py``):

* the block table rewritten for compressed rows past their prompt: ``table[:kept] ++ table[P // bs:]`` (vLLM's
  worker keeps the ids of the blocks the budget manager freed; they must never be read), with its sequence lengths
  ``kept * bs + seq_len - (P // bs) * bs``;
* the table as vLLM gave it (the step that completes a prompt reads the whole prompt through it);
* the slot mapping and ``kept`` (0: this tier keeps every block of that row);

and, for the whole step, the decode rows that retrieve (a compressed request's single-token decode rows: their
token, cold-tier slot, number of cold chunks ``P // bs`` and, per tier, ``k`` = the kept blocks) and the rows that
complete their prompt in this step (compaction of static heads, offload of dynamic heads to the cold tier: once
per request). Tiers are stacked into ``[T, ...]`` tensors so that a layer gathers the tables of its heads' tiers
with one index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from hybridkv_vllm.core.budgets import is_compressed


@dataclass(frozen=True)
class RowPlan:
    """One request row of a step."""

    req_id: str | None
    prompt_len: int | None        # None: unknown to HybridKV (a warm-up batch): never compressed
    computed: int                 # tokens already in the cache before this step
    q_start: int
    q_end: int
    seq_len: int
    compressed: bool              # min_prompt_tokens and the floor allow compression, and the request did not opt out
    budget: float | None = None   # the request's own budget (None: the server's; core.tiers.TierBudgets)

    @property
    def completes_prompt(self) -> bool:
        return self.prompt_len is not None and self.computed < self.prompt_len <= self.seq_len

    @property
    def after_prompt(self) -> bool:
        return self.prompt_len is not None and self.computed >= self.prompt_len

    @property
    def retrieves(self) -> bool:
        """A decode row of a compressed request: its dynamic heads retrieve chunks this step."""
        return self.compressed and self.after_prompt and self.q_end - self.q_start == 1


def plan_rows(req_ids: list[str | None], prompt_lens: list[int | None], query_start_loc: list[int],
              seq_lens: list[int], block_size: int, floor_blocks: int, min_prompt_tokens: int,
              budgets: list[float | None] | None = None, bypass: list[bool] | None = None) -> list[RowPlan]:
    """The step's rows; ``budgets`` / ``bypass``: each request's own budget and whether it runs uncompressed
    (its choice, or the cold tier's admission: ``adapter/requests.py``)."""
    rows = []
    for r, (req_id, p) in enumerate(zip(req_ids, prompt_lens)):
        q_start, q_end, seq_len = query_start_loc[r], query_start_loc[r + 1], seq_lens[r]
        compressed = (p is not None and not (bypass and bypass[r])
                      and is_compressed(p, block_size, floor_blocks, min_prompt_tokens))
        rows.append(RowPlan(req_id, p, seq_len - (q_end - q_start), q_start, q_end, seq_len, compressed,
                            budgets[r] if budgets else None))
    return rows


@dataclass
class GroupTables:
    """One tier's tensors for a step."""

    table: torch.Tensor           # int [R, M]: rewritten block table
    seq_lens: torch.Tensor        # int32 [R]: rewritten sequence lengths
    prompt_table: torch.Tensor    # int [R, M]: the table as vLLM gave it
    slots: torch.Tensor           # int64 [N]: slot of each token (-1: padding)
    kept: torch.Tensor            # int64 [R], on the host: blocks kept once the prompt is processed (0: all of them)


def rewrite_group(rows: list[RowPlan], table: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor,
                  kept_blocks: Callable[[int, float | None], int | None], block_size: int) -> GroupTables:
    """The tier's rewritten table: compressed rows past their prompt read ``table[:kept] ++ table[P // bs:]``;
    ``kept_blocks(prompt_len, request_budget)`` is the tier's rule (``core.tiers.TierBudgets.kept``)."""
    R, M, dev = len(rows), table.shape[1], table.device
    kept_list = [(kept_blocks(row.prompt_len, row.budget) or 0) if row.compressed and row.prompt_len is not None
                 else 0 for row in rows]
    kept = torch.tensor(kept_list, dtype=torch.long)                        # host: the plan's own bookkeeping
    table, seq_lens = table[:R], seq_lens[:R]
    rewrite_list = [row.after_prompt and k > 0 for row, k in zip(rows, kept_list)]
    if not any(rewrite_list):
        return GroupTables(table, seq_lens.to(torch.int32), table, slots.long(), kept)
    # the rewrite itself runs where vLLM's tables are (the device), from small host lists copied once
    kept_d = kept.to(dev, non_blocking=True)
    first_tail = torch.tensor([(row.prompt_len or 0) // block_size for row in rows], dtype=torch.long).to(dev)
    rewrite = torch.tensor(rewrite_list, dtype=torch.bool).to(dev)
    j = torch.arange(M, device=dev)[None, :]
    src = torch.where(j < kept_d[:, None], j, j - kept_d[:, None] + first_tail[:, None]).clamp(max=M - 1)
    rewritten = torch.where(rewrite[:, None], table.gather(1, src), table)
    new_lens = torch.where(rewrite, seq_lens.long() + (kept_d - first_tail) * block_size, seq_lens.long())
    return GroupTables(rewritten, new_lens.to(torch.int32), table, slots.long(), kept)


@dataclass
class DecodePlan:
    """The decode rows whose dynamic heads retrieve this step."""

    rows: torch.Tensor            # int64 [Rr]: row index in the step
    tokens: torch.Tensor          # int64 [Rr]: the row's query token
    cold_slots: torch.Tensor      # int64 [Rr]: the request's slot in the cold tier
    chunk_tokens: torch.Tensor    # int32 [Rr]: (P // bs) * bs: the cold chunks are the prompt's complete blocks
    k: torch.Tensor               # int64 [T, Rr]: chunks each tier retrieves (= its kept blocks; 0: none)
    k_max: int                    # padding width of the selections this step
    k_host: torch.Tensor          # ``k`` on the host (planning and accounting never read the device)
    chunks_host: torch.Tensor     # int64 [Rr] on the host: cold chunks of each row (P // bs)


@dataclass
class StepPlan:
    rows: list[RowPlan]
    num_tokens: int
    query_start_loc: torch.Tensor                         # int32 [R + 1]
    block_size: int
    groups: dict[int, GroupTables] = field(default_factory=dict)
    # stacked by finalize(): [T, ...] in tier order
    tables: torch.Tensor | None = None                    # [T, R, M]
    seq_lens: torch.Tensor | None = None                  # int32 [T, R]
    prompt_tables: torch.Tensor | None = None             # [T, R, M]
    slots: torch.Tensor | None = None                     # int64 [T, N]
    kept: torch.Tensor | None = None                      # int64 [T, R], on the host
    decode: DecodePlan | None = None
    completing: list[int] = field(default_factory=list)   # rows that complete a compressed prompt
    prefill_rows: list[int] = field(default_factory=list)  # rows with more than one query token
    single_rows: torch.Tensor | None = None               # int64: rows with exactly one query token
    single_tokens: torch.Tensor | None = None             # int64: their query token
    cache: dict = field(default_factory=dict)             # per-step values an implementation derives once

    @property
    def finalized(self) -> bool:
        return self.tables is not None

    def add_group(self, tier: int, tables: GroupTables) -> None:
        self.groups[tier] = tables

    def has_group(self, tier: int) -> bool:
        return tier in self.groups

    def finalize(self, num_tiers: int, cold_slot: Callable[[str | None], int | None]) -> None:
        """Stack the tiers and plan retrieval (after every group was built)."""
        if self.finalized:
            return
        missing = [t for t in range(num_tiers) if t not in self.groups]
        if missing:
            raise RuntimeError(f"HybridKV step plan: no block table for tiers {missing}")
        order = [self.groups[t] for t in range(num_tiers)]
        width = max(g.table.shape[1] for g in order)

        def pad(x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.shape[1] < width else x

        self.tables = torch.stack([pad(g.table).long() for g in order])
        self.prompt_tables = torch.stack([pad(g.prompt_table).long() for g in order])
        self.seq_lens = torch.stack([g.seq_lens for g in order])
        self.slots = torch.stack([g.slots[:self.num_tokens] for g in order])
        self.kept = torch.stack([g.kept for g in order])
        self.completing = [r for r, row in enumerate(self.rows) if row.compressed and row.completes_prompt]
        self.prefill_rows = [r for r, row in enumerate(self.rows) if row.q_end - row.q_start > 1]
        dev = self.tables.device

        def device_tensor(values: list[int], dtype=torch.long) -> torch.Tensor:     # host list -> one copy
            return torch.tensor(values, dtype=dtype).to(dev, non_blocking=True)

        single = [r for r, row in enumerate(self.rows) if row.q_end - row.q_start == 1]
        self.single_rows = device_tensor(single)
        self.single_tokens = device_tensor([self.rows[r].q_start for r in single])
        retrieving = [(r, cold_slot(row.req_id)) for r, row in enumerate(self.rows) if row.retrieves]
        found = [(r, s) for r, s in retrieving if s is not None]
        if found:
            rows = [r for r, _ in found]
            k = self.kept[:, torch.tensor(rows, dtype=torch.long)]
            chunks = [(self.rows[r].prompt_len or 0) // self.block_size for r in rows]       # retrieving: known
            self.decode = DecodePlan(
                rows=device_tensor(rows), tokens=device_tensor([self.rows[r].q_start for r in rows]),
                cold_slots=device_tensor([s for _, s in found]),
                chunk_tokens=device_tensor([c * self.block_size for c in chunks], torch.int32),
                k=k.to(dev, non_blocking=True), k_max=max(1, int(k.max())), k_host=k,
                chunks_host=torch.tensor(chunks, dtype=torch.long))
