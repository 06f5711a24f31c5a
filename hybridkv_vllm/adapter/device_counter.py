"""A count summed on the device by the layers of a step (chunks swapped in) and read on the host for metrics,
without making the host wait for the device.

On a CPU a read costs nothing: :meth:`DeviceCounter.drain` returns the count and zeroes it. On CUDA reading a
device scalar (``int(t)``) waits for every kernel queued before it, once per step, which would stall the stream
that the step plan otherwise never waits on (``docs/DESIGN.md`` §6.2). There ``drain`` queues a copy of the count
into pinned host memory, zeroes it (both ordered on the stream after the step's kernels) and records an event; a
later ``drain`` returns that copy once the event has completed, and queues the next copy only then, so the count
keeps growing on the device meanwhile: the figures arrive a step or more late, and nothing is lost or counted twice.
"""
from __future__ import annotations

from typing import Callable

import torch


class DeviceCounter:
    """``value``: the int64 scalar the step's kernels add to; :meth:`drain`: what was added since the last time it
    returned a count, as far as the host may know without waiting."""

    def __init__(self, device, event_factory: Callable[[], object] | None = None) -> None:
        self.device = torch.device(device)
        self.value = torch.zeros((), dtype=torch.long, device=self.device)
        # an event has ``record()`` and ``query()`` (torch.cuda.Event); tests pass their own for the lagged path
        if event_factory is None and self.device.type == "cuda":
            event_factory = torch.cuda.Event
        self._event_factory = event_factory
        self._host = torch.zeros((), dtype=torch.long, pin_memory=self.device.type == "cuda")
        self._pending = None                     # the event of the copy in flight

    @property
    def lagged(self) -> bool:
        return self._event_factory is not None

    def drain(self) -> int:
        if not self.lagged:
            count = int(self.value)
            if count:
                self.value.zero_()
            return count
        count = 0
        if self._pending is not None:
            if not self._pending.query():
                return 0                         # the last copy is still on its way: the device keeps counting
            count = int(self._host)
            self._pending = None
        self._host.copy_(self.value, non_blocking=True)
        self.value.zero_()
        self._pending = self._event_factory()
        self._pending.record()
        return count
