"""Test double of ComfyUI 0.3.54's `comfy.sd.VAE`, the object the stock `VAELoader` outputs.

Only what a consumer of a Wan2.1 VAE reads is modelled: ``first_stage_model`` (an nn.Module whose
``state_dict()`` has the file's tensor names, cast to ``vae_dtype``), ``device``, ``vae_dtype``,
``patcher`` and the latent layout attributes. Unlike the real class it keeps the tensors at whatever
width the file has, so the tiny fixture VAE can stand in for wan_2.1_vae.safetensors.
"""

from __future__ import annotations

import torch

from . import model_management, model_patcher


class _StoredTensors(torch.nn.Module):
    """A module tree whose parameters are exactly the given tensors, under their dotted names."""

    def __init__(self, sd):
        super().__init__()
        for key, tensor in sd.items():
            owner = self
            *path, leaf = key.split(".")
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, torch.nn.Module())
                owner = owner._modules[part]
            owner.register_parameter(leaf, torch.nn.Parameter(tensor.clone(), requires_grad=False))


class VAE:
    def __init__(self, sd=None, device=None, config=None, dtype=None, metadata=None):
        if not sd:
            raise RuntimeError("ERROR: VAE is invalid: None\n\nIf the VAE is from a checkpoint loader node your checkpoint does not contain a valid VAE.")
        if "decoder.middle.0.residual.0.gamma" in sd and "decoder.upsamples.0.upsamples.0.residual.2.weight" not in sd:
            # Wan 2.1 VAE: 4x temporal / 8x spatial compression, 16 latent channels
            self.upscale_ratio = (lambda a: max(0, a * 4 - 3), 8, 8)
            self.downscale_ratio = (lambda a: max(0, (a + 3) // 4), 8, 8)
            self.latent_dim = 3
            self.latent_channels = 16
            self.working_dtypes = [torch.bfloat16, torch.float16, torch.float32]
        else:
            self.upscale_ratio = self.downscale_ratio = 8
            self.latent_dim = 2
            self.latent_channels = 4
            self.working_dtypes = [torch.bfloat16, torch.float32]
        self.output_channels = 3
        self.first_stage_model = _StoredTensors(sd).eval()

        self.device = device if device is not None else model_management.vae_device()
        offload_device = model_management.vae_offload_device()
        self.vae_dtype = dtype if dtype is not None else model_management.vae_dtype(self.device, self.working_dtypes)
        self.first_stage_model.to(self.vae_dtype)
        self.output_device = model_management.intermediate_device()
        self.patcher = model_patcher.ModelPatcher(self.first_stage_model, load_device=self.device, offload_device=offload_device)
