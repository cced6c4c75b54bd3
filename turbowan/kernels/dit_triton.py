"""The DiT block's row-wise operations, each one pass over a token's row (CUDA, Triton).

They replace chains of PyTorch elementwise passes (eager) or torch.compile's looped reductions, and keep the
PyTorch path's roundings (that code, in `turbowan.models.dit`, is their reference and the CPU / no-Triton path).

`rms_norm_rope`: fused RMSNorm + 3D RoPE for the self-attention q and k.

Same function as `turbowan.models.dit.rms_norm_rope` (the PyTorch path): RMSNorm over the full width in fp32,
times the weight, rounded to the activation dtype (as the reference does before RoPE), then each interleaved pair
(x[2i], x[2i+1]) of every head rotated in fp32 by the token's angle i, rounded once more. torch.compile turned the
PyTorch path into a looped two-pass reduction plus a RoPE pass (~1.15 ms per call at 720p on an H200, three times
its byte floor); here one program holds a token's whole row (40 heads x 128 = 5120 values) in registers and
reads each value's rotation partner from the same, cached, row.

Shapes: x [B, L, H*D] (rows contiguous), weight [H*D] fp32, cos / sin [L, D/2] fp32 -> [B, L, H, D] in x's dtype.

`layer_norm_rows`: the block's LayerNorms in fp32, either affine (norm3) or followed by the AdaLN modulation
``* (1 + scale) + shift`` (norm1 / norm2), with the PyTorch path's roundings (`turbowan.models.dit`:
`affine_layer_norm`, `modulated_norm`). Compiled by torch.compile these were looped two-pass reductions at ~0.69 ms
per call at 720p; x [B, L, dim], weight / bias [dim] fp32, shift / scale [B, 1, dim] fp32 -> [B, L, dim].
"""

from __future__ import annotations

import torch

try:  # optional: the package imports and runs (on the PyTorch path) without Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from . import triton_runnable as available  # read by turbowan.kernels


# One program per token row (up to 8192 values in registers). No fp contraction: PyTorch's path rounds every
# product before the following add, and these passes are memory-bound, so fused multiply-adds would buy nothing.
_LAUNCH = dict(num_warps=8, enable_fp_fusion=False)


