"""The attention dispatch and the optional kernels: everything runs without Triton or a GPU."""

import importlib.util

import pytest
import torch

from turbowan.kernels import _load, int8_dispatch, sagesla_dispatch, sla_dispatch, w8a8_gemm_kernel
from turbowan.ops.attention import dense_attention, self_attention


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed here")
def test_without_triton_every_kernel_reports_unavailable():
    assert sla_dispatch() is None and sagesla_dispatch() is None and int8_dispatch() is None


@pytest.mark.parametrize("capability,k,out_dtype,kernel", [
    ((9, 0), 5120, torch.bfloat16, "gluon"),  # Hopper: the warp-specialized kernel
    ((9, 0), 13824, torch.float16, "gluon"),
    ((9, 0), 200, torch.bfloat16, "triton"),  # no whole K blocks: the Triton kernel refuses it with the error
    ((9, 0), 5120, torch.float32, "triton"),  # an output dtype the Gluon kernel is not built for
    ((8, 0), 5120, torch.bfloat16, "triton"),  # A100
    ((8, 9), 5120, torch.bfloat16, "triton"),  # RTX 40
    ((10, 0), 5120, torch.bfloat16, "triton"),  # Blackwell runs no sm_90a code
    ((12, 0), 5120, torch.bfloat16, "triton"),
    (None, 5120, torch.bfloat16, "triton"),  # no CUDA device (Triton's interpreter)
])
def test_w8a8_gemm_kernel_is_gluon_only_on_hopper_with_whole_k_blocks_and_half_output(capability, k, out_dtype,
                                                                                       kernel):
    assert w8a8_gemm_kernel(capability, k, out_dtype) == kernel


def test_a_kernel_module_that_does_not_load_gives_one_notice_naming_the_fallback(caplog):
    with caplog.at_level("WARNING", logger="turbowan"):
        assert _load("no_such_kernel_module", "gemm", fallback="the Triton W8A8 GEMM") is None
        assert _load("no_such_kernel_module", "gemm", fallback="the Triton W8A8 GEMM") is None
    notices = [r.getMessage() for r in caplog.records]
    assert len(notices) == 1 and "no_such_kernel_module unavailable" in notices[0]
    assert notices[0].endswith("using the Triton W8A8 GEMM")


def _qkv(L=300, H=2, D=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, L, H, D, generator=g) for _ in range(3)]


def test_sagesla_on_cpu_runs_the_sla_path():
    q, k, v = _qkv()
    proj = torch.nn.Linear(64, 64)
    assert torch.equal(self_attention(q, k, v, "sagesla", proj, 0.5), self_attention(q, k, v, "sla", proj, 0.5))


def test_sla_with_every_block_and_zero_projection_is_dense_attention():
    q, k, v = _qkv()
    proj = torch.nn.Linear(64, 64)
    torch.nn.init.zeros_(proj.weight)
    torch.nn.init.zeros_(proj.bias)
    assert torch.allclose(self_attention(q, k, v, "sla", proj, 1.0), dense_attention(q, k, v), atol=1e-5)


def test_unknown_attention_type_is_refused():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="unknown attention type"):
        self_attention(q, k, v, "flash3", None)
