"""Int8 block-quantized linear layers in the released `-quant.pth` format.

Format (one per `nn.Linear` inside the DiT blocks):
  int8_weight  int8    [N, K]
  scale        float32 [ceil(N/128), ceil(K/128)]   one scale per 128x128 weight tile
  bias         bf16    [N]

Quantization rule (weights at export, activations at run time in W8A8): per 128x128 tile
``amax = max(1e-8, max|x|)`` in fp32, ``q = round_half_even(x * (128 / amax))`` saturated to [-128, 127],
``scale = amax / 128``.

W8A8 product: for every 128-wide K block ``j`` an exact int32 dot ``x_q[:, j] . w_q[:, j]``, accumulated in
fp32 in K-block order as ``acc = fma(i32, x_scale * w_scale, acc)``; the result is rounded to the activation
dtype and the bias added in that dtype.

Two ways to run the layer (a loader option, ``quant=``):
  * ``"w8a16"``: dequantize the weight tiles to the compute dtype and use an ordinary matmul.
  * ``"w8a8"``: the reference's numerics above. On CUDA with Triton the fused kernel in
    ``turbowan.kernels.int8_triton`` runs it; everywhere else the exact emulation here does.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..options import QUANT_MODES

TILE = 128


def _pad_to_tiles(x: torch.Tensor) -> torch.Tensor:
    """Zero-pad the last two dims of a 2D tensor up to multiples of TILE."""
    rows, cols = x.shape
    pr, pc = (-rows) % TILE, (-cols) % TILE
    return F.pad(x, (0, pc, 0, pr)) if (pr or pc) else x


def quantize_int8_blockwise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, C] float -> (int8 [R, C], fp32 scales [ceil(R/128), ceil(C/128)]) with the reference's tile rule."""
    rows, cols = x.shape
    xp = _pad_to_tiles(x.float())
    tiles = xp.view(xp.shape[0] // TILE, TILE, xp.shape[1] // TILE, TILE)
    amax = tiles.abs().amax(dim=(1, 3)).clamp_min(1e-8)  # [Rt, Ct]
    inv = 128.0 / amax  # fp32, as the kernel computes it
    q = torch.round(tiles * inv[:, None, :, None]).clamp_(-128, 127).to(torch.int8)
    q = q.view(xp.shape)[:rows, :cols].contiguous()
    return q, (amax / 128.0).contiguous()


def dequantize_int8_blockwise(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] + tile scales -> weight [N, K] in ``dtype`` (multiplication done in fp32)."""
    n, k = q.shape
    s = scale.float().repeat_interleave(TILE, 0)[:n].repeat_interleave(TILE, 1)[:, :k]
    return (q.float() * s).to(dtype)


def w8a8_matmul_reference(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Exact emulation of the reference int8 GEMM accumulation -> fp32 [M, N].

    Integer block dots are exact in float64 (|sum| <= 128 * 128 * 128 < 2**53); the fma into the fp32
    accumulator is done in float64 and rounded once to fp32 per K block, as the hardware fma rounds once.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    acc = torch.zeros(m, n, dtype=torch.float32, device=x_q.device)
    xs = x_scale.float().repeat_interleave(TILE, 0)[:m]  # [M, Kt] row scale per K block
    ws = w_scale.float().repeat_interleave(TILE, 0)[:n]  # [N, Kt]
    for j in range(math.ceil(k / TILE)):
        cols = slice(j * TILE, min(k, (j + 1) * TILE))
        dot = x_q[:, cols].double() @ w_q[:, cols].double().T  # exact int32 values
        s = (xs[:, j : j + 1] * ws[:, j][None, :])  # fp32 product x_scale * w_scale
        acc = (dot * s.double() + acc.double()).float()
    return acc


def w8a8_linear_reference(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """The reference `Int8Linear.forward` on any device: x [..., K] -> [..., N] in x.dtype."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_q, x_s = quantize_int8_blockwise(x2)
    y = w8a8_matmul_reference(x_q, x_s, w_q, w_scale).to(x.dtype)
    if bias is not None:
        y = y + bias.to(x.dtype)
    return y.reshape(*shape[:-1], w_q.shape[0])


class Int8Linear(nn.Module):
    """A Linear whose weight is stored int8 with 128x128 tile scales (the `-quant.pth` layout).

    ``quant`` is ``"w8a16"`` (dequantize to the activation dtype, then matmul) or ``"w8a8"`` (int8 x int8 with
    the reference's numerics).
    """

    shares_int8_input = True  # W8A8 layers reading the same x may share one quantization of it

    def __init__(self, in_features: int, out_features: int, bias: bool = True, quant: str = "w8a16"):
        super().__init__()
        if quant not in QUANT_MODES:
            raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
        self.in_features = in_features
        self.out_features = out_features
        self.quant = quant
        self.register_buffer("int8_weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer(
            "scale", torch.empty(math.ceil(out_features / TILE), math.ceil(in_features / TILE), dtype=torch.float32)
        )
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=torch.bfloat16))
        else:
            self.bias = None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, quant: str) -> "Int8Linear":
        """Quantize a float weight [N, K] with the reference's rule (used for bf16 files run as w8a8)."""
        layer = cls(weight.shape[1], weight.shape[0], bias is not None, quant)
        q, s = quantize_int8_blockwise(weight)
        layer.int8_weight = q
        layer.scale = s
        if bias is not None:
            layer.bias = bias
        return layer

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, quant={self.quant}"

    def dequantized_weight(self, dtype: torch.dtype) -> torch.Tensor:
        fast = None
        if self.int8_weight.is_cuda:
            from ..kernels import dequant_dispatch

            fast = dequant_dispatch()  # one Triton pass instead of ~6 PyTorch ops over the weight
        return (fast or dequantize_int8_blockwise)(self.int8_weight, self.scale, dtype)

    def forward_quantized(self, x_q: torch.Tensor, x_scale: torch.Tensor, lead: tuple, dtype: torch.dtype) -> torch.Tensor:
        """W8A8 on CUDA for an input already quantized by `shared_int8_input`: -> [*lead, N]."""
        from ..kernels import int8_gemm_dispatch

        y = int8_gemm_dispatch()(x_q, x_scale, self.int8_weight, self.scale, self.bias, dtype)
        return y.reshape(*lead, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant == "w8a8":
            if x.is_cuda:
                from ..kernels import int8_dispatch

                fast = int8_dispatch()
                if fast is not None:
                    return fast(x, self.int8_weight, self.scale, self.bias)
            return w8a8_linear_reference(x, self.int8_weight, self.scale, self.bias)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized_weight(x.dtype), bias)


