"""The attention dispatch and the optional kernels: everything runs without Triton or a GPU."""

import importlib.util

import pytest
import torch

from turbowan.kernels import int8_dispatch, sagesla_dispatch, sla_dispatch
from turbowan.ops.attention import dense_attention, self_attention


@pytest.mark.skipif(importlib.util.find_spec("triton") is not None, reason="Triton is installed here")
def test_without_triton_every_kernel_reports_unavailable():
    assert sla_dispatch() is None and sagesla_dispatch() is None and int8_dispatch() is None


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
