"""Optional GPU kernels (Triton; for Hopper the W8A8 GEMM and the SLA forward in Gluon, Triton's low-level dialect).
Imported lazily: the package works without Triton or CUDA.

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
def _load(module: str, attr: str, fallback: str = "the PyTorch path"):
    try:
        mod = importlib.import_module(f".{module}", __name__)
        fn = getattr(mod, attr)
        ok = mod.available()
    except Exception as exc:  # ImportError for triton, or a kernel module not present yet
        log.warning("turbowan: %s unavailable (%s: %s); using %s", module, type(exc).__name__, exc, fallback)
        return None
    if not ok:
        log.warning("turbowan: %s unavailable on this machine; using %s", module, fallback)
        return None
    return fn


def int8_dispatch():
    """Fused W8A8 linear ``f(x, int8_weight, scale, bias) -> y`` for CUDA tensors, or None."""
    return _load("int8_triton", "w8a8_linear")


def dequant_dispatch():
    """Int8 tile dequantization ``f(int8_weight, scale, dtype) -> weight`` for CUDA tensors, or None."""
    return _load("int8_triton", "dequantize_int8_blockwise_cuda")


def sla_dispatch():
    """SLA ``f(q, k, v, proj_l_weight, proj_l_bias, topk) -> out`` for CUDA tensors, or None.

    Which kernel it runs (Gluon on Hopper, else Triton) is `sla_kernel`'s choice (`sla_triton.sla_attention_cuda`)."""
    return _load("sla_triton", "sla_attention_cuda")


def sagesla_dispatch():
    """Our Triton SageSLA (int8 Q/K), same signature as the SLA one, or None."""
    return _load("sagesla_triton", "sagesla_attention_triton")


def vae_norm_dispatch():
    """Fused VAE RMSNorm (+ optional SiLU) ``f(x, gamma, silu) -> y`` for channels-last CUDA tensors, or None."""
    return _load("vae_triton", "rms_norm_silu")


def conv3d_dispatch():
    """The VAE's causal convolution as an implicit GEMM ``f(stream, weight, bias, residual) -> y`` for channels-last
    bf16/fp16 CUDA tensors (`conv3d_triton.causal_conv3d`), or None (cuDNN runs)."""
    return _load("conv3d_triton", "causal_conv3d", fallback="cuDNN")


# (c_in, c_out, kernel) of the convolutions where the Triton implicit GEMM beat cuDNN on an H200 (bench/vae_conv.py,
# 2026-11-29, bf16 channels-last, bias and residual included): the 96-channel full-resolution ones, 5.6 against
# 7.7 ms a 720p chunk (cuDNN picks an Ampere kernel there). At 192 and 384 channels cuDNN's Hopper kernels run
# at ~500 TFLOP/s and stay faster (3.6 against 4.1 ms, 1.7 against 1.9 ms).
CONV3D_TRITON_SHAPES = {(96, 96, (3, 3, 3))}


def conv3d_fits(stream: torch.Tensor, weight: torch.Tensor) -> bool:
    """`conv3d_triton.causal_conv3d` can run this convolution (else F.conv3d runs): CUDA (or the interpreter), bf16 or
    fp16 data and weight, a channels-last 5D stream with a multiple of 16 channels, odd spatial kernels, no autograd
    (the kernel has no backward). Checked without importing Triton."""
    return (
        (stream.is_cuda or interpreting())
        and stream.dtype in (torch.bfloat16, torch.float16)
        and weight.dtype == stream.dtype
        and stream.ndim == 5
        and stream.stride(1) == 1
        and stream.shape[1] % 16 == 0
        and weight.shape[3] % 2 == 1
        and weight.shape[4] % 2 == 1
        and not (stream.requires_grad or weight.requires_grad)
    )


def conv3d_kernel(capability: tuple[int, int] | None, c_in: int, c_out: int, kernel: tuple[int, int, int]) -> str:
    """Which runs a VAE causal convolution of these widths on a device of this compute capability: "triton"
    (`conv3d_triton`) or "cudnn". Only where it was measured faster: Hopper (9.0), the shapes above. cuDNN picks other
    kernels on other cards, and nothing says the Triton one wins there (nor that Turing's Triton lowers its bf16 dots)."""
    if capability != (9, 0):
        return "cudnn"
    return "triton" if (c_in, c_out, tuple(kernel)) in CONV3D_TRITON_SHAPES else "cudnn"


