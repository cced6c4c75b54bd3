"""The W8A8 GEMM for Hopper (compute capability 9.0), warp-specialized in Gluon, Triton's low-level dialect.

Why: our Triton kernel (`int8_triton.w8a8_gemm`) folds each 128-wide K block's exact int32 partial into the fp32
accumulator (one I2F and one fma per output element per K block). Triton keeps all warps of a program in phase, so
that promotion runs in step with the tensor cores and costs ~24% of the GEMM (bench/RESULTS.md, int8 floors). Here
the program is split by role:
  * one loader warp streams A [128, 128] and B [256, 128] int8 tiles by TMA into a ring of STAGES buffers;
  * two consumer warpgroups each own 64 rows of the 128 x 256 output tile. Per K block and 128-wide chunk a
    consumer issues the int8 wgmma (into a zeroed int32 partial), waits for it and folds it into its fp32
    accumulator. While one consumer converts, the other one's wgmma runs: the two meet only at the loader's
    mbarriers, so they drift out of phase and the tensor cores stay fed.
The grid is persistent (one program per SM, at most one per tile): a program walks tiles pid, pid + grid, ... in
`tile_coords` order, and a tile's store overlaps the loads of its next tile.

Numerics: the same as `int8_triton.w8a8_gemm` bit for bit. Per output element the same int32 dots per K block
(exact), added in the same K order by the same ``fma(float(dot), x_scale * w_scale, acc)``, rounded to the output
dtype once, then the bias added in that dtype. tests/test_int8_gpu.py checks equality with torch.equal.

When it runs: `int8_triton.w8a8_gemm` asks `turbowan.kernels.w8a8_gemm_kernel` (compute capability 9.0, K a
multiple of 128, bf16/fp16 output) and loads this module only then; everywhere else, or when this module does not
load (no Gluon in the installed Triton, or a Triton whose Gluon API this was not written for), the Triton kernel
runs. Compiled offline for sm_90a without spills (tests/test_int8_gluon_compile.py: 168 registers at launch, then
by setmaxnreg 248 and 232 for the consumers, 24 for the loader). On an H200, M = 75,600, K = 5120, N = 13,824:
10.94 ms against the Triton kernel's 11.51 (bench/int8_ws.py, bench/RESULTS.md).
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from . import GLUON_TRITON, gluon_api_matches  # noqa: F401  (GLUON_TRITON: read by the compile test)
from .int8_triton import gemm_operands, tile_coords

BM = gl.constexpr(128)
BN = gl.constexpr(256)
BK = gl.constexpr(128)
CHUNK = gl.constexpr(128)  # output columns per wgmma: one 128-row weight tile, so one scale

# Chosen on an H200 at the 720p FFN shape (bench/int8_ws.py): 3 stages (144 KB of shared memory), persistent grid.
# CONSUMER_REGS: the registers requested by setmaxnreg for the second consumer, a worker partition (the loader asks
# for 24; the default partition, the first consumer, gets what is left); maxnreg: the per-thread count at launch.
GLUON_CONFIG = dict(STAGES=3, GROUP_M=8, PERSISTENT=True, CONSUMER_REGS=232, maxnreg=168)


def available() -> bool:
    """This Triton's Gluon is the one the kernel is written for (`GLUON_TRITON`), and a CUDA device is present (the
    caller checks that it is a Hopper card)."""
    return gluon_api_matches() and torch.cuda.is_available()


@gluon.jit
def _loader(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
            M, N, GROUP_M: gl.constexpr):
    stages: gl.constexpr = a_bufs.type.shape[0]
    it = 0  # K steps so far over this program's tiles: the ring position and barrier phase
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        for j in range(k_tiles):
            s = it % stages
            # a slot is free once both consumers arrived on its `empty` barrier (initially free: wait on phase 1)
            mbarrier.wait(empty.index(s), ((it // stages) & 1) ^ 1)
            mbarrier.expect(ready.index(s), a_desc.block_type.nbytes + b_desc.block_type.nbytes)
            # rows past M or N arrive as zeros (TMA fills out-of-bounds boxes), so ragged tiles need no masks here
            tma.async_copy_global_to_shared(a_desc, [pid_m * BM, j * BK], ready.index(s), a_bufs.index(s))
            tma.async_copy_global_to_shared(b_desc, [pid_n * BN, j * BK], ready.index(s), b_bufs.index(s))
            it += 1


# Partition functions share one signature, and a constexpr argument reaches them as a runtime value (Triton 3.6;
# a runtime `if HAS_BIAS` that folds to false then fails to lower). So the half and the bias switch are literals
# in thin functions over one body, and the kernel picks the pair with or without the bias.
@gluon.jit
def _consumer_top(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                  bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, GROUP_M, 0,
             False)


@gluon.jit
def _consumer_bottom(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                     bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, GROUP_M, 1,
             False)


@gluon.jit
def _consumer_top_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                       bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, GROUP_M, 0,
             True)


@gluon.jit
def _consumer_bottom_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                          bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, GROUP_M, 1,
             True)


@gluon.jit
def _consume(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
             GROUP_M: gl.constexpr, HALF: gl.constexpr, HAS_BIAS: gl.constexpr):
    stages: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, CHUNK, 32])
    w_tiles_n = gl.cdiv(N, 128)
    it = 0  # as the loader counts
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        acc0 = gl.zeros([64, CHUNK], gl.float32, layout)
        acc1 = gl.zeros([64, CHUNK], gl.float32, layout)
        # the scale rows of the tile's two 128-row weight tiles; a chunk past N reads zeros and a clamped row
        ws_row0 = ws_ptr + gl.minimum(pid_n * 2, w_tiles_n - 1) * k_tiles
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
    y = acc.to(out_ty)  # round to the output dtype, then add the bias in it (as `int8_triton._store_output`)
    if HAS_BIAS:
        b = gl.load(bias_ptr + cols, mask=cols < N, other=0.0)
        y = (y.to(gl.float32) + gl.expand_dims(b.to(gl.float32), 0)).to(out_ty)
    r = gl.expand_dims(rows, 1)
    c = gl.expand_dims(cols, 0)
    gl.store(y_ptr + r.to(gl.int64) * N + c, y, mask=(r < M) & (c < N))  # y is contiguous: row stride N


@gluon.jit
def _w8a8_gemm_ws_kernel(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles,
                         HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                         CONSUMER_REGS: gl.constexpr):
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup

    args = (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
            M, N, GROUP_M)
    # the first partition is the default one (the kernel's own 4 warps); the loader is one warp with 24 registers
    if HAS_BIAS:
        gl.warp_specialize([(_consumer_top_bias, args), (_consumer_bottom_bias, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_consumer_top, args), (_consumer_bottom, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])


def operand_descriptors(x_q: torch.Tensor, w_q: torch.Tensor) -> tuple[TensorDescriptor, TensorDescriptor]:
    """TMA descriptors of the int8 activations [M, K] and weights [N, K] (contiguous, 16-byte aligned); block
    shapes as plain ints (the host side rejects constexpr-wrapped ones)."""
    bm, bn, bk = BM.value, BN.value, BK.value
    a_desc = TensorDescriptor.from_tensor(x_q, [bm, bk], gl.NVMMASharedLayout.get_default_for([bm, bk], gl.int8))
    b_desc = TensorDescriptor.from_tensor(w_q, [bn, bk], gl.NVMMASharedLayout.get_default_for([bn, bk], gl.int8))
    return a_desc, b_desc


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def w8a8_gemm_gluon(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, out_dtype: torch.dtype, **config) -> torch.Tensor:
    """`int8_triton.w8a8_gemm`'s contract on a Hopper card, with this kernel: quantized x [M, K] and weight [N, K]
    with their tile scales -> y [M, N] in out_dtype (bf16/fp16), bias added in out_dtype.

    ``config`` overrides entries of GLUON_CONFIG (bench/int8_ws.py compares them).
    """
    cfg = {**GLUON_CONFIG, **config}
    y, (x_q, x_scale, w_q, w_scale, bias) = gemm_operands(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    if y.numel() == 0:
        return y
    m, k = x_q.shape
    n = w_q.shape[0]
    a_desc, b_desc = operand_descriptors(x_q, w_q)
    tiles = triton.cdiv(m, BM.value) * triton.cdiv(n, BN.value)
    index = x_q.device.index if x_q.device.index is not None else torch.cuda.current_device()
    grid = (min(tiles, _sm_count(index)) if cfg["PERSISTENT"] else tiles,)
    _w8a8_gemm_ws_kernel[grid](
        a_desc, b_desc, x_scale, w_scale, y, bias if bias is not None else y,  # y: an unused placeholder pointer
        m, n, tiles, k // BK.value,
        HAS_BIAS=bias is not None, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"], CONSUMER_REGS=cfg["CONSUMER_REGS"],
        num_warps=4, maxnreg=cfg["maxnreg"],
    )
    return y
