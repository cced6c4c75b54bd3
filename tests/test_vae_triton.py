"""The fused RMSNorm + SiLU Triton kernel of the VAE (turbowan/kernels/vae_triton.py) and its wiring in the VAE.

Runs on CUDA, or on the CPU under the Triton interpreter (TRITON_INTERPRET=1); skipped without Triton.
The kernel computes y = silu(x / max(||x||_channels, 1e-12) * sqrt(C) * gamma) in float32 and rounds once.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import fixtures_dir, gpu_module, kernel_module, rel_err

pytestmark = gpu_module(interpreter_ok=True)

from turbowan.models import vae as vae_module  # noqa: E402

vae_triton = kernel_module("turbowan.kernels.vae_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: the Triton interpreter
AWKWARD_CHANNELS = [3, 4, 96, 100, 384]  # not a power of two (3, 96, 100) and the real widths (96, 384)
SHAPE_5D = (2, 3, 5, 7)  # B, T, H, W: 210 pixels, not a multiple of any row block (8 .. 1024 rows)


def _activation(channels, dtype, shape=SHAPE_5D, seed=0):
    """A channels-last activation [B, C, ...] with per-pixel scales from 0 to 4 and one all-zero pixel, and gamma."""
    gen = torch.Generator().manual_seed(seed)
    b, *rest = shape
    x = torch.randn(b, channels, *rest, generator=gen) * 4 * torch.rand(b, 1, *rest, generator=gen)
    x[(0, slice(None)) + (0,) * len(rest)] = 0  # norm 0: F.normalize's eps keeps it 0 instead of NaN
    gamma = torch.randn(channels, *[1] * len(rest), generator=gen)
    layout = torch.channels_last_3d if x.ndim == 5 else torch.channels_last
    return x.to(DEVICE, dtype).contiguous(memory_format=layout), gamma.to(DEVICE, dtype)


def _formula(x, gamma, silu):
    """The exact result, in float64, of the kernel's formula on the given (already rounded) inputs."""
    x = x.double()
    y = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * x.shape[1] ** 0.5 * gamma.double()
    return F.silu(y) if silu else y


def _eager(x, gamma, silu):
    """The VAE's eager PyTorch chain (RMSNorm.forward, then nn.SiLU), rounding to x's dtype after every op."""
    y = F.normalize(x, dim=1) * x.shape[1] ** 0.5 * gamma
    return F.silu(y) if silu else y


def _ulp(t):
    """Spacing of t's dtype at the magnitude of each element (float64)."""
    fraction_bits = {torch.bfloat16: 7, torch.float16: 10}[t.dtype]
    _, exponent = torch.frexp(t.double().abs())  # |t| in [2^(e-1), 2^e)
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent - 1 - fraction_bits).clamp_min(2.0**-24)


# ------------------------------------------------------------------------------------------------
# The kernel against the formula
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize("channels", AWKWARD_CHANNELS)
def test_fp32_matches_the_formula(channels, silu):
    x, gamma = _activation(channels, torch.float32)
    y = vae_triton.rms_norm_silu(x, gamma, silu)
    exact = _formula(x, gamma, silu)
    # A few float32 ulps (2^-23 = 1.2e-7): the norm's summation over C, the divide, and SiLU's conditioning
    # (~|y| for negative y) give measured errors up to 1.1e-6 relative (C = 384), as for eager float32.
    assert ((y.double() - exact).abs() <= 4e-6 * exact.abs() + 1e-7).all()
    # Against the eager float32 chain: measured <= 8e-8 (summation order only); the brief asks ~1e-6.
    assert rel_err(y, _eager(x, gamma, silu)) < 1e-6
    assert (y.flatten(2)[0, :, 0] == 0).all()  # the all-zero pixel stays 0 (eps clamp, no NaN)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", AWKWARD_CHANNELS)