class Int8LoraLinear(Int8Linear):
    """An `Int8Linear` plus LoRA low-rank branches kept apart from the int8 weight (``turbowan.apply_lora`` with
    ``int8_merge="branch"``): ``y = int8_linear(x) + ((x @ lora_down.T) * lora_scale) @ lora_up.T``, the branch in
    x's dtype. Chained LoRAs concatenate along the rank: lora_down [r, K], lora_up [N, r], lora_scale fp32 [r]."""

    shares_int8_input = False  # the branch needs x itself, not only its quantization

    @classmethod
    def wrapping(cls, base: Int8Linear, down: torch.Tensor, up: torch.Tensor, scale: torch.Tensor) -> "Int8LoraLinear":
        """A layer holding ``base``'s own tensors (shared, not copied) and the branch."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features, layer.quant = base.in_features, base.out_features, base.quant
        for name in ("int8_weight", "scale", "bias"):
            layer.register_buffer(name, getattr(base, name))
        layer.register_buffer("lora_down", down)
        layer.register_buffer("lora_up", up)
        layer.register_buffer("lora_scale", scale)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.lora_down.to(x.dtype)) * self.lora_scale.to(x.dtype)
        return super().forward(x) + F.linear(h, self.lora_up.to(x.dtype))


def _runs_triton_w8a8(x: torch.Tensor, *layers) -> bool:
    # the layers' own conditions first, so that CPU runs check them too
    if not (all(isinstance(m, Int8Linear) and m.quant == "w8a8" and m.shares_int8_input for m in layers)
            and x.is_cuda):
        return False
    from ..kernels import int8_dispatch

    return int8_dispatch() is not None


def shared_int8_input(x: torch.Tensor, *layers) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x [..., K] quantized once for several W8A8 layers that all read it (self-attention's q, k, v: one pass over
    x instead of three, same numbers), as (int8 [M, K], tile scales); None unless they all run the Triton kernel."""
    if not _runs_triton_w8a8(x, *layers):
        return None
    from ..kernels import int8_quantize_dispatch

    x2d = x.reshape(-1, x.shape[-1])
    return int8_quantize_dispatch()(x2d if x2d.stride(-1) == 1 else x2d.contiguous())


def apply_linear(layer: nn.Module, x: torch.Tensor, shared: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """layer(x), using x's shared quantization when there is one."""
    if shared is None:
        return layer(x)
    return layer.forward_quantized(*shared, x.shape[:-1], x.dtype)

