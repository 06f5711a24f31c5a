"""Dynamic heads' work in a layer: offload to the cold tier when a prompt completes, retrieval at each decode step.

* :func:`offload` (the step that completes a compressed prompt; once per request): each dynamic head with a budget
  for this prompt copies its complete prompt chunks (pages ``[0, P // bs)``) to the request's cold pages and writes
  their Quest summaries. The budget manager then frees pages ``[kept, P // bs)``; ``[0, kept)`` become the hot
  buffer, which holds chunks ``0 .. kept - 1`` to begin with (the cold tier's ``resident`` says so).
* :func:`retrieve` (every decode step, before attention): for all retrieving rows and dynamic heads of the layer
  at once, the query scores the cold summaries (GQA-summed Quest bound), selects ``k`` chunks (sink, the prompt's
  last complete chunk, top scores; ``hybridkv_kernels.chunk_scoring``), the hot buffer is reassigned
  (``core.hot_buffer.assign_slots``) and only the slots whose chunk changed are copied in
  (``hybridkv_kernels.swap_in``). Tensor operations only: no per-row loop, no host synchronisation, fixed shapes.
"""
from __future__ import annotations

import torch

from hybridkv_vllm.adapter.kv_ops import KVOps, LayerHeads
from hybridkv_vllm.core.hot_buffer import assign_slots
from hybridkv_vllm.core.step_plan import StepPlan


def retrieve(ops: KVOps, plan: StepPlan, heads: LayerHeads, pool: torch.Tensor, cold, query: torch.Tensor,
             loads: torch.Tensor) -> None:
    """Fill the hot buffers of the layer's dynamic heads for this step's decode rows; adds the chunks copied in
    to ``loads`` (a counter tensor, read once per step by the accounting)."""
    dec = plan.decode
    dyn, cold_heads = heads.dynamic, heads.cold_heads
    rows, num_dyn = dec.rows.numel(), dyn.numel()
    n_q, hq, d = query.shape
    h = len(heads.signature)
    g = hq // h
    q = query[dec.tokens].view(rows, h, g, d)[:, dyn].reshape(rows, num_dyn * g, d)
    cold_table = cold.table[dec.cold_slots][:, cold_heads]                          # [Rr, Hd, C]
    k = dec.k[heads.tiers[dyn]].transpose(0, 1)                                     # [Rr, Hd]
    width = dec.k_max
    nc = cold.kmin.shape[0]
    chosen = ops.select(q, cold.kmin[:, None, :].expand(nc, num_dyn, d), cold.kmax[:, None, :].expand(nc, num_dyn, d),
                        cold_table, dec.chunk_tokens, width, k)
    index = (dec.cold_slots[:, None], cold_heads[None, :])
    resident = cold.resident[index][..., :width]
    new, moved = assign_slots(resident, chosen, k)
    cold.resident[index + (slice(0, width),)] = new
    hot = heads.global_pages(plan.tables, dyn)[:, dec.rows, :width].transpose(0, 1)  # [Rr, Hd, K]
    src = cold_table.gather(2, new.clamp(min=0))
    live = torch.arange(width, device=k.device) < k[..., None]
    # a head's unused slots repeat its slot 0 (the swap-in contract: same page, same source)
    dst = torch.where(live, hot, hot[..., :1])
    src = torch.where(live, src, src[..., :1])
    ops.swap_in(pool, cold.pages, dst, src, torch.where(live, moved, moved[..., :1]))
    loads += moved.sum()


def offload(ops: KVOps, plan: StepPlan, heads: LayerHeads, pool: torch.Tensor, cold, row_index: int) -> None:
    """Copy a completing prompt's chunks of the layer's dynamic heads to the request's cold pages."""
    row = plan.rows[row_index]
    slot = cold.slot_of(row.req_id)
    if slot is None or not heads.dynamic.numel():
        return
    chunks = row.prompt_len // plan.block_size
    dst = cold.table[slot, heads.cold_heads, :chunks]                              # [Hd, C]; -1: no budget
    live = dst[:, 0] >= 0
    if not bool(live.any()):
        return
    src = heads.global_pages(plan.prompt_tables, heads.dynamic[live])[:, row_index, :chunks]
    dst = dst[live].reshape(-1)
    cold.pages[dst] = pool[src.reshape(-1)]
    ops.summaries(cold, dst)
