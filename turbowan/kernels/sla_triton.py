"""SLA forward on CUDA through Triton: the same function as `turbowan.ops.sla.sla_attention`, in four launches.

1. `sla_common.key_stats`: per head, mean_L(k) for the block map and the linear branch's sum_L phi(k) and phi(k)^T v.
2. `sla_common.block_lut` (two pooling launches, then torch's scores and top-k): the torch path's block map.
3. `_sla_fwd_kernel`: per 128-row query block, flash attention over its selected key blocks only (LUT-driven, two
   64-row key blocks per step so the tensor cores see 128-wide tiles), then in the epilogue the linear branch for
   the same rows (phi(q) against the head's phi(k)^T v and sum phi(k)) and proj_l, summed and written once.

q, k, v are read in place in their (B, L, H, D) layout (any strides with the head dim contiguous), so nothing is
transposed or copied; out is a new contiguous (B, L, H, D) tensor.

On Hopper (compute capability 9.0) `sla_attention_cuda` runs the warp-specialized kernel of `sla_gluon` instead for
bf16 inputs with head dim 128 laid out as TMA reads them: the same block map, statistics and epilogue, the same
output (bit for bit on an H200), 7-8% faster (`attention_kernel` decides; this kernel is what it is tested against,
and what runs everywhere else).

Triton is imported lazily: importing this module needs no Triton; `available()` says whether it can run.
"""

from __future__ import annotations

import torch

from . import _load, cuda_capability, interpreting, sla_kernel, tma_row_matrix
from . import triton_runnable as available  # noqa: F401  (read by turbowan.kernels)
from .sla_common import (DEFAULT_CONFIG, block_lut, check_kernel_shapes, head_contiguous, key_stats,
                         triton)
from .sla_contract import BLKK, BLKQ, LOG2E, check_sla_inputs, compute_dtype

_FP32_CONFIG = {"pair": 1, "num_warps": 8, "num_stages": 1}

if triton is not None:
    import triton.language as tl

    from .sla_common import linear_branch_and_store, mma, query_block_program, selected_key_rows, to_compute

    @triton.jit
    def _sla_fwd_kernel(
        Q, K, V, LUT, KV, KSUM, W, BIAS, OUT,
        L, H, N_SEL, N_STEPS, N_QBLOCKS, qk_scale_log2,
        sqb, sql, sqh, skb, skl, skh, svb, svl, svh, sob, sol, soh,
        BLOCK_M: tl.constexpr, BLKK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr,
        LOW: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        BLOCK_N: tl.constexpr = BLKK * PAIR
        qblk, bh, b, h, offs_m, offs_n, offs_d, half, within = query_block_program(H, BLOCK_M, BLOCK_N, BLKK, D)
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
            rows, real, needs_mask = selected_key_rows(lut, step, N_SEL, L, offs_n, half, within, BLKK, PAIR)
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
        linear_branch_and_store(q, o_s, KV, KSUM, W, BIAS, OUT, bh, b, h, offs_m, offs_d, q_real, sob, sol, soh,
                                BLOCK_M, D, UPCAST, IEEE)


def sla_block_map_triton(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK):
    """Same result as `turbowan.ops.sla.sla_block_map` (lut (B, H, nQ, n) int64 sorted, n), pooled in Triton."""
    q, k = head_contiguous(q), head_contiguous(k)
    check_kernel_shapes(q, blkq, blkk)
    k_mean, _, _ = key_stats(k, k, compute_dtype(k.dtype))
    lut, count = block_lut(q, k, k_mean, topk, blkq, blkk)
    return lut.view(q.shape[0], q.shape[2], -1, count), count


def sla_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                         proj_l_bias: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK,
                         config: dict | None = None) -> torch.Tensor:
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


def attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The SLA kernel `sla_attention_cuda` runs for these inputs: "gluon" (`sla_gluon`, Hopper) or "triton" (here).

    The rule is `turbowan.kernels.sla_kernel`'s; where it picks Gluon but `sla_gluon` does not load (a Triton without
    Gluon, another Gluon API, a kernel that does not build for this card), the Triton kernel runs after a one-line
    notice.
    """
    rows = all(x.dim() == 4 and tma_row_matrix(x) for x in (q, k, v))
    if sla_kernel(cuda_capability(q), q.dtype, q.shape[-1], rows) == "gluon" and _gluon_sla() is not None:
        return "gluon"
    return "triton"


def _gluon_sla():
    return _load("sla_gluon", "sla_attention_gluon", fallback="the Triton SLA kernel")


def sla_attention_cuda(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                       proj_l_bias: torch.Tensor, topk: float) -> torch.Tensor:
    """SLA forward on CUDA, `sla_attention_triton`'s contract: on Hopper the warp-specialized kernel of `sla_gluon`
    runs where it takes the inputs (same output; `attention_kernel` decides), elsewhere the Triton kernel here."""
    if attention_kernel(q, k, v) == "gluon":
        return _gluon_sla()(q, k, v, proj_l_weight, proj_l_bias, topk)
    return sla_attention_triton(q, k, v, proj_l_weight, proj_l_bias, topk)