def test_16_bit_output_is_the_formula_rounded_once(channels, dtype):
    x, gamma = _activation(channels, dtype)
    y = vae_triton.rms_norm_silu(x, gamma, silu=True)
    exact = _formula(x, gamma, silu=True)
    rounded = exact.to(dtype)
    # The kernel's float32 result is within ~1e-6 of exact, so its single rounding can differ from rounding the
    # exact value only when that lies within ~1e-6 of a rounding midpoint: at most 1 ulp, on a tiny fraction
    # of elements (measured: none for bf16, <= 0.12% for fp16 at these sizes; bound 1%).
    assert ((y.double() - rounded.double()).abs() <= _ulp(rounded)).all()
    assert (y != rounded).double().mean() < 0.01


@pytest.mark.parametrize("channels", AWKWARD_CHANNELS)
def test_bf16_is_at_least_as_accurate_as_the_eager_chain(channels):
    x, gamma = _activation(channels, torch.bfloat16)
    y = vae_triton.rms_norm_silu(x, gamma, silu=True)
    eager = _eager(x, gamma, silu=True)
    exact = _formula(x, gamma, silu=True)
    # Eager rounds the norm, the quotient, both products and SiLU to bf16 (measured 2.8e-3 .. 4.2e-3 relative
    # to exact); one rounding gives ~1.7e-3. Both are within 1e-2 of each other (a few roundings of 2^-9).
    assert rel_err(y, exact) <= rel_err(eager, exact)
    assert rel_err(y, eager) < 1e-2


# ------------------------------------------------------------------------------------------------
# Layouts
# ------------------------------------------------------------------------------------------------


def test_output_keeps_shape_dtype_and_channels_last_strides():
    x, gamma = _activation(96, torch.bfloat16)
    y = vae_triton.rms_norm_silu(x, gamma, silu=True)
    assert y.shape == x.shape and y.dtype == x.dtype and y.stride() == x.stride() and y.device == x.device


def test_4d_per_frame_view_of_a_5d_activation():
    # AttentionBlock normalises [B*T, C, H, W] views of an NDHWC activation (NHWC strides, not a copy).
    x5, gamma5 = _activation(16, torch.float32)
    x = x5.transpose(1, 2).flatten(0, 1)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() == x5.data_ptr()
    gamma = gamma5.reshape(16, 1, 1)
    y = vae_triton.rms_norm_silu(x, gamma, silu=False)
    assert y.stride() == x.stride()
    assert ((y.double() - _formula(x, gamma, False)).abs() <= 4e-6 * _formula(x, gamma, False).abs() + 1e-7).all()


def test_4d_channels_last_input():
    x, gamma = _activation(100, torch.float32, shape=(3, 5, 9))
    y = vae_triton.rms_norm_silu(x, gamma, silu=True)
    assert y.stride() == x.stride()
    assert rel_err(y, _formula(x, gamma, True)) < 1e-6  # float32 rounding only (see test_fp32_matches_the_formula)


def test_strided_view_of_channels_last_data_is_accepted():
    # A crop keeps the channel stride 1 but leaves gaps between pixels; it is made dense first.
    x, gamma = _activation(8, torch.float32)
    crop = x[:, :, 1:, 1:-1, 2:]
    assert crop.stride(1) == 1 and not crop.is_contiguous(memory_format=torch.channels_last_3d)
    y = vae_triton.rms_norm_silu(crop, gamma, silu=True)
    assert y.shape == crop.shape and y.is_contiguous(memory_format=torch.channels_last_3d)
    assert rel_err(y, _formula(crop, gamma, True)) < 1e-6


def test_refuses_a_channels_first_input():
    x, gamma = _activation(8, torch.float32)
    with pytest.raises(ValueError, match="channels-last.*PyTorch RMSNorm"):
        vae_triton.rms_norm_silu(x.contiguous(), gamma, silu=True)


def test_refuses_float64():
    x, gamma = _activation(8, torch.float32)
    with pytest.raises(ValueError, match="float64.*PyTorch RMSNorm"):
        vae_triton.rms_norm_silu(x.double(), gamma, silu=True)


