"""The Gluon W8A8 GEMM compiles for sm_90a without a GPU, and ptxas fits it in its registers without spilling.

Runs wherever Triton (with the Gluon version `int8_gluon` is written for) is installed, GPU or not; skipped
elsewhere (CI has no Triton). A spill in the consumers' loop costs more than the warp specialization gains, and a
Gluon construct that fails to lower shows up here rather than on the first Hopper run.
"""

import importlib.util
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


@pytest.fixture(scope="module")
def gluon():
    try:
        from turbowan.kernels import int8_gluon
    except ImportError as exc:  # a Triton without Gluon
        pytest.skip(f"this Triton has no Gluon: {exc}")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) != int8_gluon.GLUON_TRITON:
        pytest.skip(f"int8_gluon is written for Triton {int8_gluon.GLUON_TRITON}, this is {triton.__version__}")
    return int8_gluon


def _compile_sm90a(G, out: str, has_bias: bool):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    a_desc, b_desc = G.operand_descriptors(torch.zeros(256, 256, dtype=torch.int8),
                                           torch.zeros(512, 256, dtype=torch.int8))
    signature = dict(a_desc=mangle_type(a_desc), b_desc=mangle_type(b_desc), xs_ptr="*fp32", ws_ptr="*fp32",
                     y_ptr=f"*{out}", bias_ptr=f"*{out}", M="i32", N="i32", num_tiles="i32", k_tiles="i32",
                     HAS_BIAS="constexpr", STAGES="constexpr", GROUP_M="constexpr", CONSUMER_REGS="constexpr")
    cfg = G.GLUON_CONFIG
    constexprs = dict(HAS_BIAS=has_bias, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"],
                      CONSUMER_REGS=cfg["CONSUMER_REGS"])
    return triton.compile(GluonASTSource(G._w8a8_gemm_ws_kernel, signature, constexprs),
                          target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4, maxnreg=cfg["maxnreg"]))


@pytest.mark.parametrize("out", ["bf16", "fp16"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_gluon_gemm_compiles_for_sm90a_without_spills(gluon, out, has_bias, tmp_path):
    import triton

    kernel = _compile_sm90a(gluon, out, has_bias)
    ptx = kernel.asm["ptx"]
    # the per-K-block promotion is there: one I2F per int32 partial element, and wgmma on the tensor cores
    assert "wgmma.mma_async" in ptx and "cvt.rn.f32.s32" in ptx
    regs = {int(r) for r in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert gluon.GLUON_CONFIG["CONSUMER_REGS"] in regs  # the second consumer warpgroup grows to its registers
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton ships no ptxas")
    (tmp_path / "k.ptx").write_text(ptx)
    run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", run.stderr), run.stderr
    used = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
    assert used <= gluon.GLUON_CONFIG["maxnreg"]
