"""The Gluon SLA kernel compiles for sm_90a without a GPU: no spills, within its registers and the card's shared
memory, its ping-pong turns on named barriers no one else uses.

Runs wherever Triton (with the Gluon version `sla_gluon` is written for) is installed, GPU or not; skipped elsewhere
(CI has no Triton). A spill in the consumers' loop costs more than the warp specialization gains, a Gluon construct
that fails to lower shows up here rather than on the first Hopper run, and a named barrier shared with Triton's own
would deadlock or race.
"""

import importlib.util
import os
import re
import subprocess

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton")

HOPPER_MAX_SHARED = 227 * 1024  # bytes of shared memory one block may use on sm_90


@pytest.fixture(scope="module")
def compiled():
    from turbowan.kernels import gluon_api_matches, sla_gluon

    if sla_gluon.gluon is None:
        pytest.skip("this Triton has no Gluon")
    if not gluon_api_matches():
        import triton

        pytest.skip(f"sla_gluon is written for another Triton than {triton.__version__}")
    from triton.backends.compiler import GPUTarget

    return sla_gluon, sla_gluon.compile_for(GPUTarget("cuda", 90, 32))


def _tool(name: str):
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        pytest.skip(f"this Triton ships no {name}")
    return path


def test_gluon_sla_compiles_for_sm90a_without_spills(compiled, tmp_path):
    sla_gluon, kernel = compiled
    cfg = sla_gluon.GLUON_CONFIG
    ptx = kernel.asm["ptx"]
    assert "wgmma.mma_async" in ptx and "cp.async.bulk.tensor" in ptx  # tensor cores fed by TMA
    regs = {int(r) for r in re.findall(r"setmaxnreg\.inc\.sync\.aligned\.u32\s+(\d+)", ptx)}
    assert cfg["CONSUMER_REGS"] in regs  # the second consumer warpgroup grows to its registers
    assert kernel.metadata.shared <= HOPPER_MAX_SHARED
    (tmp_path / "k.ptx").write_text(ptx)
    run = subprocess.run([_tool("ptxas"), "-v", "--gpu-name", "sm_90a", str(tmp_path / "k.ptx"), "-o",
                          str(tmp_path / "k.cubin")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert re.search(r"\b0 bytes spill stores, 0 bytes spill loads", run.stderr), run.stderr
    used = int(re.search(r"Used (\d+) registers", run.stderr).group(1))
    assert used <= cfg["maxnreg"]


def test_ping_pong_turns_use_barriers_8_and_9_for_256_threads_only(compiled, tmp_path):
    _, kernel = compiled
    (tmp_path / "k.cubin").write_bytes(kernel.asm["cubin"])
    run = subprocess.run([_tool("cuobjdump"), "-sass", str(tmp_path / "k.cubin")], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    # (barrier id, thread count) of every named-barrier instruction: BAR.SYNC 0x9, 0x100 / BAR.ARV 0x8, 0x100
    uses = re.findall(r"BAR\.(SYNC|ARV)[.A-Z_]*\s+(0x[0-9a-f]+)(?:,\s*(0x[0-9a-f]+))?", run.stdout)
    turns = {(op, int(bar, 16), int(count or "0", 16)) for op, bar, count in uses if int(bar, 16) in (8, 9)}
    # both consumers wait for their turn and pass it on; every use of 8 and 9 counts the two warpgroups (256)
    assert {("SYNC", 8, 256), ("SYNC", 9, 256), ("ARV", 8, 256), ("ARV", 9, 256)} <= turns
    assert all(count == 256 for _, _, count in turns)
    # Triton's own barriers (the partitions' thread barriers, warp_specialize's fork and join) stay below 8
    assert all(int(bar, 16) < 8 for _, bar, _ in uses if int(bar, 16) not in (8, 9))
