"""The Wan2.1 VAE's RMSNorm and the SiLU after it, fused into one Triton pass over channels-last activations.

Eager PyTorch spends 5-6 passes over each activation on `silu(F.normalize(x, dim=1) * sqrt(C) * gamma)` (norm,
clamp, divide, two multiplies, SiLU). Channels-last (NHWC / NDHWC) memory keeps each pixel's C channels adjacent,
so the op is row-wise: rows = pixels, width C. One kernel reads each row once and writes it once:

    y = silu(x / max(||x||_2, 1e-12) * sqrt(C) * gamma)      (F.normalize's eps is 1e-12)

computed in float32 with a single rounding to x's dtype at the end (eager bf16 rounds after every op, so this is
slightly more accurate than the eager chain, and equal to it in float32 up to the norm's summation order).

Triton is imported lazily: importing this module needs no Triton; `available()` says whether it can run.
"""

from __future__ import annotations

import torch

try:  # optional: the package imports and runs (on the torch path) without Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from . import interpreting as _interpreting
from . import triton_runnable as available  # read by turbowan.kernels

EPS = 1e-12  # F.normalize's default
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elements of one program's [ROWS, C_pow2] tile: 32 per thread at 4 warps (four 16-byte loads per thread in
# bf16), so a program moves 8 KiB in and 8 KiB out of 16-bit data. A first choice, not tuned on a GPU yet.
TILE_ELEMENTS = 4096
NUM_WARPS = 4


if triton is not None:

    @triton.jit
    def _rms_norm_silu_kernel(
        X, GAMMA, Y, n_rows, scale,
        C: tl.constexpr, BLOCK_C: tl.constexpr, ROWS: tl.constexpr, SILU: tl.constexpr,
    ):
        # X, Y: dense [n_rows, C] row-major (a channels-last tensor's storage); GAMMA: [C].
        # C is a constexpr so the channel mask and the row stride are compile-time facts (vectorised loads).
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # int64: activations pass 2^31 elements
        cols = tl.arange(0, BLOCK_C)
        mask = (rows < n_rows)[:, None] & (cols < C)[None, :]
        offsets = rows[:, None] * C + cols[None, :]
        # Convert at once: all arithmetic in float32 (also avoids the CPU interpreter's shaky bf16 math).
        x = tl.load(X + offsets, mask=mask, other=0.0).to(tl.float32)
        gamma = tl.load(GAMMA + cols, mask=cols < C, other=0.0).to(tl.float32)
        norm = tl.sqrt(tl.sum(x * x, axis=1))
        denom = tl.maximum(norm, 1e-12)[:, None]
        # Same operation order as the eager formula: ((x / denom) * scale) * gamma.
        y = x / denom * scale * gamma[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + offsets, y.to(Y.dtype.element_ty), mask=mask)


def _channels_last_format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.ndim == 4 else torch.channels_last_3d


def rms_norm_silu(x: torch.Tensor, gamma: torch.Tensor, silu: bool) -> torch.Tensor:
    """silu?(x / max(||x||_channels, 1e-12) * sqrt(C) * gamma) for a channels-last x, as one Triton kernel.

    x: [B, C, H, W] or [B, C, T, H, W] with the channel dim at stride 1 (NHWC / NDHWC memory), float32, bf16 or
    fp16. gamma: the RMSNorm's [C, 1, 1(, 1)] parameter (any float dtype). Returns a new tensor of x's shape,
    dtype and channels-last layout.
    """
    if triton is None:
        raise RuntimeError("rms_norm_silu needs Triton; use the PyTorch RMSNorm (turbowan.models.vae) instead.")
    if x.ndim not in (4, 5):
        raise ValueError(f"rms_norm_silu takes a 4D or 5D activation [B, C, (T,) H, W], got shape {tuple(x.shape)}; use the PyTorch RMSNorm for other shapes.")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"rms_norm_silu supports float32, bfloat16 and float16, got {x.dtype}; use the PyTorch RMSNorm for this dtype.")
    if not x.is_cuda and not _interpreting():
        raise ValueError("rms_norm_silu runs on CUDA tensors; use the PyTorch RMSNorm on the CPU.")
    c = x.shape[1]
    if gamma.numel() != c:
        raise ValueError(f"gamma has {gamma.numel()} values for {c} channels; pass the RMSNorm's gamma of shape [C, 1, 1(, 1)].")
    layout = _channels_last_format(x)
    if not x.is_contiguous(memory_format=layout):
        if x.stride(1) != 1:
            raise ValueError(
                f"rms_norm_silu needs a channels-last input (channel dim at stride 1), got strides {x.stride()}; "
                "use the PyTorch RMSNorm for this layout, or convert with x.contiguous(memory_format=torch.channels_last(_3d))."
            )
        x = x.contiguous(memory_format=layout)  # a strided view (e.g. a crop) of channels-last data: make it dense
    # Dense channels-last: pixel p's channels sit at storage offsets p*C .. p*C + C-1, whatever the pixel order,
    # and `empty_like` gives y the same strides, so the kernel can treat both as flat [pixels, C] rows.
    y = torch.empty_like(x, memory_format=layout)
    n_rows = x.numel() // c if c else 0
    if n_rows == 0:
        return y
    # The CPU interpreter truncates float32 -> bf16 instead of rounding to nearest, so there the kernel writes
    # float32 and torch rounds (on the GPU the kernel's own conversion rounds to nearest even).
    out = torch.empty_like(y, dtype=torch.float32) if _interpreting() and y.dtype == torch.bfloat16 else y
    block_c = triton.next_power_of_2(c)
    rows = max(1, TILE_ELEMENTS // block_c)
    _rms_norm_silu_kernel[(triton.cdiv(n_rows, rows),)](
        x, gamma.reshape(c).contiguous(), out, n_rows, float(c) ** 0.5,
        C=c, BLOCK_C=block_c, ROWS=rows, SILU=bool(silu), num_warps=NUM_WARPS,
    )
    return y if out is y else y.copy_(out)
