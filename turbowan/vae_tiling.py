"""VAE tiling policy: which spatial tile size the VAE should use for the memory at hand.

The network (`models/vae.py`) tiles only when told an explicit (tile_h, tile_w) and says how much memory a
stage needs (`WanVAE.memory_needed`); choosing a tile from a byte budget or from free GPU memory lives here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .devices import free_cuda_bytes

MIN_AUTO_TILE = 16  # latent pixels (128 video pixels); smaller tiles cost more in overlap than they save


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
    """VAE tiling for one stage of a pipeline run: none on CPU; from 90% of the free memory normally; in ``stream``
    mode (a small or capped card) from half of it. Measured on an H200 capped at 12 GB (bench/user_path.py): tiles
    sized to 90% ran the caching allocator into its cap, freeing and re-allocating every tile (41 s a video, 26 s
    with a fixed 4 GB budget, 28.6 s with half); at 24 GB half of the free memory decodes 720p untiled."""
    if device.type != "cuda" or not hasattr(vae, "memory_needed"):  # e.g. a stand-in VAE without estimates
        return None
    if mode != "stream":
        return auto_tile(vae, stage, grid, frames=frames)
    # stream: the card is small (or capped): half of what is free, so tiles stay clear of the allocator's limit
    return tile_for_budget(vae, stage, grid, 0.5 * free_cuda_bytes(vae.device), frames=frames)
