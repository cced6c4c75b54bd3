"""The Triton pieces both SLA kernels (`sla_triton`, `sagesla_triton`) share: the key-stats pass, block pooling, the
block map built from them, the checks every launch needs, and the jit helpers both forward kernels inline (matmul,
a program's query tile, the key rows of a LUT step, the linear-branch epilogue; Triton inlines them, so each kernel
compiles as if they were written in place).

* `key_stats`: one pass over k and v gives, per head, the column sums of k (-> mean_L(k) for the block map) and the
  linear branch's reductions sum_L phi(k) and phi(k)^T v (phi = softmax over the head dim), as per-split partials
  that torch sums in a fixed order (deterministic, no atomics).
* `pool_blocks` (twice) and `block_lut`: mean-pooled q blocks and mean-pooled (k - mean_L(k)) blocks with the
  reference's roundings; the scores of the pooled blocks (a small matmul) and the top-k go through torch, so the
  block map is bit-identical to the torch path's (`turbowan.ops.sla.sla_block_map`) on the same device.

Triton is imported lazily: importing this module needs no Triton.
"""

from __future__ import annotations

import torch

try:  # optional: the package imports and runs (on the torch path) without Triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

from . import interpreting
from .sla_contract import selected_block_count

# Kernel tile choices (BLOCK_N = 64 * pair, warps, pipeline stages), picked on an H100 by bench/attention.py.
DEFAULT_CONFIG = {"pair": 2, "num_warps": 8, "num_stages": 3}
_ROWS_PER_SPLIT = 4096  # rows of one head reduced by one program of the key-stats pass
_STATS_BLOCK = 64


if triton is not None:  # jit helpers must be module globals of the kernel calling them: kernel modules import them

    @triton.jit
    def mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
        # UPCAST: the CPU interpreter mis-multiplies bf16 operands, so there they go in as (exact) fp32.
        if UPCAST:
            return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        elif IEEE:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)

    @triton.jit
    def to_compute(x, LOW: tl.constexpr):
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
            k = to_compute(k, LOW)
            v = to_compute(v, LOW)
            kf = k.to(tl.float32)
            e = tl.exp(kf - tl.max(kf, axis=1)[:, None])
            phi = (e / tl.sum(e, axis=1)[:, None]).to(k.dtype)  # feature map output in the compute dtype
            phi = tl.where(real[:, None], phi, 0.0).to(k.dtype)
            ksum += tl.sum(phi.to(tl.float32), axis=0)
            kv = mma(tl.trans(phi), v, kv, UPCAST, IEEE)
        part = bh * N_SPLIT + split
        tl.store(KCOL_PART + part * D + offs_d, col)
        tl.store(KSUM_PART + part * D + offs_d, ksum)
        tl.store(KV_PART + part * D * D + offs_d[:, None] * D + offs_d[None, :], kv)

    @triton.jit
    def load_row_block(X, L, H, sxb, sxl, sxh, BLOCK: tl.constexpr, D: tl.constexpr):
        # program (block, b*h) of a per-block launch over X (B, L, H, D): its BLOCK rows of one head, 0 past L
        blk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        rows = blk * BLOCK + tl.arange(0, BLOCK)
        offs_d = tl.arange(0, D)
        real = rows < L
        x = tl.load(X + b * sxb + h * sxh + rows[:, None] * sxl + offs_d[None, :], mask=real[:, None], other=0.0)
        return blk, bh, rows, offs_d, real, x

    @triton.jit
    def query_block_program(H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLKK: tl.constexpr, D: tl.constexpr):
        # program (query block, b*h) of a sparse forward kernel: its query rows and the key-tile columns (PAIR key
        # blocks of BLKK rows side by side)
        qblk = tl.program_id(0)
        bh = tl.program_id(1).to(tl.int64)
        b, h = bh // H, bh % H
        offs_m = qblk * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D)
        half = offs_n // BLKK  # which of the PAIR key blocks a tile column belongs to
        within = offs_n % BLKK
        return qblk, bh, b, h, offs_m, offs_n, offs_d, half, within

    @triton.jit
    def selected_key_rows(lut, step, N_SEL, L, offs_n, half, within, BLKK: tl.constexpr, PAIR: tl.constexpr):
        # the key rows of loop step `step`: the LUT's selected blocks step*PAIR .. step*PAIR+PAIR-1 (an unpaired
        # tail step repeats the first, masked out); real: rows that exist; needs_mask: some row of the tile does not
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
        return rows, real, needs_mask

    @triton.jit
    def linear_branch_and_store(
        q, o_s, KV, KSUM, W, BIAS, OUT, bh, b, h, offs_m, offs_d, q_real, sob, sol, soh,
        BLOCK_M: tl.constexpr, D: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ):
        # The epilogue of a sparse forward kernel: the linear branch for these rows (q and o_s in the compute dtype)
        # and proj_l, with the reference's roundings to the compute dtype between steps, added to o_s and stored.
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

    @triton.jit
    def _pool_kernel(
        X, SHIFT, OUT, L, H, N_BLOCKS, sxb, sxl, sxh,
        BLOCK: tl.constexpr, D: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ):
        blk, bh, _, offs_d, real, x = load_row_block(X, L, H, sxb, sxl, sxh, BLOCK, D)
        if HAS_SHIFT:
            shift = tl.load(SHIFT + bh * D + offs_d)
            # the reference subtracts in the input dtype, then pools the rounded differences (padding stays 0)
            x = (x.to(tl.float32) - shift.to(tl.float32)[None, :]).to(x.dtype)
            x = tl.where(real[:, None], x, 0.0)
        count = tl.minimum(L - blk * BLOCK, BLOCK).to(tl.float32)
        mean = tl.sum(x.to(tl.float32), axis=0) / count
        tl.store(OUT + (bh * N_BLOCKS + blk) * D + offs_d, mean.to(OUT.dtype.element_ty))


