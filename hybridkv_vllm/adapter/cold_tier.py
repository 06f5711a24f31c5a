"""The cold tier of dynamic heads: their prompt KV outside vLLM's block pool, retrieved chunk by chunk.

As in the paper, a dynamic head's full prompt KV leaves the fast pool once the prompt is processed: in the step
that completes the prompt, the worker copies the head's complete prompt chunks (blocks ``[0, P // bs)``, one
chunk = one KV block) into a :class:`ColdChunks` entry here, with each chunk's Quest key summary, and the
budget manager then returns blocks ``[kept, P // bs)`` to vLLM's pool exactly as for a static head. Blocks
``[0, kept)`` stay in the pool as the head's *hot buffer*: every decode step the query scores the cold summaries,
and the chunks it selects that are not resident yet are copied into the buffer's slots
(:func:`plan_swap_in`). The tail block and the generated tokens stay hot, uncounted.

On vLLM's CPU build the cold tier is ordinary host memory, so the pool admits more requests while the process
holds the cold copies beside it; on a GPU the same entries are what host memory holds while HBM keeps only the
hot buffers. Chunks are stored as raw blocks in the attention kernel's own layout, so a swap-in is a plain
block copy. Entries live from the step that completes a prompt until the request finishes, is aborted or is
preempted (it recomputes its prompt, which is offloaded again, when it resumes); ``patches.py`` drops them.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ColdChunks:
    """One request's prompt chunks of one dynamic head (one virtual layer)."""

    keys: torch.Tensor          # [C, bs, D]: raw key blocks, in the kernel's key layout
    values: torch.Tensor        # [C, bs, D]
    kmin: torch.Tensor          # float32 [C, D]: channel-wise min of each chunk's keys
    kmax: torch.Tensor          # float32 [C, D]
    resident: list[int]         # hot slot -> the chunk it holds

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.keys, self.values, self.kmin, self.kmax))


def plan_swap_in(resident: list[int], chosen: list[int]) -> list[tuple[int, int]]:
    """``(slot, chunk)`` copies that make the hot slots hold exactly the ``chosen`` chunks (as a set); updates
    ``resident`` in place. Chunks already resident stay in their slots (no copy); every other chosen chunk goes
    into a slot whose chunk was not chosen, lowest slot first. Attention does not depend on the order of keys,
    so the slots need not be sorted."""
    if len(chosen) != len(resident) or len(set(chosen)) != len(chosen):
        raise ValueError(f"{len(chosen)} chunks chosen for {len(resident)} hot slots (expected distinct and equal)")
    wanted, present = set(chosen), set(resident)
    free = [slot for slot, chunk in enumerate(resident) if chunk not in wanted]
    missing = [chunk for chunk in chosen if chunk not in present]
    swaps = list(zip(free, missing))
    for slot, chunk in swaps:
        resident[slot] = chunk
    return swaps


@dataclass
class ColdTier:
    """Every cold entry of this worker: request id -> (layer name, kv head) -> :class:`ColdChunks`."""

    entries: dict[str, dict[tuple[str, int], ColdChunks]] = field(default_factory=dict)
    nbytes: int = 0

    def put(self, req_id: str, head: tuple[str, int], chunks: ColdChunks) -> None:
        old = self.entries.setdefault(req_id, {}).pop(head, None)
        self.nbytes += chunks.nbytes - (old.nbytes if old is not None else 0)
        self.entries[req_id][head] = chunks

    def get(self, req_id: str, head: tuple[str, int]) -> ColdChunks | None:
        return self.entries.get(req_id, {}).get(head)

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            for chunks in self.entries.pop(req_id, {}).values():
                self.nbytes -= chunks.nbytes

    def __len__(self) -> int:
        return len(self.entries)