# ------------------------------------------------------------------------------------------------
# Wiring in the VAE
# ------------------------------------------------------------------------------------------------


def test_vae_blocks_pair_each_norm_with_its_silu(monkeypatch):
    # `_run` must hand an RMSNorm followed by nn.SiLU to `rms_norm_silu` with silu=True and skip the SiLU module,
    # and the attention norm (no SiLU) with silu=False. Here the kernel stands in for `rms_norm_silu` on any
    # device (the real dispatch takes it only for CUDA tensors), so this also runs in the interpreter.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # exact float32 convolutions on CUDA
    torch.manual_seed(0)
    res = vae_module.ResidualBlock(8, 16).to(DEVICE).requires_grad_(False)
    attn = vae_module.AttentionBlock(16).to(DEVICE).requires_grad_(False)
    for norm in (res.residual[0], res.residual[3], attn.norm):
        torch.nn.init.normal_(norm.gamma)
    x = torch.randn(1, 8, 3, 4, 6, device=DEVICE).contiguous(memory_format=torch.channels_last_3d)

    # The reference: every module of the Sequential run on its own, as the checkpoint lists them.
    cache = {}
    h = x
    for layer in res.residual:
        h = layer(h, cache) if isinstance(layer, vae_module.CausalConv3d) else layer(h)
    expected = attn(h + res.shortcut(x))

    calls = []

    def fused(norm, t, silu):
        calls.append(silu)
        return vae_triton.rms_norm_silu(t.contiguous(memory_format=vae_module._channels_last(t)), norm.gamma, silu)

    monkeypatch.setattr(vae_module, "rms_norm_silu", fused)
    got = attn(res(x, {}))
    assert calls == [True, True, False]
    # Float32 rounding differences of the norms (~1e-7) through two convolutions and attention.
    assert rel_err(got, expected) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a whole decode is too slow in the Triton interpreter")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_matches_the_eager_decode_on_cuda(dtype, monkeypatch):
    # TF32 convolutions would round the (slightly different) norm outputs to 10-bit mantissas; keep them exact.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    from safetensors.torch import load_file

    latents = load_file(str(fixtures_dir() / "vae" / "vae_io.safetensors"))["latent_in"].float()
    checkpoint = fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth"
    vae = vae_module.load_vae(checkpoint, device="cuda", dtype=dtype)

    real_dispatch = vae_module.vae_norm_dispatch
    assert real_dispatch() is not None
    dispatched = []

    def counting_dispatch():
        dispatched.append(1)
        return real_dispatch()

    monkeypatch.setattr(vae_module, "vae_norm_dispatch", counting_dispatch)
    fused = vae.decode(latents)
    assert len(dispatched) > 0  # the activations were channels-last CUDA tensors, so the kernel ran
    monkeypatch.setattr(vae_module, "vae_norm_dispatch", lambda: None)  # forces the eager chain
    eager_fp32 = vae_module.load_vae(checkpoint, device="cuda", dtype=torch.float32).decode(latents)

    assert fused.dtype == dtype and fused.shape == eager_fp32.shape == (1, 3, 5, 64, 64)
    if dtype == torch.float32:
        # Only the norms' summation order differs (~1e-7 each); the CPU decode is 1.3e-6 from the reference.
        assert rel_err(fused, eager_fp32) < 1e-5
    else:
        # bf16 rounding through ~40 layers puts any bf16 decode ~3e-2 from float32 (the reference's own gap on
        # the fixture is 3.0e-2). The fused kernel rounds once where the eager chain rounds five times, so it must
        # be no further from float32 than the eager bf16 decode on the same card (10% slack for ordering noise).
        eager_bf16 = vae_module.load_vae(checkpoint, device="cuda", dtype=dtype).decode(latents)
        assert rel_err(fused, eager_fp32) <= 1.1 * rel_err(eager_bf16, eager_fp32)
