"""On Hopper, the warp-specialized Gluon SLA kernel (`sla_gluon`) gives the Triton kernel's output, and `sla` runs it
where it takes the inputs (bf16, head dim 128, TMA-readable layout); everywhere else the Triton kernel runs."""

import pytest
import torch
from helpers import gpu_module, kernel_module, rel_err, sla_structured_inputs

pytestmark = gpu_module()
S = kernel_module("turbowan.kernels.sla_triton")
G = kernel_module("turbowan.kernels.sla_gluon")

# Both kernels do the same bf16 wgmmas over the same 128-key steps in the same order, with the same block map and
# epilogue: on an H200 the outputs are equal (rel L2 0). The bound leaves room for bf16 noise only.
SAME_AS_TRITON = 2e-3

CASES = [  # (batch, length, heads, topk): selected blocks, steps of 128 keys
    (1, 1024, 2, 0.25),  # 4 of 16 blocks: 2 whole steps
    (1, 777, 2, 0.3),  # L not a multiple of 64 or 128; 3 of 13 blocks: an unpaired tail step
    (1, 777, 2, 1.0),  # every block, the partial last one included
    (2, 1000, 3, 0.07),  # batch of 2 back to back; 1 block: one step, the shortest ping-pong
    (2, 1000, 3, 0.5),
    (1, 100, 1, 1.0),  # fewer rows than one query tile (TMA fills the rest with zeros)
    (1, 4133, 4, 0.2),  # 13 of 65 blocks: 7 steps, the 3-stage ring wraps twice
]


def _skip_unless_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the Gluon SLA kernel is sm_90a code: Hopper (compute capability 9.0) only")


@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-L{}-H{}-topk{}".format(*c))
def test_gluon_sla_equals_the_triton_kernel(case):
    _skip_unless_hopper()
    batch, length, heads, topk = case
    q, k, v, weight, bias = sla_structured_inputs(batch, length, heads, 128, torch.bfloat16, "cuda", seed=11)
    want = S.sla_attention_triton(q, k, v, weight, bias, topk)
    got = G.sla_attention_gluon(q, k, v, weight, bias, topk)
    assert got.shape == want.shape and got.dtype == torch.bfloat16 and got.is_contiguous()
    assert torch.isfinite(got).all()
    assert rel_err(got, want) <= SAME_AS_TRITON


def test_gluon_sla_reads_q_k_v_as_views_of_one_fused_buffer():
    _skip_unless_hopper()
    q, k, v, weight, bias = sla_structured_inputs(2, 600, 2, 128, torch.bfloat16, "cuda", seed=12)
    fused = torch.stack([q, k, v], dim=2)  # (B, L, 3, H, D): each a [B*L, H*D] matrix with row stride 3*H*D
    views = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
    assert S.attention_kernel(*views) == "gluon"
    got = G.sla_attention_gluon(*views, weight, bias, 0.4)
    assert rel_err(got, S.sla_attention_triton(q, k, v, weight, bias, 0.4)) <= SAME_AS_TRITON


def test_sla_runs_gluon_on_hopper_for_bf16_head_dim_128_and_triton_otherwise():
    from turbowan.kernels import sla_dispatch

    assert sla_dispatch() is S.sla_attention_cuda  # the `sla` attention type's kernel
    hopper = torch.cuda.get_device_capability() == (9, 0)
    q, k, v, weight, bias = sla_structured_inputs(1, 500, 2, 128, torch.bfloat16, "cuda", seed=13)
    assert S.attention_kernel(q, k, v) == ("gluon" if hopper else "triton")
    got = S.sla_attention_cuda(q, k, v, weight, bias, 0.5)
    assert rel_err(got, S.sla_attention_triton(q, k, v, weight, bias, 0.5)) <= SAME_AS_TRITON

    interleaved = torch.stack([q, k, v], dim=3)  # (B, L, H, 3, D): heads 3*D apart, not one row matrix
    others = {
        "fp16": tuple(t.half() for t in (q, k, v)),
        "fp32": tuple(t.float() for t in (q, k, v)),
        "head dim 64": tuple(t[..., :64].contiguous() for t in (q, k, v)),
        "heads interleaved with each other": tuple(interleaved[:, :, :, i] for i in range(3)),
    }
    for name, (q2, k2, v2) in others.items():
        assert S.attention_kernel(q2, k2, v2) == "triton", name
        d = q2.shape[-1]
        w2, b2 = weight[:d, :d], bias[:d]
        assert torch.equal(S.sla_attention_cuda(q2, k2, v2, w2, b2, 0.5),
                           S.sla_attention_triton(q2, k2, v2, w2, b2, 0.5)), name


def test_gluon_sla_refuses_inputs_it_cannot_read():
    _skip_unless_hopper()
    q, k, v, weight, bias = sla_structured_inputs(1, 300, 2, 128, torch.bfloat16, "cuda", seed=14)
    interleaved = torch.stack([q, k, v], dim=3)
    with pytest.raises(ValueError, match="sla_attention_cuda"):
        G.sla_attention_gluon(interleaved[:, :, :, 0], interleaved[:, :, :, 1], interleaved[:, :, :, 2], weight,
                              bias, 0.5)
    with pytest.raises(ValueError, match="bf16 q, k, v with head dim 128"):
        G.sla_attention_gluon(q.half(), k.half(), v.half(), weight, bias, 0.5)
