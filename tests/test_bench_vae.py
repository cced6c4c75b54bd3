"""bench/vae.py's candidate for the VAE's 3D convolutions (taps stacked into one 2D convolution) computes what
`CausalConv3d` computes, chunk after chunk, in both memory layouts, before it is ever timed on a GPU."""


import pytest
import torch
from helpers import bench_module

from turbowan.models.vae import CausalConv3d


def _bench():
    return bench_module("vae")


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last_3d])
def test_causal_conv3d_as_one_conv2d_equals_the_3d_convolution_over_chunks(layout):
    conv3d_as_conv2d = _bench().conv3d_as_conv2d
    g = torch.Generator().manual_seed(0)
    conv = CausalConv3d(6, 5, 3).double()
    chunks = [torch.randn(2, 6, t, 7, 9, generator=g, dtype=torch.float64).contiguous(memory_format=layout)
              for t in (1, 4)]  # the first frame alone, then four: the cache carries the past frames over
    ours, theirs = {}, {}
    with torch.no_grad():
        for x in chunks:
            got, want = conv3d_as_conv2d(conv, x, ours), conv(x, theirs)
            assert got.shape == want.shape
            assert (got - want).abs().max() < 1e-12
            assert got.is_contiguous(memory_format=layout) or layout == torch.contiguous_format


def test_the_i2v_encode_table_times_both_paths_and_finds_the_latents_equal(capsys):
    from helpers import fixtures_dir

    from turbowan.models.vae import load_vae

    vae = load_vae(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)
    _bench().i2v_encode(vae, torch.device("cpu"), {"32x32": (32, 32)}, frames=33, repeat=1)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x32 |"))
    assert row.endswith("| True |")
