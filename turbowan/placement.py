"""Where models live during a run and between runs: the execution modes and the process's residency.

Execution modes (per run, on CUDA):

* ``resident``: both experts on the GPU (fastest; needs memory for two experts).
* ``swap``:     one expert on the GPU at a time (the reference's way).
* ``stream``:   the expert's small parts stay on the GPU; its 40 blocks stay in host memory and each is copied
                in while earlier blocks compute, so only a few blocks of weights are on the GPU.
* ``auto``:     the first of resident / swap / stream whose estimate fits the free GPU memory.

Every host->GPU weight copy goes through the staging ring (`turbowan.staging`): a few pinned buffers filled
by CPU threads from the memory-mapped or pageable home copy. No mode pins a whole expert.

A whole upload (``resident``, ``swap``) copies the small parts, then the blocks in the order the forward runs them;
the forward waits only for the block it reaches (`BlockAttacher`), so an expert's first step computes while its
later blocks are still on their way.

Residency: models put on a GPU stay there after a run (``keep_loaded``), so the next run with the same
models moves nothing. They leave when a later load needs their memory (least recently used first), when
`release` / `release_all` is called, or when a run fails. Weights are never copied back device->host:
the host copy is the home, and releasing just points the parameters at it again.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn as nn

from .devices import free_cuda_bytes, indexed
from .memory import ALLOCATOR_FACTOR, FFN_CHUNK_TOKENS, activation_bytes, choose_mode
from .staging import Upload, staging_ring

log = logging.getLogger("turbowan")

STREAM_PREFETCH_BLOCKS = 2  # blocks copied in ahead of the one computing


def module_tensors(module: nn.Module) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(owner module, attribute name, tensor) for every parameter and buffer, without duplicates."""
    out, seen = [], set()
    for mod in module.modules():
        for name, t in list(mod._parameters.items()) + list(mod._buffers.items()):
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                out.append((mod, name, t))
    return out


def tensor_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for _, _, t in module_tensors(module))


def model_bytes(model) -> int:
    """All of a model's weights: an nn.Module's, or those of the network a wrapper (our WanVAE) holds as ``.model``."""
    return tensor_bytes(model.model) if hasattr(model, "model") else tensor_bytes(model)


class HostWeights:
    """A module's weights: the home copy in host memory, and device copies attached on demand."""

    def __init__(self, module: nn.Module):
        self.entries = module_tensors(module)
        self.host = [t.data for _, _, t in self.entries]
        self.files = None  # where memory-mapped host tensors lie in their files (found on the first upload)

    def upload(self, device: torch.device) -> Upload:
        ring = staging_ring(device)
        if self.files is None:  # valid for good: self.host keeps the mappings alive
            self.files = ring.locate(self.host)
        return ring.upload(self.host, self.files)

    def attach(self, bufs) -> None:
        for (mod, name, _), d in zip(self.entries, bufs):
            getattr(mod, name).data = d

    def detach(self) -> None:
        self.attach(self.host)


class BlockStreamer:
    """Runs a DiT's blocks with weights copied in from host memory, ``prefetch`` blocks ahead of the one computing.

    Installed as forward hooks on the blocks, so the network code knows nothing of it. The prefetch wraps
    around to the first blocks, so the next step (or the next run) starts without waiting."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, prefetch: int = STREAM_PREFETCH_BLOCKS):
        self.device = device
        self.prefetch = prefetch
        self.blocks = [HostWeights(b) for b in blocks]
        self.pending: dict[int, Upload] = {}
        self.hooks = []
        for i, block in enumerate(blocks):
            self.hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: self.enter(i)))
            self.hooks.append(block.register_forward_hook(lambda m, a, o, i=i: self.leave(i)))

    def _start(self, i: int) -> None:
        i %= len(self.blocks)
        if i not in self.pending:
            self.pending[i] = self.blocks[i].upload(self.device)

    def enter(self, i: int) -> None:
        """Make block i's weights resident (waiting for its copy) and start copying the next blocks."""
        self._start(i)
        self.blocks[i].attach(self.pending.pop(i).wait())
        for j in range(1, self.prefetch + 1):
            self._start(i + j)

    def leave(self, i: int) -> None:
        self.blocks[i].detach()

    def warm(self) -> None:
        """Start copying the first blocks, so the first step does not wait for them."""
        for i in range(self.prefetch):
            self._start(i)

    def drop_prefetched(self) -> None:
        self.pending.clear()  # the ring's record_stream keeps unfinished copies' memory safe

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        for hw in self.blocks:
            hw.detach()
        self.pending.clear()


