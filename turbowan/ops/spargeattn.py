"""SageSLA through SpargeAttn's CUDA kernels (the `spas_sage_attn` package), for users who installed it and ask for
it by name (``attention_type="sagesla_spargeattn"``).

This is the reference implementation's SageSLA on Hopper: the SLA block map with 64-query x 128-key blocks (the
tile of SpargeAttn's sm90 kernel), q and k quantized to int8 per block with k smoothed by its mean, v to fp8 per
channel, the block-sparse int8/fp8 kernel, then SLA's linear branch and proj_l in bf16. Our own ``sagesla``
(Triton, nothing to install) measured faster and closer to the float result on an H200 (bench/RESULTS.md).

SpargeAttn builds kernels per GPU generation; this path is verified on compute capability 9.0 (H100 / H200)
only, and other cards are refused with a pointer to ``sagesla``. The kernels are SpargeAttn's, not ours, so this glue
sits in `turbowan.ops` rather than `turbowan.kernels`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

BLKQ, BLKK = 64, 128  # SpargeAttn's sm90 kernel tile

SPARGEATTN_MISSING = (
    "attention_type 'sagesla_spargeattn' needs SpargeAttn (the spas_sage_attn package built for this GPU, "
    "github.com/thu-ml/SpargeAttn) and a CUDA GPU, which are not available here; use 'sagesla', our own int8 "
    "kernel, which needs nothing installed"
)


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when SpargeAttn's compiled modules import and a CUDA device is present."""
    try:
        import spas_sage_attn._fused  # noqa: F401
        import spas_sage_attn._qattn  # noqa: F401
        import spas_sage_attn.utils  # noqa: F401
    except Exception:  # not installed, or built for another torch / CUDA
        return False
    return torch.cuda.is_available()


def sagesla_spargeattn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                       proj_l_bias: torch.Tensor, topk: float) -> torch.Tensor:
    """Same contract as `turbowan.ops.sla.sla_attention`: q, k, v (B, L, H, D) CUDA -> (B, L, H, D) in q's dtype."""
    from spas_sage_attn import _fused as fused
    from spas_sage_attn import _qattn as qattn
    from spas_sage_attn.utils import block_map_lut_triton, get_vanilla_qk_quant

    from ..kernels.sla_contract import check_sla_inputs
    from ..kernels.sla_triton import sla_block_map_triton  # SpargeAttn needs Triton itself: always importable here
    from .sla import linear_attention

    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    if not q.is_cuda or torch.cuda.get_device_capability(q.device) != (9, 0):
        raise ValueError("attention_type 'sagesla_spargeattn' is verified on H100/H200 (compute capability 9.0) only; "
                         "use 'sagesla' (our Triton kernel) on this device")
    b, length, h, d = q.shape
    if d not in (64, 128):
        raise ValueError(f"SpargeAttn's kernels take head dim 64 or 128, not {d}; use 'sagesla'")

    lut, _ = sla_block_map_triton(q, k, topk, BLKQ, BLKK)  # (B, H, nQ, n) sorted; the reference's get_block_map
    block_map = torch.zeros(b, h, lut.shape[2], -(-length // BLKK), dtype=torch.int8, device=q.device)
    block_map.scatter_(-1, lut, 1)
    kernel_lut, valid_blocks = block_map_lut_triton(block_map)

    qh, kh, vh = (t.transpose(1, 2).to(torch.bfloat16).contiguous() for t in (q, k, v))  # (B, H, L, D)
    q_int8, q_scale, k_int8, k_scale = get_vanilla_qk_quant(qh, kh, kh.mean(dim=-2, keepdim=True), BLKQ, BLKK)
    padded = -(-length // 128) * 128
    v_t = torch.empty(b, h, d, padded, dtype=vh.dtype, device=q.device)
    fused.transpose_pad_permute_cuda(vh, v_t, 1)  # 1: (B, H, L, D) layout
    v_fp8 = torch.empty(v_t.shape, dtype=torch.float8_e4m3fn, device=q.device)
    v_scale = torch.empty(b, h, d, dtype=torch.float32, device=q.device)
    fused.scale_fuse_quant_cuda(v_t, v_fp8, v_scale, length, 2.25, 1)
    o_s = torch.empty_like(qh)
    qattn.qk_int8_sv_f8_accum_f32_block_sparse_attn_inst_buf_fuse_v_scale_sm90(
        q_int8, k_int8, v_fp8, o_s, kernel_lut, valid_blocks, q_scale, k_scale, v_scale, 1, False, 1, d**-0.5)

    o_l = F.linear(linear_attention(qh, kh, vh), proj_l_weight.to(torch.bfloat16), proj_l_bias.to(torch.bfloat16))
    return (o_s + o_l).to(q.dtype).transpose(1, 2).contiguous()


def spargeattn_dispatch():
    """`sagesla_spargeattn` when SpargeAttn is installed and usable here, else None. Asked for by name only, so no
    fallback notice: the caller refuses with SPARGEATTN_MISSING."""
    return sagesla_spargeattn if available() else None
