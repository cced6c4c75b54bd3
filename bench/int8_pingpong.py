"""Schedules for the consumers of the Gluon W8A8 GEMM (`turbowan.kernels.int8_gluon`), bit for bit and in time.

    cd bench && timeout -k 10 230 python int8_pingpong.py [--shape 75600 5120 13824] [--variants pingpong overlap64]

Needs a Hopper card (compute capability 9.0). Why: in the package kernel each consumer warpgroup issues a K block's
wgmma, waits for it, and only then promotes the int32 partial (`fma(float(p), x_scale * w_scale, acc)`); the two
consumers meet only at the loader's mbarriers, so nothing keeps them out of phase, and the tensor cores idle
whenever both promote at once (bench/RESULTS.md: 10.90 ms against 9.24 for plain int8 without promotion). The
candidates, all with the package's loader, tile (128 x 256 x 128), persistent grid and epilogue:
  * pingpong: FlashAttention-3's inter-warpgroup schedule. Each wgmma issue (one K block, one 128-column chunk) is a
    window; named barriers make the two consumers' windows alternate (top, bottom, top, ...), so one promotes its
    partial while the tensor cores run the other's wgmma. See `_consume_pingpong`.
  * overlap64: FlashAttention-3's intra-warpgroup overlap instead: the chunk is 64 columns, and a consumer issues
    the next sub-chunk's wgmma before it promotes the previous one, so its own wgmma stays in flight during three
    of its four promotions per K block (N = 64 wgmmas read A from shared memory twice as often). ptxas spills
    68 bytes in its K loop (offline, sm_90a): a measurement of the idea, not a package candidate as it stands.
    See `_consume_overlap64`.
(Why not more: two 128-column partials next to the two accumulators need 256 registers, more than a consumer
gets; a third consumer warpgroup for a 192-row tile leaves each ~160, below the 192 that a 64 x 256 accumulator
and one partial need.)

Numerics: the same int32 dot per K block and output element (exact, whatever the wgmma's N), added in the same K
order by the same fma, rounded once, bias after. The script checks every variant with torch.equal against the
Triton kernel (`int8_triton.w8a8_gemm`) on ragged shapes (bf16/fp16, with and without bias) and on the timed
shape, then times the Triton kernel, the package's Gluon kernel and each variant (median of 10 after 3 warm-ups)
and prints a markdown table. At the default shape the figures go into bench/results.json (`w8a8_gemm_720p_<name>_ms`
for each bit-exact variant). A variant's first launch runs under a watchdog (WATCHDOG_S, compile included): a
deadlock ends the script with a message naming the variant instead of hanging; the rows printed before stay.
Registers and spills: tests/test_int8_pingpong_compile.py (offline sm_90a compile).
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

import common
from turbowan.kernels.int8_gluon import (BK, BM, BN, CHUNK, GLUON_CONFIG, _loader, _sm_count, _store,
                                         operand_descriptors)
from turbowan.kernels.int8_triton import gemm_operands, tile_coords

DEFAULT_SHAPE = (75600, 5120, 13824)
RAGGED = ((1000, 512, 640), (129, 256, 130), (1, 256, 384), (300, 128, 256))  # (M, K, N); the last: one K block
WATCHDOG_S = 60.0  # a variant's first launch, compile included (seconds; a compile takes a few): longer is a hang
SUB = gl.constexpr(64)  # overlap64: output columns per wgmma

# Named barriers of the ping-pong: TURN_BARRIER + HALF is "consumer HALF may issue its wgmma", counted over 256
# threads (one warpgroup's bar.sync, the other's bar.arrive). Triton's own ids in this kernel's PTX are 0 and 1
# (tests/test_int8_pingpong_compile.py checks that no other id appears), and a CTA has 16.
TURN_BARRIER = gl.constexpr(8)


@gluon.jit
def _turn_wait(bar_id):
    """bar.sync: block this warpgroup until the other consumer has arrived on `bar_id` (it issued its wgmma).
    inline_asm needs a result; is_pure=False keeps it from being removed, merged or reordered."""
    gl.inline_asm_elementwise("bar.sync $1, 256;\n\tmov.u32 $0, 0;", "=r,r", [bar_id], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _turn_pass(bar_id):
    """bar.arrive: let the other consumer, waiting on `bar_id`, issue its wgmma; this warpgroup does not wait."""
    gl.inline_asm_elementwise("bar.arrive $1, 256;\n\tmov.u32 $0, 0;", "=r,r", [bar_id], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _turn_pass_if(bar_id, pred):
    """`_turn_pass` where pred is true, as a predicated instruction (a branch around it makes ptxas spill)."""
    gl.inline_asm_elementwise("{\n\t.reg .pred p;\n\tsetp.ne.b32 p, $2, 0;\n\t@p bar.arrive $1, 256;\n\t}\n\t"
                              "mov.u32 $0, 0;", "=r,r,r", [bar_id, pred.to(gl.int32)], dtype=gl.int32,
                              is_pure=False, pack=1)


# Partition functions share one signature and a constexpr argument reaches them as a runtime value (Triton 3.6;
# see int8_gluon), so the half, the bias switch and the schedule are literals in thin functions over the bodies.
@gluon.jit
def _pingpong_top(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
                  M, N, GROUP_M: gl.constexpr):
    _consume_pingpong(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                      GROUP_M, 0, False)


@gluon.jit
def _pingpong_bottom(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                     bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_pingpong(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                      GROUP_M, 1, False)


@gluon.jit
def _pingpong_top_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                       bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_pingpong(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                      GROUP_M, 0, True)


@gluon.jit
def _pingpong_bottom_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                          bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_pingpong(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                      GROUP_M, 1, True)


@gluon.jit
def _overlap64_top(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                   bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_overlap64(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                       GROUP_M, 0, False)


@gluon.jit
def _overlap64_bottom(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                      bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_overlap64(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                       GROUP_M, 1, False)


@gluon.jit
def _overlap64_top_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                        bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_overlap64(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                       GROUP_M, 0, True)


@gluon.jit
def _overlap64_bottom_bias(a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr,
                           bias_ptr, M, N, GROUP_M: gl.constexpr):
    _consume_overlap64(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                       GROUP_M, 1, True)


@gluon.jit
def _consume_pingpong(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                      GROUP_M: gl.constexpr, HALF: gl.constexpr, HAS_BIAS: gl.constexpr):
    """The package consumer (`int8_gluon._consume`) with FlashAttention-3's ping-pong between the two warpgroups.

    Windows: each wgmma issue (tile, K block j, chunk c) is one window; a consumer has W = tiles x k_tiles x 2 of
    them, in the same order as the other. A window: wait for ready[j] (chunk 0), wait for the turn (bar.sync on
    TURN_BARRIER + HALF), issue, pass the turn (bar.arrive on the other's barrier), wait for the wgmma, free the
    slot (chunk 1: both wgmmas of the slot are read), promote. So the issues alternate top, bottom, top, ... and
    one consumer's promotion runs while the other's wgmma is on the tensor cores.

    Turn barriers: the bottom seeds the top's barrier once, so the top's first window goes first; each bar.sync
    completes with exactly one bar.arrive of the other warpgroup: the top syncs W times, its barrier gets the seed
    plus the bottom's arrivals after its windows 1..W-1 (the bottom skips the arrival after its last window: no one
    would sync on it); the bottom syncs W times, the top arrives after each of its W windows. An arrival cannot land
    in a barrier generation it does not belong to: the other warpgroup's next arrival on the same barrier comes
    only after its own next turn, which needs this warpgroup's sync to have completed first.

    Why it cannot deadlock with the loader's mbarriers: order the windows top 1, bottom 1, top 2, bottom 2, ...
    Everything a window waits for comes from earlier windows or hardware that completes: (a) its turn: the previous
    window's bar.arrive, issued right after that window's issue, before anything there can block; (b) ready[j]:
    the loader, which waits only on empty of step j - STAGES (STAGES >= 1), released by both consumers in their
    windows of step j - STAGES, all earlier than this one, and TMA, which completes; (c) the wgmma wait: the tensor
    cores. By induction over that order every window finishes, and the stores need nothing of the other consumer.
    Needs W >= 1 (K >= 128; the host refuses K = 0)."""
    stages: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, CHUNK, 32])
    my_turn = TURN_BARRIER + HALF
    their_turn = TURN_BARRIER + 1 - HALF
    if HALF == 1:
        _turn_pass(their_turn)  # the seed: the top's first window goes first
    w_tiles_n = gl.cdiv(N, 128)
    it = 0  # as the loader counts
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        more_tiles = tile + gl.num_programs(0) < num_tiles
        acc0 = gl.zeros([64, CHUNK], gl.float32, layout)
        acc1 = gl.zeros([64, CHUNK], gl.float32, layout)
        ws_row0 = ws_ptr + gl.minimum(pid_n * 2, w_tiles_n - 1) * k_tiles
        ws_row1 = ws_ptr + gl.minimum(pid_n * 2 + 1, w_tiles_n - 1) * k_tiles
        xs_row = xs_ptr + pid_m * k_tiles
        for j in range(k_tiles):
            s = it % stages
            mbarrier.wait(ready.index(s), (it // stages) & 1)
            a = a_bufs.index(s).slice(HALF * 64, 64)
            b = b_bufs.index(s)
            xs = gl.load(xs_row + j)
            # window (j, chunk 0)
            _turn_wait(my_turn)
            p = warpgroup_mma(a, b.slice(0, CHUNK).permute((1, 0)), gl.zeros([64, CHUNK], gl.int32, layout),
                              use_acc=False, is_async=True)
            _turn_pass(their_turn)
            p = warpgroup_mma_wait(0, deps=(p,))
            acc0 = gl.fma(p.to(gl.float32), xs * gl.load(ws_row0 + j), acc0)
            # pin the fma before the next issue (as in int8_gluon: else the wgmma is hoisted and partials spill)
            acc0 = warpgroup_mma_wait(0, deps=(acc0,))
            # window (j, chunk 1)
            _turn_wait(my_turn)
            p = warpgroup_mma(a, b.slice(CHUNK, CHUNK).permute((1, 0)), gl.zeros([64, CHUNK], gl.int32, layout),
                              use_acc=False, is_async=True)
            if HALF == 0:
                _turn_pass(their_turn)
            else:  # the bottom's last window: no one is left to let go (a predicate: a branch here spills)
                _turn_pass_if(their_turn, (j < k_tiles - 1) | more_tiles)
            p = warpgroup_mma_wait(0, deps=(p,))
            mbarrier.arrive(empty.index(s), count=1)
            acc1 = gl.fma(p.to(gl.float32), xs * gl.load(ws_row1 + j), acc1)
            it += 1
        rows = pid_m * BM + HALF * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = pid_n * BN + gl.arange(0, CHUNK, layout=gl.SliceLayout(0, layout))
        _store(y_ptr, bias_ptr, acc0, rows, cols, M, N, HAS_BIAS)
        _store(y_ptr, bias_ptr, acc1, rows, cols + CHUNK, M, N, HAS_BIAS)


@gluon.jit
def _consume_overlap64(a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N,
                       GROUP_M: gl.constexpr, HALF: gl.constexpr, HAS_BIAS: gl.constexpr):
    """The package consumer with the wgmma of the next 64-column sub-chunk in flight while the previous one is
    promoted. Per K block: issue sub-chunks 0 and 1; wait until one is outstanding (0 is complete), promote 0;
    issue 2; promote 1; issue 3; promote 2; wait for 3, free the slot, promote 3. At most two 32-register partials
    are live beside the four 32-register accumulators, as the package kernel's one 64-register partial. The
    slot is freed within its own block, as in the package kernel: no new waits, no new deadlock."""
    stages: gl.constexpr = a_bufs.type.shape[0]
    layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, SUB, 32])
    w_tiles_n = gl.cdiv(N, 128)
    it = 0  # as the loader counts
    for tile in range(gl.program_id(0), num_tiles, gl.num_programs(0)):
        pid_m, pid_n = tile_coords(tile, M, N, BM, BN, GROUP_M)
        acc0 = gl.zeros([64, SUB], gl.float32, layout)
        acc1 = gl.zeros([64, SUB], gl.float32, layout)
        acc2 = gl.zeros([64, SUB], gl.float32, layout)
        acc3 = gl.zeros([64, SUB], gl.float32, layout)
        ws_row0 = ws_ptr + gl.minimum(pid_n * 2, w_tiles_n - 1) * k_tiles
        ws_row1 = ws_ptr + gl.minimum(pid_n * 2 + 1, w_tiles_n - 1) * k_tiles
        xs_row = xs_ptr + pid_m * k_tiles
        # Each wgmma writes over the registers of a partial promoted before it (use_acc=False: their values are
        # ignored): that orders the promotion before the issue in ptxas too. With fresh zeros instead, ptxas
        # sinks the promotions below the next issues, four partials are live and the consumers spill.
        p2 = gl.zeros([64, SUB], gl.int32, layout)
        p3 = gl.zeros([64, SUB], gl.int32, layout)
        for j in range(k_tiles):
            s = it % stages
            mbarrier.wait(ready.index(s), (it // stages) & 1)
            a = a_bufs.index(s).slice(HALF * 64, 64)
            b = b_bufs.index(s)
            xs = gl.load(xs_row + j)
            scale0 = xs * gl.load(ws_row0 + j)  # columns 0..127 of the tile: the first weight tile's scale
            scale1 = xs * gl.load(ws_row1 + j)
            p0 = warpgroup_mma(a, b.slice(0, SUB).permute((1, 0)), p2, use_acc=False, is_async=True)
            p1 = warpgroup_mma(a, b.slice(SUB, SUB).permute((1, 0)), p3, use_acc=False, is_async=True)
            p0 = warpgroup_mma_wait(1, deps=(p0,))
            acc0 = gl.fma(p0.to(gl.float32), scale0, acc0)
            acc0 = warpgroup_mma_wait(1, deps=(acc0,))  # and pinned before it in Triton's own scheduling
            p2 = warpgroup_mma(a, b.slice(2 * SUB, SUB).permute((1, 0)), p0, use_acc=False, is_async=True)
            p1 = warpgroup_mma_wait(1, deps=(p1,))
            acc1 = gl.fma(p1.to(gl.float32), scale0, acc1)
            acc1 = warpgroup_mma_wait(1, deps=(acc1,))  # and pinned before it in Triton's own scheduling
            p3 = warpgroup_mma(a, b.slice(3 * SUB, SUB).permute((1, 0)), p1, use_acc=False, is_async=True)
            p2 = warpgroup_mma_wait(1, deps=(p2,))
            acc2 = gl.fma(p2.to(gl.float32), scale1, acc2)
            acc2 = warpgroup_mma_wait(1, deps=(acc2,))  # and pinned before it in Triton's own scheduling
            p3 = warpgroup_mma_wait(0, deps=(p3,))
            mbarrier.arrive(empty.index(s), count=1)  # all four wgmmas of this slot are done
            acc3 = gl.fma(p3.to(gl.float32), scale1, acc3)
            it += 1
        rows = pid_m * BM + HALF * 64 + gl.arange(0, 64, layout=gl.SliceLayout(1, layout))
        cols = pid_n * BN + gl.arange(0, SUB, layout=gl.SliceLayout(0, layout))
        _store(y_ptr, bias_ptr, acc0, rows, cols, M, N, HAS_BIAS)
        _store(y_ptr, bias_ptr, acc1, rows, cols + SUB, M, N, HAS_BIAS)
        _store(y_ptr, bias_ptr, acc2, rows, cols + 2 * SUB, M, N, HAS_BIAS)
        _store(y_ptr, bias_ptr, acc3, rows, cols + 3 * SUB, M, N, HAS_BIAS)


@gluon.jit
def _partition_args(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles, STAGES: gl.constexpr,
                    GROUP_M: gl.constexpr):
    """The package kernel's shared ring and barriers: the arguments of every partition."""
    a_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BM, BK], a_desc.layout)
    b_bufs = gl.allocate_shared_memory(gl.int8, [STAGES, BN, BK], b_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    return (a_desc, b_desc, a_bufs, b_bufs, ready, empty, num_tiles, k_tiles, xs_ptr, ws_ptr, y_ptr, bias_ptr,
            M, N, GROUP_M)


@gluon.jit
def _pingpong_kernel(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles,
                     HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                     CONSUMER_REGS: gl.constexpr):
    args = _partition_args(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles, STAGES,
                           GROUP_M)
    if HAS_BIAS:
        gl.warp_specialize([(_pingpong_top_bias, args), (_pingpong_bottom_bias, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_pingpong_top, args), (_pingpong_bottom, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])


@gluon.jit
def _overlap64_kernel(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles,
                      HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, GROUP_M: gl.constexpr,
                      CONSUMER_REGS: gl.constexpr):
    args = _partition_args(a_desc, b_desc, xs_ptr, ws_ptr, y_ptr, bias_ptr, M, N, num_tiles, k_tiles, STAGES,
                           GROUP_M)
    if HAS_BIAS:
        gl.warp_specialize([(_overlap64_top_bias, args), (_overlap64_bottom_bias, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])
    else:
        gl.warp_specialize([(_overlap64_top, args), (_overlap64_bottom, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])


# the variants: kernels with the package kernel's signature (`int8_gluon._w8a8_gemm_ws_kernel`), and its config
KERNELS = {"pingpong": _pingpong_kernel, "overlap64": _overlap64_kernel}


def w8a8_gemm_variant(variant: str, x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor,
                      w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype):
    """`int8_gluon.w8a8_gemm_gluon` with the consumers of `variant` (a key of KERNELS) and the package config
    -> (y, the compiled kernel: its n_regs and n_spills as ptxas reports them on this machine)."""
    if variant not in KERNELS:
        raise ValueError(f"unknown variant {variant!r}; choose one of {sorted(KERNELS)}")
    y, (x_q, x_scale, w_q, w_scale, bias) = gemm_operands(x_q, x_scale, w_q, w_scale, bias, out_dtype)
    m, k = x_q.shape
    if k == 0:  # the ping-pong needs one window per consumer (see _consume_pingpong)
        raise ValueError("w8a8_gemm_variant: K = 0; these kernels need at least one 128-wide K block")
    if y.numel() == 0:
        return y, None
    n = w_q.shape[0]
    a_desc, b_desc = operand_descriptors(x_q, w_q)
    tiles = triton.cdiv(m, BM.value) * triton.cdiv(n, BN.value)
    index = x_q.device.index if x_q.device.index is not None else torch.cuda.current_device()
    cfg = GLUON_CONFIG
    compiled = KERNELS[variant][(min(tiles, _sm_count(index)),)](
        a_desc, b_desc, x_scale, w_scale, y, bias if bias is not None else y,  # y: an unused placeholder pointer
        m, n, tiles, k // BK.value,
        HAS_BIAS=bias is not None, STAGES=cfg["STAGES"], GROUP_M=cfg["GROUP_M"], CONSUMER_REGS=cfg["CONSUMER_REGS"],
        num_warps=4, maxnreg=cfg["maxnreg"],
    )
    return y, compiled


def guarded(what: str, fn, seconds: float = WATCHDOG_S):
    """fn() and a device synchronize, under a watchdog: past `seconds` the process prints what hung and exits
    (faulthandler's own thread: it fires even while this thread is blocked in the CUDA driver)."""
    import faulthandler

    print(f"[watchdog {seconds:.0f} s] {what}", flush=True)
    faulthandler.dump_traceback_later(seconds, exit=True)
    try:
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out
    finally:
        faulthandler.cancel_dump_traceback_later()


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", nargs=3, type=int, default=list(DEFAULT_SHAPE), metavar=("M", "K", "N"))
    ap.add_argument("--variants", nargs="+", choices=sorted(KERNELS), default=list(KERNELS))
    args = ap.parse_args(argv)
    m, k, n = args.shape
    if min(m, n) < 1 or k < 128 or k % 128:
        ap.error(f"--shape {m} {k} {n}: M and N must be positive and K a positive multiple of 128")
    return args


def main(argv=None):
    args = parse_args(argv)
    m, k, n = args.shape
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/int8_pingpong.py needs a Hopper GPU (compute capability 9.0): the Gluon kernels are sm_90a")
    from turbowan.kernels import int8_gluon as G
    from turbowan.kernels import int8_triton as K

    def triton_gemm(*ops):  # config overrides select the Triton kernel (`int8_triton.gemm_kernel`)
        return K.w8a8_gemm(*ops, **K.GEMM_CONFIG)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"package config {GLUON_CONFIG}", flush=True)
    g = torch.Generator("cuda").manual_seed(0)
    ragged = []
    for rm, rk, rn in RAGGED:
        rx, rxs, rw, rws = common.random_w8a8_operands(rm, rk, rn, g, scale=1.0)
        for dtype in (torch.bfloat16, torch.float16):
            for rb in (torch.randn(rn, device="cuda", generator=g).to(dtype), None):
                ops = (rx, rxs, rw, rws, rb, dtype)
                ragged.append((f"{rm}x{rk}x{rn} {str(dtype)[6:]} bias {rb is not None}", ops, triton_gemm(*ops)))
    exact, spills = {}, {}
    for name in args.variants:
        failed = []
        for i, (label, ops, want) in enumerate(ragged):
            try:
                if i == 0:
                    got, compiled = guarded(f"{name}: first launch ({label}, compile included)",
                                            lambda: w8a8_gemm_variant(name, *ops))
                    spills[name] = f"{compiled.n_regs} regs at launch, {compiled.n_spills} spilled"
                else:
                    got, _ = w8a8_gemm_variant(name, *ops)
                if not torch.equal(got, want):
                    failed.append(f"{label}: {int((got != want).sum())} differ")
            except Exception as exc:  # report and go on: one variant failing must not hide the others
                failed.append(f"{label}: {type(exc).__name__}: {str(exc)[:200]}")
                break
        exact[name] = not failed
        print(f"{name}: ragged bit-exact vs Triton on {len(ragged)} cases: "
              f"{'yes' if not failed else 'NO: ' + '; '.join(failed)} ({spills.get(name, 'not compiled')})",
              flush=True)

    xq, xs, wq, ws = common.random_w8a8_operands(m, k, n, g)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    ops = (xq, xs, wq, ws, bias, torch.bfloat16)
    want = triton_gemm(*ops)
    tops = 2 * m * n * k / 1e9
    print(f"M={m} K={k} N={n}, bf16 with bias; median of 10 after 3 warm-ups")
    print("| kernel | bit-exact vs Triton | ms | TOP/s |")
    print("|---|---|---|---|")
    triton_ms = common.median_ms(lambda: triton_gemm(*ops), reps=10, warmup=3)
    print(f"| ours (Triton `w8a8_gemm`) | - | {triton_ms:.2f} | {tops / triton_ms:.0f} |", flush=True)
    package = G.w8a8_gemm_gluon(*ops)
    package_ms = common.median_ms(lambda: G.w8a8_gemm_gluon(*ops), reps=10, warmup=3)
    print(f"| Gluon, package (`int8_gluon`) | {'yes' if torch.equal(package, want) else 'NO'} | {package_ms:.2f} | "
          f"{tops / package_ms:.0f} |", flush=True)
    values = {}
    for name in args.variants:
        if name not in spills:  # never compiled: the ragged failure above says why
            print(f"| Gluon, {name} | failed on the ragged shapes | | |", flush=True)
            continue
        got, _ = guarded(f"{name}: first launch at M={m} K={k} N={n}", lambda: w8a8_gemm_variant(name, *ops), 30.0)
        same = torch.equal(got, want)
        ms = common.median_ms(lambda: w8a8_gemm_variant(name, *ops), reps=10, warmup=3)
        print(f"| Gluon, {name} ({spills[name]}) | {'yes' if same and exact[name] else 'NO'} | {ms:.2f} | "
              f"{tops / ms:.0f} |", flush=True)
        if same and exact[name]:  # only a bit-exact result is recorded
            values[f"w8a8_gemm_720p_{name}_ms"] = round(ms, 3)
    if (m, k, n) == DEFAULT_SHAPE and values:
        common.merge_results(values, torch.cuda.get_device_name(), prefix="int8_pingpong_")
        print(f"merged into {common.RESULTS_JSON}: {values}")


if __name__ == "__main__":
    main()
