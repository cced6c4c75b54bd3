"""Sparse-linear attention (SLA), the pure-PyTorch definition of TurboDiffusion's `sla` attention.

This module defines the semantics; the Triton kernels in `turbowan.kernels` compute the same function on CUDA. The
contract all of them share (block sizes, the selected block count, input checks) is `turbowan.kernels.sla_contract`.

    out = o_s + proj_l(o_l)

* Block map: queries are cut into blocks of `blkq` rows and keys into blocks of `blkk` rows. Each block is mean-pooled
  (a partial last block is averaged over its real rows: fp32 sum / count, cast back to the input dtype); keys are first
  smoothed by subtracting their mean over all tokens. Each query block keeps the `int(topk * K)` key blocks (K key
  blocks in all, clamped to K) with the largest pooled score.
* o_s: softmax attention (scale D^-0.5) of each query block restricted to its selected key blocks, renormalised over
  them; the padding of a partial last key block is masked out.
* o_l: linear attention over all keys with feature map softmax(x, dim=-1):
  (phi(q) . (phi(k)^T v)) / (1e-5 + phi(q) . sum_L phi(k)), then the learned `proj_l` (a D x D linear layer).

Precision follows the reference module: with bf16 (or fp16) inputs the block map is scored in the input dtype, the
attention runs in bf16 with fp32 accumulation (P rounded to bf16 before P.V), the linear branch and proj_l run in bf16;
with fp32 inputs everything is fp32. The sparse part is evaluated a few query blocks at a time from gathered key blocks,
so memory stays O(L * topk * blkk) per block group, never L x L.

Layout at the boundary: q, k, v are (B, L, H, D) (tokens before heads, as the DiT produces them); out is (B, L, H, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.sla_contract import (BLKK, BLKQ, LOG2E, check_sla_inputs, check_sla_qk, compute_dtype,
                                    selected_block_count)

# Bytes of fp32 scores a group of query blocks may hold on the CPU path (sizes the chunk, not the result).
_SCORE_BUDGET_BYTES = 256 * 1024 * 1024
_LINEAR_EPS = 1e-5


def mean_pool_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """(B, H, L, D) -> (B, H, ceil(L / block), D): fp32 block means over the real rows, cast to x's dtype."""
    b, h, length, d = x.shape
    n = -(-length // block)
    xf = F.pad(x.float(), (0, 0, 0, n * block - length))
    sums = xf.view(b, h, n, block, d).sum(dim=3)
    counts = torch.full((n, 1), float(block), device=x.device)
    counts[-1] = length - (n - 1) * block
    return (sums / counts).to(x.dtype)


def sla_block_scores(q: torch.Tensor, k: torch.Tensor, blkq: int = BLKQ, blkk: int = BLKK) -> torch.Tensor:
    """Pooled block scores (B, H, nQ, K) in the input dtype: mean-pooled q against mean-pooled (k - mean_L(k))."""
    check_sla_qk(q, k)
    qh = q.transpose(1, 2)  # (B, H, L, D)
    kh = k.transpose(1, 2)
    smoothed_k = kh - kh.mean(dim=2, keepdim=True)
    return mean_pool_blocks(qh, blkq) @ mean_pool_blocks(smoothed_k, blkk).transpose(-1, -2)


def sla_block_map(q: torch.Tensor, k: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK):
    """Selected key blocks of each query block.

    q, k: (B, L, H, D). Returns (lut, count): lut int64 (B, H, ceil(L/blkq), count), each row sorted ascending, and
    count = min(K, int(topk * K)) with K = ceil(L / blkk).
    """
    scores = sla_block_scores(q, k, blkq, blkk)
    count = selected_block_count(topk, scores.shape[-1])
    lut = torch.topk(scores, count, dim=-1, sorted=False).indices
    return lut.sort(dim=-1).values, count


def _sparse_attention(q, k, v, lut, blkq: int, blkk: int) -> torch.Tensor:
    """Block-sparse softmax attention. q, k, v (B, H, L, D) in the compute dtype; lut (B, H, nQ, n). -> (B, H, L, D)."""
    b, h, length, d = q.shape
    nq, nk, n_sel = -(-length // blkq), -(-length // blkk), lut.shape[-1]
    low_precision = q.dtype != torch.float32
    q_blocks = F.pad(q, (0, 0, 0, nq * blkq - length)).view(b, h, nq, blkq, d)
    k_blocks = F.pad(k, (0, 0, 0, nk * blkk - length)).reshape(b, h, nk, blkk * d)
    v_blocks = F.pad(v, (0, 0, 0, nk * blkk - length)).reshape(b, h, nk, blkk * d)
    key_is_real = (torch.arange(nk * blkk, device=q.device) < length).view(nk, blkk)
    scale_log2 = d**-0.5 * LOG2E  # softmax in the exp2 domain, as the kernels compute it

    out = torch.empty(b, h, nq * blkq, d, dtype=q.dtype, device=q.device)
    group = max(1, _SCORE_BUDGET_BYTES // (b * h * blkq * n_sel * blkk * 4))
    for q0 in range(0, nq, group):
        q1 = min(nq, q0 + group)
        idx = lut[:, :, q0:q1].reshape(b, h, -1)  # (B, H, g * n)
        gather_idx = idx.unsqueeze(-1).expand(-1, -1, -1, blkk * d)
        ks = torch.gather(k_blocks, 2, gather_idx).view(b, h, q1 - q0, n_sel * blkk, d)
        vs = torch.gather(v_blocks, 2, gather_idx).view(b, h, q1 - q0, n_sel * blkk, d)
        real = key_is_real[idx].view(b, h, q1 - q0, 1, n_sel * blkk)

        scores = (q_blocks[:, :, q0:q1].float() @ ks.float().transpose(-1, -2)) * scale_log2  # (B, H, g, blkq, n*blkk)
        scores = scores.masked_fill(~real, float("-inf"))
        p = torch.exp2(scores - scores.amax(dim=-1, keepdim=True))
        row_sum = p.sum(dim=-1, keepdim=True)
        if low_precision:
            p = p.to(q.dtype).float()  # the kernel feeds P to the tensor cores in bf16, accumulating in fp32
        o = (p @ vs.float()) / row_sum
        out[:, :, q0 * blkq : q1 * blkq] = o.reshape(b, h, (q1 - q0) * blkq, d).to(q.dtype)
    return out[:, :, :length]


def linear_attention(q, k, v) -> torch.Tensor:
    """Softmax-feature-map linear attention over all keys, in the inputs' dtype. (B, H, L, D) -> (B, H, L, D)."""
    phi_q = torch.softmax(q, dim=-1)
    phi_k = torch.softmax(k, dim=-1)
    kv = phi_k.transpose(-1, -2) @ v  # (B, H, D, D)
    k_sum = phi_k.sum(dim=-2, keepdim=True)  # (B, H, 1, D)
    return (phi_q @ kv) / (_LINEAR_EPS + (phi_q * k_sum).sum(dim=-1, keepdim=True))


def sla_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                  proj_l_bias: torch.Tensor, topk: float, blkq: int = BLKQ, blkk: int = BLKK) -> torch.Tensor:
    """SLA forward. q, k, v: (B, L, H, D), one dtype; proj_l: weight (D, D), bias (D,). -> (B, L, H, D), q's dtype."""
    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    lut, _ = sla_block_map(q, k, topk, blkq, blkk)  # scored in the input dtype, as the reference does
    compute = compute_dtype(q.dtype)
    qh, kh, vh = (t.transpose(1, 2).to(compute) for t in (q, k, v))  # (B, H, L, D)
    o_s = _sparse_attention(qh, kh, vh, lut, blkq, blkk)
    o_l = F.linear(linear_attention(qh, kh, vh), proj_l_weight.to(compute), proj_l_bias.to(compute))
    return (o_s + o_l).to(q.dtype).transpose(1, 2).contiguous()