class BlockAttacher:
    """Attaches each block of a whole upload when the forward first reaches it, so an expert's first step computes
    while its later blocks are still being copied in (the one-off upload of ``resident`` / ``swap`` mode overlaps
    the first step instead of preceding it). One-shot forward pre-hooks; gone once every block is attached."""

    def __init__(self, blocks: nn.ModuleList, uploads: list[tuple[HostWeights, Upload]]):
        self.pending = dict(enumerate(uploads))
        self.hooks = [b.register_forward_pre_hook(lambda m, a, i=i: self.attach(i)) for i, b in enumerate(blocks)]

    def attach(self, i: int) -> None:
        part = self.pending.pop(i, None)
        if part is not None:
            hw, upload = part
            hw.attach(upload.wait())
        if not self.pending:
            self.close()

    def close(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.pending.clear()  # the ring's record_stream keeps unfinished copies' memory safe


# -- residency ------------------------------------------------------------------------------------------------


@dataclass
class Resident:
    """One model on a device: ``how`` is "whole" (all weights copied in), "stream" (small parts copied in, blocks
    streamed) or "move" (a plain ``.to()``, for the VAE and models not homed on the CPU)."""

    model: object
    device: torch.device
    how: str
    home: torch.device
    nbytes: int
    parts: list = field(default_factory=list)  # HostWeights attached on the device
    pending: Optional[list] = None  # uploads not yet attached: (HostWeights, Upload)
    streamer: Optional[BlockStreamer] = None
    attacher: Optional[BlockAttacher] = None  # a whole upload's blocks, attached as the first forward reaches them

    def finish_upload(self) -> None:
        """Attach what must be on the device before the forward starts (the blocks of a whole upload attach as the
        forward reaches them: `BlockAttacher`)."""
        if self.pending is not None:
            for hw, upload in self.pending:
                hw.attach(upload.wait())
            self.pending = None


_residents: "OrderedDict[int, Resident]" = OrderedDict()  # least recently used first


def _host_parts(model) -> dict[str, HostWeights]:
    """The model's HostWeights per part ("small": everything but the blocks; "blocks": one per block), made once per model."""
    parts = getattr(model, "_turbowan_host", None)
    if parts is None:
        parts = model._turbowan_host = {}
    return parts


def _release(entry: Resident) -> None:
    if entry.how == "move":
        entry.model.to(entry.home)
        return
    entry.pending = None
    if entry.streamer is not None:
        entry.streamer.close()
    if entry.attacher is not None:
        entry.attacher.close()
    for hw in entry.parts:
        hw.detach()


def release(*models) -> None:
    """Take these models off every device (back to their host copies) and return the memory to the driver."""
    ids = {id(m) for m in models}
    devices = set()
    for key in [k for k, e in _residents.items() if id(e.model) in ids]:
        entry = _residents.pop(key)
        _release(entry)
        devices.add(entry.device)
    _empty_cache(devices)


def release_all(device=None) -> None:
    """Take every model this process keeps on ``device`` (all devices when None) off it."""
    device = indexed(device) if device is not None else None
    release(*[e.model for e in _residents.values() if device is None or e.device == device])


def resident_models(device=None) -> list:
    """The models kept on ``device`` (all devices when None), least recently used first."""
    device = indexed(device) if device is not None else None
    return [e.model for e in _residents.values() if device is None or e.device == device]


def device_bytes(model, device) -> int:
    """Bytes of ``model``'s weights on ``device``: what residency keeps there, or all of them for a model that
    lives there (a CPU run computes in place)."""
    device = indexed(device)
    entry = _residents.get(id(model))
    if entry is not None:
        return entry.nbytes if entry.device == device else 0
    return model_bytes(model) if model.device == device else 0


def _empty_cache(devices) -> None:
    if any(d.type == "cuda" for d in devices):
        torch.cuda.empty_cache()


# -- one run --------------------------------------------------------------------------------------------------


class Placement:
    """Puts the models of one run on the compute device per the execution mode. What it loads stays resident
    after a successful run (``keep_loaded``); `finish(ok=False)` releases it. ``before_load(nbytes, device)``
    lets a host application free its own memory before ours is allocated."""

    def __init__(self, device: torch.device, before_load: Optional[Callable[[int, torch.device], None]] = None,
                 keep_loaded: bool = True):
        self.device = indexed(device)
        self.before_load = before_load
        self.keep_loaded = keep_loaded
        self.used: set[int] = set()  # models this run needs: never evicted to make room
        self.ffn_chunk: Optional[int] = FFN_CHUNK_TOKENS  # tokens per FFN pass; None: all at once (set per run)

    def _entry(self, model) -> Optional[Resident]:
        entry = _residents.get(id(model))
        return entry if entry is not None and entry.device == self.device else None

    # -- experts -------------------------------------------------------------------------------------------
    def resolve_mode(self, high, low: Optional[nn.Module], tokens: int, allow_resident: bool = True,
                     ranks: int = 1) -> str:
        """The mode for this run. ``auto`` first makes room for one expert (so that a text encoder the host
        application still holds does not push us into a slower mode), then measures free memory, counting
        what these experts already hold on the device and what other idle models of ours would give back.
        ``allow_resident=False`` keeps auto to one expert on the GPU at a time. ``ranks``: the run is split over
        that many sequence-parallel ranks, each with its own device and its share of the tokens' activations
        (every rank holds whole experts, so the weights count in full)."""
        mode = getattr(high, "execution_mode", "auto")
        if self.device.type != "cuda":
            return "resident"  # nothing to move: CPU runs in place
        c = high.config
        one, other = tensor_bytes(high), tensor_bytes(low) if low is not None else 0  # None: a one-model run
        free = None
        if mode == "auto":
            act = activation_bytes(tokens, c.dim, c.ffn_dim, FFN_CHUNK_TOKENS, ranks)
            self._before(max(one, other) + act)
            free = self._available()
            mode = choose_mode(free, one, other if allow_resident else 1 << 62, act)
            if mode == "resident" and not allow_resident:
                mode = "swap"
            log.info("turbowan: execution mode auto -> %s (%.1f GB available)", mode, free / 1e9)
        # The FFN runs in token chunks to bound its [L, ffn_dim] activations; when both experts and the whole
        # activation fit with room to spare, it runs in one piece (no concatenation, full-size GEMMs).
        self.ffn_chunk = FFN_CHUNK_TOKENS
        if mode == "resident":
            free = self._available() if free is None else free
            if (one + other + activation_bytes(tokens, c.dim, c.ffn_dim, None, ranks)) * ALLOCATOR_FACTOR < free:
                self.ffn_chunk = None
        return mode

    def _available(self) -> int:
        """Free memory plus what our own resident models hold (already where needed, or released on demand)."""
        idle = sum(e.nbytes for k, e in _residents.items() if e.device == self.device and e.how != "stream")
        return free_cuda_bytes(self.device) + idle

    def start_expert(self, model, mode: str) -> None:
        """Start putting an expert on the device for ``mode`` (copies run in the background); see `load_expert`."""
        self.used.add(id(model))
        entry = self._entry(model)
        want = "stream" if mode == "stream" else "whole"
        if entry is not None and entry.how in (want, "move"):
            _residents.move_to_end(id(model))
            if entry.streamer is not None:
                entry.streamer.warm()
            return
        if entry is not None:
            release(model)
        if model.device == self.device:
            return  # loaded onto this device by the caller: nothing to do
        if model.device.type != "cpu" or self.device.type != "cuda":
            self._move(model)
            return
        model_ffn_chunk(model, self.ffn_chunk)
        parts = _host_parts(model)
        if "small" not in parts:
            parts["small"] = HostWeights(nn.ModuleList(m for n, m in model.named_children() if n != "blocks"))
        small = parts["small"]
        if want == "stream":
            nbytes = sum(t.numel() * t.element_size() for t in small.host)
            self._make_room(nbytes + (STREAM_PREFETCH_BLOCKS + 1) * tensor_bytes(model.blocks[0]))
            entry = Resident(model, self.device, "stream", model.device, nbytes, [small],
                             [(small, small.upload(self.device))], BlockStreamer(model.blocks, self.device))
            entry.streamer.warm()
        else:
            # the small parts first, then the blocks in the order the forward runs them (the ring copies in order)
            if "blocks" not in parts:
                parts["blocks"] = [HostWeights(b) for b in model.blocks]
            nbytes = tensor_bytes(model)
            self._make_room(nbytes)
            small_upload = (small, small.upload(self.device))
            blocks = [(hw, hw.upload(self.device)) for hw in parts["blocks"]]
            entry = Resident(model, self.device, "whole", model.device, nbytes, [small, *parts["blocks"]],
                             [small_upload], attacher=BlockAttacher(model.blocks, blocks))
        _residents[id(model)] = entry

    def load_expert(self, model, mode: str) -> None:
        """Have ``model`` ready to run on the device in ``mode`` (waits for copies started by `start_expert`)."""
        self.start_expert(model, mode)
        entry = self._entry(model)
        if entry is not None:
            model_ffn_chunk(model, self.ffn_chunk)
            entry.finish_upload()

    def unload(self, model) -> None:
        """Take a model off the device now (swap mode's switch, or a stage that needs the memory)."""
        self.used.discard(id(model))
        if self._entry(model) is not None:
            release(model)

    # -- VAE and other small models: a plain move --------------------------------------------------------------
    def load_vae(self, vae) -> None:
        self.used.add(id(vae))
        if self._entry(vae) is not None:
            _residents.move_to_end(id(vae))
            return
        if vae.device == self.device:
            return
        self._move(vae)

    def _move(self, model) -> None:
        home = model.device
        nbytes = model_bytes(model)
        self._make_room(nbytes)
        model.to(self.device)
        _residents[id(model)] = Resident(model, self.device, "move", home, nbytes)

    def drop_prefetched(self) -> None:
        """Free the blocks streamed experts copied in ahead (before a stage that needs the memory)."""
        for e in _residents.values():
            if e.streamer is not None and id(e.model) in self.used:
                e.streamer.drop_prefetched()

    # -- end of run ----------------------------------------------------------------------------------------------
    def finish(self, ok: bool) -> None:
        """After a run: keep what it loaded resident (``ok`` and ``keep_loaded``), else release it."""
        if self.device.type != "cuda":
            release(*[e.model for e in _residents.values() if id(e.model) in self.used])  # CPU: back home
            return
        if ok and self.keep_loaded:
            self.drop_prefetched()
            return
        release(*[e.model for e in _residents.values() if id(e.model) in self.used])

    # -- memory --------------------------------------------------------------------------------------------------
    def _make_room(self, nbytes: int) -> None:
        """Release our idle models on this device (least recently used first) until ``nbytes`` fit, then let the
        host application free what it holds."""
        if self.device.type == "cuda":
            for key, entry in list(_residents.items()):
                if free_cuda_bytes(self.device) > nbytes * ALLOCATOR_FACTOR:
                    break
                if entry.device == self.device and key not in self.used:
                    release(entry.model)
        self._before(nbytes)

    def _before(self, nbytes: int) -> None:
        if self.before_load is not None:
            self.before_load(int(nbytes), self.device)


def model_ffn_chunk(model, chunk: Optional[int]) -> None:
    for block in model.blocks:
        block.ffn.chunk = chunk
