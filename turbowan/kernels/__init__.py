"""Optional GPU kernels (Triton). Imported lazily: the package works without Triton or CUDA.

Each ``*_dispatch()`` returns the fast function, or ``None`` when it cannot run here; the first failure is
reported once with a one-line notice and the caller falls back to the pure-PyTorch path.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os

import torch

log = logging.getLogger("turbowan")


def interpreting() -> bool:
    """Triton's CPU interpreter is switched on (TRITON_INTERPRET=1): kernels run on CPU tensors, slowly."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.lru_cache(maxsize=1)
def triton_runnable() -> bool:
    """Triton imports and can run here: a CUDA device is present, or the interpreter is on."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or interpreting()


@functools.lru_cache(maxsize=None)
def _load(module: str, attr: str):
    try:
        mod = importlib.import_module(f".{module}", __name__)
        fn = getattr(mod, attr)
        ok = mod.available()
    except Exception as exc:  # ImportError for triton, or a kernel module not present yet
        log.warning("turbowan: %s unavailable (%s: %s); using the PyTorch path", module, type(exc).__name__, exc)
        return None
    if not ok:
        log.warning("turbowan: %s unavailable on this machine; using the PyTorch path", module)
        return None
    return fn


def int8_dispatch():
    """Fused W8A8 linear ``f(x, int8_weight, scale, bias) -> y`` for CUDA tensors, or None."""
    return _load("int8_triton", "w8a8_linear")


def dequant_dispatch():
    """Int8 tile dequantization ``f(int8_weight, scale, dtype) -> weight`` for CUDA tensors, or None."""
    return _load("int8_triton", "dequantize_int8_blockwise_cuda")


def sla_dispatch():
    """Triton SLA ``f(q, k, v, proj_l_weight, proj_l_bias, topk) -> out`` for CUDA tensors, or None."""
    return _load("sla_triton", "sla_attention_triton")


def sagesla_dispatch():
    """Our Triton SageSLA (int8 Q/K), same signature as the SLA one, or None."""
    return _load("sagesla_triton", "sagesla_attention_triton")


def vae_norm_dispatch():
    """Fused VAE RMSNorm (+ optional SiLU) ``f(x, gamma, silu) -> y`` for channels-last CUDA tensors, or None."""
    return _load("vae_triton", "rms_norm_silu")


def dit_dispatch(name: str):
    """One of the DiT block's row kernels in `turbowan.kernels.dit_triton` (``rms_norm_rope``, ``rms_norm_rows``,
    ``layer_norm_rows``, ``gated_residual_rows``), or None."""
    return _load("dit_triton", name)


def int8_quantize_dispatch():
    """Activation quantization ``f(x2d) -> (int8, tile scales)`` for CUDA tensors, or None."""
    return _load("int8_triton", "quantize_activations")


def int8_gemm_dispatch():
    """W8A8 GEMM on pre-quantized activations ``f(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> y``, or None."""
    return _load("int8_triton", "w8a8_gemm")
