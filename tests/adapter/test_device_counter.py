"""adapter/device_counter.py: what the step's kernels add reaches the host exactly once, and on the lagged path
(CUDA) without waiting: a drain never returns a copy whose event has not completed. Runs without vLLM (the GPU check
runs it natively, where ``cuda`` is the real event)."""
from __future__ import annotations

import random

import pytest
import torch

from hybridkv_vllm.adapter.device_counter import DeviceCounter


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
