"""``turbowan demo``: the whole image-to-video pipeline on tiny random weights, in seconds on a CPU.

It builds a 2-block DiT pair and a narrow Wan2.1 VAE with the real architectures (same code as the released
models, only smaller widths), a random prompt embedding and a drawn test image, runs `generate_i2v` with SLA
attention and writes an mp4. The video shows that the install works end to end; with random weights it is
coloured noise, not a picture of anything: real videos need the released model files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .checkpoint import DiTConfig
from .devices import check_device, set_cpu_threads
from .models.dit import random_dit
from .models.random_weights import random_parameters
from .models.vae import VAEConfig, WanVAE, WanVAEModel
from .options import VIDEO_FORMATS
from .video import check_writable

# Widths chosen to run in seconds on two CPU cores while keeping every structural constant of the release
# (36 input channels, 64-wide heads as in the fixtures, the 4096-wide text input, z_dim 16).
DEMO_DIT = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2)
DEMO_VAE = VAEConfig(dim=4)  # base width (release: 96)
DEMO_WIDTH, DEMO_HEIGHT, DEMO_FRAMES = 96, 64, 9  # 3 latent frames x 4 x 6 patches = 72 tokens
# 72 tokens = 2 key blocks of 64; keeping one of them exercises both the sparse and the linear branch of SLA.
DEMO_SLA_TOPK = 0.5
DEMO_TEXT_TOKENS = 16


def build_demo_models(seed: int = 0, dtype: torch.dtype = torch.float32):
    """(high, low, vae): two tiny experts with different seeds and a tiny VAE, on the CPU."""
    high, low = (random_dit(DEMO_DIT, dtype=dtype, attention="sla", sla_topk=DEMO_SLA_TOPK, seed=seed + 2 + i)
                 for i in range(2))  # seed + 1 draws the prompt
    high.source, low.source = "demo-high", "demo-low"  # the pipeline checks the high/low roles by name
    vae_model = WanVAEModel(DEMO_VAE)
    generator = torch.Generator().manual_seed(seed + 4)
    vae_model.load_state_dict(random_parameters(vae_model, generator, lambda name: dtype), strict=True, assign=True)
    return high, low, WanVAE(vae_model)


def demo_image(width: int = DEMO_WIDTH, height: int = DEMO_HEIGHT):
    """A drawn test card (colour gradients and a bright disc): the input frame, made without any file."""
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = x / max(1, width - 1)
    g = y / max(1, height - 1)
    b = 0.5 + 0.5 * np.sin(x / 6.0) * np.cos(y / 6.0)
    disc = ((x - 0.6 * width) ** 2 + (y - 0.45 * height) ** 2) < (0.22 * height) ** 2
    rgb = np.stack([r, g, b], axis=-1)
    rgb[disc] = (1.0, 0.9, 0.2)
    return Image.fromarray((rgb * 255 + 0.5).astype(np.uint8))


def run_demo(output="turbowan-demo.mp4", seed: int = 0, device="cpu", progress=None) -> int:
    """Build the tiny models, generate DEMO_FRAMES frames, write ``output``; prints what it did. Returns 0."""
    from . import write_video
    from .pipeline import generate_i2v

    output = Path(output).expanduser()
    if output.suffix.lower().lstrip(".") not in VIDEO_FORMATS:
        raise ValueError(f"-o {output.name}: the demo writes .mp4, .webm or .gif")
    check_writable(output)  # before the work, not after it
    if check_device(device, option="--device").type == "cpu":
        set_cpu_threads()
    if progress is not None:
        progress.restart_clock()
    high, low, vae = build_demo_models(seed)
    text = torch.randn(1, DEMO_TEXT_TOKENS, DEMO_DIT.text_dim, generator=torch.Generator().manual_seed(seed + 1))
    if progress is not None:
        progress("load", 1, 1)
    frames = generate_i2v(
        high, low, vae, demo_image(), 0.1 * text,  # umT5 outputs are of this size
        num_frames=DEMO_FRAMES, width=DEMO_WIDTH, height=DEMO_HEIGHT, seed=seed, progress=progress, device=device,
    )
    write_video(frames[0], output, fps=16)
    if progress is not None:
        progress("write", 1, 1)
        progress.close()
    timing = f" in {progress.summary()}" if progress is not None else ""
    print(
        f"demo video written to {output} ({DEMO_FRAMES} frames, {DEMO_WIDTH}x{DEMO_HEIGHT}){timing}.\n"
        "It came from tiny RANDOM weights, so it shows noise: it proves the install runs the whole pipeline "
        "(VAE encode, SLA attention, 4 rCM steps with both experts, VAE decode, mp4), nothing more.\n"
        "Real videos need the released model files (about 14.5 GB per int8 expert):\n"
        "  TurboWan2.2-I2V-A14B-high-720P-quant.pth and -low-720P-quant.pth  "
        "https://huggingface.co/TurboDiffusion/TurboWan2.2-I2V-A14B-720P\n"
        "  wan_2.1_vae.safetensors and umt5_xxl_fp8_e4m3fn_scaled.safetensors  "
        "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged\n"
        "then: turbowan doctor --models-dir DIR, and turbowan generate --models-dir DIR --image IMG --prompt TEXT"
    )
    return 0
