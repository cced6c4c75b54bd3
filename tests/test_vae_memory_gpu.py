"""A 720p, 81-frame decode and encode fit a card with 8 GB free (full-width VAE, tiles from turbowan.vae_tiling.auto_tile). CUDA only."""

import pytest
import torch
from helpers import gpu_module

from turbowan.models.vae import VAEConfig, WanVAE, WanVAEModel
from turbowan.vae_tiling import auto_tile

BIG_GPU = torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= 12e9
pytestmark = [*gpu_module(), pytest.mark.skipif(not BIG_GPU, reason="needs a CUDA GPU with at least 12 GB")]

FREE = 8e9  # what the user's card has left
GRID = (90, 160)  # 720p latents


@pytest.fixture(scope="module")
def vae():
    with torch.device("cuda"):
        model = WanVAEModel(VAEConfig())  # released width; random weights do not change memory use
    return WanVAE(model.to(torch.bfloat16))


@pytest.fixture
def eight_gb_free():
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    filler = torch.empty(int(free - FREE), dtype=torch.uint8, device="cuda")  # leaves 8 GB free
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    yield base
    del filler
    torch.cuda.empty_cache()


def test_720p_decode_fits_in_8_gb(vae, eight_gb_free):
    latents = torch.randn(1, 16, 21, *GRID, device="cuda")
    tile = auto_tile(vae, "decode", GRID, frames=81)
    assert tile is not None  # the whole frame would not fit: tiles are needed
    video = vae.decode(latents, tile=auto_tile(vae, "decode", GRID, frames=81))  # an out-of-memory error fails the test
    assert video.shape == (1, 3, 81, 720, 1280)
    assert torch.cuda.max_memory_allocated() - eight_gb_free < FREE


def test_720p_encode_fits_in_8_gb(vae, eight_gb_free):
    video = torch.zeros(1, 3, 81, 720, 1280, device="cuda", dtype=torch.bfloat16)
    latents = vae.encode(video, tile=auto_tile(vae, "encode", GRID, frames=81))
    assert latents.shape == (1, 16, 21, *GRID)
    assert torch.cuda.max_memory_allocated() - eight_gb_free < FREE
