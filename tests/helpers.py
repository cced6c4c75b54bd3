"""Small test helpers shared by the test modules (`from helpers import ...`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch

from turbowan.kernels import triton_runnable

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The reference fixtures: $TURBOWAN_FIXTURES, else the copy in tests/fixtures (data made by the reference)."""
    path = Path(os.environ.get("TURBOWAN_FIXTURES", REPO / "tests" / "fixtures"))
    if not (path / "manifest.json").exists():
        pytest.skip(f"reference fixtures not found at {path} (set TURBOWAN_FIXTURES)")
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


def gpu_module(interpreter_ok: bool = False) -> pytest.MarkDecorator:
    """`pytestmark = gpu_module()` at the top of a GPU test module: skips the whole module unless `triton_runs_here`
    (before it imports any kernel module), and marks its tests `gpu` (select them with `pytest -m gpu`)."""
    if not triton_runs_here(interpreter_ok):
        pytest.skip(_triton_reason(interpreter_ok), allow_module_level=True)
    return pytest.mark.gpu


def gpu(test):
    """Decorator for a GPU test in a CPU test module: marked `gpu`, skipped unless Triton and a CUDA GPU are here."""
    return pytest.mark.gpu(pytest.mark.skipif(not triton_runs_here(), reason=_triton_reason(False))(test))


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
