"""Triton kernels for the int8 `-quant.pth` layers: fused W8A8 linear and a fast W8A16 dequantize.

Numerics are those of ``turbowan.ops.int8`` (the exact emulation of the reference), reproduced bit for bit:
  * activations are quantized per 128x128 tile: ``amax = max(1e-8, max|x|)``, ``q = rint(x * (128 / amax))``
    (IEEE division, round half to even) saturated to [-128, 127], ``scale = amax / 128``;
  * the GEMM takes one exact int32 dot per 128-wide K block and folds it into an fp32 accumulator in K order
    with one fused multiply-add, ``acc = fma(float(dot), x_scale * w_scale, acc)``;
  * the accumulator is rounded to the activation dtype, then the bias is added in that dtype.

Shapes: x [M, K] bf16/fp16, int8 weight [N, K], weight scales fp32 [ceil(N/128), K/128], y [M, N].
K must be a multiple of 128 (every DiT layer's is: 5120, 13824); M and N may be ragged.

Kernel layout (Hopper first; sm80+ works through Triton's pointer fallback for tensor descriptors): one program
owns a 128 x (CHUNK * N_CHUNKS) output tile. Operands arrive by TMA. For each 128-wide K block it issues one int8
tensor-core dot per output chunk, converts the exact int32 partial to fp32 (I2FP) and does the fma with the scalar
scale product (a chunk never straddles a 128-row weight tile, and the 128-row M tile is one activation tile).
Chunking bounds registers: at 8 warps a [128, 128] chunk costs 64 accumulator registers per thread plus 64 for
the partial in flight; a whole [128, 256] partial would spill.

On Hopper (compute capability 9.0) `w8a8_gemm` runs the warp-specialized kernel of `int8_gluon` instead: the same
result bit for bit, ~5% faster at the 720p FFN shape (`gemm_kernel` decides; this kernel is what it is tested
against, and what every other card runs).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import libdevice
from triton.tools.tensor_descriptor import TensorDescriptor

from . import _load, cuda_capability, w8a8_gemm_kernel

TILE = 128

# Chosen from bench/int8.py's sweep on an H200 (see bench/INT8_NOTES.md); bench passes overrides to compare.
# Needs ~192 KB of shared memory per block (H100/H200/B200).
GEMM_CONFIG = dict(CHUNK=128, N_CHUNKS=2, GROUP_M=8, num_warps=8, num_stages=4, maxnreg=232)
# Cards with ~100-164 KB per block (A100, RTX 30/40/50): a 128x128 tile in 32 KB. Compiled offline for
# sm80/86/89/120 (Triton lowers the TMA descriptors to plain loads there); not timed on such a card.
GEMM_CONFIG_SMALL_SMEM = dict(CHUNK=128, N_CHUNKS=1, GROUP_M=8, num_warps=8, num_stages=2, maxnreg=None)


def available() -> bool:
    """Tensor-core int8 dots need sm80+; Triton must also see a CUDA device."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


# ----------------------------------------------------------------------------------------------------------------
# activation quantization: x [M, K] -> q int8 [M, K], scales fp32 [ceil(M/128), K/128]; one 128x128 tile per program


@triton.jit
def _quantize_tiles_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, TILE: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * TILE + tl.arange(0, TILE)
    cols = pid_k * TILE + tl.arange(0, TILE)
    in_rows = rows[:, None] < M
    # padding rows read as 0, which cannot raise the tile's amax (the emulation zero-pads the same way)
    x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_xm + cols[None, :], mask=in_rows, other=0.0)
    x = x.to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(x), axis=1), axis=0), 1e-8)
    inv = tl.math.div_rn(tl.full((), 128.0, tl.float32), amax)  # IEEE division, as the reference computes it
    q = tl.minimum(tl.maximum(libdevice.rint(x * inv), -128.0), 127.0).to(tl.int8)  # round half to even
    tl.store(q_ptr + rows[:, None].to(tl.int64) * K + cols[None, :], q, mask=in_rows)
    tl.store(s_ptr + pid_m * tl.num_programs(0) + pid_k, amax * 0.0078125)  # amax / 128, exact


