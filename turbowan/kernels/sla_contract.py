"""What every SLA implementation agrees on: the block sizes, how many key blocks a query block keeps, and which
inputs are accepted.

The PyTorch reference (`turbowan.ops.sla`), the Triton kernels (`sla_triton`, `sagesla_triton`) and the SpargeAttn
glue all check their inputs and count selected blocks here, so a clip is accepted or refused the same way whichever
path runs it. Needs only torch: importing it never imports Triton.
"""

from __future__ import annotations

import math

import torch

BLKQ = 128  # query rows per block (TurboDiffusion's SLA)
BLKK = 64  # key rows per block
LOG2E = 1.4426950408889634  # every path computes the softmax in the exp2 domain: exp(x) = exp2(x * log2 e)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """bf16 and fp16 inputs are computed in bf16 (fp32 accumulation), as the reference module does; fp32 stays fp32."""
    return torch.float32 if dtype == torch.float32 else torch.bfloat16


def check_sla_qk(q: torch.Tensor, k: torch.Tensor) -> None:
    """q and k: (B, L, H, D) of one shape and one float dtype (bf16, fp16 or fp32)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(
            f"SLA expects q and k of the same shape (B, L, H, D); got q {tuple(q.shape)} and k {tuple(k.shape)}."
        )
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or k.dtype != q.dtype:
        raise ValueError(
            f"SLA computes in bfloat16, float16 or float32 with q, k, v of one dtype; got q {q.dtype}, k {k.dtype}: "
            "cast them to the model's compute dtype first."
        )


def check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias) -> None:
    """q, k, v alike (see `check_sla_qk`); proj_l a D x D weight and a D bias for head dim D."""
    check_sla_qk(q, k)
    if v.shape != q.shape or v.dtype != q.dtype:
        raise ValueError(f"SLA expects v like q, {tuple(q.shape)} {q.dtype}; got {tuple(v.shape)} {v.dtype}.")
    d = q.shape[-1]
    if tuple(proj_l_weight.shape) != (d, d) or tuple(proj_l_bias.shape) != (d,):
        raise ValueError(
            f"SLA proj_l must be a {d} x {d} weight and a {d} bias for head dim {d}; got "
            f"{tuple(proj_l_weight.shape)} and {tuple(proj_l_bias.shape)}: the checkpoint's proj_l does not match the heads."
        )


def selected_block_count(topk: float, num_key_blocks: int) -> int:
    """`int(topk * K)` clamped to K; refuses a ratio that keeps no block (the reference would return NaN there)."""
    if not (isinstance(topk, (int, float)) and math.isfinite(topk) and topk > 0):
        raise ValueError(f"sla_topk must be a number in (0, 1], the fraction of key blocks kept; got {topk!r}.")
    count = min(num_key_blocks, int(topk * num_key_blocks))
    if count == 0:
        smallest = math.ceil(10000 / num_key_blocks) / 10000
        while int(smallest * num_key_blocks) == 0:  # guard against float rounding of the ratio
            smallest += 1e-4
        raise ValueError(
            f"The clip is too short for sla_topk={topk}: its {num_key_blocks} key blocks give "
            f"int({topk} * {num_key_blocks}) = 0 selected blocks; use sla_topk >= {smallest:.4f} "
            "(or more frames / a larger resolution)."
        )
    return count
