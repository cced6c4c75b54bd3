"""The VAE's causal convolution as a Triton implicit GEMM (turbowan/kernels/conv3d_triton.py) and its wiring in the VAE.

Runs on CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1); skipped without Triton. The kernel
computes conv3d(stream, w, bias, padding=(0, kh//2, kw//2)) (+ residual) in float32 and rounds once, so it is
compared with a float64 convolution of the same (rounded) inputs, to within the output's rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import gpu_module, kernel_module, rel_err

pytestmark = gpu_module(interpreter_ok=True)

conv3d_triton = kernel_module("turbowan.kernels.conv3d_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
# The interpreter rounds float32 -> bf16 by truncation; fp16 is exact there, bf16 is checked on the GPU.
DTYPES = [torch.float16, torch.bfloat16] if DEVICE == "cuda" else [torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _inputs(c_in, c_out, kt, kh, b, t, h, w, dtype, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    stream = torch.randn(b, c_in, t + kt - 1, h, w, generator=g)
    weight = torch.randn(c_out, c_in, kt, kh, kh, generator=g) / (c_in * kt * kh * kh) ** 0.5
    bias = torch.randn(c_out, generator=g)
    res = torch.randn(b, c_out, t, h, w, generator=g) if residual else None

    def put(x):
        return None if x is None else x.to(DEVICE, dtype)

    stream = put(stream).contiguous(memory_format=torch.channels_last_3d)
    return stream, put(weight), put(bias), put(res)


def _exact(stream, weight, bias, res):
    kh, kw = weight.shape[3], weight.shape[4]
    out = F.conv3d(stream.cpu().double(), weight.cpu().double(), None if bias is None else bias.cpu().double(),
                   padding=(0, kh // 2, kw // 2))
    return out if res is None else out + res.cpu().double()


SHAPES = [  # c_in, c_out, kt, kh, b, t, h, w: widths not a multiple of the tile, frame sizes not of BLOCK_M
    (16, 24, 3, 3, 1, 2, 5, 7),
    (32, 3, 3, 3, 2, 1, 4, 6),  # the decoder head's 3 output channels
    (96, 96, 3, 3, 1, 3, 9, 11),  # the real full-resolution width (96 = 3 x 32)
    (64, 130, 3, 1, 1, 2, 3, 5),  # the upsample's time convolution (3, 1, 1)
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_the_kernel_is_the_convolution_plus_bias_rounded_once(shape, dtype):
    stream, weight, bias, _ = _inputs(*shape, dtype=dtype)
    got = conv3d_triton.causal_conv3d(stream, weight, bias)
    want = _exact(stream, weight, bias, None)
    assert got.shape == want.shape
    assert rel_err(got.cpu(), want) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_residual_is_added_in_the_epilogue(dtype):
    stream, weight, bias, res = _inputs(96, 96, 3, 3, 1, 2, 6, 10, dtype, residual=True)
    got = conv3d_triton.causal_conv3d(stream, weight, bias, res)
    assert rel_err(got.cpu(), _exact(stream, weight, bias, res)) < (4e-3 if dtype == torch.bfloat16 else 1e-3)


def test_without_bias_the_kernel_adds_nothing():
    stream, weight, _, _ = _inputs(32, 16, 3, 3, 1, 1, 4, 4, torch.float16)
    got = conv3d_triton.causal_conv3d(stream, weight, None)
    assert rel_err(got.cpu(), _exact(stream, weight, None, None)) < 1e-3


def test_every_tile_configuration_gives_the_same_convolution():
    stream, weight, bias, res = _inputs(64, 40, 3, 3, 1, 2, 5, 6, torch.float16, residual=True)
    want = _exact(stream, weight, bias, res)
    for cfg in [(32, 16, 16, 4, 2), (64, 64, 32, 4, 3), (16, 128, 64, 4, 2)]:
        got = conv3d_triton.causal_conv3d(stream, weight, bias, res, config=conv3d_triton.TileConfig(*cfg))
        assert rel_err(got.cpu(), want) < 1e-3, cfg


def test_the_output_is_channels_last_in_the_input_dtype():
    stream, weight, bias, _ = _inputs(16, 32, 3, 3, 1, 2, 3, 4, torch.float16)
    got = conv3d_triton.causal_conv3d(stream, weight, bias)
    assert got.dtype == torch.float16
    assert got.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_channels_first_stream_is_refused_with_the_fix():
    stream, weight, bias, _ = _inputs(16, 16, 3, 3, 1, 1, 3, 3, torch.float16)
    with pytest.raises(ValueError, match="channels-last.*use F.conv3d"):
        conv3d_triton.causal_conv3d(stream.contiguous(), weight, bias)


def test_a_stream_shorter_than_the_kernel_is_refused():
    stream, weight, bias, _ = _inputs(16, 16, 3, 3, 1, 1, 3, 3, torch.float16)
    with pytest.raises(ValueError, match="prefix the past frames"):
        conv3d_triton.causal_conv3d(stream[:, :, :2], weight, bias)


def test_a_block_k_that_does_not_divide_the_channels_is_refused():
    stream, weight, bias, _ = _inputs(48, 16, 3, 3, 1, 1, 3, 3, torch.float16)
    with pytest.raises(ValueError, match="block_k 32 does not divide the 48"):
        conv3d_triton.causal_conv3d(stream, weight, bias, config=conv3d_triton.TileConfig(16, 16, 32, 4, 2))


@needs_cuda
def test_on_cuda_the_full_width_vae_with_the_kernel_is_as_close_to_float32_as_with_cudnn(monkeypatch):
    """Random weights amplify rounding, so the yardstick is cuDNN's own bf16 error against a float32 run."""
    from turbowan.models import vae as V

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = V.WanVAEModel(V.VAEConfig())  # the released width: its 96-channel convolutions take the kernel
    g = torch.Generator().manual_seed(0)
    video = (torch.rand(1, 3, 9, 64, 96, generator=g) * 2 - 1).cuda()
    exact = V.WanVAE(model)
    want_latents = exact.encode(video)
    want_frames = exact.decode(want_latents)
    vae = V.WanVAE(model.to(torch.bfloat16))
    real, calls = V.conv3d_dispatch(), []
    assert real is not None, "the Triton convolution should load on a CUDA machine with Triton"
    monkeypatch.setattr(V, "conv3d_dispatch", lambda: lambda *a: calls.append(1) or real(*a))
    kernel = vae.encode(video), vae.decode(want_latents)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert bool(calls) == hopper, "the 96-channel convolutions take the kernel on Hopper, and only there"
    monkeypatch.setattr(V, "conv3d_dispatch", lambda: None)
    cudnn = vae.encode(video), vae.decode(want_latents)
    for got, base, want in zip(kernel, cudnn, (want_latents, want_frames)):
        assert rel_err(got.float(), want) <= 1.25 * rel_err(base.float(), want) + 1e-3


@needs_cuda
def test_on_cuda_the_doctor_finds_the_vae_kernels_working():
    from turbowan.doctor import check_vae

    checks = check_vae(torch.device("cuda"))
    assert [c.ok for c in checks] == [True, True], [c.line() for c in checks]
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert ("Triton implicit GEMM" in checks[1].name) == hopper
