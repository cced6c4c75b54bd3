"""`sagesla`: SLA with quantized sparse attention (the SageSLA idea), as Triton kernels of our own.

Same block map, linear branch and proj_l as `sla` (turbowan.ops.sla; the key-stats pass and block map come from
`sla_common`); only the sparse softmax part is quantized:
* q (pre-multiplied by D^-0.5 * log2 e) and smoothed k (k - mean_L(k), which leaves softmax unchanged since it moves
  every score of a row by the same amount) become int8 with one fp32 scale per token (amax of its row / 127);
  q.k^T runs on the int8 tensor cores with exact int32 accumulation, then is scaled back.
* where the card has fp8 tensor cores (compute capability 8.9+), v becomes fp8 e4m3 with one scale per head channel
  (amax over all tokens / 448), stored transposed (B*H, D, L) so the fp8 tensor cores read it in the order they
  need; P is scaled by 448 into fp8, and P.V accumulates in fp32. Elsewhere (Ampere) P.V stays bf16.
* The online softmax, its exp2 and the normalisation stay fp32.
Error budget: relative L2 under 3e-2 against the float SLA on the same inputs (measured by bench/attention.py:
1.6e-2 at 720p and 2.0e-2 at 480p with fp8 P.V on an H200).

Needs CUDA and Triton; q, k, v as for `sla_attention_triton`, bf16 or fp16. The module imports without Triton.
"""

from __future__ import annotations

import torch

from . import interpreting
from . import triton_runnable as available  # noqa: F401  (read by turbowan.kernels)
from .sla_common import DEFAULT_CONFIG, block_lut, check_kernel_shapes, head_contiguous, key_stats, triton
from .sla_contract import BLKK, BLKQ, LOG2E, check_sla_inputs

_FP8_MAX = 448.0  # largest finite float8 e4m3fn value

