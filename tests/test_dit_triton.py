"""The DiT block's Triton row kernels (turbowan/kernels/dit_triton.py) equal the PyTorch code they replace on CUDA.

The PyTorch functions in turbowan/models/dit.py are the reference (the CPU fixtures pin them to the reference
implementation); here they are called with the kernels switched off.
"""

import pytest
import torch
from helpers import gpu_module, kernel_module

pytestmark = gpu_module(interpreter_ok=True)
from turbowan.models import dit  # noqa: E402

K = kernel_module("turbowan.kernels.dit_triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CUDA_ONLY_BF16 = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter truncates bf16 casts")


@pytest.fixture
def torch_path(monkeypatch):
    """The dit.py functions with the Triton kernels switched off."""
    monkeypatch.setattr(dit, "_cuda_kernel", lambda name, x: None)
    return dit


def _x(b, length, width, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, length, width, generator=g) * scale + 0.5).to(dtype).to(DEVICE)


def _rand(*shape, seed=1, lo=0.5):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(*shape, generator=g) + lo).to(DEVICE)


def _assert_close(out, ref, dtype, max_ulps=2, max_fraction=0.02):
    assert out.shape == ref.shape and out.dtype == ref.dtype
    if dtype == torch.float32:
        # fp32 throughout: only the reduction order and fma contraction differ (~1e-7 relative)
        assert torch.allclose(out, ref, rtol=1e-5, atol=1e-5)
        return
    # Both sides round to bf16 at the same points; a different fp32 summation order can move a value across a
    # rounding boundary: at most `max_ulps` bf16 ulps (2**-7 relative), on a small fraction of the values.
    out, ref = out.float(), ref.float()
    ulp = 2.0 ** -7 * ref.abs().clamp_min(1e-3)
    assert ((out - ref).abs() <= max_ulps * ulp + 1e-6).all()
    assert ((out - ref).abs() > 0).float().mean() < max_fraction


def _rope(length, heads, d, grid):
    ang = dit.rope_angles(d, *grid, DEVICE)
    assert ang.shape[0] == length
    return torch.cos(ang), torch.sin(ang)


DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=CUDA_ONLY_BF16)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,grid,heads,d", [(1, (2, 3, 5), 5, 16), (2, (1, 4, 4), 3, 32), (1, (3, 2, 2), 40, 128)])
def test_rms_norm_rope_equals_the_torch_path(torch_path, dtype, b, grid, heads, d):
    length = grid[0] * grid[1] * grid[2]
    x, w = _x(b, length, heads * d, dtype), _rand(heads * d)
    cos, sin = _rope(length, heads, d, grid)
    out = K.rms_norm_rope(x, w, cos, sin, 1e-6, heads)
    assert out.shape == (b, length, heads, d)
    _assert_close(out, torch_path.rms_norm_rope(x, w, cos, sin, 1e-6, heads), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,length,width", [(1, 7, 96), (2, 33, 320), (1, 5, 5120)])
def test_modulated_layer_norm_equals_the_torch_path(torch_path, dtype, b, length, width):
    x = _x(b, length, width, dtype)
    shift, scale = _rand(b, 1, width, seed=2, lo=-0.5), _rand(b, 1, width, seed=3, lo=-0.5)
    out = K.layer_norm_rows(x, 1e-6, shift=shift, scale=scale)
    ref = torch_path.modulated_norm(x, shift, scale, 1e-6)
    if dtype == torch.float32:
        _assert_close(out, ref, dtype)
        return
    # The norm is rounded to bf16 before the modulation (both sides); a 1-ulp difference there is carried through
    # `* (1 + scale) + shift`, which can cancel to a small output: bound the error by 2 ulps of the output plus
    # one ulp of the modulated norm, and require it to be rare.
    normed = torch_path.layer_norm(x, 1e-6).float() * (1 + scale)
    err = (out.float() - ref.float()).abs()
    assert (err <= 2.0 ** -7 * (2 * ref.float().abs() + normed.abs()) + 1e-6).all()
    assert (err > 0).float().mean() < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,length,width", [(1, 7, 96), (2, 33, 320)])
def test_affine_layer_norm_equals_the_torch_path(torch_path, dtype, b, length, width):
    x = _x(b, length, width, dtype)
    weight, bias = _rand(width, seed=4), _rand(width, seed=5, lo=-0.5)
    out = K.layer_norm_rows(x, 1e-6, weight=weight, bias=bias)
    _assert_close(out, torch_path.affine_layer_norm(x, weight, bias, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("b,length,width", [(1, 7, 96), (2, 512, 320)])
def test_rms_norm_equals_the_torch_path(torch_path, dtype, b, length, width):
    x, w = _x(b, length, width, dtype), _rand(width)
    _assert_close(K.rms_norm_rows(x, w, 1e-6), torch_path.rms_norm(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_residual_equals_the_torch_path_exactly(torch_path, dtype):
    # Pure elementwise with the same two roundings (product, then sum): bit-identical.
    x, y = _x(2, 37, 320, dtype, seed=6), _x(2, 37, 320, dtype, seed=7)
    gate = _rand(2, 1, 320, seed=8, lo=-0.5)
    assert torch.equal(K.gated_residual_rows(x, y, gate), torch_path.gated_residual(x, y, gate))


def test_layer_norm_needs_exactly_one_of_affine_or_modulation():
    x = _x(1, 4, 64, torch.float32)
    with pytest.raises(ValueError, match="either weight and bias"):
        K.layer_norm_rows(x, 1e-6)


def test_odd_head_dim_is_refused():
    x = torch.zeros(1, 4, 3 * 24, device=DEVICE)
    with pytest.raises(ValueError, match="power-of-two head dim"):
        K.rms_norm_rope(x, torch.ones(72, device=DEVICE), torch.zeros(4, 12, device=DEVICE),
                        torch.zeros(4, 12, device=DEVICE), 1e-6, 3)


def test_the_block_uses_the_kernels_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("dispatch is for CUDA tensors")
    from turbowan.kernels import dit_dispatch

    for name in ("rms_norm_rope", "rms_norm_rows", "layer_norm_rows", "gated_residual_rows"):
        assert dit_dispatch(name) is getattr(K, name)
