"""The cold tier of dynamic heads: their prompt KV outside vLLM's block pool, in one pooled allocation.

As in the paper, a dynamic head's full prompt KV leaves the fast pool once the prompt is processed: in the step
that completes the prompt, the worker copies the head's complete prompt chunks (blocks ``[0, P // bs)``, one chunk
= one KV block, stored as a raw page in the attention kernel's own layout) into cold pages here, with each chunk's
Quest key summary (fp32 min / max per channel), and the budget manager then returns blocks ``[kept, P // bs)`` to
vLLM's pool exactly as for a static head. Blocks ``[0, kept)`` stay in the pool as the head's *hot buffer*
(``core/hot_buffer.py``): each decode step the query scores the cold summaries and the chosen chunks that are not
resident yet are copied in. The tail block and the generated tokens stay hot, uncounted.

Storage (one allocation, not a tensor pair per request and head, so that one operation serves every row and head
of a layer):

* ``pages [capacity, 2 * bs, D]``: K tile then V tile, like one page of a one-head virtual layer;
* ``bounds [capacity * units, 2, D]`` fp32: one summary per retrieval unit, ``kmin`` then ``kmax`` (``sub_chunks``
  units of ``bs // sub_chunks`` tokens per page; unit ``j`` of page ``p`` is row ``p * units + j``, its *unit
  address*); ``kmin`` / ``kmax`` are views of it, and one gather of a row brings both;
* per request a *slot*: ``table[slot, head, c]`` = the cold page of chunk ``c`` of dynamic head ``head`` (heads
  numbered over the whole model, ``-1``: none), and ``resident[slot, head, j]`` = the unit (chunk index x units
  + j) hot unit slot ``j`` holds.

Where it lives (``cold_tier_memory``): the summaries, tables and resident maps sit beside the KV cache (the device),
read by every decode step's scoring; the pages sit in host memory (``"host"``, the default: pinned on a GPU, where
the swap-in kernel reads them through unified addressing and copies only the chunks that are missing) or beside the
pool (``"device"``: no memory saving for dynamic heads on a GPU, only fewer bytes read per step). On vLLM's CPU
build both are host memory.

Pages are handed out from a free list and the allocation doubles when it runs out (bounded by ``max_bytes``,
the ``cold_tier_gib`` setting, when set); it is released whole once no request holds an entry. While requests run,
the allocation can be up to twice the bytes they hold (``nbytes``, the ``hybridkv:cold_tier_bytes`` gauge).
Entries live from the step that completes a prompt until the request finishes, is aborted or is preempted (it
recomputes its prompt, which is offloaded again, when it resumes); ``patches.py`` releases them. On vLLM's CPU
build the cold tier is host memory like the pool itself.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hybridkv_vllm.adapter.device_sync import KeepAlive


@dataclass
class ColdEntry:
    slot: int
    pages: torch.Tensor           # int64 [n]: every page this request holds
    nbytes: int


def page_bytes(block_size: int, head_dim: int, dtype: torch.dtype, units: int = 1) -> int:
    """Bytes of one cold page: a chunk's K and V tiles plus the fp32 min / max summaries of its ``units``."""
    return 2 * block_size * head_dim * torch.empty(0, dtype=dtype).element_size() + 2 * head_dim * 4 * units


class ColdTierFull(RuntimeError):
    """The cold tier cannot take a request without passing its bound."""


