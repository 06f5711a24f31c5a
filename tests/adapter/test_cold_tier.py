"""The cold tier's bookkeeping: swap-in plans keep resident chunks and fill the hot buffer with exactly the
chosen set (property-based), and entries account their bytes until released."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_vllm.adapter.cold_tier import ColdChunks, ColdTier, plan_swap_in


@st.composite
def buffers(draw):
    num_chunks = draw(st.integers(1, 40))
    slots = draw(st.integers(1, num_chunks))
    resident = draw(st.permutations(range(num_chunks)))[:slots]
    chosen = draw(st.permutations(range(num_chunks)))[:slots]
    return list(resident), list(chosen)


@settings(max_examples=300, deadline=None)
@given(buffers())
def test_swap_in_holds_exactly_the_chosen_chunks_with_fewest_copies(case):
    resident, chosen = case
    before = list(resident)
    swaps = plan_swap_in(resident, chosen)
    assert sorted(resident) == sorted(chosen)
    assert len(swaps) == len(set(chosen) - set(before))              # only missing chunks are copied
    for slot, chunk in swaps:
        assert before[slot] not in chosen and resident[slot] == chunk    # never evicts a chosen chunk
    untouched = set(range(len(before))) - {slot for slot, _ in swaps}
    assert all(resident[s] == before[s] for s in untouched)


def test_swap_in_rejects_a_plan_that_does_not_fill_the_buffer():
    with pytest.raises(ValueError, match="hot slots"):
        plan_swap_in([0, 1, 2], [4, 5])
    with pytest.raises(ValueError, match="hot slots"):
        plan_swap_in([0, 1], [3, 3])


def _chunks(num: int, bs: int = 4, d: int = 8) -> ColdChunks:
    keys = torch.randn(num, bs, d)
    return ColdChunks(keys=keys, values=torch.randn(num, bs, d), kmin=keys.amin(1), kmax=keys.amax(1),
                      resident=[0, 1])


def test_cold_tier_accounts_bytes_until_released():
    tier = ColdTier()
    a, b = _chunks(5), _chunks(3)
    tier.put("r1", ("layer.0", 0), a)
    tier.put("r1", ("layer.0", 1), b)
    tier.put("r2", ("layer.0", 0), _chunks(2))
    assert tier.nbytes == a.nbytes + b.nbytes + _chunks(2).nbytes and len(tier) == 2
    tier.put("r1", ("layer.0", 0), _chunks(2))                       # re-offload after preemption replaces
    assert tier.nbytes == b.nbytes + 2 * _chunks(2).nbytes
    assert tier.get("r1", ("layer.0", 1)) is b and tier.get("r3", ("layer.0", 0)) is None
    tier.drop({"r1", "never-seen"})
    assert len(tier) == 1 and tier.nbytes == _chunks(2).nbytes
    tier.drop(["r2"])
    assert len(tier) == 0 and tier.nbytes == 0
