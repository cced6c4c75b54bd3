"""The fused RMSNorm + RoPE kernel (turbowan/kernels/norm_triton.py) equals the PyTorch path it replaces on CUDA."""

import os

import pytest
import torch

pytest.importorskip("triton")
if not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"):
    pytest.skip("needs CUDA or the Triton interpreter (TRITON_INTERPRET=1)", allow_module_level=True)

from turbowan.kernels.norm_triton import rms_norm_rope as fused  # noqa: E402
from turbowan.models.dit import apply_rope, rms_norm_rope, rope_angles  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _inputs(b, grid, heads, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    x = (torch.randn(b, t * h * w, heads * d, generator=g) * 3).to(dtype)
    weight = torch.rand(heads * d, generator=g) + 0.5
    ang = rope_angles(d, t, h, w, "cpu")
    return [v.to(DEVICE) for v in (x, weight, torch.cos(ang), torch.sin(ang))]


def _torch_path(x, weight, cos, sin, eps, heads):
    xf = x.float()
    normed = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return apply_rope(normed.unflatten(-1, (heads, -1)), cos, sin)


@pytest.mark.parametrize("b,grid,heads,d", [(1, (2, 3, 5), 5, 16), (2, (1, 4, 4), 3, 32), (1, (3, 2, 2), 40, 128)])
def test_fp32_equals_the_torch_path(b, grid, heads, d):
    x, w, c, s = _inputs(b, grid, heads, d, torch.float32)
    out = fused(x, w, c, s, 1e-6, heads)
    ref = _torch_path(x, w, c, s, 1e-6, heads)
    assert out.shape == (b, x.shape[1], heads, d) and out.dtype == torch.float32
    # fp32 all the way: only the sum-of-squares order and fma contraction differ (~1e-7 relative)
    assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter truncates bf16 casts")
@pytest.mark.parametrize("b,grid,heads,d", [(1, (2, 3, 5), 5, 16), (2, (3, 2, 2), 40, 128)])
def test_bf16_matches_the_torch_path_to_one_rounding(b, grid, heads, d):
    x, w, c, s = _inputs(b, grid, heads, d, torch.bfloat16, seed=1)
    out = fused(x, w, c, s, 1e-6, heads).float()
    ref = _torch_path(x, w, c, s, 1e-6, heads).float()
    # Both round twice to bf16 (after the norm, after RoPE); a different fp32 reduction order can move a value
    # across a rounding boundary: at most 2 bf16 ulps (2**-7 relative), on a small fraction of the values.
    ulp = 2.0 ** -7 * ref.abs().clamp_min(1e-3)
    assert ((out - ref).abs() <= 2 * ulp + 1e-6).all()
    assert ((out - ref).abs() > 0).float().mean() < 0.02


def test_dit_uses_the_kernel_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("dispatch is for CUDA tensors")
    from turbowan.kernels import dit_norm_dispatch

    assert dit_norm_dispatch() is fused
    x, w, c, s = _inputs(1, (2, 2, 2), 4, 32, torch.bfloat16)
    assert torch.equal(rms_norm_rope(x, w, c, s, 1e-6, 4), fused(x, w, c, s, 1e-6, 4))


def test_odd_head_dim_is_refused():
    x = torch.zeros(1, 4, 3 * 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        fused(x, torch.ones(72, device=DEVICE), torch.zeros(4, 12, device=DEVICE), torch.zeros(4, 12, device=DEVICE), 1e-6, 3)
