"""The VAE's causal 3D convolutions as one implicit-GEMM Triton kernel over channels-last activations.

cuDNN runs the Wan VAE's 3x3x3 convolutions (96-384 channels, NDHWC) at ~190 TFLOP/s over a whole 720p decode:
it picks Ampere kernels for several shapes, and around them adds layout conversions, a float32 scratch output
and a separate bias pass (`bench/vae.py --profile`). This kernel computes the convolution as a GEMM without
materialising the unfolded input:

    rows    M = output pixels (b, t, h, w)                 (channels-last: a pixel's Cin channels are adjacent)
    columns N = output channels
    depth   K = taps (dt, dh, dw) x input channels           (one K step = one tap, BLOCK_K of its channels)

    y[m, n] = bias[n] + (residual[m, n]) + sum_k x[pixel(m) + shift(tap(k)), channel(k)] * w[n, k]

The input is the causal stream [B, Cin, T + kt - 1, H, W] (the previous chunk's last kt - 1 frames, then this
chunk), so every temporal tap is inside it; spatial taps outside the frame read zeros ("same" padding). Products
accumulate in float32 and the result is rounded once to the input dtype, bias and optional residual included (the
eager path rounds after the convolution and again after the residual sum).

Triton is imported lazily: importing this module needs no Triton; `available()` says whether it can run.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

try:  # optional: the package imports and runs (on cuDNN / the CPU) without Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from . import conv3d_fits
from . import triton_runnable as available  # read by turbowan.kernels

class TileConfig(NamedTuple):
    block_m: int  # output pixels per program
    block_n: int  # output channels per program
    block_k: int  # input channels per K step (divides Cin)
    num_warps: int
    num_stages: int


def default_config(c_in: int, c_out: int) -> TileConfig:
    """The tile for a convolution of these widths (chosen by `bench/vae_conv.py` on an H200)."""
    block_k = 64 if c_in % 64 == 0 else 32 if c_in % 32 == 0 else 16
    block_n = 128 if c_out > 64 else max(16, 1 << (c_out - 1).bit_length())  # a power of two covering c_out
    return TileConfig(128, block_n, block_k, 8 if block_k == 64 else 4, 3 if block_k == 64 else 4)


if triton is not None:

    @triton.jit
    def _causal_conv3d_kernel(
        X, W, BIAS, RES, Y,
        M, T, H, WIDTH,
        C_IN: tl.constexpr, C_OUT: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NUM_STAGES: tl.constexpr,
    ):
        # X: stream [B, T + KT - 1, H, WIDTH, C_IN] (channels-last storage); W: [C_OUT, KT, KH, KW, C_IN];
        # Y, RES: [B, T, H, WIDTH, C_OUT]. M = B * T * H * WIDTH output pixels.
        n_tiles = tl.cdiv(C_OUT, BLOCK_N)
        pid = tl.program_id(0)
        pid_m = pid // n_tiles  # the N tiles of one M tile run side by side: they read the same input from L2
        pid_n = pid % n_tiles

        offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)  # int64: streams pass 2^31 elements
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < C_OUT

        w_out = offs_m % WIDTH
        h_out = (offs_m // WIDTH) % H
        bt = offs_m // (WIDTH * H)
        t_out = bt % T
        b = bt // T
        # The input pixel under tap (0, 0, 0) minus the spatial padding, as a flat pixel index of the stream.
        pad_h: tl.constexpr = KH // 2
        pad_w: tl.constexpr = KW // 2
        base = ((b * (T + KT - 1) + t_out) * H + h_out - pad_h) * WIDTH + w_out - pad_w

        K_TOTAL: tl.constexpr = KT * KH * KW * C_IN
        CHUNKS: tl.constexpr = C_IN // BLOCK_K
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for step in tl.range(0, KT * KH * KW * CHUNKS, num_stages=NUM_STAGES):
            tap = step // CHUNKS
            c0 = (step % CHUNKS) * BLOCK_K
            dt = tap // (KH * KW)
            dh = (tap // KW) % KH
            dw = tap % KW
            hh = h_out + dh - pad_h
            ww = w_out + dw - pad_w
            inside = m_ok & (hh >= 0) & (hh < H) & (ww >= 0) & (ww < WIDTH)
            pixel = base + (dt * H + dh) * WIDTH + dw
            a = tl.load(X + pixel[:, None] * C_IN + (c0 + offs_k)[None, :], mask=inside[:, None], other=0.0)
            w = tl.load(W + offs_n[None, :] * K_TOTAL + (tap * C_IN + c0 + offs_k)[:, None], mask=n_ok[None, :], other=0.0)
            acc = tl.dot(a, w, acc)

        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        out_offsets = offs_m[:, None] * C_OUT + offs_n[None, :]
        out_mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            acc += tl.load(RES + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(Y + out_offsets, acc.to(Y.dtype.element_ty), mask=out_mask)


def causal_conv3d(
    stream: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    config: Optional[TileConfig] = None,
) -> torch.Tensor:
    """conv3d(stream, weight, bias, padding=(0, kh // 2, kw // 2)) (+ residual), rounded once.

    stream: [B, Cin, T + kt - 1, H, W], channels-last (NDHWC memory), bf16 or fp16, Cin a multiple of 16.
    weight: [Cout, Cin, kt, kh, kw] with odd kh, kw; bias: [Cout] or None; residual: [B, Cout, T, H, W] or None.
    Returns [B, Cout, T, H, W] in channels-last memory, the stream's dtype.
    """
    if triton is None:
        raise RuntimeError("causal_conv3d needs Triton; use F.conv3d instead.")
    if not conv3d_fits(stream, weight):
        raise ValueError(
            f"causal_conv3d takes a channels-last bf16/fp16 stream with Cin a multiple of 16 and an odd spatial "
            f"kernel of the same dtype, got stream {tuple(stream.shape)} {stream.dtype} strides {stream.stride()} "
            f"and weight {tuple(weight.shape)} {weight.dtype}; use F.conv3d for this convolution."
        )
    b, c_in, t_in, h, w = stream.shape
    c_out, w_in, kt, kh, kw = weight.shape
    if w_in != c_in:
        raise ValueError(f"weight {tuple(weight.shape)} expects {w_in} input channels, the stream has {c_in}.")
    t = t_in - (kt - 1)
    if t < 1:
        raise ValueError(f"the stream has {t_in} frames, fewer than the kernel's {kt}; prefix the past frames first.")
    stream = stream.contiguous(memory_format=torch.channels_last_3d)  # a view with the right strides stays as is
    packed = weight.permute(0, 2, 3, 4, 1).contiguous()  # [Cout, kt, kh, kw, Cin]: K contiguous (tiny copy)
    y = torch.empty(b, c_out, t, h, w, dtype=stream.dtype, device=stream.device, memory_format=torch.channels_last_3d)
    if residual is not None:
        if residual.shape != y.shape:
            raise ValueError(f"residual {tuple(residual.shape)} does not match the output {tuple(y.shape)}.")
        residual = residual.contiguous(memory_format=torch.channels_last_3d)
    m = b * t * h * w
    if m == 0:
        return y
    cfg = config or default_config(c_in, c_out)
    if c_in % cfg.block_k:
        raise ValueError(f"block_k {cfg.block_k} does not divide the {c_in} input channels.")
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(c_out, cfg.block_n),)
    _causal_conv3d_kernel[grid](
        stream, packed, bias if bias is not None else packed, residual if residual is not None else y, y,
        m, t, h, w,
        C_IN=c_in, C_OUT=c_out, KT=kt, KH=kh, KW=kw,
        HAS_BIAS=bias is not None, HAS_RES=residual is not None,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.num_warps,
    )
    return y
