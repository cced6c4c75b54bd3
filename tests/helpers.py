"""Small test helpers shared by the test modules (`from helpers import ...`)."""

from __future__ import annotations

import importlib
import math
import os
import types
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from turbowan.kernels import triton_runnable

REPO = Path(__file__).resolve().parents[1]


def bench_module(name: str) -> types.ModuleType:
    """bench/<name>.py imported as its scripts see each other (bench/ on sys.path while it imports)."""
    import sys

    sys.path.insert(0, str(REPO / "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "bench"))


def fixtures_dir() -> Path:
    """The reference fixtures: $TURBOWAN_FIXTURES, else the copy in tests/fixtures (data made by the reference).

    Missing fixtures FAIL the test rather than skip it: they ship with the repository, so a checkout without them
    must not "pass" without testing parity."""
    path = Path(os.environ.get("TURBOWAN_FIXTURES", REPO / "tests" / "fixtures"))
    if not (path / "manifest.json").exists():
        pytest.fail(f"reference fixtures not found at {path}: restore tests/fixtures from the repository "
                    "(or point TURBOWAN_FIXTURES at a copy)", pytrace=False)
    return path


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, computed in float64."""
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())


# -- GPU tests ---------------------------------------------------------------------------------------------------


def triton_runs_here(interpreter_ok: bool = False) -> bool:
    """The one condition of the GPU tests: Triton imports and a CUDA GPU is present (with interpreter_ok, Triton's CPU
    interpreter, TRITON_INTERPRET=1, will do instead of the GPU)."""
    return triton_runnable() and (torch.cuda.is_available() or interpreter_ok)


def _triton_reason(interpreter_ok: bool) -> str:
    return "needs Triton and a CUDA GPU" + (" (or TRITON_INTERPRET=1)" if interpreter_ok else "")


def gpu_module(interpreter_ok: bool = False) -> list[pytest.MarkDecorator]:
    """`pytestmark = gpu_module()` at the top of a GPU test module: marks its tests `gpu` (select them with
    `pytest -m gpu`) and skips each one unless `triton_runs_here`, so the skip summary counts tests, not modules.
    Import kernel modules there with `kernel_module`: the module must collect without Triton."""
    return [pytest.mark.gpu, pytest.mark.skipif(not triton_runs_here(interpreter_ok),
                                                 reason=_triton_reason(interpreter_ok))]


def kernel_module(name: str) -> types.ModuleType:
    """The module ``name``, imported on first attribute use (inside a test, after the GPU skip)."""

    class Lazy(types.ModuleType):
        def __getattr__(self, attr):
            return getattr(importlib.import_module(name), attr)

    return Lazy(name)


def gpu(test):
    """Decorator for a GPU test in a CPU test module: marked `gpu`, skipped unless Triton and a CUDA GPU are here."""
    return pytest.mark.gpu(pytest.mark.skipif(not triton_runs_here(), reason=_triton_reason(False))(test))


def sla_structured_inputs(batch, length, heads, dim, dtype, device, seed):
    """Random q, k, v whose 64-token key blocks have distinct means, so the top-k choice has clear margins."""
    gen = torch.Generator().manual_seed(seed)
    noise = [torch.randn(batch, length, heads, dim, generator=gen) for _ in range(3)]
    key_means = torch.randn(batch, math.ceil(length / 64), heads, dim, generator=gen) * 2
    query_means = torch.randn(batch, math.ceil(length / 128), heads, dim, generator=gen)
    q = noise[0] * 0.5 + query_means.repeat_interleave(128, dim=1)[:, :length]
    k = noise[1] * 0.5 + key_means.repeat_interleave(64, dim=1)[:, :length]
    weight = torch.randn(dim, dim, generator=gen) / dim**0.5
    bias = torch.randn(dim, generator=gen) * 0.1
    to = dict(device=device, dtype=dtype)
    return q.to(**to), k.to(**to), noise[2].to(**to), weight.to(device), bias.to(device)


# -- videos ------------------------------------------------------------------------------------------------------


class Decoded(NamedTuple):
    frames: np.ndarray  # (T, H, W, 3) uint8 RGB
    codec: str
    pix_fmt: str
    average_rate: object  # a Fraction (frames per second) as the container states it
    metadata: dict


def decode(path) -> Decoded:
    """A video file as PyAV decodes it. Everything is read while the container is open (PyAV 19 refuses after)."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
        return Decoded(frames, stream.codec_context.name, stream.codec_context.pix_fmt, stream.average_rate,
                       dict(container.metadata))


# The original node's inputs (its API-format workflows give exactly these); everything we added is optional.
ORIGINAL_INPUTS = {
    "TurboWanModelLoader": {"model_name", "attention_type", "sla_topk"},
    "TurboDiffusionI2VSampler": {"high_noise_model", "low_noise_model", "conditioning", "vae", "image", "num_frames",
                                 "num_steps", "resolution", "aspect_ratio", "boundary", "sigma_max", "seed",
                                 "use_ode"},
    "TurboDiffusionSaveVideo": {"frames", "filename_prefix", "fps", "format", "quality", "loop"},
}


def write_tiny_lora(path, seed: int = 0, rank: int = 4, dim: int = 128) -> Path:
    """A native-layout LoRA (rank 4, alpha 4) on every self-attention q of the tiny 2-block experts (dim 128)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(2):
        base = f"diffusion_model.blocks.{i}.self_attn.q"
        sd[f"{base}.lora_down.weight"] = 0.1 * torch.randn(rank, dim, generator=g)
        sd[f"{base}.lora_up.weight"] = 0.1 * torch.randn(dim, rank, generator=g)
        sd[f"{base}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))
    return Path(path)


TINY_T2V = dict(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=16)  # the tiny I2V experts' size, in_dim 16


def write_tiny_t2v(path, quant: bool = False, seed: int = 0) -> Path:
    """A tiny random TurboWan2.1-T2V checkpoint in the released layout (as tests/fixtures/README.md describes for
    the I2V experts: bf16, fp32 norms, SLA proj_l under attn_op.local_attn, int8 triples for -quant), but with 16
    input channels and no image branch. .safetensors or .pth by the file name."""
    from safetensors.torch import save_file

    from turbowan.checkpoint import DiTConfig
    from turbowan.models.dit import random_dit

    model = random_dit(DiTConfig(**TINY_T2V), quant="w8a16" if quant else None, seed=seed)
    sd = {k.replace("self_attn.proj_l", "self_attn.attn_op.local_attn.proj_l"): v.contiguous()
          for k, v in model.state_dict().items()}
    if str(path).endswith(".safetensors"):
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return Path(path)


def tiny_dit_inputs():
    """(x, t, context, y) for a one-step forward of a tiny I2V DiT (16 + 20 channels, 3 frames of 8x8, t = 900)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 3, 8, 8, generator=g)
    y = torch.randn(1, 20, 3, 8, 8, generator=g)
    ctx = torch.randn(1, 512, 4096, generator=g) * 0.1
    return x, torch.tensor([900.0]), ctx, y