def quantize_activations(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[M, K] bf16/fp16 CUDA (K % 128 == 0, unit column stride) -> (int8 [M, K], fp32 [ceil(M/128), K/128])."""
    m, k = x2d.shape
    mt, kt = triton.cdiv(m, TILE), k // TILE
    q = torch.empty(m, k, dtype=torch.int8, device=x2d.device)
    s = torch.empty(mt, kt, dtype=torch.float32, device=x2d.device)
    if m:
        _quantize_tiles_kernel[(kt, mt)](x2d, q, s, m, k, x2d.stride(0), TILE=TILE, num_warps=8)
    return q, s


# ----------------------------------------------------------------------------------------------------------------
# W8A8 GEMM


@triton.jit
def _chunk_update(acc, a, x_scale, w_desc, ws_ptr, n0, j, k_tiles, w_tiles_n):
    """acc += float(a @ W[n0:n0+CHUNK, 128j:128j+128].T) * (x_scale * w_scale) as one fma per element.

    a [128, 128] int8, acc [128, CHUNK] fp32. The int32 partial is exact (|dot| <= 2**21) and so is its conversion.
    A chunk lies inside one 128-row weight tile, so its scale is a scalar; a chunk past N reads zeros through TMA
    and clamps its scale row to stay in bounds.
    """
    b = w_desc.load([n0, j * 128])  # [CHUNK, 128] int8, K-major as the int8 tensor-core path needs
    w_scale = tl.load(ws_ptr + tl.minimum(n0 // 128, w_tiles_n - 1) * k_tiles + j)
    partial = tl.dot(a, b.T).to(tl.float32)
    return tl.fma(partial, tl.broadcast_to(x_scale * w_scale, partial.shape), acc)


@triton.jit
def _store_output(y_ptr, acc, bias_ptr, rows, cols, M, N, stride_ym, HAS_BIAS: tl.constexpr):
    out_ty = y_ptr.dtype.element_ty
    y = acc.to(out_ty)  # round to the activation dtype first, then add the bias in that dtype (as torch does)
    if HAS_BIAS:
        b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        y = (y.to(tl.float32) + b.to(tl.float32)[None, :]).to(out_ty)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], y, mask=mask)


@triton.jit
def grouped_tile(M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile (pid_m, pid_n) in grouped order (`tile_coords` of its program id)."""
    return tile_coords(tl.program_id(0), M, N, BM, BN, GROUP_M)


@triton.jit
def tile_coords(pid, M, N, BM: tl.constexpr, BN: tl.constexpr, GROUP_M: tl.constexpr):
    """Output tile number ``pid`` as (pid_m, pid_n) in grouped order: GROUP_M row tiles sweep the N tiles
    together, so operand tiles are reused from L2."""
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_rows, (pid % per_group) // group_rows


@triton.jit
def _w8a8_gemm_kernel(xq_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, y_ptr, M, N, k_tiles, stride_ym,
                      HAS_BIAS: tl.constexpr, CHUNK: tl.constexpr, N_CHUNKS: tl.constexpr, GROUP_M: tl.constexpr):
    BM: tl.constexpr = 128
    BN: tl.constexpr = CHUNK * N_CHUNKS
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)

    w_tiles_n = tl.cdiv(N, 128)
    off_m = pid_m * BM
    off_n = pid_n * BN
    xs_row = xs_ptr + pid_m * k_tiles
    # up to four output chunks, each with its own fp32 accumulator: the int32 partial of one dot stays
    # [128, CHUNK], which bounds registers (a [128, 256] partial next to a [128, 256] accumulator would spill)
    acc0 = tl.zeros((BM, CHUNK), dtype=tl.float32)
    acc1 = tl.zeros((BM, CHUNK), dtype=tl.float32)
    acc2 = tl.zeros((BM, CHUNK), dtype=tl.float32)
    acc3 = tl.zeros((BM, CHUNK), dtype=tl.float32)
    for j in range(k_tiles):
        a = xq_desc.load([off_m, j * 128])  # [128, 128] int8
        x_scale = tl.load(xs_row + j)
        acc0 = _chunk_update(acc0, a, x_scale, w_desc, ws_ptr, off_n, j, k_tiles, w_tiles_n)
        if N_CHUNKS > 1:
            acc1 = _chunk_update(acc1, a, x_scale, w_desc, ws_ptr, off_n + CHUNK, j, k_tiles, w_tiles_n)
        if N_CHUNKS > 2:
            acc2 = _chunk_update(acc2, a, x_scale, w_desc, ws_ptr, off_n + 2 * CHUNK, j, k_tiles, w_tiles_n)
            acc3 = _chunk_update(acc3, a, x_scale, w_desc, ws_ptr, off_n + 3 * CHUNK, j, k_tiles, w_tiles_n)

    rows = off_m + tl.arange(0, BM)
    cols = off_n + tl.arange(0, CHUNK)
    _store_output(y_ptr, acc0, bias_ptr, rows, cols, M, N, stride_ym, HAS_BIAS)
    if N_CHUNKS > 1:
        _store_output(y_ptr, acc1, bias_ptr, rows, cols + CHUNK, M, N, stride_ym, HAS_BIAS)
    if N_CHUNKS > 2:
        _store_output(y_ptr, acc2, bias_ptr, rows, cols + 2 * CHUNK, M, N, stride_ym, HAS_BIAS)
        _store_output(y_ptr, acc3, bias_ptr, rows, cols + 3 * CHUNK, M, N, stride_ym, HAS_BIAS)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """TMA needs a contiguous tensor whose base address is 16-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def gemm_operands(x_q, x_scale, w_q, w_scale, bias, out_dtype):
    """What both W8A8 GEMM kernels start from -> (y [M, N] empty in out_dtype, (x_q, x_scale, w_q, w_scale, bias)).

    K is checked; the int8 operands come back contiguous and 16-byte aligned (with K a multiple of 128 so are their
    row strides: TMA's requirements), the scales fp32 and contiguous, the bias in out_dtype or None.
    """
    m, k = x_q.shape
    n = w_q.shape[0]
    if k % TILE:
        raise ValueError(f"w8a8_gemm: K = {k} is not a multiple of 128; pad the features or use quant='w8a16'")
    y = torch.empty(m, n, dtype=out_dtype, device=x_q.device)
    if m == 0 or n == 0:
        return y, (x_q, x_scale, w_q, w_scale, bias)
    bias = bias.to(out_dtype).contiguous() if bias is not None else None
    return y, (_aligned(x_q), x_scale.float().contiguous(), _aligned(w_q), w_scale.float().contiguous(), bias)


def gemm_kernel(x_q: torch.Tensor, out_dtype: torch.dtype, config: dict) -> str:
    """The W8A8 GEMM that `w8a8_gemm` runs for these operands: "gluon" (`int8_gluon`, Hopper) or "triton" (here).

    ``config`` holds overrides of this module's GEMM_CONFIG, so any selects the Triton kernel. Otherwise the rule is
    `turbowan.kernels.w8a8_gemm_kernel`'s; where it picks Gluon but `int8_gluon` does not load (a Triton without
    Gluon, or another Gluon API), the Triton kernel runs after a one-line notice.
    """
    if config:
        return "triton"
    if w8a8_gemm_kernel(cuda_capability(x_q), x_q.shape[1], out_dtype) == "gluon" and _gluon_gemm() is not None:
        return "gluon"
    return "triton"


def _gluon_gemm():
    return _load("int8_gluon", "w8a8_gemm_gluon", fallback="the Triton W8A8 GEMM")


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, **config) -> torch.Tensor:
    """Quantized x [M, K] and weight [N, K] with their tile scales -> y [M, N] in out_dtype (bias in out_dtype).

    On Hopper the warp-specialized kernel of `int8_gluon` runs (same result bit for bit; `gemm_kernel` decides),
    elsewhere the Triton kernel here. ``config`` overrides entries of GEMM_CONFIG and so selects the Triton kernel
    (bench/int8.py sweeps them).
    """
    if gemm_kernel(x_q, out_dtype, config) == "gluon":
        return _gluon_gemm()(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    return _launch_w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, config)[0]


@functools.lru_cache(maxsize=None)
def _default_config(device: torch.device) -> dict:
    index = device.index if device.index is not None else torch.cuda.current_device()
    max_smem = triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]
    return GEMM_CONFIG if max_smem >= 200 * 1024 else GEMM_CONFIG_SMALL_SMEM


def _launch_w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, config):
    """The Triton kernel -> (y, the compiled kernel or None); the kernel handle lets the bench read registers and
    SASS."""
    cfg = {**_default_config(x_q.device), **config}
    y, (x_q, x_scale, w_q, w_scale, bias) = gemm_operands(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if y.numel() == 0:
        return y, None
    m, k = x_q.shape
    n = w_q.shape[0]
    xq_desc = TensorDescriptor.from_tensor(x_q, [128, 128])
    w_desc = TensorDescriptor.from_tensor(w_q, [cfg["CHUNK"], 128])
    bn = cfg["CHUNK"] * cfg["N_CHUNKS"]
    grid = (triton.cdiv(m, 128) * triton.cdiv(n, bn),)
    kernel = _w8a8_gemm_kernel[grid](
        xq_desc, w_desc, x_scale, w_scale, bias if bias is not None else y, y,  # y: an unused placeholder pointer
        m, n, k // 128, y.stride(0),
        HAS_BIAS=bias is not None, CHUNK=cfg["CHUNK"], N_CHUNKS=cfg["N_CHUNKS"], GROUP_M=cfg["GROUP_M"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], maxnreg=cfg["maxnreg"],
    )
    return y, kernel


def _check_layer_args(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor) -> None:
    n, k = w_q.shape
    if x.shape[-1] != k:
        raise ValueError(f"w8a8_linear: input has {x.shape[-1]} features but the int8 weight expects {k}; "
                         "pass activations whose last dimension matches the weight's in_features")
    if k % TILE:
        raise ValueError(f"w8a8_linear: in_features {k} is not a multiple of 128; the Triton W8A8 kernel "
                         "needs whole 128-wide K blocks, so run this layer with quant='w8a16' or the CPU emulation")
    if w_q.dtype != torch.int8 or x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"w8a8_linear: needs int8 weights and bf16/fp16 activations, got {w_q.dtype} and "
                         f"{x.dtype}; cast the activations to bf16")
    if tuple(w_scale.shape) != (triton.cdiv(n, TILE), k // TILE):
        raise ValueError(f"w8a8_linear: weight scale shape {tuple(w_scale.shape)} does not match "
                         f"{(triton.cdiv(n, TILE), k // TILE)} for a [{n}, {k}] weight; the checkpoint is corrupt")
    if not (x.is_cuda and w_q.is_cuda and w_scale.is_cuda):
        raise ValueError("w8a8_linear: the Triton kernel needs CUDA tensors; move the layer and input to the GPU")


def w8a8_linear(x: torch.Tensor, int8_weight: torch.Tensor, scale: torch.Tensor,
                bias: torch.Tensor | None) -> torch.Tensor:
    """The reference's W8A8 `Int8Linear.forward`: x [..., K] bf16/fp16 -> y [..., N] in x.dtype."""
    _check_layer_args(x, int8_weight, scale)
    lead, k = x.shape[:-1], x.shape[-1]
    x2d = x.reshape(-1, k)
    if x2d.stride(-1) != 1:
        x2d = x2d.contiguous()
    x_q, x_scale = quantize_activations(x2d)
    y = w8a8_gemm(x_q, x_scale, int8_weight, scale, bias, x.dtype)
    return y.reshape(*lead, int8_weight.shape[0])


