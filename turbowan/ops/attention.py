"""The single attention dispatch used by the DiT.

Kinds (`turbowan.options.ATTENTION_KINDS`; the loader's ``attention``, the node's ``attention_type``):
  * ``"original"`` - dense scaled-dot-product attention (cuDNN / flash on GPU when available).
  * ``"sla"``      - sparse-linear attention with the reference semantics (`turbowan.ops.sla`); on CUDA our
                     kernel runs it (`sla_dispatch`: on Hopper, for bf16 with head dim 128, the warp-specialized
                     Gluon kernel, else the Triton one; `turbowan.kernels.sla_kernel` decides), elsewhere the
                     pure-PyTorch implementation.
  * ``"sagesla"``  - SLA with int8 Q/K (and fp8 P.V on cards that have it): our Triton kernel on CUDA with
                     bf16/fp16 inputs on compute capability 8.0+; otherwise a one-line notice and the ``"sla"``
                     path. (SpargeAttn is not needed.)
  * ``"sagesla_spargeattn"`` - the reference's SageSLA through SpargeAttn's CUDA kernels, for those who installed
                     it and ask for it (`turbowan.ops.spargeattn`); an error, not a fallback, when it is missing.

All take q, k, v as [B, L, H, D] and return [B, L, H, D].
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

from ..kernels import sagesla_dispatch, sla_dispatch
from ..options import ATTENTION_KINDS
from .spargeattn import SPARGEATTN_MISSING, spargeattn_dispatch

log = logging.getLogger("turbowan")


@functools.lru_cache(maxsize=None)
def _dense_backends():
    """SDPA backends in preference order (cuDNN first on Hopper, then flash, then the rest)."""
    try:
        from torch.nn.attention import SDPBackend

        return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    except ImportError:  # older torch
        return None


def dense_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Plain softmax attention, scale D**-0.5, no mask. [B, L, H, D] in and out."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    backends = _dense_backends() if q.is_cuda else None
    if backends is not None:
        from torch.nn.attention import sdpa_kernel

        try:
            with sdpa_kernel(backends, set_priority=True):
                out = F.scaled_dot_product_attention(qt, kt, vt)
        except TypeError:  # torch without set_priority
            with sdpa_kernel(backends):
                out = F.scaled_dot_product_attention(qt, kt, vt)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt)
    return out.transpose(1, 2)


@functools.lru_cache(maxsize=None)
def _has_int8_cores(device: torch.device) -> bool:
    return torch.cuda.get_device_capability(device) >= (8, 0)


@functools.lru_cache(maxsize=None)
def _notice_once(message: str) -> None:
    log.warning(message)


def self_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attention: str,
    proj_l: torch.nn.Linear | None = None,
    topk: float = 0.1,
) -> torch.Tensor:
    """Self-attention of one DiT block through the configured kind. [B, L, H, D] in and out."""
    if attention == "original":
        return dense_attention(q, k, v)
    if attention not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention type {attention!r}; choose one of {ATTENTION_KINDS}")
    if proj_l is None:
        raise ValueError(f"attention_type {attention!r} needs the SLA proj_l weights, which this model does not have")
    w, b = proj_l.weight, proj_l.bias
    if attention == "sagesla_spargeattn":  # asked for by name: no silent substitute
        fast = spargeattn_dispatch() if q.is_cuda else None
        if fast is None:
            raise RuntimeError(SPARGEATTN_MISSING)
        return fast(q, k, v, w, b, topk)
    d = q.shape[-1]
    if q.is_cuda and d >= 16 and d & (d - 1) == 0:  # the Triton kernels take power-of-two head dims
        if attention == "sagesla":
            fast = sagesla_dispatch()
            if fast is not None and q.dtype in (torch.bfloat16, torch.float16) and _has_int8_cores(q.device):
                return fast(q, k, v, w, b, topk)
            _notice_once("turbowan: sagesla needs our Triton kernel, bf16/fp16 and a compute capability 8.0+ GPU; "
                         "running sla instead")
        fast = sla_dispatch()
        if fast is not None:
            return fast(q, k, v, w, b, topk)
    elif attention == "sagesla":
        _notice_once("turbowan: sagesla needs a CUDA GPU; running the equivalent sla path on CPU")
    from .sla import sla_attention

    return sla_attention(q, k, v, w, b, topk)
