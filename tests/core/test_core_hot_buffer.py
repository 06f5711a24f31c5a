"""The hot buffer's slot rule: the per-(request, head) statement and its batched, fixed-shape form agree, and the
rule keeps resident chunks, fills the buffer with exactly the chosen set and copies only what is missing."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridkv_vllm.core.hot_buffer import assign_slots, plan_swap_in


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


@st.composite
def batches(draw):
    b, h, width = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    chunks = width + draw(st.integers(0, 8))
    cases = []
    for _ in range(b * h):
        k = draw(st.integers(0, width))
        cases.append((k, draw(st.permutations(range(chunks)))[:k], draw(st.permutations(range(chunks)))[:k]))
    return b, h, width, cases


@settings(max_examples=300, deadline=None)
@given(batches())
def test_batched_assignment_equals_the_per_head_rule(case):
    b, h, width, cases = case
    resident = torch.randint(-1, 50, (b, h, width))          # slots past k hold anything: they must be ignored
    chosen = torch.full((b, h, width), -1)
    k = torch.zeros(b, h, dtype=torch.long)
    expected = []
    for i, (kk, res, cho) in enumerate(cases):
        bi, hi = divmod(i, h)
        k[bi, hi] = kk
        resident[bi, hi, :kk] = torch.tensor(res, dtype=torch.long)
        chosen[bi, hi, :kk] = torch.tensor(cho, dtype=torch.long)
        after = list(res)
        expected.append((bi, hi, kk, after, sorted(slot for slot, _ in plan_swap_in(after, cho))))
    new, moved = assign_slots(resident, chosen, k)
    assert new.shape == moved.shape == (b, h, width)
    for bi, hi, kk, after, slots in expected:
        assert new[bi, hi, :kk].tolist() == after
        assert (new[bi, hi, kk:] == -1).all()
        assert torch.nonzero(moved[bi, hi]).flatten().tolist() == slots
