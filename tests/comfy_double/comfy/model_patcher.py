"""Test double of ComfyUI 0.3.54's `comfy.model_patcher.ModelPatcher`: devices and size accounting only.

Weight patches (LoRA), hooks, wrappers and callbacks are not modelled; load and unload move the whole
module between ``load_device`` and ``offload_device`` and keep ``model_loaded_weight_memory`` up to date,
which is what `comfy.model_management` reads.
"""

from __future__ import annotations

import uuid

from . import model_management


class ModelPatcher:
    def __init__(self, model, load_device, offload_device, size=0, weight_inplace_update=False):
        self.size = size
        self.model = model
        if getattr(self.model, "device", None) is None:
            self.model.device = offload_device
        self.patches = {}
        self.backup = {}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.weight_inplace_update = weight_inplace_update
        self.patches_uuid = uuid.uuid4()
        self.parent = None
        for attr, default in (("model_loaded_weight_memory", 0), ("lowvram_patch_counter", 0),
                              ("model_lowvram", False), ("current_weight_patches_uuid", None)):
            if not hasattr(self.model, attr):
                setattr(self.model, attr, default)
        self.model_size()

    def model_size(self):
        if self.size > 0:
            return self.size
        self.size = model_management.module_size(self.model)
        return self.size

    def loaded_size(self):
        return self.model.model_loaded_weight_memory

    def lowvram_patch_counter(self):
        return self.model.lowvram_patch_counter

    def clone(self):
        n = self.__class__(self.model, self.load_device, self.offload_device, self.size, self.weight_inplace_update)
        n.patches = {k: list(v) for k, v in self.patches.items()}
        n.object_patches = dict(self.object_patches)
        n.model_options = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.model_options.items()}
        n.parent = self
        return n

    def is_clone(self, other):
        return hasattr(other, "model") and self.model is other.model

    def model_patches_to(self, device):
        pass  # no patches are modelled

    def model_patches_models(self):
        return []

    def model_dtype(self):
        if hasattr(self.model, "get_dtype"):
            return self.model.get_dtype()

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        if load_weights:
            self.load(device_to, lowvram_model_memory=lowvram_model_memory, force_patch_weights=force_patch_weights, full_load=True)
        return self.model

    def load(self, device_to=None, lowvram_model_memory=0, force_patch_weights=False, full_load=False):
        if device_to is not None:
            self.model.to(device_to)
            self.model.device = device_to
        self.model.model_loaded_weight_memory = self.model_size()
        self.model.current_weight_patches_uuid = self.patches_uuid

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            self.model.current_weight_patches_uuid = None
            if device_to is not None:
                self.model.to(device_to)
                self.model.device = device_to
            self.model.model_loaded_weight_memory = 0

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        before = self.model.model_loaded_weight_memory
        if before == 0:
            self.load(device_to, force_patch_weights=force_patch_weights, full_load=True)
        return self.model.model_loaded_weight_memory - before

    def partially_unload(self, device_to, memory_to_free=0):
        freed = self.model.model_loaded_weight_memory
        self.unpatch_model(device_to)
        return freed

    def detach(self, unpatch_all=True):
        if unpatch_all:
            self.unpatch_model(self.offload_device, unpatch_weights=True)
        return self.model

    def current_loaded_device(self):
        return self.model.device