def dit_dispatch(name: str):
    """One of the DiT block's row kernels in `turbowan.kernels.dit_triton` (``rms_norm_rope``, ``rms_norm_rows``,
    ``layer_norm_rows``, ``gated_residual_rows``), or None."""
    return _load("dit_triton", name)


def int8_quantize_dispatch():
    """Activation quantization ``f(x2d) -> (int8, tile scales)`` for CUDA tensors, or None."""
    return _load("int8_triton", "quantize_activations")


def int8_gemm_dispatch():
    """W8A8 GEMM on pre-quantized activations ``f(x_q, x_scale, w_q, w_scale, bias, out_dtype) -> y``, or None.

    Which kernel it runs is `w8a8_gemm_kernel`'s choice."""
    return _load("int8_triton", "w8a8_gemm")


# Gluon is experimental and its API moves between releases: the Triton minor version the Gluon kernels
# (`int8_gluon`, `sla_gluon`) are written for; with another, their `available()` says no and Triton kernels run.
GLUON_TRITON = (3, 6)


def gluon_api_matches() -> bool:
    """The installed Triton is the release the Gluon kernels are written for."""
    import triton

    return tuple(int(p) for p in triton.__version__.split(".")[:2]) == GLUON_TRITON


def cuda_capability(x: torch.Tensor) -> tuple[int, int] | None:
    """The compute capability of x's CUDA device, or None (a CPU tensor, or Triton's interpreter)."""
    if not x.is_cuda or interpreting():
        return None
    return _device_capability(x.device.index if x.device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _device_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def w8a8_gemm_kernel(capability: tuple[int, int] | None, k: int, out_dtype: torch.dtype) -> str:
    """The W8A8 GEMM for a device of this compute capability (None: not a CUDA device, e.g. Triton's interpreter):
    "gluon", the warp-specialized kernel of `int8_gluon`, or "triton", the kernel of `int8_triton`.

    Gluon needs compute capability 9.0 exactly (its sm_90a code uses Hopper's wgmma, TMA and setmaxnreg, which no
    other card runs), K a multiple of 128 (whole K blocks; the Triton kernel refuses other K with the error) and a
    bf16/fp16 output. The operands need no check here: both kernels receive them contiguous and 16-byte aligned
    (`int8_triton.gemm_operands`), and with K a multiple of 128 so are the int8 row strides, as TMA requires.
    """
    if capability != (9, 0) or k % 128 or out_dtype not in (torch.bfloat16, torch.float16):
        return "triton"
    return "gluon"


def tma_row_matrix(x: torch.Tensor) -> bool:
    """x (B, L, H, D) can be read by TMA as one [B*L, H*D] row-major matrix: D contiguous, the heads side by side,
    the batch entries back to back (or B = 1), and the base and row stride 16-byte aligned as TMA requires."""
    b, length, h, d = x.shape
    return (x.stride(3) == 1 and x.stride(2) == d and x.stride(1) >= h * d
            and (b == 1 or x.stride(0) == length * x.stride(1))
            and x.data_ptr() % 16 == 0 and x.stride(1) * x.element_size() % 16 == 0)


def sla_kernel(capability: tuple[int, int] | None, dtype: torch.dtype, head_dim: int, row_matrices: bool) -> str:
    """The SLA forward for inputs on a device of this compute capability (None: not a CUDA device): "gluon", the
    warp-specialized kernel of `sla_gluon`, or "triton", the kernel of `sla_triton`.

    Gluon needs compute capability 9.0 exactly (sm_90a code: wgmma, TMA, setmaxnreg), bf16 q, k, v (its tiles
    and wgmma are bf16; fp16 inputs are computed in bf16, which only the Triton kernel converts), head dim 128
    (its tile width) and q, k, v each a TMA row matrix (`tma_row_matrix`, passed as ``row_matrices``).
    """
    if capability != (9, 0) or dtype != torch.bfloat16 or head_dim != 128 or not row_matrices:
        return "triton"
    return "gluon"
