"""adapter/device_sync.py: what the step's kernels add reaches the host exactly once, and on the lagged path
(CUDA) without waiting: a drain never returns a copy whose event has not completed. Runs without vLLM (the GPU check
runs it natively, where ``cuda`` is the real event)."""
from __future__ import annotations

import random

import pytest
import torch

from hybridkv_vllm.adapter.device_sync import DeviceCounter, KeepAlive


class ManualEvent:
    """An event the test completes by hand (``torch.cuda.Event``'s ``record`` / ``query``)."""

    made: list[ManualEvent] = []

    def __init__(self):
        self.done = False
        ManualEvent.made.append(self)

    def record(self):
        pass

    def query(self):
        return self.done

    def synchronize(self):
        self.done = True


def test_cpu_drain_returns_the_count_at_once_and_zeroes_it():
    c = DeviceCounter("cpu")
    assert not c.lagged and c.drain() == 0
    c.value += 5
    c.value += 2
    assert c.drain() == 7 and int(c.value) == 0 and c.drain() == 0


def test_lagged_drain_reads_a_copy_only_once_its_event_completed_and_loses_nothing():
    ManualEvent.made.clear()
    c = DeviceCounter("cpu", event_factory=ManualEvent)
    assert c.lagged
    rng = random.Random(3)
    added = received = 0
    for step in range(200):
        n = rng.randrange(0, 9)
        c.value += n
        added += n
        if ManualEvent.made and rng.random() < 0.4:
            ManualEvent.made[-1].done = True             # the device caught up with the last queued copy
        pending_before = c._pending
        got = c.drain()
        if pending_before is not None and not pending_before.done:
            assert got == 0                              # never waits, never reads a copy in flight
        received += got
    ManualEvent.made[-1].done = True
    received += c.drain()                                # the copy in flight arrives
    ManualEvent.made[-1].done = True
    received += c.drain()                                # and what was counted since
    assert received == added


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the pinned copy and CUDA event need a GPU")
def test_cuda_drain_delivers_every_count_through_pinned_memory():
    c = DeviceCounter("cuda")
    assert c.lagged and c._host.is_pinned()
    total = 0
    for n in range(1, 50):
        c.value += n
        total -= c.drain()
    torch.cuda.synchronize()
    total -= c.drain()
    torch.cuda.synchronize()
    total -= c.drain()
    assert total == -sum(range(1, 50))


def test_keep_alive_holds_a_retired_tensor_until_its_event_completed():
    ManualEvent.made.clear()
    keep = KeepAlive(ManualEvent)
    a, b = torch.zeros(4), torch.ones(4)
    keep.retire(a)
    keep.retire(b)
    assert len(keep) == 2
    ManualEvent.made[0].done = True                      # the device finished what was queued before a's retirement
    keep.collect()
    assert len(keep) == 1 and keep._held[0][0] is b
    ManualEvent.made[1].done = True
    keep.retire(torch.zeros(1))                          # retiring collects the completed ones first
    assert len(keep) == 1


def test_keep_alive_waits_for_the_device_when_told_and_then_holds_nothing():
    ManualEvent.made.clear()
    keep = KeepAlive(ManualEvent)
    keep.retire(torch.zeros(4), wait=True)
    assert len(keep) == 0 and ManualEvent.made[-1].done


def test_keep_alive_without_asynchronous_work_holds_nothing():
    keep = KeepAlive(None)
    keep.retire(torch.zeros(4))
    assert len(keep) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned pages need a GPU")
def test_a_growing_pinned_cold_tier_keeps_its_replaced_pages_until_the_device_is_past_them():
    from hybridkv_vllm.adapter.cold_tier import ColdTier
    cold = ColdTier(16, 64, torch.bfloat16, 2, device="cuda", pages_on_host=True)
    assert cold.pinned and cold.pages.is_pinned()
    first = cold.admit("a", 40, torch.tensor([2, 2]))
    before = cold.pages.clone()
    cold.admit("b", 200, torch.tensor([2, 2]))           # grows the page array
    assert cold.pages.is_pinned() and len(cold.retired) >= 1
    assert torch.equal(cold.pages[:before.shape[0]], before)
    torch.cuda.synchronize()
    cold.retired.collect()
    assert len(cold.retired) == 0 and first == cold.slot_of("a")
    cold.drop(["a", "b"])                                # idle: the array goes back at once, nothing held
    assert cold.pages.shape[0] == 0 and len(cold.retired) == 0
