"""TurboWan: TurboDiffusion's Wan2.2 image-to-video (TurboWan2.2-I2V-A14B) and Wan2.1 text-to-video
(TurboWan2.1-T2V, `generate_t2v`) as a Python package.

    import turbowan
    high = turbowan.load_dit("TurboWan2.2-I2V-A14B-high-720P-quant.pth")
    low = turbowan.load_dit("TurboWan2.2-I2V-A14B-low-720P-quant.pth")
    vae = turbowan.load_vae("wan_2.1_vae.safetensors")
    text = turbowan.load_text_encoder("umt5_xxl_fp8_e4m3fn_scaled.safetensors").encode("a cat surfing")
    frames = turbowan.generate_i2v(high, low, vae, PIL.Image.open("cat.png"), text, num_frames=81)
    turbowan.write_video(frames[0], "cat.mp4", fps=16)
"""

from __future__ import annotations

from .checkpoint import DiTConfig, ModelFileError
from .lora import apply_lora
from .models.dit import WanI2VDiT, load_dit
from .options import ASPECT_RATIOS, RESOLUTIONS
from .placement import release, release_all, resident_models
from .pipeline import check_num_frames, generate_i2v, generate_t2v, target_size
from .progress import ProgressHook
from .sampler import expert_schedule, rcm_timesteps

__version__ = "0.1.0"


def load_vae(path, device=None, dtype=None):
    """Load the Wan2.1 VAE (``Wan2.1_VAE.pth`` or ComfyUI's ``wan_2.1_vae.safetensors``); see `turbowan.models.vae`."""
    import torch

    from .models.vae import load_vae as _load

    return _load(path, device=device, dtype=torch.bfloat16 if dtype is None else dtype)


def load_text_encoder(path, tokenizer=None, device=None, dtype=None):
    """Load the umT5-xxl text encoder (either file layout); see `turbowan.models.umt5`."""
    import torch

    from .models.umt5 import load_text_encoder as _load

    return _load(path, tokenizer=tokenizer, device=device, dtype=torch.bfloat16 if dtype is None else dtype)


def write_video(frames, path, fps: int = 16, format: str | None = None, quality: int = 8, loop: bool = True):
    """Write frames [T, H, W, 3] in [0, 1] as mp4 (H.264), webm (VP9) or gif; see `turbowan.video`."""
    from .video import write_video as _write

    kwargs = {} if format is None else {"format": format}
    return _write(frames, path, fps=fps, quality=quality, loop=loop, **kwargs)


__all__ = [
    "ASPECT_RATIOS", "DiTConfig", "ModelFileError", "ProgressHook", "RESOLUTIONS", "WanI2VDiT", "apply_lora",
    "check_num_frames", "expert_schedule", "generate_i2v", "generate_t2v", "load_dit", "load_text_encoder", "load_vae",
    "rcm_timesteps", "release", "release_all", "resident_models", "target_size", "write_video",
]
