"""A VAE decode split over ranks (a spatial tile each, gloo on the CPU) hands out finished frames per latent frame,
so a video writer can encode while the rest decodes; the frames are those of one process tiling alike."""

from __future__ import annotations

import datetime

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fixtures_dir, max_abs

from turbowan.models.vae import load_vae, tile_count
from turbowan.vae_tiling import tile_for_ranks

GRID = (8, 12)  # latent pixels: two 8 x 7 tiles overlapping by one latent pixel (8 video pixels of blend)
STEPS = 3  # latent frames -> 9 video frames


def _vae():
    return load_vae(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)


def _latents() -> torch.Tensor:
    return torch.randn(1, 16, STEPS, *GRID, generator=torch.Generator().manual_seed(0))


def _worker(rank: int, world: int, store: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        handed_out = []
        # only rank 0 takes the frames (it writes the file), as in the command: the ranks must still agree
        take = (lambda start, frames: handed_out.append((start, frames.clone()))) if rank == 0 else None
        video = _vae().decode(_latents(), tile=tile_for_ranks(GRID, world), group=dist.group.WORLD, on_frames=take)
        torch.save({"video": video, "handed_out": handed_out}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_split_decode_hands_out_each_latent_frames_video_frames_as_one_process_tiling_alike_decodes(tmp_path):
    tile = tile_for_ranks(GRID, 2)
    assert tile_count(GRID, tile) == 2
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one_process = _vae().decode(_latents(), tile=tile)
    handed_out = ranks[0]["handed_out"]
    assert [start for start, _ in handed_out] == [0, 1, 5]  # frame 0, then 4 frames per latent frame
    assert torch.equal(torch.cat([frames for _, frames in handed_out], dim=2), ranks[0]["video"])
    assert torch.equal(ranks[1]["video"], ranks[0]["video"])  # every rank the same video
    assert max_abs(ranks[0]["video"], one_process) < 1e-5


def test_several_tiles_in_one_process_hand_out_the_video_once_blended():
    vae = _vae()
    handed_out = []
    video = vae.decode(_latents(), tile=tile_for_ranks(GRID, 2), on_frames=lambda s, f: handed_out.append((s, f)))
    assert len(handed_out) == 1 and handed_out[0][0] == 0 and torch.equal(handed_out[0][1], video)
