"""SLA forward on CUDA through Triton: the same function as `turbowan.ops.sla.sla_attention`, in four launches.

1. `_key_stats_kernel`: one pass over k and v gives, per head, the column sums of k (-> mean_L(k) for the block map)
   and the linear branch's reductions sum_L phi(k) and phi(k)^T v (phi = softmax over the head dim), as per-split
   partials that torch sums in a fixed order (deterministic, no atomics).
2. `_pool_kernel` (twice): mean-pooled q blocks and mean-pooled (k - mean_L(k)) blocks, with the reference's roundings.
   The scores of the pooled blocks (a small matmul) and the top-k go through torch, so the block map is bit-identical
   to the torch path's on the same device.
3. `_sla_fwd_kernel`: per 128-row query block, flash attention over its selected key blocks only (LUT-driven, two
   64-row key blocks per step so the tensor cores see 128-wide tiles), then in the epilogue the linear branch for
   the same rows (phi(q) against the head's phi(k)^T v and sum phi(k)) and proj_l, summed and written once.

q, k, v are read in place in their (B, L, H, D) layout (any strides with the head dim contiguous), so nothing is
transposed or copied; out is a new contiguous (B, L, H, D) tensor.

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
from ..ops.sla import check_sla_inputs, selected_block_count

# Kernel tile choices (BLOCK_N = 64 * pair, warps, pipeline stages), picked on an H100 by bench/attention.py.
DEFAULT_CONFIG = {"pair": 2, "num_warps": 8, "num_stages": 3}
_FP32_CONFIG = {"pair": 1, "num_warps": 8, "num_stages": 1}
_ROWS_PER_SPLIT = 4096  # rows of one head reduced by one program of the key-stats pass
_STATS_BLOCK = 64


def _kernels():
    return _key_stats_kernel, _pool_kernel, _sla_fwd_kernel


if triton is not None:  # the kernels; helpers they call must be module globals for Triton to find them

    @triton.jit
    def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        # UPCAST: the CPU interpreter mis-multiplies bf16 operands, so there they go in as (exact) fp32.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def _compute(x, LOW: tl.constexpr):
        # bf16 / fp16 inputs are computed in bf16, as the reference module does; fp32 stays fp32
        if LOW:
            return x.to(tl.bfloat16)
        else:
            return x

    @triton.jit
    def _key_stats_kernel(
        K, V, KV_PART, KSUM_PART, KCOL_PART,
        L, H, N_SPLIT,
        skb, skl, skh, svb, svl, svh,
        ROWS_PER_SPLIT: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
        LOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        split = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_r = tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        col = tl.zeros([D], dtype=tl.float32)
        ksum = tl.zeros([D], dtype=tl.float32)
        kv = tl.zeros([D, D], dtype=tl.float32)
        for r0 in range(0, ROWS_PER_SPLIT, BLOCK):
            rows = split * ROWS_PER_SPLIT + r0 + offs_r
            real = rows < L
            k = tl.load(k_base + rows[:, None] * skl + offs_d[None, :], mask=real[:, None], other=0.0)
            v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=real[:, None], other=0.0)
            col += tl.sum(k.to(tl.float32), axis=0)  # of the input-dtype k: its mean smooths the block map
            k = _compute(k, LOW)
            v = _compute(v, LOW)
            kf = k.to(tl.float32)
            e = tl.exp(kf - tl.max(kf, axis=1)[:, None])
            phi = (e / tl.sum(e, axis=1)[:, None]).to(k.dtype)  # feature map output in the compute dtype
            phi = tl.where(real[:, None], phi, 0.0).to(k.dtype)
            ksum += tl.sum(phi.to(tl.float32), axis=0)
            kv = _mma(tl.trans(phi), v, kv, UPCAST, IEEE)
        part = bh * N_SPLIT + split
        tl.store(KCOL_PART + part * D + offs_d, col)
        tl.store(KSUM_PART + part * D + offs_d, ksum)
        tl.store(KV_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], kv)

    @triton.jit
    def _pool_kernel(
        X, SHIFT, OUT, L, H, N_BLOCKS, sxb, sxl, sxh,
        BLOCK: tl.constexpr, D: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        blk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        real = rows < L
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxl + offs_d[None, :], mask=real[:, None], other=0.0)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + bh * D + offs_d)
            # the reference subtracts in the input dtype, then pools the rounded differences (padding stays 0)
            x = (x.to(tl.float32) - shift.to(tl.float32)[None, :]).to(x.dtype)
            x = tl.where(real[:, None], x, 0.0)
        count = tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x.to(tl.float32), axis=0) / count
        tl.store(OUT + (bh * N_BLOCKS + blk) * D + offs_d, mean.to(OUT.dtype.element_ty))

    @triton.jit
    def _sla_fwd_kernel(
        Q, K, V, LUT, KV, KSUM, W, BIAS, OUT,
        L, H, N_SEL, N_STEPS, N_QBLOCKS, qk_scale_log2,
        sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
        BLOCK_M: tl.constexpr, BLKK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr,
        LOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        BLOCK_N: tl.constexpr = BLKK * PAIR
        qblk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        half = offs_n // BLKK  # which of the PAIR key blocks a tile column belongs to
        within = offs_n % BLKK
        q_real = offs_m < L

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=q_real[:, None], other=0.0)
        q = _compute(q, LOW)
        k_base = K + b * skb + h * skh
        v_base = V + b * svb + h * svh
        lut = LUT + (bh * N_QBLOCKS + qblk) * N_SEL

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for step in range(0, N_STEPS):  # N_STEPS = ceil(N_SEL / PAIR)
            first = tl.load(lut + step * PAIR)
            if PAIR == 2:
                has_second = step * 2 + 1 < N_SEL
                second = tl.load(lut + step * 2 + 1, mask=has_second, other=first)
                block = tl.where(half == 0, first, second)
                rows = block * BLKK + within
                real = (rows < L) & ((half == 0) | has_second)
                needs_mask = ((second + 1) * BLKK > L) | ((first + 1) * BLKK > L) | (step * 2 + 1 >= N_SEL)
            else:
                rows = first * BLKK + offs_n
                real = rows < L
                needs_mask = (first + 1) * BLKK > L
            kt = tl.load(k_base + rows[None, :] * skl + offs_d[:, None], mask=real[None, :], other=0.0)  # (D, N)
            v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=real[:, None], other=0.0)  # (N, D)
            kt = _compute(kt, LOW)
            v = _compute(v, LOW)
            s = _mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)  # unscaled q.k
            if needs_mask:  # only the partial last key block and an unpaired tail step pay for the select
                s = tl.where(real[None, :], s, float("-inf"))
            # max of the scaled scores = scale * max of the raw ones; the scale then folds into one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale_log2)
            p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
            m_i = m_new
        o_s = (acc / l_i[:, None]).to(q.dtype)  # the reference rounds the sparse output to the compute dtype

        # Linear branch for these rows, with the reference's roundings to the compute dtype between steps.
        qf = q.to(tl.float32)
        e = tl.exp(qf - tl.max(qf, axis=1)[:, None])
        phi_q = (e / tl.sum(e, axis=1)[:, None]).to(q.dtype)
        kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        num = _mma(phi_q, kv, tl.zeros([BLOCK_M, D], dtype=tl.float32), UPCAST, IEEE).to(q.dtype)
        k_sum = tl.load(KSUM + bh * D + offs_d)
        den = tl.sum((phi_q.to(tl.float32) * k_sum.to(tl.float32)[None, :]).to(q.dtype).to(tl.float32), axis=1)
        den = (den.to(q.dtype).to(tl.float32) + 1e-5).to(q.dtype)
        o_l = (num.to(tl.float32) / den.to(tl.float32)[:, None]).to(q.dtype)
        w_t = tl.load(W + offs_d[None, :] * D + offs_d[:, None])  # proj_l weight transposed: [in, out]
        bias = tl.load(BIAS + offs_d)
        lin = _mma(o_l, w_t, tl.zeros([BLOCK_M, D], dtype=tl.float32), UPCAST, IEEE) + bias.to(tl.float32)[None, :]
        out = o_s.to(tl.float32) + lin.to(q.dtype).to(tl.float32)
        tl.store(
            OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=q_real[:, None],
        )


def _check_kernel_shapes(q: torch.Tensor, blkq: int, blkk: int) -> None:
    d = q.shape[-1]
    for name, value in (("head dim", d), ("blkq", blkq), ("blkk", blkk)):
        if value < 16 or value & (value - 1):
            raise ValueError(
                f"The Triton SLA kernel needs a power-of-two {name} >= 16, got {value}; "
                "use turbowan.ops.sla.sla_attention (pure PyTorch) for this shape."
            )
    if not q.is_cuda and not _interpreting():
        raise ValueError("sla_attention_triton runs on CUDA tensors; use turbowan.ops.sla.sla_attention on the CPU.")


def _head_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _key_stats(k: torch.Tensor, v: torch.Tensor, compute_dtype: torch.dtype):
    """-> (mean_L(k) in k's dtype, sum_L phi(k), phi(k)^T v in the compute dtype); each (B*H, D) / (B*H, D, D)."""
    key_stats_kernel, _, _ = _kernels()
    b, length, h, d = k.shape
    n_split = -(-length // _ROWS_PER_SPLIT)
    kv_part = torch.empty(b * h, n_split, d, d, dtype=torch.float32, device=k.device)
    ksum_part = torch.empty(b * h, n_split, d, dtype=torch.float32, device=k.device)
    kcol_part = torch.empty(b * h, n_split, d, dtype=torch.float32, device=k.device)
    key_stats_kernel[(n_split, b * h)](
        k, v, kv_part, ksum_part, kcol_part, length, h, n_split,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ROWS_PER_SPLIT=_ROWS_PER_SPLIT, BLOCK=_STATS_BLOCK, D=d,
        LOW=compute_dtype != torch.float32, UPCAST=_interpreting(), IEEE=compute_dtype == torch.float32, num_warps=4,
    )
    k_mean = (kcol_part.sum(dim=1) / length).to(k.dtype)
    return k_mean, ksum_part.sum(dim=1).to(compute_dtype), kv_part.sum(dim=1).to(compute_dtype)


def _pool(x: torch.Tensor, block: int, shift: torch.Tensor | None) -> torch.Tensor:
    """(B, L, H, D) -> (B*H, ceil(L/block), D) block means in x's dtype, of x - shift when shift is given."""
    _, pool_kernel, _ = _kernels()
    b, length, h, d = x.shape
    n = -(-length // block)
    out = torch.empty(b * h, n, d, dtype=x.dtype, device=x.device)
    pool_kernel[(n, b * h)](
        x, shift if shift is not None else out, out, length, h, n, x.stride(0), x.stride(1), x.stride(2),
        BLOCK=block, D=d, HAS_SHIFT=shift is not None, num_warps=4,
    )
    return out


def _block_lut(q, k, k_mean, topk, blkq, blkk):
    """-> (int64 LUT (B*H, nQ, n) sorted ascending, n): the torch path's block map from Triton-pooled blocks."""
    scores = _pool(q, blkq, None) @ _pool(k, blkk, k_mean).transpose(-1, -2)  # (B*H, nQ, K) in the input dtype
    count = selected_block_count(topk, scores.shape[-1])
    lut = torch.topk(scores, count, dim=-1, sorted=False).indices.sort(dim=-1).values
    return lut, count


def sla_block_map_triton(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = 128, blkk: int = 64):
    """Same result as `turbowan.ops.sla.sla_block_map` (lut (B, H, nQ, n) int64 sorted, n), pooled in Triton."""
    q, k = _head_contiguous(q), _head_contiguous(k)
    _check_kernel_shapes(q, blkq, blkk)
    k_mean, _, _ = _key_stats(k, k, torch.float32 if k.dtype == torch.float32 else torch.bfloat16)
    lut, count = _block_lut(q, k, k_mean, topk, blkq, blkk)
    return lut.view(q.shape[0], q.shape[2], -1, count), count


def sla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l_weight: torch.Tensor,
    proj_l_bias: torch.Tensor,
    topk: float,
    blkq: int = 128,
    blkk: int = 64,
    config: dict | None = None,
) -> torch.Tensor:
    """SLA forward on CUDA; same contract as `turbowan.ops.sla.sla_attention`.

    q, k, v: (B, L, H, D) CUDA tensors of one dtype (bf16, fp16 or fp32; the head dim must be contiguous, other
    strides are free), D a power of two. proj_l: weight (D, D), bias (D,). -> (B, L, H, D) contiguous, q's dtype.
    """
    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    q, k, v = _head_contiguous(q), _head_contiguous(k), _head_contiguous(v)
    _check_kernel_shapes(q, blkq, blkk)
    compute = torch.float32 if q.dtype == torch.float32 else torch.bfloat16
    # fp32 tiles are twice the bytes: one 64-key block per step and no prefetch stage keep them in shared memory
    cfg = dict(DEFAULT_CONFIG if compute != torch.float32 else _FP32_CONFIG, **(config or {}))
    _, _, sla_fwd_kernel = _kernels()
    b, length, h, d = q.shape

    k_mean, k_sum, kv = _key_stats(k, v, compute)
    lut, count = _block_lut(q, k, k_mean, topk, blkq, blkk)
    lut = lut.to(torch.int32).contiguous()
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)
    n_qblocks = lut.shape[1]
    sla_fwd_kernel[(n_qblocks, b * h)](
        q, k, v, lut, kv, k_sum, proj_l_weight.to(compute).contiguous(), proj_l_bias.to(compute).contiguous(), out,
        length, h, count, -(-count // cfg["pair"]), n_qblocks, d**-0.5 * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=blkq, BLKK=blkk, PAIR=cfg["pair"], D=d, LOW=compute != torch.float32,
        UPCAST=_interpreting(), IEEE=compute == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
