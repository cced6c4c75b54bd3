"""The attention dispatch and the optional kernels: everything runs without Triton or a GPU."""

import importlib.util

import pytest
import torch

from turbowan.kernels import (_load, int8_dispatch, sagesla_dispatch, sla_dispatch, sla_kernel, tma_row_matrix,
                              w8a8_gemm_kernel)
from turbowan.ops.attention import dense_attention, self_attention


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed here")
def test_without_triton_every_kernel_reports_unavailable():
    assert sla_dispatch() is None and sagesla_dispatch() is None and int8_dispatch() is None
    from turbowan.kernels import sla_gluon  # the Hopper SLA module imports, and says it cannot run

    assert not sla_gluon.available()


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


@pytest.mark.parametrize("capability,dtype,head_dim,row_matrices,kernel", [
    ((9, 0), torch.bfloat16, 128, True, "gluon"),  # Hopper, the model's attention: the warp-specialized kernel
    ((9, 0), torch.float16, 128, True, "triton"),  # fp16 is computed in bf16: only the Triton kernel converts
    ((9, 0), torch.float32, 128, True, "triton"),
    ((9, 0), torch.bfloat16, 64, True, "triton"),  # the Gluon tiles are 128 wide
    ((9, 0), torch.bfloat16, 128, False, "triton"),  # q, k or v not one [B*L, H*D] matrix for TMA
    ((8, 0), torch.bfloat16, 128, True, "triton"),  # A100
    ((8, 9), torch.bfloat16, 128, True, "triton"),  # RTX 40
    ((10, 0), torch.bfloat16, 128, True, "triton"),  # Blackwell runs no sm_90a code
    (None, torch.bfloat16, 128, True, "triton"),  # no CUDA device (Triton's interpreter)
])
def test_sla_kernel_is_gluon_only_on_hopper_for_bf16_head_dim_128_row_matrices(capability, dtype, head_dim,
                                                                               row_matrices, kernel):
    assert sla_kernel(capability, dtype, head_dim, row_matrices) == kernel


def test_tma_row_matrix_takes_heads_side_by_side_and_batches_back_to_back():
    x = torch.zeros(2, 10, 3, 128, dtype=torch.bfloat16)
    assert tma_row_matrix(x) and tma_row_matrix(x[:1])
    fused = torch.zeros(2, 10, 3, 3, 128, dtype=torch.bfloat16)
    assert all(tma_row_matrix(fused[:, :, i]) for i in range(3))  # read as (B, L, q|k|v, H, D): a fused projection
    assert not any(tma_row_matrix(fused[:, :, :, i]) for i in range(3))  # as (B, L, H, q|k|v, D): heads 3*D apart
    assert not tma_row_matrix(x.transpose(0, 1).contiguous().transpose(0, 1))  # batch entries interleaved
    assert tma_row_matrix(x.transpose(0, 1).contiguous().transpose(0, 1)[:1])  # ... harmless with one entry
    assert not tma_row_matrix(torch.zeros(1, 10, 3, 128, 2, dtype=torch.bfloat16)[..., 0])  # D strided
    assert not tma_row_matrix(torch.zeros(1 + 10 * 3 * 128, dtype=torch.bfloat16)[1:].view(1, 10, 3, 128))  # 2 B off


def test_gluon_sla_refuses_what_it_cannot_run_before_any_gpu_work():
    from turbowan.kernels.sla_gluon import sla_attention_gluon  # imports without Triton

    q, k, v = (torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    w, b = torch.zeros(128, 128), torch.zeros(128)
    with pytest.raises(ValueError, match="bf16 q, k, v with head dim 128"):
        sla_attention_gluon(q.half(), k.half(), v.half(), w, b, 0.5)
    with pytest.raises(ValueError, match="bf16 q, k, v with head dim 128"):
        sla_attention_gluon(q[..., :64], k[..., :64], v[..., :64], w[:64, :64], b[:64], 0.5)
    with pytest.raises(ValueError, match="runs on a compute capability 9.0 GPU"):
        sla_attention_gluon(q, k, v, w, b, 0.5)


@pytest.fixture
def hopper_capability(monkeypatch):
    """Tensors report compute capability 9.0; the kernel modules' load cache starts and ends empty."""
    from turbowan import kernels
    from turbowan.kernels import sla_triton

    monkeypatch.setattr(sla_triton, "cuda_capability", lambda x: (9, 0))
    monkeypatch.setattr(kernels, "cuda_capability", lambda x: (9, 0))
    _load.cache_clear()
    yield sla_triton
    _load.cache_clear()


def test_sla_on_hopper_runs_gluon_where_it_loads_else_triton_and_doctor_says_which(hopper_capability,
                                                                                  monkeypatch):
    from turbowan.doctor import sla_kernel_name

    from turbowan.kernels import sla_gluon

    sla_triton = hopper_capability
    q = torch.zeros(1, 256, 2, 128, dtype=torch.bfloat16)
    # where sla_gluon does not run (here made so on any machine): the Triton kernel, and the doctor names the reason
    monkeypatch.setattr(sla_gluon, "available", lambda: False)
    assert sla_kernel_name(q, q, q) == ("sla, our Triton kernel (the Gluon one does not run here: sla_gluon "
                                        "unavailable on this machine)")
    assert sla_triton.attention_kernel(q, q, q) == "triton"
    assert sla_kernel_name(q.half(), q.half(), q.half()) == "sla, our Triton kernel"  # not Gluon's to run
    monkeypatch.setattr(sla_triton, "_gluon_sla", lambda: sla_triton.sla_attention_triton)  # as if it loaded
    assert sla_triton.attention_kernel(q, q, q) == "gluon"
    assert sla_triton.attention_kernel(q.half(), q.half(), q.half()) == "triton"
    assert sla_kernel_name(q, q, q) == "sla, our Gluon kernel (Hopper, warp-specialized)"


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


def test_the_vae_convolution_runs_the_triton_kernel_only_where_it_measured_faster():
    from turbowan.kernels import conv3d_kernel

    assert conv3d_kernel((9, 0), 96, 96, (3, 3, 3)) == "triton"
    assert conv3d_kernel((9, 0), 192, 192, (3, 3, 3)) == "cudnn"  # cuDNN's Hopper kernels win there
    assert conv3d_kernel((9, 0), 96, 3, (3, 3, 3)) == "cudnn"
    assert conv3d_kernel((8, 9), 96, 96, (3, 3, 3)) == "cudnn"  # measured on Hopper only
    assert conv3d_kernel(None, 96, 96, (3, 3, 3)) == "cudnn"  # CPU