if triton is not None:
    import triton.language as tl

    from .sla_common import linear_branch_and_store, load_row_block, mma, query_block_program, selected_key_rows

    @triton.jit
    def _quant_int8_kernel(
        X, SHIFT, XQ, XSCALE, L, H, L_PAD, sxb, sxl, sxh, factor,
        BLOCK: tl.constexpr, D: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        # BLOCK rows of one head -> int8 rows of XQ (B*H, L_PAD, D), one fp32 scale per row (token)
        _, bh, rows, offs_d, real, x = load_row_block(X, L, H, sxb, sxl, sxh, BLOCK, D)
        x = x.to(tl.float32)
        if HAS_SHIFT:
            x = x - tl.load(SHIFT + bh * D + offs_d).to(tl.float32)[None, :]
        x = tl.where(real[:, None], x * factor, 0.0)  # padding rows quantize to 0
        amax = tl.maximum(tl.max(tl.abs(x), axis=1), 1e-20)
        scaled = x * (127.0 / amax)[:, None]
        q = tl.where(scaled >= 0, scaled + 0.5, scaled - 0.5).to(tl.int8)  # round half away from zero
        tl.store(XQ + (bh * L_PAD + rows[:, None]) * D + offs_d[None, :], q)
        tl.store(XSCALE + bh * L_PAD + rows, amax / 127.0)

    @triton.jit
    def _quant_v_fp8_kernel(
        V, VSCALE, VT, L, H, L_PAD, svb, svl, svh,
        BLOCK: tl.constexpr, D: tl.constexpr,
    ):
        # one (BLOCK, D) tile of v -> fp8 columns of VT (B*H, D, L_PAD), scaled per channel
        _, bh, rows, offs_d, _, v = load_row_block(V, L, H, svb, svl, svh, BLOCK, D)
        scale = tl.load(VSCALE + bh * D + offs_d)  # amax / 448 per channel
        v8 = tl.clamp(v.to(tl.float32) / scale[None, :], -448.0, 448.0).to(tl.float8e4nv)
        tl.store(VT + (bh * D + offs_d[None, :]) * L_PAD + rows[:, None], v8)

    @triton.jit
    def _sagesla_fwd_kernel(
        QI, QSCALE, KI, KSCALE, VT, VSCALE, Q, V, LUT, KV, KSUM, W, BIAS, OUT,
        L, H, N_SEL, N_STEPS, N_QBLOCKS, N_KBLOCKS,
        sqb, sql, sqh, svb, svl, svh, sob, sol, soh,
        BLOCK_M: tl.constexpr, BLKK: tl.constexpr, PAIR: tl.constexpr, D: tl.constexpr,
        PV_FP8: tl.constexpr, UPCAST: tl.constexpr,
    ):
        # UPCAST (CPU interpreter only): every dot on exact fp32 copies of its operands
        BLOCK_N: tl.constexpr = BLKK * PAIR
        qblk, bh, b, h, offs_m, offs_n, offs_d, half, within = query_block_program(H, BLOCK_M, BLOCK_N, BLKK, D)
        k_pad = N_KBLOCKS * BLKK

        q_i8 = tl.load(QI + (bh * N_QBLOCKS * BLOCK_M + offs_m[:, None]) * D + offs_d[None, :])
        q_scale = tl.load(QSCALE + bh * N_QBLOCKS * BLOCK_M + offs_m)  # per query row
        ki_base = KI + bh * k_pad * D
        vt_base = VT + bh * D * k_pad
        v_base = V + b * svb + h * svh
        lut = LUT + (bh * N_QBLOCKS + qblk) * N_SEL

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
        for step in range(0, N_STEPS):
            # rows stay inside the zero-padded quantized buffers; real masks the padding
            rows, real, needs_mask = selected_key_rows(lut, step, N_SEL, L, offs_n, half, within, BLKK, PAIR)
            k_i8 = tl.load(ki_base + rows[None, :] * D + offs_d[:, None])  # (D, N)
            k_scale = tl.load(KSCALE + bh * k_pad + rows)  # (N,) per key row
            if UPCAST:
                s = mma(q_i8, k_i8, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), True, True)
            else:
                s = tl.dot(q_i8, k_i8, out_dtype=tl.int32).to(tl.float32)
            s = s * k_scale[None, :]  # the per-row q scale (> 0) folds into the FMA below
            if needs_mask:
                s = tl.where(real[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1) * q_scale)
            p = tl.math.exp2(s * q_scale[:, None] - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, axis=1)
            if PV_FP8:
                v_t = tl.load(vt_base + offs_d[:, None] * k_pad + rows[None, :])  # (D, N) fp8
                acc = mma((p * 448.0).to(tl.float8e4nv), tl.trans(v_t), acc * alpha[:, None], UPCAST, False)
            else:
                v = tl.load(v_base + rows[:, None] * svl + offs_d[None, :], mask=real[:, None], other=0.0)
                acc = mma(p.to(tl.bfloat16), v.to(tl.bfloat16), acc * alpha[:, None], UPCAST, False)
            m_i = m_new
        if PV_FP8:
            v_scale = tl.load(VSCALE + bh * D + offs_d)  # amax / 448 per channel
            acc = acc * (v_scale / 448.0)[None, :]
        o_s = (acc / l_i[:, None]).to(tl.bfloat16)

        # linear branch and proj_l: as in the bf16 `sla` kernel, from the unquantized q
        q_real = offs_m < L
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sql + offs_d[None, :], mask=q_real[:, None], other=0.0)
        linear_branch_and_store(q.to(tl.bfloat16), o_s, KV, KSUM, W, BIAS, OUT, bh, b, h, offs_m, offs_d, q_real,
                                sob, sol, soh, BLOCK_M, D, UPCAST, False)


