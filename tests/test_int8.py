"""Int8 block quantization and the W8A8 product match the reference CUDA ops bit for bit."""

import torch
from helpers import fixtures_dir, rel_err
from safetensors.torch import load_file

from turbowan.ops.int8 import (Int8Linear, dequantize_int8_blockwise, quantize_int8_blockwise,
                               w8a8_linear_reference, w8a8_matmul_reference)


def _unit():
    return load_file(fixtures_dir() / "dit" / "int8_linear_unit.safetensors")


def test_weight_quantization_is_bit_exact():
    d = _unit()
    q, s = quantize_int8_blockwise(d["weight"])
    assert torch.equal(q, d["w_int8"]) and torch.equal(s, d["w_scale"])


def test_activation_quantization_is_bit_exact():
    d = _unit()
    q, s = quantize_int8_blockwise(d["x"])
    assert torch.equal(q, d["x_int8"]) and torch.equal(s, d["x_scale"])


def test_gemm_accumulation_is_bit_exact():
    d = _unit()
    out = w8a8_matmul_reference(d["x_int8"], d["x_scale"], d["w_int8"], d["w_scale"]).to(torch.bfloat16)
    assert torch.equal(out, d["gemm_out"])


def test_w8a8_linear_is_bit_exact():
    d = _unit()
    assert torch.equal(w8a8_linear_reference(d["x"], d["w_int8"], d["w_scale"], d["bias"]), d["linear_out"])


def test_quantization_rounds_half_to_even_and_saturates():
    w = torch.zeros(128, 128)
    w[0, 0] = 1.0  # amax: 1.0 * 128 -> 128 saturates to 127
    w[0, 1] = -1.0  # -> -128 fits
    w[0, 2] = 2.5 / 128  # 2.5 -> 2 (half to even)
    w[0, 3] = 3.5 / 128  # 3.5 -> 4
    q, s = quantize_int8_blockwise(w)
    assert q[0, :4].tolist() == [127, -128, 2, 4]
    assert s.item() == 1.0 / 128


def test_ragged_shapes_use_partial_tiles():
    w = torch.randn(200, 300)
    q, s = quantize_int8_blockwise(w)
    assert q.shape == (200, 300) and s.shape == (2, 3)
    assert rel_err(dequantize_int8_blockwise(q, s, torch.float32), w) < 1e-2


def test_int8_linear_w8a16_equals_dense_with_dequantized_weight():
    torch.manual_seed(0)
    w, b, x = torch.randn(256, 384), torch.randn(256), torch.randn(5, 384)
    layer = Int8Linear.from_weight(w, b, "w8a16")
    expected = x @ dequantize_int8_blockwise(layer.int8_weight, layer.scale, torch.float32).T + b
    assert torch.allclose(layer(x), expected, atol=1e-5)