# ----------------------------------------------------------------------------------------------------------------
# W8A16: dequantize once (per layer or per load), then cuBLAS


@triton.jit
def _dequantize_tiles_kernel(q_ptr, s_ptr, w_ptr, N, K, TILE: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_n * TILE + tl.arange(0, TILE)
    cols = pid_k * TILE + tl.arange(0, TILE)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * tl.num_programs(0) + pid_k)
    tl.store(w_ptr + offs, (q * s).to(w_ptr.dtype.element_ty), mask=mask)  # fp32 product, one rounding


def dequantize_int8_blockwise_cuda(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 [N, K] + fp32 tile scales [ceil(N/128), ceil(K/128)] -> [N, K] in dtype, equal to the CPU version."""
    n, k = q.shape
    if tuple(scale.shape) != (triton.cdiv(n, TILE), triton.cdiv(k, TILE)):
        raise ValueError(f"dequantize: scale shape {tuple(scale.shape)} does not match a [{n}, {k}] int8 weight; "
                         "the checkpoint is corrupt")
    w = torch.empty(n, k, dtype=dtype, device=q.device)
    if n and k:
        grid = (triton.cdiv(k, TILE), triton.cdiv(n, TILE))
        _dequantize_tiles_kernel[grid](q.contiguous(), scale.float().contiguous(), w, n, k, TILE=TILE, num_warps=4)
    return w
