"""Where expert weights live during a run: the execution modes.

* ``resident``: both experts on the GPU for the whole run (fastest; needs memory for two experts).
* ``swap``:     one expert on the GPU at a time; the other waits in pinned host memory (the reference's way).
* ``stream``:   the expert's 40 blocks stay in pinned host memory; each block is copied to the GPU on a side
                stream while the previous block computes, so only ~two blocks of weights are on the GPU.
* ``auto``:     picks the first of resident / swap / stream whose estimate fits the free GPU memory.

Weights are never copied back device->host: the host copy is the home, and unloading just points the
parameters at it again (weights are read-only at inference).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Optional

import torch
import torch.nn as nn

from .devices import free_cuda_bytes

log = logging.getLogger("turbowan")

EXECUTION_MODES = ("auto", "resident", "swap", "stream")


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


def _set(mod: nn.Module, name: str, data: torch.Tensor) -> None:
    t = getattr(mod, name)
    t.data = data


class HostWeights:
    """A module's weights kept in host memory (pinned when CUDA is present), put on a device on demand."""

    def __init__(self, module: nn.Module, pin: bool):
        self.entries = module_tensors(module)
        self.host = []
        for mod, name, t in self.entries:
            h = t.data if t.device.type == "cpu" else t.data.cpu()
            if pin and not h.is_pinned():
                h = h.pin_memory()
            self.host.append(h)
            _set(mod, name, h)

    def to_device(self, device: torch.device, stream: Optional[torch.cuda.Stream] = None) -> list[torch.Tensor]:
        bufs = []
        ctx = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
        with ctx:
            for (mod, name, _), h in zip(self.entries, self.host):
                d = h.to(device, non_blocking=True)
                bufs.append(d)
        return bufs

    def attach(self, bufs: Iterable[torch.Tensor]) -> None:
        for (mod, name, _), d in zip(self.entries, bufs):
            _set(mod, name, d)

    def detach(self) -> None:
        for (mod, name, _), h in zip(self.entries, self.host):
            _set(mod, name, h)


class BlockStreamer:
    """Runs a DiT's blocks with weights streamed from pinned host memory, one block ahead on a side stream."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, pin: bool = True):
        self.device = device
        self.blocks = [HostWeights(b, pin) for b in blocks]
        self.side = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._pending: dict[int, tuple[list[torch.Tensor], Optional[torch.cuda.Event]]] = {}

    def _prefetch(self, i: int) -> None:
        if i >= len(self.blocks) or i in self._pending:
            return
        bufs = self.blocks[i].to_device(self.device, self.side)
        ev = None
        if self.side is not None:
            ev = torch.cuda.Event()
            ev.record(self.side)
        self._pending[i] = (bufs, ev)

    def enter(self, i: int) -> None:
        """Make block i's weights resident (waiting for its copy) and start copying block i+1."""
        self._prefetch(i)
        bufs, ev = self._pending.pop(i)
        if ev is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_event(ev)
            for b in bufs:
                b.record_stream(main)  # the side stream's allocator must not reuse these until main is done
        self.blocks[i].attach(bufs)
        self._prefetch(i + 1)

    def leave(self, i: int) -> None:
        self.blocks[i].detach()

    def close(self) -> None:
        for hw in self.blocks:
            hw.detach()
        self._pending.clear()


def activation_bytes(tokens: int, dim: int, ffn_dim: int, ffn_chunk: Optional[int]) -> int:
    """Rough peak of one block's activations in bf16 (residual, normed input, q/k/v, fp32 temporaries, FFN)."""
    width = 2 * tokens * dim  # one bf16 [L, dim] tensor
    ffn_rows = tokens if ffn_chunk is None else min(tokens, ffn_chunk)
    return 10 * width + 2 * 2 * ffn_rows * ffn_dim


def choose_mode(free_bytes: int, expert_bytes: int, other_expert_bytes: int, act_bytes: int) -> str:
    """auto: resident if both experts and the activations fit, else swap if one does, else stream."""
    margin = 1.1
    if (expert_bytes + other_expert_bytes + act_bytes) * margin < free_bytes:
        return "resident"
    if (expert_bytes + act_bytes) * margin < free_bytes:
        return "swap"
    return "stream"


def _host_ram_bytes() -> Optional[int]:
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not available (e.g. Windows)
        return None


def _should_pin(nbytes: int) -> bool:
    """Pin host copies only when there is plenty of RAM: pinned pages cannot be swapped out."""
    ram = _host_ram_bytes()
    return torch.cuda.is_available() and ram is not None and nbytes < 0.35 * ram


FFN_CHUNK_TOKENS = 16384


