"""A warp-specialized W8A8 GEMM in Gluon (Triton 3.6's low-level dialect) against ours, bit for bit and in time.

    python bench/int8_ws.py [--shape 75600 5120 13824]

Why: `bench/int8_floors.py` measured our Triton W8A8 GEMM at 932 TOP/s where a plain int8 GEMM with the same tile
reaches ~1150: the per-128-K-block promotion (int32 partial -> fp32, one fma per output element) runs in step
with the tensor cores, because Triton keeps all warps of the CTA in phase. Here the CTA is split by role:
  * one loader warp streams A [128, 128] and B [256, 128] int8 tiles by TMA into a ring of STAGES buffers;
  * two consumer warpgroups each own 64 rows of the 128 x 256 output tile. Per K block and per 128-wide chunk a
    consumer issues the int8 wgmma (zero-initialised int32 partial), waits for it, and folds it into its fp32
    accumulator with the reference's fma. While one consumer converts, the other one's wgmma runs: the two drift
    out of phase (they only meet at the loader's mbarriers), so the tensor cores stay fed.
Numerics are those of `turbowan.kernels.int8_triton` (same K order, same fma, same output rounding), so the result
must equal ours exactly; the script checks that before timing.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import common
from turbowan.kernels.int8_triton import tile_coords, w8a8_gemm

BM = gl.constexpr(128)
BN = gl.constexpr(256)
BK = gl.constexpr(128)
CHUNK = gl.constexpr(128)  # output columns per wgmma: one 128-row weight tile, so one scale


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
            M, N, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):
    stages: gl.constexpr = a_bufs.type.shape[0]
    it = 0  # K steps so far over this program's tiles: the ring position and barrier phase
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        for j in range(k_tiles):
            s = it % stages
            # a slot is free once both consumers arrived on its `empty` barrier (initially free: wait on phase 1)
            mbarrier.wait(empty.index(s), ((it // stages) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [pid_m * BM, j * BK], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BN, j * BK], ready.index(s), b_bufs.index(s))
            it += 1


# Partition functions must share one signature and cannot take constexpr arguments that survive the fork, so the
# two consumers are two thin functions over one body with the half as a literal.
@gluon.jit
def _consumer_top(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                  bias_ptr, M, N, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, HAS_BIAS,
             GROUP_M, 0)


@gluon.jit
def _consumer_bottom(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                     bias_ptr, M, N, HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, HAS_BIAS,
             GROUP_M, 1)


@gluon.jit
def _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
             HAS_BIAS: gl.constexpr, GROUP_M: gl.constexpr, HALF: gl.constexpr):
    stages: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, CHUNK, 32])
    w_tiles_n = gl.cdiv(N, 128)
    it = 0  # as the loader counts
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        acc0 = gl.zeros([64, CHUNK], gl.float32, layout)
        acc1 = gl.zeros([64, CHUNK], gl.float32, layout)
        ws_row0 = ws_ptr + gl.minimum(pid_n * 2, w_tiles_n - 1) * k_tiles  # the two 128-row weight tiles
        ws_row1 = ws_ptr + gl.minimum(pid_n * 2 + 1, w_tiles_n - 1) * k_tiles
        xs_row = xs_ptr + pid_m * k_tiles
        for j in range(k_tiles):
            s = it % stages
            mbarrier.wait(ready.index(s), (it // stages) & 1)
            a = a_bufs.index(s).slice(HALF * 64, 64)  # [64, 128] int8: this consumer's rows
            b = b_bufs.index(s)  # [256, 128] int8, K-major
            xs = gl.load(xs_row + j)
            # use_acc=False: the wgmma starts from zero; the zeros passed are made here, where they are dead at
            # once (a zero tensor kept across the loop would hold 64 registers)
            p = warpgroup_mma(a, b.slice(0, CHUNK).permute((1, 0)), gl.zeros([64, CHUNK], gl.int32, layout),
                              use_acc=False, is_async=True)
            p = warpgroup_mma_wait(0, deps=(p,))
            acc0 = gl.fma(p.to(gl.float32), xs * gl.load(ws_row0 + j), acc0)
            # pin this fma before the next wgmma (the wait takes acc0 as an operand and is ordered with the
            # wgmma): otherwise the compiler hoists the wgmma, and two int32 partials beside the accumulators spill
            acc0 = warpgroup_mma_wait(0, deps=(acc0,))
            p = warpgroup_mma(a, b.slice(CHUNK, CHUNK).permute((1, 0)), gl.zeros([64, CHUNK], gl.int32, layout),
                              use_acc=False, is_async=True)
            p = warpgroup_mma_wait(0, deps=(p,))
            mbarrier.arrive(empty.index(s), count=1)  # both wgmmas of this slot are done: the loader may refill it
            acc1 = gl.fma(p.to(gl.float32), xs * gl.load(ws_row1 + j), acc1)
            it += 1
        # the store runs while the loader already fills the ring with the next tile's operands
        rows = pid_m * BM + HALF * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = pid_n * BN + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
        _store(y_ptr, bias_ptr, acc0, rows, cols, M, N, HAS_BIAS)
        _store(y_ptr, bias_ptr, acc1, rows, cols + CHUNK, M, N, HAS_BIAS)


@gluon.jit
def _store(y_ptr, bias_ptr, acc, rows, cols, M, N, HAS_BIAS: gl.constexpr):
    out_ty: gl.constexpr = y_ptr.dtype.element_ty
    y = acc.to(out_ty)  # round to the output dtype, then add the bias in it (as torch's bf16 + bf16)
    if HAS_BIAS:
        b = gl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        y = (y.to(gl.float32) + gl.expand_dims(b.to(gl.float32), 0)).to(out_ty)
    r = gl.expand_dims(rows, 1)
    c = gl.expand_dims(cols, 0)
    gl.store(y_ptr + r.to(gl.int64) * N + c, y, mask=(r < M) & (c < N))


@gluon.jit
def _w8a8_ws_kernel(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles,
                    HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr, CONSUMER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup

    # each program runs tiles pid, pid + grid, ... in our tile order: one each with a grid of all tiles, several
    # with a grid of one program per SM (persistent: a tile's store overlaps the next tile's loads)
    args = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
            M, N, HAS_BIAS, GROUP_M)
    gl.warp_specialize([
        (_consumer_top, args),  # the default partition: the kernel's own 4 warps
        (_consumer_bottom, args),
        (_loader, args),
    ], [4, 1], [CONSUMER_REGS, 24])


def operand_descriptors(xq, wq):
    """TMA descriptors of the int8 activations [M, K] and weights [N, K]; block shapes as plain ints (the host side
    rejects constexpr-wrapped ones)."""
    bm, bn, bk = BM.value, BN.value, BK.value
    a_desc = TensorDescriptor.from_tensor(xq, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    b_desc = TensorDescriptor.from_tensor(wq, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    return a_desc, b_desc


def w8a8_ws_gemm(xq, xs, wq, ws, bias=None, out_dtype=torch.bfloat16, stages=4, group_m=8, consumer_regs=232,
                 maxnreg=168, persistent=False):
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    a_desc, b_desc = operand_descriptors(xq, wq)
    tiles = triton.cdiv(m, BM.value) * triton.cdiv(n, BN.value)
    grid = (min(tiles, torch.cuda.get_device_properties(xq.device).multi_processor_count) if persistent else tiles,)
    _w8a8_ws_kernel[grid](a_desc, b_desc, xs, ws, y, bias if bias is not None else y, m, n, tiles, k // BK.value,
                          HAS_BIAS=bias is not None, STAGES=stages, GROUP_M=group_m, CONSUMER_REGS=consumer_regs,
                          num_warps=4, maxnreg=maxnreg)
    return y


def main():
    m, k, n = common.gemm_shape(__doc__.split("\n")[0])
    g = torch.Generator("cuda").manual_seed(0)
    xq, xs, wq, ws = common.random_w8a8_operands(m, k, n, g)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    for rm, rk, rn in ((1000, 512, 640), (129, 256, 130)):  # ragged M and N: TMA zero-fill, masked stores
        rx, rxs, rw, rws = common.random_w8a8_operands(rm, rk, rn, g, scale=1.0)
        rb = torch.randn(rn, device="cuda", generator=g).to(torch.bfloat16)
        try:
            want = w8a8_gemm(rx, rxs, rw, rws, rb, torch.bfloat16)
            same = all(torch.equal(w8a8_ws_gemm(rx, rxs, rw, rws, rb, persistent=p), want) for p in (False, True))
        except Exception as exc:
            same = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
        print(f"ragged {rm}x{rk}x{rn}: bit-exact vs ours: {same}", flush=True)
    ours = w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16)
    ops = 2 * m * n * k
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; M={m} K={k} N={n}")
    print("| kernel | config | bit-exact vs ours | ms | TOP/s |")
    print("|---|---|---|---|---|")
    ms = common.median_ms(lambda: w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16), reps=10, warmup=3)
    print(f"| ours (Triton) | default | - | {ms:.2f} | {ops / ms / 1e9:.0f} |", flush=True)
    for persistent, stages, group_m, regs in ((False, 4, 8, 232), (False, 3, 8, 232), (False, 4, 16, 232),
                                              (True, 4, 8, 232), (True, 3, 8, 232)):
        cfg = f"{'persistent' if persistent else 'a program per tile'}, stages {stages}, GROUP_M {group_m}"
        try:
            got = w8a8_ws_gemm(xq, xs, wq, ws, bias, stages=stages, group_m=group_m, consumer_regs=regs,
                               persistent=persistent)
            torch.cuda.synchronize()
        except Exception as exc:  # report and go on: one config failing must not hide the others
            print(f"| Gluon warp-specialized | {cfg} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |", flush=True)
            continue
        diff = int((got != ours).sum())
        ms = common.median_ms(lambda: w8a8_ws_gemm(xq, xs, wq, ws, bias, stages=stages, group_m=group_m,
                                                   consumer_regs=regs, persistent=persistent), reps=10, warmup=3)
        print(f"| Gluon warp-specialized | {cfg} | {'yes' if diff == 0 else f'NO: {diff} elements differ'} | "
              f"{ms:.2f} | {ops / ms / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
