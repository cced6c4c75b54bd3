"""VAE tiling policy: which spatial tile size the VAE should use for the memory at hand.

The network (`models/vae.py`) tiles only when told an explicit (tile_h, tile_w) and says how much memory a
stage needs (`WanVAE.memory_needed`); choosing a tile from a byte budget or from free GPU memory lives here.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .devices import free_cuda_bytes
from .models.vae import tile_count

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


def tile_for_ranks(grid: Tuple[int, int], ranks: int, tile: Optional[Tuple[int, int]] = None) -> Optional[Tuple[int, int]]:
    """The tile for a VAE stage split over ``ranks`` sequence-parallel ranks: the frame cut into at most
    ``ranks`` overlapping tiles (rows x columns, the layout whose tiles' shorter side is longest: thin strips
    get thin overlaps, and seams show), so each rank codes one; smaller where the memory tile ``tile`` (`tile_for_run`) is smaller. ``ranks`` 1: ``tile``."""
    if ranks <= 1:
        return tile
    best = None
    for rows in (r for r in range(1, ranks + 1) if ranks % r == 0):
        split = (_side_for_count(grid[0], rows), _side_for_count(grid[1], ranks // rows))
        key = (min(split), -tile_count(grid, split) * split[0] * split[1])  # squarest, then least area
        if best is None or key > best[0]:
            best = (key, split)
    split = best[1]
    return split if tile is None else (min(split[0], tile[0]), min(split[1], tile[1]))


def _side_for_count(size: int, count: int) -> int:
    """The smallest tile side whose overlapping spans cover ``size`` latent pixels in at most ``count`` tiles."""
    side = max(2, -(-size // count))
    while side < size and tile_count((size, 1), (side, 1)) > count:
        side += 1
    return min(side, size)