if triton is not None:

    @triton.jit
    def _rounded(x, OUT):
        """x rounded to OUT's element type and widened back to fp32, as PyTorch's separate ops do. The bitcast
        round trip keeps the compiler from folding the narrowing away (with fp32 outputs it is the identity)."""
        ty = OUT.dtype.element_ty
        if ty.primitive_bitwidth == 16:
            return x.to(ty).to(tl.int16, bitcast=True).to(ty, bitcast=True).to(tl.float32)
        else:
            return x

    @triton.jit
    def _rms_norm_rope_kernel(X, W, COS, SIN, OUT, L, stride_x, eps,
                              WIDTH: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        pos = row % L  # token position inside its sample: the RoPE angles repeat per batch element
        e = tl.arange(0, BLOCK)  # flat index over the row's heads x head dim
        inside = e < WIDTH
        partner = e ^ 1  # the other member of e's rotation pair (2i <-> 2i+1)
        x = tl.load(X + row * stride_x + e, mask=inside, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / WIDTH + eps)
        # the partner's value comes from the same (cached) row; normalising it here avoids a register shuffle
        xp = tl.load(X + row * stride_x + partner, mask=inside, other=0.0).to(tl.float32)
        w = tl.load(W + e, mask=inside, other=0.0)
        wp = tl.load(W + partner, mask=inside, other=0.0)
        n = _rounded(x * r * w, OUT)  # rounded, as the reference does before RoPE
        n_p = _rounded(xp * r * wp, OUT)
        pair = (e % D) // 2
        c = tl.load(COS + pos * (D // 2) + pair, mask=inside, other=0.0)
        s = tl.load(SIN + pos * (D // 2) + pair, mask=inside, other=0.0)
        # (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
        out = tl.where((e % 2) == 0, n * c - n_p * s, n * c + n_p * s)
        tl.store(OUT + row * WIDTH + e, out.to(OUT.dtype.element_ty), mask=inside)


    @triton.jit
    def _layer_norm_kernel(X, W, BIAS, SHIFT, SCALE, OUT, L, stride_x, eps,
                           WIDTH: tl.constexpr, BLOCK: tl.constexpr, AFFINE: tl.constexpr, MODULATE: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        sample = row // L
        e = tl.arange(0, BLOCK)
        inside = e < WIDTH
        x = tl.load(X + row * stride_x + e, mask=inside, other=0.0).to(tl.float32)
        centred = tl.where(inside, x - tl.sum(x, axis=0) / WIDTH, 0.0)
        y = centred * tl.math.rsqrt(tl.sum(centred * centred, axis=0) / WIDTH + eps)
        if AFFINE:
            y = y * tl.load(W + e, mask=inside, other=0.0) + tl.load(BIAS + e, mask=inside, other=0.0)
        if MODULATE:  # the PyTorch path rounds the norm to the activation dtype before modulating in fp32
            y = _rounded(y, OUT)
            scale = tl.load(SCALE + sample * WIDTH + e, mask=inside, other=0.0)
            shift = tl.load(SHIFT + sample * WIDTH + e, mask=inside, other=0.0)
            y = y * (1.0 + scale) + shift
        tl.store(OUT + row * WIDTH + e, y.to(OUT.dtype.element_ty), mask=inside)
    @triton.jit
    def _rms_norm_kernel(X, W, OUT, stride_x, eps, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK)
        inside = e < WIDTH
        x = tl.load(X + row * stride_x + e, mask=inside, other=0.0).to(tl.float32)
        r = tl.math.rsqrt(tl.sum(x * x, axis=0) / WIDTH + eps)
        w = tl.load(W + e, mask=inside, other=0.0)
        tl.store(OUT + row * WIDTH + e, (x * r * w).to(OUT.dtype.element_ty), mask=inside)

    @triton.jit
    def _gated_residual_kernel(X, Y, GATE, OUT, L, stride_x, stride_y, WIDTH: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        e = tl.arange(0, BLOCK)
        inside = e < WIDTH
        x = tl.load(X + row * stride_x + e, mask=inside, other=0.0).to(tl.float32)
        y = tl.load(Y + row * stride_y + e, mask=inside, other=0.0).to(tl.float32)
        g = _rounded(tl.load(GATE + (row // L) * WIDTH + e, mask=inside, other=0.0), OUT)
        gy = _rounded(y * g, OUT)  # PyTorch rounds the product, then the sum
        tl.store(OUT + row * WIDTH + e, (x + gy).to(OUT.dtype.element_ty), mask=inside)


def layer_norm_rows(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                    shift: torch.Tensor | None = None, scale: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm over the last dim of x [B, L, dim]: affine (weight, bias) or modulated (shift, scale [B, 1, dim])."""
    b, length, width = x.shape
    affine, modulate = weight is not None, shift is not None
    if affine == modulate:
        raise ValueError("layer_norm_rows: pass either weight and bias (affine) or shift and scale (modulated)")
    x2d = x.reshape(b * length, width)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(b, length, width, dtype=x.dtype, device=x.device)
    if modulate:
        shift = shift.float().expand(b, 1, width).contiguous()
        scale = scale.float().expand(b, 1, width).contiguous()
    else:
        weight, bias = weight.float().contiguous(), bias.float().contiguous()
    if x2d.shape[0]:
        _layer_norm_kernel[(x2d.shape[0],)](
            x2d, weight if affine else out, bias if affine else out, shift if modulate else out,
            scale if modulate else out, out, length, x2d.stride(0), eps,
            WIDTH=width, BLOCK=triton.next_power_of_2(width), AFFINE=affine, MODULATE=modulate, **_LAUNCH,
        )
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def rms_norm_rows(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim (fp32), times weight, in x's dtype: x [..., dim] (cross-attention's q and k)."""
    x2d = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        _rms_norm_kernel[(x2d.shape[0],)](x2d, weight.float().contiguous(), out, x2d.stride(0), eps,
                                          WIDTH=x2d.shape[1], BLOCK=triton.next_power_of_2(x2d.shape[1]), **_LAUNCH)
    return out


def gated_residual_rows(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in x's dtype (gate [B, 1, dim] fp32, rounded to x's dtype first); x, y [B, L, dim]."""
    b, length, width = x.shape
    x2d, y2d = _rows(x), _rows(y)
    gate = gate.float().expand(b, 1, width).contiguous()
    out = torch.empty(b, length, width, dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        _gated_residual_kernel[(x2d.shape[0],)](x2d, y2d, gate, out, length, x2d.stride(0), y2d.stride(0),
                                                WIDTH=width, BLOCK=triton.next_power_of_2(width), **_LAUNCH)
    return out


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  heads: int) -> torch.Tensor:
    """[B, L, H*D] -> [B, L, H, D]; see the module docstring. D must be even and a power of two."""
    b, length, width = x.shape
    d = width // heads
    if d * heads != width or d & (d - 1) or d < 2:
        raise ValueError(f"rms_norm_rope: width {width} is not {heads} heads of a power-of-two head dim; "
                         "use the PyTorch path (turbowan.models.dit.rms_norm_rope) for this model")
    if tuple(cos.shape) != (length, d // 2) or tuple(sin.shape) != (length, d // 2):
        raise ValueError(f"rms_norm_rope: RoPE tables are {tuple(cos.shape)}, expected {(length, d // 2)}")
    x2d = x.reshape(b * length, width)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    out = torch.empty(b, length, heads, d, dtype=x.dtype, device=x.device)
    if x2d.shape[0]:
        _rms_norm_rope_kernel[(x2d.shape[0],)](
            x2d, weight.float().contiguous(), cos.float().contiguous(), sin.float().contiguous(), out,
            length, x2d.stride(0), eps, WIDTH=width, BLOCK=triton.next_power_of_2(width), D=d, **_LAUNCH,
        )
    return out
