"""Fused RMSNorm + 3D RoPE for the DiT's self-attention q and k, one pass over the row (CUDA, Triton).

Same function as `turbowan.models.dit.rms_norm_rope` (the PyTorch path): RMSNorm over the full width in fp32,
times the weight, rounded to the activation dtype (as the reference does before RoPE), then each interleaved pair
(x[2i], x[2i+1]) of every head rotated in fp32 by the token's angle i, rounded once more. torch.compile turned the
PyTorch path into a looped two-pass reduction plus a RoPE pass (~1.15 ms per call at 720p on an H200, three times
its byte floor); here one program holds a token's whole row (40 heads x 128 = 5120 values) in registers and
reads each value's rotation partner from the same, cached, row.

Shapes: x [B, L, H*D] (rows contiguous), weight [H*D] fp32, cos / sin [L, D/2] fp32 -> [B, L, H, D] in x's dtype.
"""

from __future__ import annotations

import os

import torch

try:  # optional: the package imports and runs (on the PyTorch path) without Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def available() -> bool:
    return triton is not None and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


if triton is not None:

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
        n = (x * r * w).to(OUT.dtype.element_ty).to(tl.float32)  # rounded, as the reference does before RoPE
        n_p = (xp * r * wp).to(OUT.dtype.element_ty).to(tl.float32)
        pair = (e % D) // 2
        c = tl.load(COS + pos * (D // 2) + pair, mask=inside, other=0.0)
        s = tl.load(SIN + pos * (D // 2) + pair, mask=inside, other=0.0)
        # (x0, x1) -> (x0 c - x1 s, x1 c + x0 s)
        out = tl.where((e % 2) == 0, n * c - n_p * s, n * c + n_p * s)
        tl.store(OUT + row * WIDTH + e, out.to(OUT.dtype.element_ty), mask=inside)


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
            length, x2d.stride(0), eps, WIDTH=width, BLOCK=triton.next_power_of_2(width), D=d, num_warps=8,
        )
    return out
