"""The pooled cold tier: pages and slots are handed out and returned, bytes are accounted until release, the
allocation grows, and a bound stops it with the project's named error."""
from __future__ import annotations

import pytest
import torch

from hybridkv_vllm.adapter.cold_tier import ColdTier, ColdTierFull

BS, D, HEADS = 4, 8, 5


def test_admit_gives_each_budgeted_head_its_own_pages_and_a_hot_buffer_of_the_first_chunks():
    tier = ColdTier(BS, D, torch.float32, HEADS)
    hot = torch.tensor([2, 0, 3, 1, 2])                      # head 1: its tier keeps everything for this prompt
    slot = tier.admit("r1", 6, hot)
    table = tier.table[slot]
    assert (table[1] == -1).all()
    pages = table[hot > 0, :6]
    assert (pages >= 0).all() and pages.unique().numel() == pages.numel() == 4 * 6
    for head, k in enumerate(hot.tolist()):
        assert tier.resident[slot, head, :k].tolist() == list(range(k))
        assert (tier.resident[slot, head, k:] == -1).all()
    assert tier.nbytes == 4 * 6 * tier.page_bytes
    assert tier.page_bytes == 2 * BS * D * 4 + 2 * D * 4


def test_pages_and_slots_return_on_release_and_the_allocation_grows():
    tier = ColdTier(BS, D, torch.float32, HEADS)
    hot = torch.full((HEADS,), 2)
    slots = {f"r{i}": tier.admit(f"r{i}", 20, hot) for i in range(12)}    # past the first allocation
    assert len(set(slots.values())) == 12 and len(tier) == 12
    held = torch.cat([tier.table[s].flatten() for s in slots.values()])
    held = held[held >= 0]
    assert held.unique().numel() == held.numel() == 12 * HEADS * 20
    assert tier.pages.shape[0] >= held.numel()
    tier.drop({"r3", "never-seen"})
    assert len(tier) == 11 and tier.slot_of("r3") is None
    again = tier.admit("r12", 20, hot)
    assert again == slots["r3"]                                  # slots and pages are reused
    assert tier.nbytes == 12 * HEADS * 20 * tier.page_bytes
    tier.admit("r0", 3, hot)                                     # re-offload after preemption replaces
    assert tier.nbytes == (11 * 20 + 3) * HEADS * tier.page_bytes
    tier.drop(list(tier.entries))
    assert len(tier) == 0 and tier.nbytes == 0
    assert tier.pages.shape[0] == 0 and not tier.free_pages          # the allocation goes back when idle
    slot = tier.admit("again", 4, hot)
    assert (tier.table[slot, :, :4] >= 0).all() and tier.pages.shape[0] >= 4 * HEADS


def test_a_bound_refuses_growth_past_it_with_a_named_error():
    tier = ColdTier(BS, D, torch.float32, HEADS, max_bytes=100 * (2 * BS * D * 4 + 2 * D * 4))
    hot = torch.full((HEADS,), 1)
    tier.admit("a", 10, hot)                                     # 50 pages
    with pytest.raises(ColdTierFull, match="bound"):
        tier.admit("b", 11, hot)                                 # 55 more pages: past 100
    tier.admit("c", 10, hot)                                     # exactly 100
    assert len(tier) == 2


@pytest.mark.parametrize("on_host", [True, False])
def test_pages_live_on_the_host_or_beside_the_pool_and_the_rest_beside_the_pool(on_host):
    """cold_tier_memory: the pages (the bulk) in host memory or on the KV cache's device; summaries, tables and
    resident maps, read by every decode step's scoring, always on the device ("meta" stands in for a GPU)."""
    cold = ColdTier(16, 8, torch.bfloat16, 2, device="meta", pages_on_host=on_host)
    cold.admit("r", 6, torch.tensor([2, 3]))
    assert cold.pages.device.type == ("cpu" if on_host else "meta") and cold.pages.shape[0] >= 12
    assert {cold.kmin.device.type, cold.kmax.device.type, cold.table.device.type, cold.resident.device.type} == \
        {"meta"}
    assert not cold.pinned                                  # pinned only for a CUDA device
