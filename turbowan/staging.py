"""Host -> GPU weight copies through a small ring of pinned staging buffers.

A copy from pageable (or memory-mapped) host memory runs at a fraction of the bus's rate, and pinning a whole
14B expert costs seconds and 15-29 GB of unswappable RAM. The ring pins only ``slots x slot_bytes`` (512 MB by
default) once per device: worker threads copy chunks of the source tensors into free slots (a CPU memcpy, which
also reads memory-mapped files into the page cache), and each filled slot is copied to its place on the GPU
asynchronously on a copy stream. A slot is reused once the GPU has finished reading it (a CUDA event per slot).

    ring = staging_ring(device)
    upload = ring.upload(host_tensors)       # returns at once; copies run in the background
    ...                                      # compute on the GPU meanwhile
    gpu_tensors = upload.wait()              # the current stream will see the data (no host sync needed)

On a CPU "device" the same code runs with plain copies (no pinning, no streams), which is what the tests use to
check the chunking and slot reuse.
"""

from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

SLOT_BYTES = 64 << 20
SLOTS = 8


def _default_threads() -> int:
    # Enough memcpy threads to keep ahead of the copy engine from the page cache, leaving cores for the rest.
    return max(1, min(6, (os.cpu_count() or 2) // 2))


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's storage bytes."""
    return t.reshape(-1).view(torch.uint8)


class Upload:
    """Copies of a list of host tensors on their way to the device; `wait()` returns the device tensors."""

    def __init__(self, ring: "StagingRing", destinations: list[torch.Tensor], futures: list[Future]):
        self._ring = ring
        self._destinations = destinations
        self._futures = futures
        self._done: Optional[list[torch.Tensor]] = None

    def wait(self) -> list[torch.Tensor]:
        """Block until every chunk is staged and queued, then order the current stream after its copies."""
        if self._done is None:
            events = [f.result() for f in self._futures]  # re-raises a worker's error
            if self._ring.cuda:
                current = torch.cuda.current_stream(self._ring.device)
                for event in events:  # this upload's chunks only, not later prefetches on the same stream
                    current.wait_event(event)
            self._done = self._destinations
        return self._done


class StagingRing:
    """``slots`` pinned buffers of ``slot_bytes`` each, filled by ``threads`` workers, drained to ``device``."""

    def __init__(self, device: torch.device, slot_bytes: int = SLOT_BYTES, slots: int = SLOTS,
                 threads: Optional[int] = None):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.slot_bytes = slot_bytes
        self.buffers = [torch.empty(slot_bytes, dtype=torch.uint8, pin_memory=self.cuda) for _ in range(slots)]
        self.events: list[Optional[torch.cuda.Event]] = [None] * slots
        self.free: "queue.Queue[int]" = queue.Queue()
        for i in range(slots):
            self.free.put(i)
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.pool = ThreadPoolExecutor(threads or _default_threads(), thread_name_prefix="turbowan-staging")

    @property
    def pinned_bytes(self) -> int:
        return self.slot_bytes * len(self.buffers) if self.cuda else 0

    def upload(self, sources: Sequence[torch.Tensor]) -> Upload:
        """Start copying ``sources`` (CPU tensors, pageable or memory-mapped) to new tensors on the device."""
        destinations = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in sources]
        if self.cuda:
            # The new tensors may reuse memory the current stream is still reading: copy only after it; and
            # their memory must not be reused before the copy stream is done with it, even if dropped unwaited.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for d in destinations:
                d.record_stream(self.stream)
        futures = []
        for src, dst in zip(sources, destinations):
            src = src if src.is_contiguous() else src.contiguous()
            src_b, dst_b = _bytes(src), _bytes(dst)
            for start in range(0, src_b.numel(), self.slot_bytes):
                end = min(src_b.numel(), start + self.slot_bytes)
                futures.append(self.pool.submit(self._copy_chunk, src_b[start:end], dst_b[start:end]))
        return Upload(self, destinations, futures)

    def _copy_chunk(self, src: torch.Tensor, dst: torch.Tensor) -> Optional[torch.cuda.Event]:
        """Stage one chunk and queue its copy to the device; returns the event marking that copy's end."""
        slot = self.free.get()
        try:
            if self.events[slot] is not None:
                self.events[slot].synchronize()  # the GPU has finished reading this slot's last chunk
            n = src.numel()
            staged = self.buffers[slot][:n]
            # A single-threaded memcpy that releases the GIL (numpy's): torch's CPU copy would start an OpenMP team
            # in every worker and starve the thread that launches the GPU work. Faults in memory-mapped pages.
            np.copyto(staged.numpy(), src.numpy())
            if self.cuda:
                with torch.cuda.stream(self.stream):
                    dst.copy_(staged, non_blocking=True)
                    event = torch.cuda.Event()
                    event.record(self.stream)
                self.events[slot] = event
                return event
            dst.copy_(staged)
            return None
        finally:
            self.free.put(slot)

    def close(self) -> None:
        self.pool.shutdown(wait=True)


_rings: dict[torch.device, StagingRing] = {}
_rings_lock = threading.Lock()


def staging_ring(device: torch.device) -> StagingRing:
    """The process's ring for ``device`` (created on first use; pins ``SLOTS x SLOT_BYTES`` once)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    with _rings_lock:
        ring = _rings.get(device)
        if ring is None:
            ring = _rings[device] = StagingRing(device)
        return ring
