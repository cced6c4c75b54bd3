"""bench/int8_pingpong.py's GEMM schedules compile for sm_90a without a GPU, as they claim: the ping-pong without
spills and with its turn barriers clear of Triton's own, the overlap with its wgmmas really pipelined; and a hung
first launch ends the bench instead of hanging it.

Runs wherever Triton (with the Gluon version `int8_gluon` is written for) is installed, GPU or not; skipped
elsewhere (CI has no Triton). Run with -s to see each variant's ptxas line (registers, spills).
"""

import importlib.util
import os
import re
import subprocess
import sys

import pytest
from helpers import REPO, bench_module

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")


@pytest.fixture(scope="module")
def pingpong():
    try:
        from turbowan.kernels import int8_gluon
    except ImportError as exc:  # a Triton without Gluon
        pytest.skip(f"this Triton has no Gluon: {exc}")
    import triton

    if tuple(int(p) for p in triton.__version__.split(".")[:2]) != int8_gluon.GLUON_TRITON:
        pytest.skip(f"int8_gluon is written for Triton {int8_gluon.GLUON_TRITON}, this is {triton.__version__}")
    return bench_module("int8_pingpong")


def _compile_sm90a(P, variant: str, out: str, has_bias: bool):
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    a_desc, b_desc = P.operand_descriptors(torch.zeros(256, 256, dtype=torch.int8),
                                           torch.zeros(512, 256, dtype=torch.int8))
    signature = dict(a_desc=mangle_type(a_desc), b_desc=mangle_type(b_desc), xs_ptr="*fp32", ws_ptr="*fp32",
                     y_ptr=f"*{out}", bias_ptr=f"*{out}", M="i32", N="i32", num_tiles="i32", k_tiles="i32",
                     HAS_BIAS="constexpr", STAGES="constexpr", GROUP_M="constexpr", CONSUMER_REGS="constexpr")
    cfg = P.GLUON_CONFIG
    constexprs = dict(HAS_BIAS=has_bias, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"],
                      CONSUMER_REGS=cfg["CONSUMER_REGS"])
    return triton.compile(GluonASTSource(P.KERNELS[variant], signature, constexprs),
                          target=GPUTarget("cuda", 90, 64), options=dict(num_warps=4, maxnreg=cfg["maxnreg"]))


def _ptxas(ptx: str, tmp_path) -> str:
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip("this Triton ships no ptxas")
    (tmp_path / "k.ptx").write_text(ptx)
    run = subprocess.run([ptxas, "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return run.stderr


@pytest.mark.parametrize("out", ["bf16", "fp16"])
@pytest.mark.parametrize("has_bias", [True, False])
def test_pingpong_gemm_compiles_for_sm90a_without_spills_and_with_free_turn_barriers(pingpong, out, has_bias,
                                                                                       tmp_path):
    ptx = _compile_sm90a(pingpong, "pingpong", out, has_bias).asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cvt.rn.f32.s32" in ptx
    # the turns, 256 threads on a register id (TURN_BARRIER + half): per consumer a bar.sync and a bar.arrive
    # around each of its two wgmma issues per K block, and the bottom's seed; the bottom's second arrive predicated
    assert len(re.findall(r"\bbar\.sync\s+%r\d+, 256;", ptx)) == 4
    assert len(re.findall(r"\bbar\.arrive\s+%r\d+, 256;", ptx)) == 5
    assert len(re.findall(r"@p bar\.arrive\s+%r\d+, 256;", ptx)) == 1
    # Triton's own named barriers (constant ids) must not be the turn barriers
    own = {int(i) for i in re.findall(r"\bbar(?:rier)?\.(?:sync|arrive)(?:\.aligned)?\s+(\d+)", ptx)}
    turn = pingpong.TURN_BARRIER.value
    assert own and not own & {turn, turn + 1}, own
    log = _ptxas(ptx, tmp_path)
    print(f"pingpong {out} bias={has_bias}:", " | ".join(line.strip() for line in log.splitlines()
                                                           if "spill" in line or "Used" in line))
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", log), log
    assert "C7514" not in log, log  # wgmmas not serialized by ptxas
    assert int(re.search(r"Used (\d+) registers", log).group(1)) <= pingpong.GLUON_CONFIG["maxnreg"]


@pytest.mark.parametrize("has_bias", [True, False])
def test_overlap64_gemm_keeps_one_wgmma_in_flight_while_promoting(pingpong, has_bias, tmp_path):
    ptx = _compile_sm90a(pingpong, "overlap64", "bf16", has_bias).asm["ptx"]
    assert "wgmma.mma_async.sync.aligned.m64n64k32.s32.s8.s8" in ptx
    assert "wgmma.wait_group.sync.aligned 1;" in ptx  # the previous sub-chunk's wait leaves the next in flight
    log = _ptxas(ptx, tmp_path)
    # its spills (a few registers in the K loop, see the bench's docstring) are reported, not hidden
    print(f"overlap64 bias={has_bias}:", " | ".join(line.strip() for line in log.splitlines()
                                                    if "spill" in line or "Used" in line))
    assert "C7514" not in log, log  # ptxas did not serialize the wgmmas, which would undo the overlap


def test_a_hung_first_launch_ends_the_bench_with_the_variant_named(pingpong):
    code = ("import sys, time; sys.path.insert(0, 'bench'); import int8_pingpong as P; "
            "P.guarded('pingpong: first launch', lambda: time.sleep(60), seconds=1.0)")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=50)
    assert run.returncode != 0
    assert "[watchdog 1 s] pingpong: first launch" in run.stdout
    assert "Timeout" in run.stderr  # faulthandler's report, with the stack of the hung call