def check_kernel_shapes(q: torch.Tensor, blkq: int, blkk: int) -> None:
    """The Triton kernels tile with power-of-two blocks and head dims, on CUDA (or under the interpreter)."""
    d = q.shape[-1]
    for name, value in (("head dim", d), ("blkq", blkq), ("blkk", blkk)):
        if value < 16 or value & (value - 1):
            raise ValueError(
                f"The Triton SLA kernel needs a power-of-two {name} >= 16, got {value}; "
                "use turbowan.ops.sla.sla_attention (pure PyTorch) for this shape."
            )
    if not q.is_cuda and not interpreting():
        raise ValueError("sla_attention_triton runs on CUDA tensors; use turbowan.ops.sla.sla_attention on the CPU.")


def head_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its head dim is contiguous (the kernels take any other strides), else a contiguous copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def key_stats(k: torch.Tensor, v: torch.Tensor, compute_dtype: torch.dtype):
    """-> (mean_L(k) in k's dtype, sum_L phi(k), phi(k)^T v in the compute dtype); each (B*H, D) / (B*H, D, D)."""
    b, length, h, d = k.shape
    n_split = -(-length // _ROWS_PER_SPLIT)
    kv_part = torch.empty(b * h, n_split, d, d, dtype=torch.float32, device=k.device)
    ksum_part = torch.empty(b * h, n_split, d, dtype=torch.float32, device=k.device)
    kcol_part = torch.empty(b * h, n_split, d, dtype=torch.float32, device=k.device)
    _key_stats_kernel[(n_split, b * h)](
        k, v, kv_part, ksum_part, kcol_part, length, h, n_split,
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        ROWS_PER_SPLIT=_ROWS_PER_SPLIT, BLOCK=_STATS_BLOCK, D=d,
        LOW=compute_dtype != torch.float32, UPCAST=interpreting(), IEEE=compute_dtype == torch.float32, num_warps=4,
    )
    k_mean = (kcol_part.sum(dim=1) / length).to(k.dtype)
    return k_mean, ksum_part.sum(dim=1).to(compute_dtype), kv_part.sum(dim=1).to(compute_dtype)


def pool_blocks(x: torch.Tensor, block: int, shift: torch.Tensor | None) -> torch.Tensor:
    """(B, L, H, D) -> (B*H, ceil(L/block), D) block means in x's dtype, of x - shift when shift is given."""
    b, length, h, d = x.shape
    n = -(-length // block)
    out = torch.empty(b * h, n, d, dtype=x.dtype, device=x.device)
    _pool_kernel[(n, b * h)](
        x, shift if shift is not None else out, out, length, h, n, x.stride(0), x.stride(1), x.stride(2),
        BLOCK=block, D=d, HAS_SHIFT=shift is not None, num_warps=4,
    )
    return out


def block_lut(q, k, k_mean, topk, blkq, blkk):
    """-> (int64 LUT (B*H, nQ, n) sorted ascending, n): the torch path's block map from Triton-pooled blocks."""
    # (B*H, nQ, K) scores in the input dtype
    scores = pool_blocks(q, blkq, None) @ pool_blocks(k, blkk, k_mean).transpose(-1, -2)
    count = selected_block_count(topk, scores.shape[-1])
    lut = torch.topk(scores, count, dim=-1, sorted=False).indices.sort(dim=-1).values
    return lut, count
