"""Ulysses sequence parallelism on gloo: 2, 4 and 8 CPU processes give the one-process frames to float32 rounding.

The video is 9 frames of 144x112: 3 x 7 x 9 = 189 latent tokens, which divides by none of 2, 4, 8, so the padding
path runs. Every rank's frames are compared with a one-process run; heads that do not split are refused. With the
VAE split over the ranks (a spatial tile each), the one-process run to compare with is one that tiles its VAE alike.
"""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import fixtures_dir, max_abs
from PIL import Image

import turbowan
from turbowan import pipeline
from turbowan.checkpoint import DiTConfig
from turbowan.models.dit import random_dit
from turbowan.ops.sequence_parallel import check_world_size
from turbowan.vae_tiling import tile_for_ranks

FOUR_HEADS = DiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2)
EIGHT_HEADS = DiTConfig(dim=256, ffn_dim=256, num_heads=8, num_layers=2)
RUN = dict(num_frames=9, width=144, height=112, seed=3, device="cpu")
SLA_TOPK = 0.5  # 3 key blocks of 64: one is kept per 128-query block, so SLA's sparse and linear parts both run


def _models(kind: str, attention: str):
    """Float32 experts ('fixture': the 2-head reference files; 'four_heads' / 'eight_heads': random ones) and the
    VAE."""
    f = fixtures_dir()
    if kind == "fixture":
        high, low = (turbowan.load_dit(f / "dit" / f"TurboWan2.2-I2V-tiny-{n}.pth", attention=attention,
                                       sla_topk=SLA_TOPK, dtype=torch.float32) for n in ("high", "low"))
    else:
        config = FOUR_HEADS if kind == "four_heads" else EIGHT_HEADS
        high, low = (random_dit(config, dtype=torch.float32, attention=attention, sla_topk=SLA_TOPK, seed=s)
                     for s in (1, 2))
    return high, low, turbowan.load_vae(f / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)


def _generate(kind: str, attention: str, **kwargs) -> torch.Tensor:
    f = fixtures_dir()
    image = Image.open(f / "pipeline" / "input_image.png")
    text = torch.randn(1, 10, 4096, generator=torch.Generator().manual_seed(0))
    return turbowan.generate_i2v(*_models(kind, attention), image, text, **RUN, **kwargs)


def _worker(rank: int, world: int, store: str, out_dir: str, jobs: list) -> None:
    """Each job (model kind, attention, split_vae) on every rank; the one-process run of job i on rank i % world."""
    torch.set_num_threads(1)  # the ranks share the machine's few cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        results = {}
        for kind, attention, split_vae in jobs:
            try:
                results[kind, attention, split_vae] = _generate(kind, attention, sequence_parallel=True,
                                                                split_vae=split_vae)
            except ValueError as exc:  # refusals come back as their message
                results[kind, attention, split_vae] = str(exc)
        for i in range(rank, len(jobs), world):  # the one-process runs, shared out (1 thread is fastest here)
            kind, attention, split_vae = jobs[i]
            if split_vae:  # the VAE tiled as the split tiles it, all tiles in this process
                pipeline.tile_for_run = lambda vae, stage, grid, *rest: tile_for_ranks(grid, world)
            results["single", i] = _generate(kind, attention)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _run_ranks(tmp_path, world: int, jobs: list) -> list[dict]:
    mp.spawn(_worker, args=(world, str(tmp_path / "store"), str(tmp_path), jobs), nprocs=world)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]


def test_two_ranks_give_the_one_process_frames_for_original_and_sla_with_the_vae_whole_or_split(tmp_path):
    jobs = [("fixture", "original", False), ("fixture", "sla", False), ("fixture", "sla", True)]
    ranks = _run_ranks(tmp_path, 2, jobs)
    for i, job in enumerate(jobs):
        single = ranks[i % 2]["single", i]
        assert single.shape == (1, 9, 112, 144, 3)
        for result in ranks:
            assert torch.equal(result[job], ranks[0][job])  # every rank returns the same frames
        assert max_abs(ranks[0][job], single) < 1e-5, job


def test_four_ranks_with_the_vae_split_four_ways_give_the_one_process_frames_and_refuse_two_heads(tmp_path):
    jobs = [("four_heads", "sla", True), ("fixture", "original", True)]
    ranks = _run_ranks(tmp_path, 4, jobs)
    single = ranks[0]["single", 0]
    for result in ranks:
        assert torch.equal(result[jobs[0]], ranks[0][jobs[0]])
        assert result[jobs[1]] == ("sequence parallelism splits the 2 attention heads evenly over the ranks, so 4 "
                                   "ranks do not work; use one of: 2")
    assert max_abs(ranks[0][jobs[0]], single) < 1e-5


def test_world_sizes_that_do_not_divide_the_heads_are_refused_naming_the_valid_ones():
    check_world_size(40, 8)
    with pytest.raises(ValueError, match=r"40 attention heads .* 3 ranks do not work; use one of: 2, 4, 5, 8, 10, "
                                         r"20, 40$"):
        check_world_size(40, 3)


def test_sequence_parallel_without_a_process_group_is_refused_before_any_work():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_process_group"):
        _generate("fixture", "original", sequence_parallel=True)



def test_eight_ranks_give_the_one_process_frames(tmp_path):
    # 8 ranks (they divide A14B's 40 heads) over 189 tokens: 24 per rank, the last rank's slice 3 tokens of padding
    jobs = [("eight_heads", "sla", False)]
    ranks = _run_ranks(tmp_path, 8, jobs)
    single = ranks[0]["single", 0]
    for result in ranks:
        assert torch.equal(result[jobs[0]], ranks[0][jobs[0]])
    assert max_abs(ranks[0][jobs[0]], single) < 1e-5
