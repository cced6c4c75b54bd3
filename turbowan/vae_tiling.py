"""VAE tiling policy: which spatial tile size the VAE should use for the memory at hand.

The network (`models/vae.py`) tiles only when told an explicit (tile_h, tile_w) and says how much memory a
stage needs (`WanVAE.memory_needed`); choosing a tile from a byte budget or from free GPU memory lives here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .devices import free_cuda_bytes

MIN_AUTO_TILE = 16  # latent pixels (128 video pixels); smaller tiles cost more in overlap than they save
STREAM_VAE_BUDGET = 4 * 1024**3  # bytes of VAE activations allowed when the experts are streamed


def tile_for_budget(vae, stage: str, grid: Tuple[int, int], budget: float, batch: int = 1,
                    frames: int = 1) -> Optional[Tuple[int, int]]:
    """None if the whole frame fits `budget` bytes, else the largest square tile that does
    (at least MIN_AUTO_TILE latent pixels, even if that does not fit)."""
    if vae.memory_needed(stage, grid, None, batch, frames) <= budget:
        return None
    side = max(grid)
    while side > MIN_AUTO_TILE and vae.memory_needed(stage, grid, (min(side, grid[0]), min(side, grid[1])), batch,
                                                     frames) > budget:
        side -= 4
    side = max(side, MIN_AUTO_TILE)
    return (min(side, grid[0]), min(side, grid[1]))


def auto_tile(vae, stage: str, grid: Tuple[int, int], batch: int = 1, frames: int = 1) -> Optional[Tuple[int, int]]:
    """`tile_for_budget` with 90% of the free CUDA memory; None (no tiling) on CPU."""
    if vae.device.type != "cuda":
        return None
    return tile_for_budget(vae, stage, grid, 0.9 * free_cuda_bytes(vae.device), batch, frames)


def tile_for_run(vae, stage: str, grid: Tuple[int, int], mode: str, device: torch.device, frames: int):
    """VAE tiling for one stage of a pipeline run: none on CPU; from free memory normally; in ``stream``
    mode the largest tile that fits STREAM_VAE_BUDGET, so the whole run stays within a small card."""
    if device.type != "cuda" or not hasattr(vae, "memory_needed"):  # e.g. a stand-in VAE without estimates
        return None
    if mode != "stream":
        return auto_tile(vae, stage, grid, frames=frames)
    return tile_for_budget(vae, stage, grid, STREAM_VAE_BUDGET, frames=frames)
