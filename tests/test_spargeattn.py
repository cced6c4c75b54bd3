"""attention_type 'sagesla_spargeattn': SpargeAttn's kernels when installed, a clear refusal when not."""

import pytest
import torch
from helpers import gpu

from turbowan.ops import spargeattn
from turbowan.ops.attention import ATTENTION_KINDS, self_attention

HAVE = spargeattn.available()


def test_it_is_one_of_the_attention_kinds():
    assert "sagesla_spargeattn" in ATTENTION_KINDS


@pytest.mark.skipif(HAVE, reason="SpargeAttn is installed here")
def test_running_without_spargeattn_names_the_package_and_the_alternative():
    q = k = v = torch.randn(1, 16, 2, 64)
    proj = torch.nn.Linear(64, 64)
    with pytest.raises(RuntimeError, match="SpargeAttn.*use 'sagesla'"):
        self_attention(q, k, v, "sagesla_spargeattn", proj, 0.5)


@pytest.mark.skipif(HAVE, reason="SpargeAttn is installed here")
def test_loading_without_spargeattn_is_refused_before_reading_the_file(tmp_path):
    from turbowan.models.dit import load_dit

    with pytest.raises(ValueError, match="spas_sage_attn"):
        load_dit(tmp_path / "never-read.pth", attention="sagesla_spargeattn")


@gpu
@pytest.mark.skipif(not (HAVE and torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)),
                    reason="needs SpargeAttn built for an H100/H200")
@pytest.mark.parametrize("length", [1000, 4096])
def test_spargeattn_path_is_close_to_the_float_sla_with_its_block_shape(length):
    # The reference's SageSLA numerics (int8 q/k, fp8 v and P.V) against fp32 SLA with the same 64 x 128 blocks.
    # On the bench inputs this path and SpargeAttn's own module show the same error (2.5e-2 at 720p, 3.3e-2 at
    # 480p). Here q, k are iid Gaussian, so each row attends almost uniformly and its output is a small average
    # that the int8/fp8 rounding disturbs more: measured 3e-2 (L 1000) and 7.8e-2 (L 4096); bound 0.1.
    from turbowan.ops.sla import sla_attention

    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, length, 4, 128, device="cuda", generator=g).bfloat16() for _ in range(3))
    w = torch.randn(128, 128, device="cuda", generator=g) * 0.05
    b = torch.randn(128, device="cuda", generator=g) * 0.05
    out = spargeattn.sagesla_spargeattn(q, k, v, w, b, 0.2)
    ref = sla_attention(q.float(), k.float(), v.float(), w, b, 0.2, blkq=64, blkk=128)
    assert out.shape == q.shape and out.dtype == torch.bfloat16
    assert ((out.float() - ref).norm() / ref.norm()).item() < 0.1
    assert torch.equal(self_attention(q, k, v, "sagesla_spargeattn", _linear(w, b), 0.2), out)


def _linear(w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], device=w.device)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return lin
