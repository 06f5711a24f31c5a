"""The hot buffer of a dynamic head: which cold prompt chunk each of its ``k`` pool slots holds (DESIGN §6).

A dynamic head keeps ``k`` blocks of vLLM's pool (its budget) as a *hot buffer*; the prompt's complete chunks
sit in the cold tier. Every decode step its query selects ``k`` chunks (:func:`selection.select_chunks`) and the
buffer is made to hold exactly that set. Attention does not depend on the order of keys, so the slots need not
be sorted: a chunk already resident stays in its slot, and every newly chosen chunk goes into a slot whose chunk
was not chosen, lowest slot first, in the order the chunks were chosen. Only those slots are copied from the cold
tier (*swap-in*).

:func:`plan_swap_in` states the rule for one (request, head) in plain Python; :func:`assign_slots` is the same
rule over ``[B, H, K]`` tensors with fixed shapes and no host synchronisation (the decode path's form, tested
equal to the first).
"""
from __future__ import annotations

import torch


def plan_swap_in(resident: list[int], chosen: list[int]) -> list[tuple[int, int]]:
    """``(slot, chunk)`` copies that make the hot slots hold exactly the ``chosen`` chunks (as a set); updates
    ``resident`` in place (the rule of the module docstring)."""
    if len(chosen) != len(resident) or len(set(chosen)) != len(chosen):
        raise ValueError(f"{len(chosen)} chunks chosen for {len(resident)} hot slots (expected distinct and equal)")
    wanted, present = set(chosen), set(resident)
    free = [slot for slot, chunk in enumerate(resident) if chunk not in wanted]
    missing = [chunk for chunk in chosen if chunk not in present]
    swaps = list(zip(free, missing))
    for slot, chunk in swaps:
        resident[slot] = chunk
    return swaps


def assign_slots(resident: torch.Tensor, chosen: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`plan_swap_in` for every (request, head) at once.

    Parameters
    ----------
    resident : torch.Tensor
        ``int [B, H, K]``: chunk held by each hot slot; only slots ``j < k[b, h]`` are meaningful.
    chosen : torch.Tensor
        ``int [B, H, K]``: the chunks selected this step, distinct, in their first ``k[b, h]`` entries (``-1`` after).
    k : torch.Tensor
        ``int [B, H]``: hot slots of each (request, head) (``0``: the head retrieves nothing for this request).

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``new_resident int64 [B, H, K]`` (``-1`` at slots ``>= k``) and ``moved bool [B, H, K]``: the slots whose
        chunk must be copied in from the cold tier.
    """
    B, H, K = chosen.shape
    j = torch.arange(K, device=chosen.device)
    live = j < k.to(chosen.device).long()[..., None]                                      # [B, H, K]
    res = torch.where(live, resident.long(), -1)
    want = torch.where(live, chosen.long(), -2)
    # membership tests over the K x K pairs (K is a budget in chunks: small)
    present = ((want[..., :, None] == res[..., None, :]) & live[..., None, :]).any(-1)     # chosen already held
    kept = ((res[..., :, None] == want[..., None, :]) & live[..., None, :]).any(-1)        # slot's chunk chosen
    missing = live & ~present
    free = live & ~kept
    miss_rank = torch.cumsum(missing.long(), -1) - 1
    free_rank = torch.cumsum(free.long(), -1) - 1
    # slot_of_rank[q] = the q-th free slot; a spare column K absorbs the writes of slots that are not free
    slot_of_rank = torch.full((B, H, K + 1), K, dtype=torch.long, device=chosen.device)
    slot_of_rank.scatter_(-1, torch.where(free, free_rank, K), j.expand(B, H, K).clone())
    dest = slot_of_rank.gather(-1, torch.where(missing, miss_rank, K))                  # slot of each missing chunk
    new = torch.cat([res, res.new_full((B, H, 1), -1)], dim=-1)
    new.scatter_(-1, torch.where(missing, dest, K), want)
    new = new[..., :K]
    return new, live & (new != res)