def fp8_supported(device: torch.device | None = None) -> bool:
    """fp8 tensor cores: compute capability 8.9 or newer."""
    if not torch.cuda.is_available():
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def sagesla_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                             proj_l_bias: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK,
                             config: dict | None = None, pv_fp8: bool | None = None) -> torch.Tensor:
    """Quantized SLA forward; same contract as `sla_attention_triton` (CUDA, bf16/fp16 q, k, v (B, L, H, D)).

    pv_fp8: P.V on the fp8 tensor cores (None: wherever the card has them, compute capability 8.9+); False keeps
    P.V in bf16, as on Ampere, where only q.k^T is quantized (int8 tensor cores, sm80+).
    """
    if pv_fp8 is None:
        pv_fp8 = interpreting() or fp8_supported(q.device)
    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    if q.dtype == torch.float32:
        raise ValueError("sagesla quantizes attention and runs on bf16/fp16 inputs; use 'sla' for float32.")
    if pv_fp8 and not interpreting() and not fp8_supported(q.device):
        raise ValueError("pv_fp8=True needs fp8 tensor cores (compute capability 8.9+); pass pv_fp8=None or False.")
    q, k, v = head_contiguous(q), head_contiguous(k), head_contiguous(v)
    check_kernel_shapes(q, blkq, blkk)
    cfg = dict(DEFAULT_CONFIG, **(config or {}))
    b, length, h, d = q.shape
    dev = q.device
    n_q, n_k = -(-length // blkq), -(-length // blkk)

    k_mean, k_sum, kv = key_stats(k, v, torch.bfloat16)
    lut, count = block_lut(q, k, k_mean, topk, blkq, blkk)
    lut = lut.to(torch.int32).contiguous()

    q_i8 = torch.empty(b * h, n_q * blkq, d, dtype=torch.int8, device=dev)
    q_scale = torch.empty(b * h, n_q * blkq, dtype=torch.float32, device=dev)
    k_i8 = torch.empty(b * h, n_k * blkk, d, dtype=torch.int8, device=dev)
    k_scale = torch.empty(b * h, n_k * blkk, dtype=torch.float32, device=dev)
    _quant_int8_kernel[(n_q, b * h)](
        q, q, q_i8, q_scale, length, h, n_q * blkq, q.stride(0), q.stride(1), q.stride(2), d**-0.5 * LOG2E,
        BLOCK=blkq, D=d, HAS_SHIFT=False, num_warps=4,
    )
    _quant_int8_kernel[(n_k, b * h)](
        k, k_mean, k_i8, k_scale, length, h, n_k * blkk, k.stride(0), k.stride(1), k.stride(2), 1.0,
        BLOCK=blkk, D=d, HAS_SHIFT=True, num_warps=4,
    )
    if pv_fp8:
        v_amax = torch.linalg.vector_norm(v, float("inf"), dim=1, dtype=torch.float32)  # (B, H, D)
        v_scale = (v_amax.clamp_min(1e-20) / _FP8_MAX).reshape(b * h, d).contiguous()
        v_t = torch.empty(b * h, d, n_k * blkk, dtype=torch.float8_e4m3fn, device=dev)
        _quant_v_fp8_kernel[(n_k, b * h)](
            v, v_scale, v_t, length, h, n_k * blkk, v.stride(0), v.stride(1), v.stride(2),
            BLOCK=blkk, D=d, num_warps=4,
        )
    else:  # unused placeholders
        v_scale, v_t = k_scale, k_i8

    out = torch.empty(b, length, h, d, dtype=q.dtype, device=dev)
    _sagesla_fwd_kernel[(n_q, b * h)](
        q_i8, q_scale, k_i8, k_scale, v_t, v_scale, q, v, lut, kv, k_sum,
        proj_l_weight.to(torch.bfloat16).contiguous(), proj_l_bias.to(torch.bfloat16).contiguous(), out,
        length, h, count, -(-count // cfg["pair"]), n_q, n_k,
        q.stride(0), q.stride(1), q.stride(2), v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=blkq, BLKK=blkk, PAIR=cfg["pair"], D=d, PV_FP8=pv_fp8, UPCAST=interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out
