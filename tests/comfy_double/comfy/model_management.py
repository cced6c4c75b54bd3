"""Test double of ComfyUI 0.3.54's `comfy.model_management`, as ComfyUI runs with ``--cpu``.

Same public names and signatures; models are loaded and unloaded whole (no low-VRAM partial loading).
See README.md in the folder above.
"""

from __future__ import annotations

import os
import sys
import threading
import weakref
from enum import Enum

import torch


class VRAMState(Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5


class CPUState(Enum):
    GPU = 0
    CPU = 1
    MPS = 2


cpu_state = CPUState.CPU
vram_state = VRAMState.DISABLED
EXTRA_RESERVED_VRAM = 400 * 1024 * 1024
DISABLE_SMART_MEMORY = False
OOM_EXCEPTION = torch.cuda.OutOfMemoryError


def get_torch_device():
    if cpu_state == CPUState.CPU:
        return torch.device("cpu")
    return torch.device(torch.cuda.current_device())


def is_device_type(device, type):
    return getattr(device, "type", None) == type


def is_device_cpu(device):
    return is_device_type(device, "cpu")


def is_device_cuda(device):
    return is_device_type(device, "cuda")


def cpu_mode():
    return cpu_state == CPUState.CPU


def _host_available_bytes() -> int:
    # what psutil.virtual_memory().available reports, read from the kernel directly
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def get_free_memory(dev=None, torch_free_too=False):
    """Free bytes on ``dev`` (host RAM for the CPU); with ``torch_free_too`` also what torch holds unused."""
    if dev is None:
        dev = get_torch_device()
    if getattr(dev, "type", None) in ("cpu", "mps"):
        free_total = free_torch = _host_available_bytes()
    else:
        stats = torch.cuda.memory_stats(dev)
        free_cuda, _ = torch.cuda.mem_get_info(dev)
        free_torch = stats["reserved_bytes.all.current"] - stats["active_bytes.all.current"]
        free_total = free_cuda + free_torch
    return (free_total, free_torch) if torch_free_too else free_total


def module_size(module):
    return sum(t.nelement() * t.element_size() for t in module.state_dict().values())


def extra_reserved_memory():
    return EXTRA_RESERVED_VRAM


def minimum_inference_memory():
    return (1024 * 1024 * 1024) * 0.8 + extra_reserved_memory()


def unet_offload_device():
    if vram_state == VRAMState.HIGH_VRAM:
        return get_torch_device()
    return torch.device("cpu")


def intermediate_device():
    return torch.device("cpu")


def vae_device():
    return get_torch_device()


def vae_offload_device():
    return torch.device("cpu")


def vae_dtype(device=None, allowed_dtypes=[]):
    """bf16 where the device supports it and the caller allows it, else float32 (always float32 on CPU)."""
    for d in allowed_dtypes:
        if d == torch.bfloat16 and device is not None and is_device_cuda(device) and torch.cuda.is_bf16_supported():
            return d
    return torch.float32


class LoadedModel:
    """One ModelPatcher that ComfyUI has put on its load device (held weakly, like the real one)."""

    def __init__(self, model):
        self._model = weakref.ref(model)
        self.device = model.load_device
        self.real_model = None
        self.currently_used = True
        self.model_finalizer = None

    @property
    def model(self):
        return self._model()

    def model_memory(self):
        return self.model.model_size()

    def model_loaded_memory(self):
        return self.model.loaded_size()

    def model_offloaded_memory(self):
        return self.model.model_size() - self.model.loaded_size()

    def model_memory_required(self, device):
        if device == self.model.current_loaded_device():
            return self.model_offloaded_memory()
        return self.model_memory()

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        self.model.model_patches_to(self.device)
        self.model.model_patches_to(self.model.model_dtype())
        self.model_use_more_vram(lowvram_model_memory or 1e32, force_patch_weights=force_patch_weights)
        real_model = self.model.model
        self.real_model = weakref.ref(real_model)
        self.model_finalizer = weakref.finalize(real_model, cleanup_models)
        return real_model

    def model_unload(self, memory_to_free=None, unpatch_weights=True):
        """Unload all of the model (True), or only ``memory_to_free`` bytes of it where it can (False: still listed)."""
        if memory_to_free is not None and memory_to_free < self.model.loaded_size():
            freed = self.model.partially_unload(self.model.offload_device, memory_to_free)
            if freed >= memory_to_free:
                return False
        self.model.detach(unpatch_weights)
        self.model_finalizer.detach()
        self.model_finalizer = None
        self.real_model = None
        return True

    def model_use_more_vram(self, extra_memory, force_patch_weights=False):
        return self.model.partially_load(self.device, extra_memory, force_patch_weights=force_patch_weights)

    def is_dead(self):
        return self.real_model is not None and self.real_model() is not None and self.model is None

    def __eq__(self, other):
        return self.model is other.model


current_loaded_models: list[LoadedModel] = []


def loaded_models(only_currently_used=False):
    return [m.model for m in current_loaded_models if m.currently_used or not only_currently_used]


def free_memory(memory_required, device, keep_loaded=[]):
    """Unload models on ``device`` until ``memory_required`` bytes are free: those with the least offloaded first,
    then the least referenced, then the smallest. Returns the LoadedModel entries it unloaded."""
    candidates = []
    for i in range(len(current_loaded_models) - 1, -1, -1):
        entry = current_loaded_models[i]
        if entry.device == device and entry not in keep_loaded and not entry.is_dead():
            candidates.append((-entry.model_offloaded_memory(), sys.getrefcount(entry.model), entry.model_memory(), i))
            entry.currently_used = False

    unloaded = []
    for *_, i in sorted(candidates):
        memory_to_free = None
        if not DISABLE_SMART_MEMORY:
            free = get_free_memory(device)
            if free > memory_required:
                break
            memory_to_free = memory_required - free
        if current_loaded_models[i].model_unload(memory_to_free):
            unloaded.append(i)
    removed = [current_loaded_models.pop(i) for i in sorted(unloaded, reverse=True)]
    if removed:
        soft_empty_cache()
    return removed


def load_models_gpu(models, memory_required=0, force_patch_weights=False, minimum_memory_required=None, force_full_load=False):
    """Put each ModelPatcher on its load device, first freeing what the others need there."""
    extra_mem = max(minimum_inference_memory(), memory_required + extra_reserved_memory())
    to_load = []
    for m in set(models):
        entry = LoadedModel(m)
        if entry in current_loaded_models:
            entry = current_loaded_models[current_loaded_models.index(entry)]
            entry.currently_used = True
        to_load.append(entry)

    needed: dict = {}
    for entry in to_load:
        needed[entry.device] = needed.get(entry.device, 0) + entry.model_memory_required(entry.device)
    for device, nbytes in needed.items():
        if device != torch.device("cpu"):
            free_memory(nbytes * 1.1 + extra_mem, device)

    for entry in to_load:
        if entry in current_loaded_models:  # ComfyUI unloads it as a clone of itself (detach(unpatch_all=False))
            current_loaded_models.remove(entry)
        entry.model_load(0, force_patch_weights=force_patch_weights)
        current_loaded_models.insert(0, entry)


def load_model_gpu(model):
    return load_models_gpu([model])


def cleanup_models():
    """Drop the entries whose model was garbage collected (each loaded model's finalizer calls this)."""
    current_loaded_models[:] = [m for m in current_loaded_models if m.real_model is None or m.real_model() is not None]


def soft_empty_cache(force=False):
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


def unload_all_models():
    free_memory(1e30, get_torch_device())


class InterruptProcessingException(Exception):
    pass


interrupt_processing_mutex = threading.RLock()
interrupt_processing = False


def interrupt_current_processing(value=True):
    global interrupt_processing
    with interrupt_processing_mutex:
        interrupt_processing = value


def processing_interrupted():
    with interrupt_processing_mutex:
        return interrupt_processing


def throw_exception_if_processing_interrupted():
    """Raise InterruptProcessingException once if Cancel was pressed (and clear the flag)."""
    global interrupt_processing
    with interrupt_processing_mutex:
        if interrupt_processing:
            interrupt_processing = False
            raise InterruptProcessingException()
