"""Host -> GPU weight copies through a small ring of pinned staging buffers.

A copy from pageable (or memory-mapped) host memory runs at a fraction of the bus's rate, and pinning a whole
14B expert costs seconds and 15-29 GB of unswappable RAM. The ring pins only ``slots x slot_bytes`` (512 MB by
default) once per device: worker threads fill free slots with chunks of the source tensors, and each filled
slot is copied to its place on the GPU asynchronously on a copy stream. A slot is reused once the GPU has
finished reading it (a CUDA event per slot).

Weights loaded memory-mapped (``torch.load(mmap=True)``) are read from their file with ``pread`` straight into
the slot: copying from the mapping instead faults every page into the process, which measured ~3x slower than
the rest of the pipeline on the H200 host. Other sources (anonymous memory) are copied with a memcpy.

    ring = staging_ring(device)
    upload = ring.upload(host_tensors)       # returns at once; copies run in the background
    ...                                      # compute on the GPU meanwhile
    gpu_tensors = upload.wait()              # the current stream will see the data (no host sync needed)

On a CPU "device" the same code runs with plain copies (no pinning, no streams), which is what the tests use to
check the chunking and slot reuse.
"""

from __future__ import annotations

import bisect
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from .devices import indexed

SLOT_BYTES = 64 << 20
SLOTS = 8


def _default_threads() -> int:
    # Enough memcpy threads to keep ahead of the copy engine from the page cache, leaving cores for the rest.
    return max(1, min(6, (os.cpu_count() or 2) // 2))


class MappedFiles:
    """Which file, at which offset, backs the bytes of memory-mapped tensors (Linux ``/proc/self/maps``).

    A location is only valid while the mapping lives: callers ask for the tensors they hold (which keeps their
    mapping alive), and every `locate` reads the maps afresh, since an address of a model freed earlier may now
    belong to another file's mapping. Files are opened by identity (device and inode), not by path, so a file
    replaced on disk is never read in place of the one that is mapped."""

    def __init__(self):
        self.fds: dict[tuple[str, str], int] = {}  # (device, inode) -> read-only descriptor
        self.lock = threading.Lock()

    def locate(self, tensors: Sequence[torch.Tensor]) -> Optional[list[Optional[tuple[int, int]]]]:
        """(fd, offset) of each tensor's bytes when one file mapping holds them all, else None per tensor;
        None when the maps cannot be read (not Linux)."""
        try:
            with open("/proc/self/maps") as f:
                lines = f.read().splitlines()
        except OSError:
            return None
        maps = []  # (start, end, file offset, (device, inode), path)
        for line in lines:
            parts = line.split(maxsplit=5)
            if len(parts) == 6 and parts[5].startswith("/"):
                start, end = (int(x, 16) for x in parts[0].split("-"))
                # a deleted (replaced) file: usable only through a descriptor opened before, never by its path
                path = None if parts[5].endswith(" (deleted)") else parts[5]
                maps.append((start, end, int(parts[2], 16), (parts[3], parts[4]), path))
        maps.sort()
        starts = [m[0] for m in maps]
        out = []
        with self.lock:
            for t in tensors:
                addr, nbytes = t.data_ptr(), t.numel() * t.element_size()
                i = bisect.bisect_right(starts, addr) - 1
                if nbytes == 0 or i < 0 or addr + nbytes > maps[i][1]:
                    out.append(None)
                    continue
                start, _, offset, identity, path = maps[i]
                if identity not in self.fds and path is not None:
                    fd = os.open(path, os.O_RDONLY)
                    if os.fstat(fd).st_ino != int(identity[1]):  # replaced since /proc/self/maps was read
                        os.close(fd)
                        out.append(None)
                        continue
                    self.fds[identity] = fd
                fd = self.fds.get(identity)
                out.append(None if fd is None else (fd, offset + addr - start))
        return out


def _pread_into(fd: int, offset: int, out: np.ndarray) -> None:
    view, done = memoryview(out), 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"model file ended early while reading {len(view)} bytes at offset {offset}")
        done += n


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
        self.files = MappedFiles() if hasattr(os, "preadv") else None

    def locate(self, sources: Sequence[torch.Tensor]) -> list[Optional[tuple[int, int]]]:
        """Where each source's bytes lie in a mapped file ((fd, offset), or None): for `upload`'s ``files``. Valid
        while the caller holds the tensors."""
        found = self.files.locate(sources) if self.files is not None else None
        return found if found is not None else [None] * len(sources)

    def upload(self, sources: Sequence[torch.Tensor], files: Optional[Sequence] = None) -> Upload:
        """Start copying ``sources`` (CPU tensors, pageable or memory-mapped) to new tensors on the device;
        ``files`` (from `locate`) lets mapped ones be read from their file."""
        destinations = [torch.empty(s.shape, dtype=s.dtype, device=self.device) for s in sources]
        if self.cuda:
            # The new tensors may reuse memory the current stream is still reading: copy only after it; and
            # their memory must not be reused before the copy stream is done with it, even if dropped unwaited.
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            for d in destinations:
                d.record_stream(self.stream)
        futures = []
        for src, dst, where in zip(sources, destinations, files or [None] * len(sources)):
            if not src.is_contiguous():
                src, where = src.contiguous(), None
            src_b, dst_b = _bytes(src), _bytes(dst)
            for start in range(0, src_b.numel(), self.slot_bytes):
                end = min(src_b.numel(), start + self.slot_bytes)
                chunk_file = None if where is None else (where[0], where[1] + start)
                futures.append(self.pool.submit(self._copy_chunk, src_b[start:end], dst_b[start:end], chunk_file))
        return Upload(self, destinations, futures)

    def _copy_chunk(self, src: torch.Tensor, dst: torch.Tensor,
                    file: Optional[tuple[int, int]]) -> Optional[torch.cuda.Event]:
        """Stage one chunk (read from ``file``, (fd, offset), when given) and queue its copy to the device; returns
        the event marking that copy's end."""
        slot = self.free.get()
        try:
            if self.events[slot] is not None:
                self.events[slot].synchronize()  # the GPU has finished reading this slot's last chunk
            n = src.numel()
            staged = self.buffers[slot][:n]
            if file is not None:
                _pread_into(*file, staged.numpy())
            else:
                # numpy's memcpy: one thread, GIL released; torch's CPU copy would start an OpenMP team in every
                # worker and starve the thread that launches the GPU work
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
    device = indexed(device)
    with _rings_lock:
        ring = _rings.get(device)
        if ring is None:
            ring = _rings[device] = StagingRing(device)
        return ring