class Placement:
    """Puts models on the compute device for one run, following each expert's execution mode, and takes them
    off again (also on error or cancel). ``before_load(nbytes, device)`` lets a host application free memory."""

    def __init__(self, device: torch.device, before_load: Optional[Callable[[int, torch.device], None]] = None):
        self.device = device
        self.before_load = before_load
        # id -> (model, how, home): how is "host" (device copies of host weights), "stream" or "move" (.to())
        self.loaded: dict[int, tuple[object, str, torch.device]] = {}
        self.ffn_chunk: Optional[int] = FFN_CHUNK_TOKENS  # tokens per FFN pass; None: all at once (set per run)

    # -- experts -------------------------------------------------------------------------------------------
    def resolve_mode(self, high, low, tokens: int, allow_resident: bool = True) -> str:
        """The mode for this run. ``auto`` first lets the host application free what one expert needs (so a
        text encoder it still holds does not push us into a slower mode), then measures free memory.
        ``allow_resident=False`` keeps auto to one expert on the GPU at a time."""
        mode = getattr(high, "execution_mode", "auto")
        if self.device.type != "cuda":
            return "resident"  # nothing to move: CPU runs in place
        c = high.config
        one, other = tensor_bytes(high), tensor_bytes(low)
        free = None
        if mode == "auto":
            act = activation_bytes(tokens, c.dim, c.ffn_dim, FFN_CHUNK_TOKENS)
            self._before(max(one, other) + act)
            free = free_cuda_bytes(self.device)
            mode = choose_mode(free, one, other if allow_resident else 1 << 62, act)
            if mode == "resident" and not allow_resident:
                mode = "swap"
            log.info("turbowan: execution mode auto -> %s (%.1f GB free)", mode, free / 1e9)
        # The FFN runs in token chunks to bound its [L, ffn_dim] activations; when both experts and the whole
        # activation fit with room to spare, it runs in one piece (no concatenation, full-size GEMMs).
        self.ffn_chunk = FFN_CHUNK_TOKENS
        if mode == "resident":
            free = free_cuda_bytes(self.device) if free is None else free
            if (one + other + activation_bytes(tokens, c.dim, c.ffn_dim, None)) * 1.1 < free:
                self.ffn_chunk = None
        return mode

    def _host(self, module: nn.Module) -> HostWeights:
        # Not pinned: an expert moves once per run (pinning 15-29 GB costs more than it saves); stream pins its blocks.
        hw = getattr(module, "_turbowan_host", None)
        if hw is None:
            hw = HostWeights(module, pin=False)
            module._turbowan_host = hw
        return hw

    def load_expert(self, model, mode: str) -> None:
        if id(model) in self.loaded or model.device == self.device:
            return
        if self.device.type != "cuda":
            self._move(model)
            return
        model_ffn_chunk(model, self.ffn_chunk)
        if mode == "stream":
            small = [m for name, m in model.named_children() if name != "blocks"]
            nbytes = sum(tensor_bytes(m) for m in small) + 2 * tensor_bytes(model.blocks[0])
            self._before(nbytes)
            for m in small:
                hw = self._host(m)
                hw.attach(hw.to_device(self.device))
            model.streamer = BlockStreamer(model.blocks, self.device, pin=_should_pin(tensor_bytes(model)))
            self.loaded[id(model)] = (model, "stream", model.device)
        else:
            self._before(tensor_bytes(model))
            hw = self._host(model)
            hw.attach(hw.to_device(self.device))
            self.loaded[id(model)] = (model, "host", model.device)

    def unload(self, model) -> None:
        entry = self.loaded.pop(id(model), None)
        if entry is None:
            return
        _, how, home = entry
        if how == "stream":
            model.streamer.close()
            model.streamer = None
            for name, m in model.named_children():
                if name != "blocks":
                    self._host(m).detach()
        elif how == "host":
            self._host(model).detach()
        else:
            model.to(home)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    # -- VAE (small: a plain move) -----------------------------------------------------------------------------
    def load_vae(self, vae) -> None:
        if vae.device == self.device or id(vae) in self.loaded:
            return
        self._before(tensor_bytes(vae.model) if hasattr(vae, "model") else 0)
        self._move(vae)

    def _move(self, model) -> None:
        home = model.device
        model.to(self.device)
        self.loaded[id(model)] = (model, "move", home)

    def unload_all(self) -> None:
        for model, _, _ in list(self.loaded.values()):
            self.unload(model)

    def _before(self, nbytes: int) -> None:
        if self.before_load is not None:
            self.before_load(int(nbytes), self.device)


def model_ffn_chunk(model, chunk: Optional[int]) -> None:
    for block in model.blocks:
        block.ffn.chunk = chunk
