"""Host-side bookkeeping of work the device may still be doing, so that the host never has to wait for it.

:class:`DeviceCounter`: a count summed on the device by the layers of a step (chunks swapped in) and read on the
host for metrics.

On a CPU a read costs nothing: :meth:`DeviceCounter.drain` returns the count and zeroes it. On CUDA reading a
device scalar (``int(t)``) waits for every kernel queued before it, once per step, which would stall the stream
that the step plan otherwise never waits on (``docs/DESIGN.md`` §6.2). There ``drain`` queues a copy of the count
into pinned host memory, zeroes it (both ordered on the stream after the step's kernels) and records an event; a
later ``drain`` returns that copy once the event has completed, and queues the next copy only then, so the count
keeps growing on the device meanwhile: the figures arrive a step or more late, and nothing is lost or counted twice.

:class:`KeepAlive`: host memory the device may still read. The cold tier's pinned pages are read by kernels through
unified addressing, which PyTorch's pinned-memory cache does not track (it tracks ``copy_`` only): a page array
replaced by a larger one while the last step's swap-in may still run would go back to the cache, and could be
handed out and overwritten under that kernel. It is kept until an event recorded at its retirement has completed
(the runtime collects every step), or, when no later step may come, the host waits for that event once.
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


class KeepAlive:
    """Tensors retired while queued device work may still read them, each held until its event completed."""

    def __init__(self, event_factory: Callable[[], object] | None) -> None:
        self._event_factory = event_factory
        self._held: list[tuple[torch.Tensor, object]] = []

    def retire(self, tensor: torch.Tensor, wait: bool = False) -> None:
        """Hold ``tensor`` until the device is past the work queued so far; ``wait``: wait for that here instead
        (for a release after which no step may come to collect it, such as the cold tier going idle)."""
        self.collect()
        if self._event_factory is None:
            return                               # nothing runs asynchronously: the tensor may go at once
        event = self._event_factory()
        event.record()
        if wait:
            event.synchronize()
            return
        self._held.append((tensor, event))

    def collect(self) -> None:
        """Let go of the tensors whose events completed."""
        self._held = [(t, e) for t, e in self._held if not e.query()]

    def __len__(self) -> int:
        return len(self._held)
