"""Dynamic heads' work in a layer: offload to the cold tier when a prompt completes, retrieval at each decode step.

* :func:`offload` (the step that completes a compressed prompt; once per request): each dynamic head with a budget
  for this prompt copies its complete prompt chunks (pages ``[0, P // bs)``) to the request's cold pages and writes
  their Quest summaries. The budget manager then frees pages ``[kept, P // bs)``; ``[0, kept)`` become the hot
  buffer, which holds chunks ``0 .. kept - 1`` to begin with (the cold tier's ``resident`` says so).
* :func:`retrieve` (every decode step, before attention): for all retrieving rows and dynamic heads of the layer
  at once, the query scores the cold summaries (GQA-summed Quest bound), selects ``k`` chunks (sink, the prompt's
  last complete chunk, top scores; ``hybridkv_kernels.chunk_scoring``) and the hot buffer is made to hold them
  (``KVOps.fill_hot``: the Triton implementation reassigns slots with ``core.hot_buffer.assign_slots`` and copies
  only the chunks that are missing, as a GPU must across PCIe; the CPU implementation, where the cold tier is
  host memory like the pool, rewrites every hot slot, which costs less than tracking them). Tensor operations
  only: no per-row loop, no host synchronisation, fixed shapes.
"""
from __future__ import annotations

import torch

from hybridkv_vllm.adapter.kv_ops import KVOps, LayerHeads, LayerStep
from hybridkv_vllm.core.step_plan import StepPlan


def retrieve(ops: KVOps, plan: StepPlan, heads: LayerHeads, step: LayerStep, pool: torch.Tensor, cold,
             query: torch.Tensor, loads: torch.Tensor) -> None:
    """Fill the hot buffers of the layer's dynamic heads for this step's decode rows; adds the chunks copied in
    to ``loads`` (a counter tensor, read once per step by the accounting)."""
    dec = plan.decode
    rows, num_dyn = dec.rows.numel(), heads.dynamic.numel()
    d = query.shape[2]
    g = query.shape[1] // len(heads.signature)
    q = query[dec.tokens].view(rows, -1, g, d)[:, heads.dynamic].reshape(rows, num_dyn * g, d)
    chosen = ops.select(q, cold, step, dec)
    ops.fill_hot(pool, cold, step, chosen, dec.cold_slots, heads.cold_start, loads)


def offload(ops: KVOps, plan: StepPlan, heads: LayerHeads, step: LayerStep, pool: torch.Tensor, cold,
            row_index: int) -> None:
    """Copy a completing prompt's chunks of the layer's dynamic heads to the request's cold pages."""
    row = plan.rows[row_index]
    slot = cold.slot_of(row.req_id)
    if slot is None or not heads.dynamic.numel():
        return
    chunks = row.prompt_len // plan.block_size
    lo = heads.cold_start
    dst = cold.table[slot, lo:lo + heads.dynamic.numel(), :chunks]                 # [Hd, C]; -1: no budget
    live = dst[:, 0] >= 0
    if not bool(live.any()):
        return
    src = step.prompt_pages[heads.dynamic[live], row_index, :chunks]
    dst = dst[live].reshape(-1)
    tiles = pool[src.reshape(-1)]
    ops.summaries(cold, dst, tiles)                     # on the pool's device, where the summaries are read
    cold.pages[dst.to(cold.pages.device)] = tiles.to(cold.pages.device)       # to host memory when it lives there
