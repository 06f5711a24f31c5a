"""The per-layer step of the decode executor: plan once per step (core/step_plan.py), run per layer (here).

:func:`run_layer` is everything a layer does in every step, for all of its KV heads at once, whichever tiers
they belong to: write the step's K/V, bring the dynamic heads' chosen chunks into their hot buffers (decode rows),
attend over the rewritten tables. It reads the step plan and issues tensor operations through a :class:`KVOps`
implementation: no per-row loop, no host synchronisation (no ``.item()``, ``.tolist()``, ``.cpu()``), no output
whose shape depends on data. ``tests/adapter/test_executor.py`` runs it under a dispatch guard that fails on any of
those and checks the same operations run for one row as for several.

The step that completes a prompt also prunes static heads and offloads dynamic ones (backend.py,
``static_heads`` / ``dynamic_heads``): once per request, per completing row, outside this path.
"""
from __future__ import annotations

import torch

from hybridkv_vllm.adapter import dynamic_heads
from hybridkv_vllm.adapter.kv_ops import KVOps, LayerHeads, LayerStep
from hybridkv_vllm.core.step_plan import StepPlan


def run_layer(ops: KVOps, plan: StepPlan, heads: LayerHeads, step: LayerStep, pool: torch.Tensor, cold,
              query: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor] | None, output: torch.Tensor, scale: float,
              layer, loads: torch.Tensor) -> None:
    """One layer of one step. ``step`` is the layer's share of the plan (``kv_ops.plan_layers``);
    ``query [n, Hq, D]``; ``kv`` = this step's ``(key, value) [n, H, D]`` (None: nothing to write);
    ``output [n, Hq, D]`` is written; ``loads`` counts the chunks swapped in."""
    if kv is not None:
        ops.write(pool, kv[0], kv[1], step.slots, layer)
    if plan.decode is not None and heads.dynamic.numel():
        dynamic_heads.retrieve(ops, plan, heads, step, pool, cold, query, loads)
    ops.attend(plan, heads, pool, query, step.pages, step.seq_lens, scale, output, layer)
