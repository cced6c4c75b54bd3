"""SLA forward on CUDA through Triton: the same function as `turbowan.ops.sla.sla_attention`, in four launches.

1. `sla_common.key_stats`: per head, mean_L(k) for the block map and the linear branch's sum_L phi(k) and phi(k)^T v.
2. `sla_common.block_lut` (two pooling launches, then torch's scores and top-k): the torch path's block map.
3. `_sla_fwd_kernel`: per 128-row query block, flash attention over its selected key blocks only (LUT-driven, two
   64-row key blocks per step so the tensor cores see 128-wide tiles), then in the epilogue the linear branch for
   the same rows (phi(q) against the head's phi(k)^T v and sum phi(k)) and proj_l, summed and written once.

q, k, v are read in place in their (B, L, H, D) layout (any strides with the head dim contiguous), so nothing is
transposed or copied; out is a new contiguous (B, L, H, D) tensor.

Triton is imported lazily: importing this module needs no Triton; `available()` says whether it can run.
"""

from __future__ import annotations

import torch

from . import interpreting
from . import triton_runnable as available  # noqa: F401  (read by turbowan.kernels)
from .sla_common import (DEFAULT_CONFIG, block_lut, check_kernel_shapes, head_contiguous, key_stats,
                         triton)
from .sla_contract import BLKK, BLKQ, LOG2E, check_sla_inputs, compute_dtype

_FP32_CONFIG = {"pair": 1, "num_warps": 8, "num_stages": 1}

if triton is not None:
    import triton.language as tl

    from .sla_common import mma, to_compute

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
        q = to_compute(q, LOW)
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
            kt = to_compute(kt, LOW)
            v = to_compute(v, LOW)
            s = mma(q, kt, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)  # unscaled q.k
            if needs_mask:  # only the partial last key block and an unpaired tail step pay for the select
                s = tl.where(real[None, :], s, float("-inf"))
            # max of the scaled scores = scale * max of the raw ones; the scale then folds into one FMA per score
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * qk_scale_log2)
            p = tl.math.exp2(s * qk_scale_log2 - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST, IEEE)
            m_i = m_new
        o_s = (acc / l_i[:, None]).to(q.dtype)  # the reference rounds the sparse output to the compute dtype

        # Linear branch for these rows, with the reference's roundings to the compute dtype between steps.
        qf = q.to(tl.float32)
        e = tl.exp(qf - tl.max(qf, axis=1)[:, None])
        phi_q = (e / tl.sum(e, axis=1)[:, None]).to(q.dtype)
        kv = tl.load(KV + bh * D * D + offs_d[:, None] * D + offs_d[None, :])
        num = mma(phi_q, kv, tl.zeros([BLOCK_M, D], dtype=tl.float32), UPCAST, IEEE).to(q.dtype)
        k_sum = tl.load(KSUM + bh * D + offs_d)
        den = tl.sum((phi_q.to(tl.float32) * k_sum.to(tl.float32)[None, :]).to(q.dtype).to(tl.float32), axis=1)
        den = (den.to(q.dtype).to(tl.float32) + 1e-5).to(q.dtype)
        o_l = (num.to(tl.float32) / den.to(tl.float32)[:, None]).to(q.dtype)
        w_t = tl.load(W + offs_d[None, :] * D + offs_d[:, None])  # proj_l weight transposed: [in, out]
        bias = tl.load(BIAS + offs_d)
        lin = mma(o_l, w_t, tl.zeros([BLOCK_M, D], dtype=tl.float32), UPCAST, IEEE) + bias.to(tl.float32)[None, :]
        out = o_s.to(tl.float32) + lin.to(q.dtype).to(tl.float32)
        tl.store(
            OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :],
            out.to(OUT.dtype.element_ty),
            mask=q_real[:, None],
        )


def sla_block_map_triton(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK):
    """Same result as `turbowan.ops.sla.sla_block_map` (lut (B, H, nQ, n) int64 sorted, n), pooled in Triton."""
    q, k = head_contiguous(q), head_contiguous(k)
    check_kernel_shapes(q, blkq, blkk)
    k_mean, _, _ = key_stats(k, k, compute_dtype(k.dtype))
    lut, count = block_lut(q, k, k_mean, topk, blkq, blkk)
    return lut.view(q.shape[0], q.shape[2], -1, count), count


def sla_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_l_weight: torch.Tensor,
    proj_l_bias: torch.Tensor,
    topk: float,
    blkq: int = BLKQ,
    blkk: int = BLKK,
    config: dict | None = None,
) -> torch.Tensor:
    """SLA forward on CUDA; same contract as `turbowan.ops.sla.sla_attention`.

    q, k, v: (B, L, H, D) CUDA tensors of one dtype (bf16, fp16 or fp32; the head dim must be contiguous, other
    strides are free), D a power of two. proj_l: weight (D, D), bias (D,). -> (B, L, H, D) contiguous, q's dtype.
    """
    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    q, k, v = head_contiguous(q), head_contiguous(k), head_contiguous(v)
    check_kernel_shapes(q, blkq, blkk)
    compute = compute_dtype(q.dtype)
    # fp32 tiles are twice the bytes: one 64-key block per step and no prefetch stage keep them in shared memory
    cfg = dict(DEFAULT_CONFIG if compute != torch.float32 else _FP32_CONFIG, **(config or {}))
    b, length, h, d = q.shape

    k_mean, k_sum, kv = key_stats(k, v, compute)
    lut, count = block_lut(q, k, k_mean, topk, blkq, blkk)
    lut = lut.to(torch.int32).contiguous()
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)
    n_qblocks = lut.shape[1]
    _sla_fwd_kernel[(n_qblocks, b * h)](
        q, k, v, lut, kv, k_sum, proj_l_weight.to(compute).contiguous(), proj_l_bias.to(compute).contiguous(), out,
        length, h, count, -(-count // cfg["pair"]), n_qblocks, d**-0.5 * LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=blkq, BLKK=blkk, PAIR=cfg["pair"], D=d, LOW=compute != torch.float32,
        UPCAST=interpreting(), IEEE=compute == torch.float32,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