class ColdTier:
    def __init__(self, block_size: int, head_dim: int, dtype: torch.dtype, num_heads: int,
                 max_bytes: int | None = None, device: torch.device | str = "cpu", pages_on_host: bool = True,
                 units: int = 1) -> None:
        self.block_size, self.head_dim, self.dtype, self.num_heads = block_size, head_dim, dtype, num_heads
        self.units = units
        self.max_bytes, self.device = max_bytes, torch.device(device)
        self.pages_device = torch.device("cpu") if pages_on_host else self.device
        self.pinned = pages_on_host and self.device.type == "cuda"
        # pinned pages a grown array replaced, held while the last steps' kernels may still read them (the runtime
        # collects them every step); handed back when idle, once the device is past them
        self.retired = KeepAlive(torch.cuda.Event if self.pinned else None)
        self.page_kv_bytes = 2 * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()
        self.page_bytes = page_bytes(block_size, head_dim, dtype, units)
        self.pages = self._new_pages(0)
        self.bounds = torch.empty(0, 2, head_dim, dtype=torch.float32, device=self.device)
        self.free_pages: list[int] = []
        self.table = torch.full((0, num_heads, 1), -1, dtype=torch.long, device=self.device)
        self.resident = torch.full((0, num_heads, 1), -1, dtype=torch.long, device=self.device)
        self.free_slots: list[int] = []
        self.entries: dict[str, ColdEntry] = {}
        self.nbytes = 0

    @property
    def kmin(self) -> torch.Tensor:
        """``[capacity * units, D]`` view of ``bounds``: channel-wise minimum of each unit's keys."""
        return self.bounds[:, 0]

    @property
    def kmax(self) -> torch.Tensor:
        return self.bounds[:, 1]

    # -- capacity
    def _grow_pages(self, need: int) -> None:
        have = self.pages.shape[0]
        if len(self.free_pages) >= need:
            return
        new = max(2 * have, have + need - len(self.free_pages), 64)
        if self.max_bytes is not None:
            new = min(new, self.max_bytes // self.page_bytes)
            if new - have + len(self.free_pages) < need:
                raise ColdTierFull(f"the cold tier needs {need} more pages of {self.page_bytes} B "
                                   f"({self.nbytes / 2**20:.1f} MiB held, bound {self.max_bytes / 2**30:g} GiB)")
        grow = new - have
        pages = self._new_pages(new)
        pages[:have].copy_(self.pages)
        self.retired.retire(self.pages)
        self.pages = pages
        self.bounds = torch.cat([self.bounds, self.bounds.new_empty(grow * self.units, 2, self.head_dim)])
        self.free_pages.extend(range(new - 1, have - 1, -1))

    def _new_pages(self, n: int) -> torch.Tensor:
        return torch.empty(n, 2 * self.block_size, self.head_dim, dtype=self.dtype, device=self.pages_device,
                           pin_memory=self.pinned)

    def _grow_slots(self, chunks: int, hot: int) -> None:
        slots, _, width = self.table.shape
        hot_width = self.resident.shape[2]
        if not self.free_slots:
            extra = max(slots, 8)
            self.table = torch.cat([self.table, self.table.new_full((extra, self.num_heads, width), -1)])
            self.resident = torch.cat([self.resident, self.resident.new_full((extra, self.num_heads, hot_width), -1)])
            self.free_slots.extend(range(slots + extra - 1, slots - 1, -1))
        if chunks > width:
            self.table = torch.nn.functional.pad(self.table, (0, chunks - width), value=-1)
        if hot > hot_width:
            self.resident = torch.nn.functional.pad(self.resident, (0, hot - hot_width), value=-1)

    def ensure_hot_width(self, hot: int) -> None:
        if hot > self.resident.shape[2]:
            self.resident = torch.nn.functional.pad(self.resident, (0, hot - self.resident.shape[2]), value=-1)

    # -- requests
    def admit(self, req_id: str, chunks: int, hot: torch.Tensor) -> int:
        """Give a request a slot and cold pages for ``chunks`` chunks of every dynamic head with ``hot[head] > 0``
        hot blocks; its hot buffers start out holding units ``0 .. hot * units - 1`` (the pool blocks they are).
        Returns the slot (the request's earlier entry, if any, is released first)."""
        self.drop([req_id])
        heads = torch.nonzero(hot > 0).flatten()
        need = int(heads.numel()) * chunks
        self._grow_pages(need)
        hot = hot * self.units                                        # hot unit slots
        self._grow_slots(chunks, int(hot.max()) if hot.numel() else 1)
        pages = torch.tensor(self.free_pages[len(self.free_pages) - need:][::-1], dtype=torch.long)
        del self.free_pages[len(self.free_pages) - need:]
        slot = self.free_slots.pop()
        self.table[slot] = -1
        self.table[slot, heads, :chunks] = pages.view(-1, chunks).to(self.device)
        j = torch.arange(self.resident.shape[2])
        self.resident[slot] = torch.where(j[None, :] < hot[:, None], j[None, :], -1).to(self.device)
        entry = ColdEntry(slot, pages, need * self.page_bytes)
        self.entries[req_id] = entry
        self.nbytes += entry.nbytes
        return slot

    def slot_of(self, req_id: str | None) -> int | None:
        entry = self.entries.get(req_id) if req_id is not None else None
        return None if entry is None else entry.slot

    def drop(self, req_ids) -> None:
        for req_id in req_ids:
            entry = self.entries.pop(req_id, None)
            if entry is None:
                continue
            self.free_pages.extend(entry.pages.tolist())
            self.free_slots.append(entry.slot)
            self.table[entry.slot] = -1
            self.resident[entry.slot] = -1
            self.nbytes -= entry.nbytes
        if not self.entries and self.pages.shape[0]:
            # idle: hand the pooled allocation back rather than keep its capacity while reporting 0 bytes held
            self.retired.retire(self.pages, wait=True)          # no step may come to collect it
            self.pages, self.bounds = self._new_pages(0), self.bounds[:0].clone()
            self.free_pages = []

    def __len__(self) -> int:
        return len(self.entries)
