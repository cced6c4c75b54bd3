"""The Triton int8 kernels (CUDA only) reproduce the exact W8A8 emulation bit for bit; on Hopper, so does the Gluon
W8A8 GEMM that `w8a8_gemm` dispatches to there."""

import pytest
import torch
from helpers import fixtures_dir, gpu_module, kernel_module
from safetensors.torch import load_file

from turbowan.ops.int8 import (Int8Linear, dequantize_int8_blockwise, quantize_int8_blockwise,
                               w8a8_linear_reference, w8a8_matmul_reference)

pytestmark = gpu_module()
K = kernel_module("turbowan.kernels.int8_triton")
G = kernel_module("turbowan.kernels.int8_gluon")

# Every comparison below is exact (torch.equal): both sides do the same integer dots, the same fp32 fma per
# 128-wide K block and the same round-to-nearest-even casts, so any difference is a bug, not rounding noise.

AWKWARD = [(1, 136, 128), (77, 200, 256), (129, 257, 384), (300, 640, 5120)]  # (M, N, K): ragged M and N


def _random_layer(m, n, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    wq, ws = quantize_int8_blockwise(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(torch.bfloat16)
    return x, wq, ws, bias


@pytest.mark.parametrize("m,n,k", AWKWARD)
def test_activation_quantization_matches_emulation(m, n, k):
    x, *_ = _random_layer(m, n, k, torch.bfloat16, 0)
    q, s = K.quantize_activations(x.cuda())
    q_ref, s_ref = quantize_int8_blockwise(x)
    assert torch.equal(q.cpu(), q_ref) and torch.equal(s.cpu(), s_ref)


@pytest.mark.parametrize("m,n,k", AWKWARD)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_w8a8_linear_matches_emulation(m, n, k, dtype):
    x, wq, ws, bias = _random_layer(m, n, k, dtype, 1)
    y = K.w8a8_linear(x.cuda(), wq.cuda(), ws.cuda(), bias.cuda())
    assert y.dtype == dtype
    assert torch.equal(y.cpu(), w8a8_linear_reference(x, wq, ws, bias))


def test_w8a8_linear_keeps_leading_dims_and_works_without_bias():
    x, wq, ws, _ = _random_layer(2 * 45, 256, 256, torch.bfloat16, 2)
    x3 = x.view(2, 45, 256)
    y = K.w8a8_linear(x3.cuda(), wq.cuda(), ws.cuda(), None)
    assert y.shape == (2, 45, 256)
    assert torch.equal(y.cpu(), w8a8_linear_reference(x3, wq, ws, None))


def test_fixture_unit_is_bit_exact():
    d = load_file(fixtures_dir() / "dit" / "int8_linear_unit.safetensors")
    c = {k: v.cuda() for k, v in d.items()}
    q, s = K.quantize_activations(c["x"])
    assert torch.equal(q.cpu(), d["x_int8"]) and torch.equal(s.cpu(), d["x_scale"])
    gemm = K.w8a8_gemm(c["x_int8"], c["x_scale"], c["w_int8"], c["w_scale"], None, torch.bfloat16)
    assert torch.equal(gemm.cpu(), d["gemm_out"])
    y = K.w8a8_linear(c["x"], c["w_int8"], c["w_scale"], c["bias"])
    assert torch.equal(y.cpu(), d["linear_out"])


def test_int8linear_w8a8_on_cuda_uses_the_kernel_and_matches_emulation():
    x, wq, ws, bias = _random_layer(130, 256, 384, torch.bfloat16, 3)
    layer = Int8Linear(384, 256, bias=True, quant="w8a8")
    layer.int8_weight, layer.scale, layer.bias = wq, ws, bias
    from turbowan.kernels import int8_dispatch

    assert int8_dispatch() is K.w8a8_linear  # otherwise the layer would silently run the emulation
    assert torch.equal(layer.cuda()(x.cuda()).cpu(), w8a8_linear_reference(x, wq, ws, bias))


def test_k_not_multiple_of_128_is_refused_with_a_clear_error():
    x, wq, ws, bias = _random_layer(8, 128, 200, torch.bfloat16, 4)
    with pytest.raises(ValueError, match="multiple of 128"):
        K.w8a8_linear(x.cuda(), wq.cuda(), ws.cuda(), bias.cuda())


@pytest.mark.parametrize("n,k", [(136, 200), (13824 // 8, 5120)])
def test_cuda_dequantize_equals_cpu_dequantize(n, k):
    _, wq, ws, _ = _random_layer(1, n, k, torch.bfloat16, 5)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        w = K.dequantize_int8_blockwise_cuda(wq.cuda(), ws.cuda(), dtype)
        assert torch.equal(w.cpu(), dequantize_int8_blockwise(wq, ws, dtype))


def test_int8_linear_w8a16_on_cuda_uses_the_kernel_and_matches_cpu():
    from turbowan.ops.int8 import Int8Linear

    torch.manual_seed(0)
    layer = Int8Linear.from_weight(torch.randn(256, 384), torch.randn(256).bfloat16(), "w8a16")
    x = torch.randn(7, 384).bfloat16()
    cpu_w = layer.dequantized_weight(torch.bfloat16)
    layer.cuda()
    assert torch.equal(layer.dequantized_weight(torch.bfloat16).cpu(), cpu_w)
    assert torch.allclose(layer(x.cuda()).float().cpu(), torch.nn.functional.linear(x, cpu_w, layer.bias.cpu()).float(),
                          atol=3e-2, rtol=1e-2)


def test_shared_quantized_input_gives_each_layer_its_own_result():
    from turbowan.ops.int8 import apply_linear, shared_int8_input

    torch.manual_seed(2)
    layers = [Int8Linear.from_weight(torch.randn(256, 384), torch.randn(256).bfloat16(), "w8a8").cuda() for _ in range(3)]
    x = torch.randn(1, 130, 384).bfloat16().cuda()
    shared = shared_int8_input(x, *layers)
    assert shared is not None
    for layer in layers:
        assert torch.equal(apply_linear(layer, x, shared), layer(x))


# -- the Gluon W8A8 GEMM (Hopper) ---------------------------------------------------------------------------------

# (M, K, N): ragged M and N; M = 1; and 17 x 11 = 187 output tiles, more than an H100/H200 has SMs, so persistent
# programs run two tiles and carry the operand ring's phase from one to the next
GLUON_SHAPES = [(1000, 512, 640), (129, 256, 130), (1, 256, 384), (2100, 384, 2600)]


def _skip_unless_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon W8A8 GEMM is sm_90a code: Hopper (compute capability 9.0) only")


def _gemm_operands(m, k, n, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    xq, xs = quantize_int8_blockwise(torch.randn(m, k, generator=g) * 3)
    wq, ws = quantize_int8_blockwise(torch.randn(n, k, generator=g))
    bias = torch.randn(n, generator=g).to(dtype) if with_bias else None
    return tuple(t.cuda() if t is not None else None for t in (xq, xs, wq, ws, bias))


@pytest.mark.parametrize("m,k,n", GLUON_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_gluon_gemm_equals_the_triton_gemm_bit_for_bit(m, k, n, dtype, with_bias):
    _skip_unless_hopper()
    xq, xs, wq, ws, bias = _gemm_operands(m, k, n, dtype, with_bias, 6)
    want = K.w8a8_gemm(xq, xs, wq, ws, bias, dtype, **K.GEMM_CONFIG)  # overrides: the Triton kernel
    got = G.w8a8_gemm_gluon(xq, xs, wq, ws, bias, dtype)
    assert got.dtype == dtype and got.shape == (m, n)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))  # the bits, signed zeros included
    per_tile = G.w8a8_gemm_gluon(xq, xs, wq, ws, bias, dtype, PERSISTENT=False)  # a program per output tile
    assert torch.equal(per_tile.view(torch.int16), want.view(torch.int16))


def test_w8a8_gemm_runs_gluon_on_hopper_and_triton_when_configured_or_unsupported():
    xq, xs, wq, ws, bias = _gemm_operands(129, 256, 130, torch.bfloat16, True, 7)
    hopper = torch.cuda.get_device_capability() == (9, 0)
    assert K.gemm_kernel(xq, torch.bfloat16, {}) == ("gluon" if hopper else "triton")
    assert K.gemm_kernel(xq, torch.float16, {}) == ("gluon" if hopper else "triton")
    assert K.gemm_kernel(xq, torch.bfloat16, {"num_stages": 3}) == "triton"  # Triton config overrides
    assert K.gemm_kernel(xq, torch.float32, {}) == "triton"  # an output dtype the Gluon kernel does not take
    # whichever runs, the dispatching entry point equals the emulation
    want = (w8a8_matmul_reference(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu()).to(torch.bfloat16) + bias.cpu())
    assert torch.equal(K.w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16).cpu(), want)
    assert torch.equal(K.w8a8_gemm(xq, xs, wq, ws, bias, torch.float32).cpu(),
                       w8a8_matmul_reference(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu()) + bias.cpu().float())
