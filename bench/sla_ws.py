"""A warp-specialized SLA forward in Gluon (Triton 3.6's low-level dialect) against ours, in output and in time.

    python bench/sla_ws.py [--res 720p 480p] [--topk 0.1] [--consumers plain pipelined pingpong]

Why: our Triton SLA kernel runs its sparse part at ~450 TFLOP/s on the selected blocks (25 ms of the 720p
forward): Triton keeps every warp of the CTA on the same step, so the tensor cores wait while the softmax runs.
Here the CTA is split by role, as FlashAttention-3 does:
  * one loader warp brings the 128-row query tile once, then the K and V tiles of each selected 64-row key block
    (the block map's LUT) by TMA into a ring of STAGES buffers;
  * two consumer warpgroups own 64 query rows each and run S = Q K^T (wgmma), the online softmax, and
    O += P V (wgmma, P from registers); they meet only at the loader's mbarriers, so one's softmax overlaps the
    other's matmuls.
The sparse kernel writes the softmax branch o_s (rounded to bf16, as the reference does); a small Triton kernel
then adds the linear branch and proj_l with our kernels' own epilogue (`sla_common.linear_branch_and_store`), so the
output is ours up to the order of bf16 sums. The script checks that (relative L2 and max difference against
`sla_attention_triton`) and times both, with the block map and key statistics shared.
Limits of this first version: bf16, head dim 128, B = 1 or batch-contiguous q/k/v. Variants: one or two 64-row
key blocks per step (`pair`); consumers plain, pipelined (FA3's intra-warpgroup overlap) or pingpong (FA3's
inter-warpgroup schedule: named barriers make the two consumers take turns issuing their GEMMs, see
`_attend_pingpong`; STAGES >= 2).
"""

from __future__ import annotations

import argparse

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (mbarrier, tma, warpgroup_mma, warpgroup_mma_init,
                                                             warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

import common
from turbowan.kernels.sla_common import block_lut, key_stats, linear_branch_and_store, load_row_block
from turbowan.kernels.sla_contract import LOG2E
from turbowan.kernels.sla_triton import sla_attention_triton

BLKQ = gl.constexpr(128)
BLKK = gl.constexpr(64)
HEAD = gl.constexpr(128)
HALF_ROWS = gl.constexpr(64)  # query rows per consumer warpgroup


@gluon.jit
def _loader(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row,
            col, out_ptr, L, sol, qk_scale_log2):
    stages: gl.constexpr = k_bufs.type.shape[0]
    pair: gl.constexpr = k_bufs.type.shape[1] // BLKK  # key blocks per step
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q_row, col], q_bar, q_smem)
    for j in range(gl.cdiv(n_sel, pair)):
        s = j % stages
        mbarrier.wait(empty.index(s), ((j // stages) & 1) ^ 1)  # a fresh barrier counts as freed
        mbarrier.expect(ready.index(s), pair * (k_desc.block_type.nbytes + v_desc.block_type.nbytes))
        for i in gl.static_range(pair):
            # an unpaired tail step loads the last block again; the consumers mask it out
            row = kv_row + gl.load(lut_ptr + gl.minimum(j * pair + i, n_sel - 1)) * BLKK
            tma.async_copy_global_to_shared(k_desc, [row, col], ready.index(s), k_bufs.index(s).slice(i * BLKK, BLKK))
            tma.async_copy_global_to_shared(v_desc, [row, col], ready.index(s), v_bufs.index(s).slice(i * BLKK, BLKK))


@gluon.jit
def _mask_keys(s, lut_ptr, j, n_sel, L, pair: gl.constexpr, s_layout: gl.constexpr):
    """Scores of key rows that do not exist (past L in a partial last block, or an unpaired tail's repeat) -> -inf."""
    column = gl.arange(0, BLKK * pair, layout=gl.SliceLayout(0, s_layout))
    key = gl.zeros_like(column)  # the key row of each score column (column // BLKK picks the block)
    real = column < 0
    for i in gl.static_range(pair):
        step = j * pair + i
        block = gl.load(lut_ptr + gl.minimum(step, n_sel - 1))
        mine = column // BLKK == i
        key = gl.where(mine, block * BLKK + column % BLKK, key)
        real = gl.where(mine, step < n_sel, real)
    return gl.where(gl.expand_dims(real & (key < L), 0), s, float("-inf"))


@gluon.jit
def _softmax_step(s, m_i, l_i, acc, qk_scale_log2, o_rows: gl.constexpr):
    """Our kernels' online softmax on one step's scores: the max of the scaled scores, exp2 with the scale folded
    in, the running sum and the accumulator rescaled -> (p, m_new, l_i, acc)."""
    m_new = gl.maximum(m_i, gl.max(s, axis=1) * qk_scale_log2)
    p = gl.exp2(s * qk_scale_log2 - gl.expand_dims(m_new, 1))
    alpha = gl.exp2(m_i - m_new)
    l_i = l_i * alpha + gl.sum(p, axis=1)
    return p, m_new, l_i, acc * gl.expand_dims(gl.convert_layout(alpha, o_rows), 1)


@gluon.jit
def _store_rows(acc, l_i, q_row, kv_row, col, out_ptr, L, sol, HALF: gl.constexpr, o_layout: gl.constexpr):
    """o_s = acc / l, rounded to bf16 as the reference does, written for this warpgroup's rows that exist."""
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    o_s = (acc / gl.expand_dims(gl.convert_layout(l_i, o_rows), 1)).to(gl.bfloat16)
    local = q_row - kv_row + HALF * HALF_ROWS + gl.arange(0, HALF_ROWS, layout=o_rows)  # rows of this batch entry
    d = gl.arange(0, HEAD, layout=gl.SliceLayout(0, o_layout))
    ptrs = out_ptr + gl.expand_dims((kv_row + local).to(gl.int64) * sol, 1) + col + gl.expand_dims(d, 0)
    gl.store(ptrs, o_s, mask=gl.expand_dims(local < L, 1) & gl.expand_dims(d < HEAD, 0))  # rows past L: none


# Partition functions share one signature and cannot carry constexpr arguments through the fork, so the two
# consumers are two thin functions over one body with the half as a literal.
@gluon.jit
def _consumer_top(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row,
                  kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L, sol,
            qk_scale_log2, 0)


@gluon.jit
def _consumer_bottom(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row,
                     kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L, sol,
            qk_scale_log2, 1)


@gluon.jit
def _attend(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L, sol,
            qk_scale_log2, HALF: gl.constexpr):
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]  # keys per step: `pair` blocks of BLKK
    pair: gl.constexpr = block_n // BLKK
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bar, 0)
    q = q_smem.slice(HALF * HALF_ROWS, HALF_ROWS)  # [64, 128] bf16: this warpgroup's query rows
    m_i = gl.full([HALF_ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([HALF_ROWS], gl.float32, s_rows)
    acc = gl.zeros([HALF_ROWS, HEAD], gl.float32, o_layout)
    for j in range(gl.cdiv(n_sel, pair)):
        s_idx = j % stages
        mbarrier.wait(ready.index(s_idx), (j // stages) & 1)
        s = warpgroup_mma(q, k_bufs.index(s_idx).permute((1, 0)),
                          gl.zeros([HALF_ROWS, block_n], gl.float32, s_layout), use_acc=False, is_async=True)
        s = warpgroup_mma_wait(0, deps=(s,))  # unscaled q.k, fp32
        s = _mask_keys(s, lut_ptr, j, n_sel, L, pair, s_layout)
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale_log2, o_rows)
        o = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(s_idx), acc, is_async=True)
        acc = warpgroup_mma_wait(0, deps=(o,))
        mbarrier.arrive(empty.index(s_idx), count=1)  # both matmuls on this slot are done
    _store_rows(acc, l_i, q_row, kv_row, col, out_ptr, L, sol, HALF, o_layout)


@gluon.jit
def _consumer_top_pipelined(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel,
                            q_row, kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend_pipelined(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                      sol, qk_scale_log2, 0)


@gluon.jit
def _consumer_bottom_pipelined(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel,
                               q_row, kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend_pipelined(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                      sol, qk_scale_log2, 1)


@gluon.jit
def _attend_pipelined(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                      sol, qk_scale_log2, HALF: gl.constexpr):
    """`_attend` with FlashAttention-3's intra-warpgroup overlap: S of the next key block is issued before the
    softmax of this one, so the softmax runs while the tensor cores compute it. The last step issues a spare S on
    its own block (one extra QK^T per query block) instead of branching."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]  # keys per step: `pair` blocks of BLKK
    pair: gl.constexpr = block_n // BLKK
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)

    mbarrier.wait(q_bar, 0)
    q = q_smem.slice(HALF * HALF_ROWS, HALF_ROWS)
    m_i = gl.full([HALF_ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([HALF_ROWS], gl.float32, s_rows)
    # carried through the loop as an in-flight wgmma result (the PV of the previous step)
    acc = warpgroup_mma_init(gl.zeros([HALF_ROWS, HEAD], gl.float32, o_layout))
    n_steps = gl.cdiv(n_sel, pair)
    mbarrier.wait(ready.index(0), 0)
    s_next = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), gl.zeros([HALF_ROWS, block_n], gl.float32, s_layout),
                           use_acc=False, is_async=True)
    for j in range(n_steps):
        s_idx = j % stages
        # S_j and the previous PV are done: the previous block's slot goes back to the loader
        s, acc = warpgroup_mma_wait(0, deps=(s_next, acc))
        mbarrier.arrive(empty.index((j + stages - 1) % stages), count=1, pred=j > 0)
        nxt = gl.minimum(j + 1, n_steps - 1)
        mbarrier.wait(ready.index(nxt % stages), (nxt // stages) & 1)
        s_next = warpgroup_mma(q, k_bufs.index(nxt % stages).permute((1, 0)),
                               gl.zeros([HALF_ROWS, block_n], gl.float32, s_layout), use_acc=False, is_async=True)
        s = _mask_keys(s, lut_ptr, j, n_sel, L, pair, s_layout)
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale_log2, o_rows)
        acc = warpgroup_mma(gl.convert_layout(p.to(gl.bfloat16), p_layout), v_bufs.index(s_idx), acc,
                            is_async=True)
    _, acc = warpgroup_mma_wait(0, deps=(s_next, acc))
    _store_rows(acc, l_i, q_row, kv_row, col, out_ptr, L, sol, HALF, o_layout)


# Named barriers of the ping-pong schedule: TURN_BARRIER + HALF is "warpgroup HALF may issue its GEMMs", counted
# over 256 threads (one warpgroup's bar.sync, the other's bar.arrive). Triton's own ids in these kernels' PTX are
# 0 (the default partition's thread barrier), 1 (warp_specialize's fork and join, whole CTA) and 2 (the bottom
# consumer's thread barrier), so 8 and 9 are free; a CTA has 16.
TURN_BARRIER = gl.constexpr(8)


@gluon.jit
def _turn_wait(bar_id):
    """bar.sync: block this warpgroup until the other consumer has arrived on `bar_id` (its GEMMs are issued).
    inline_asm needs a result; is_pure=False keeps it from being removed or merged."""
    gl.inline_asm_elementwise("bar.sync $1, 256;\n\tmov.u32 $0, 0;", "=r,r", [bar_id], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _turn_pass(bar_id):
    """bar.arrive: let the other consumer, waiting on `bar_id`, issue its GEMMs; this warpgroup does not wait."""
    gl.inline_asm_elementwise("bar.arrive $1, 256;\n\tmov.u32 $0, 0;", "=r,r", [bar_id], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _consumer_top_pingpong(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel,
                           q_row, kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend_pingpong(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                     sol, qk_scale_log2, 0)


@gluon.jit
def _consumer_bottom_pingpong(q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel,
                              q_row, kv_row, col, out_ptr, L, sol, qk_scale_log2):
    _attend_pingpong(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                     sol, qk_scale_log2, 1)


@gluon.jit
def _attend_pingpong(q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut_ptr, n_sel, q_row, kv_row, col, out_ptr, L,
                     sol, qk_scale_log2, HALF: gl.constexpr):
    """`_attend` with FlashAttention-3's inter-warpgroup ping-pong: each warpgroup's GEMMs are issued in windows
    (window 0: S_0; window j: S_j and P_{j-1} V_{j-1}; window n: P_{n-1} V_{n-1}; n = steps), and the two
    warpgroups' windows alternate, top first, by two named barriers, so one's softmax runs while the tensor cores
    work on the other's GEMMs. Window j: wait for ready[j], wait for the turn (bar.sync on TURN_BARRIER + HALF),
    issue, pass the turn (bar.arrive on the other's barrier), wait for the GEMMs, free the previous step's slot,
    then mask and softmax step j (its P is kept in registers for window j + 1).

    Turn barriers: the bottom warpgroup seeds the top's barrier once, so the top's window 0 goes first; each
    window's bar.sync completes with exactly one bar.arrive of the other warpgroup: the top syncs n + 1 times on
    its barrier, which gets the seed plus the bottom's arrivals after windows 0..n-1 (the bottom skips the arrive
    after its last window: no one would sync on it); the bottom syncs n + 1 times, the top arrives after each of
    its n + 1 windows. An arrival can never land in a barrier generation it does not belong to: the other
    warpgroup's next arrival comes only after its own next turn, which needs this sync to have completed first.

    Why it cannot deadlock with the loader's mbarriers (needs STAGES >= 2 and n >= 1, as every variant): order
    the windows top 0, bottom 0, top 1, bottom 1, ... Everything a window waits for comes from earlier windows:
    (a) its turn: the previous window's bar.arrive, issued right after that window's wgmma issue and before
    anything there can block; (b) ready[j]: the loader, which waits only on empty of step j - STAGES, released by
    both warpgroups in their windows j - STAGES + 1 <= j - 1 (each keeps arriving on `empty` once per step, the
    bottom included after it stops passing the turn), and TMA, which completes; (c) wgmma_wait: the tensor
    cores, which complete. Induction over that order: every window finishes. With STAGES = 1, window j would need
    the slot of step j - 1, which window j itself frees after its wait: a deadlock, hence the static_assert."""
    stages: gl.constexpr = k_bufs.type.shape[0]
    block_n: gl.constexpr = k_bufs.type.shape[1]  # keys per step: `pair` blocks of BLKK
    pair: gl.constexpr = block_n // BLKK
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, block_n, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_rows: gl.constexpr = gl.SliceLayout(1, s_layout)
    o_rows: gl.constexpr = gl.SliceLayout(1, o_layout)
    my_turn = TURN_BARRIER + HALF
    their_turn = TURN_BARRIER + 1 - HALF

    if HALF == 1:
        _turn_pass(their_turn)  # the seed: the top warpgroup's first window goes first
    mbarrier.wait(q_bar, 0)
    q = q_smem.slice(HALF * HALF_ROWS, HALF_ROWS)
    m_i = gl.full([HALF_ROWS], float("-inf"), gl.float32, s_rows)
    l_i = gl.zeros([HALF_ROWS], gl.float32, s_rows)
    acc = gl.zeros([HALF_ROWS, HEAD], gl.float32, o_layout)
    n_steps = gl.cdiv(n_sel, pair)

    # window 0: S_0 alone
    mbarrier.wait(ready.index(0), 0)
    _turn_wait(my_turn)
    s = warpgroup_mma(q, k_bufs.index(0).permute((1, 0)), gl.zeros([HALF_ROWS, block_n], gl.float32, s_layout),
                      use_acc=False, is_async=True)
    _turn_pass(their_turn)
    s = warpgroup_mma_wait(0, deps=(s,))
    s = _mask_keys(s, lut_ptr, 0, n_sel, L, pair, s_layout)
    p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale_log2, o_rows)
    p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    # windows 1..n-1: S_j and the previous step's PV
    for j in range(1, n_steps):
        s_idx = j % stages
        prev = (j + stages - 1) % stages
        mbarrier.wait(ready.index(s_idx), (j // stages) & 1)
        _turn_wait(my_turn)
        s = warpgroup_mma(q, k_bufs.index(s_idx).permute((1, 0)),
                          gl.zeros([HALF_ROWS, block_n], gl.float32, s_layout), use_acc=False, is_async=True)
        o = warpgroup_mma(p, v_bufs.index(prev), acc, is_async=True)
        _turn_pass(their_turn)
        s, acc = warpgroup_mma_wait(0, deps=(s, o))
        mbarrier.arrive(empty.index(prev), count=1)  # K and V of step j - 1 are read
        s = _mask_keys(s, lut_ptr, j, n_sel, L, pair, s_layout)
        p, m_i, l_i, acc = _softmax_step(s, m_i, l_i, acc, qk_scale_log2, o_rows)
        p = gl.convert_layout(p.to(gl.bfloat16), p_layout)
    # window n: the last PV
    last = (n_steps - 1) % stages
    _turn_wait(my_turn)
    o = warpgroup_mma(p, v_bufs.index(last), acc, is_async=True)
    if HALF == 0:
        _turn_pass(their_turn)  # the bottom's last window; the top has no window left to let go
    acc = warpgroup_mma_wait(0, deps=(o,))
    mbarrier.arrive(empty.index(last), count=1)
    _store_rows(acc, l_i, q_row, kv_row, col, out_ptr, L, sol, HALF, o_layout)


@gluon.jit
def _partition_args(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                    STAGES: gl.constexpr, PAIR: gl.constexpr):
    """This program's query block and head, its shared buffers and barriers: the arguments of every partition."""
    qblk = gl.program_id(0)
    bh = gl.program_id(1)
    b = bh // H
    h = bh % H
    q_row = b * L + qblk * BLKQ
    kv_row = b * L
    col = h * HEAD
    lut = lut_ptr + (bh * n_qblocks + qblk).to(gl.int64) * n_sel

    q_smem = gl.allocate_shared_memory(gl.bfloat16, [BLKQ, HEAD], q_desc.layout)
    k_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAIR * BLKK, HEAD], k_desc.layout)
    v_bufs = gl.allocate_shared_memory(gl.bfloat16, [STAGES, PAIR * BLKK, HEAD], v_desc.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per consumer warpgroup
    return (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut, n_sel, q_row, kv_row, col,
            out_ptr, L, sol, qk_scale_log2)


@gluon.jit
def _sla_sparse_ws_kernel(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                          STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PAIR: gl.constexpr):
    args = _partition_args(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                           STAGES, PAIR)
    gl.warp_specialize([(_consumer_top, args), (_consumer_bottom, args), (_loader, args)], [4, 1],
                       [CONSUMER_REGS, 24])


@gluon.jit
def _sla_sparse_ws_pipelined_kernel(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol,
                                    qk_scale_log2, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                    PAIR: gl.constexpr):
    args = _partition_args(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                           STAGES, PAIR)
    gl.warp_specialize([(_consumer_top_pipelined, args), (_consumer_bottom_pipelined, args), (_loader, args)],
                       [4, 1], [CONSUMER_REGS, 24])


@gluon.jit
def _sla_sparse_ws_pingpong_kernel(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol,
                                   qk_scale_log2, STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                   PAIR: gl.constexpr):
    gl.static_assert(STAGES >= 2, "the ping-pong consumers hold a step's slot until their next window: STAGES >= 2")
    args = _partition_args(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                           STAGES, PAIR)
    gl.warp_specialize([(_consumer_top_pingpong, args), (_consumer_bottom_pingpong, args), (_loader, args)],
                       [4, 1], [CONSUMER_REGS, 24])


KERNELS = {"plain": _sla_sparse_ws_kernel, "pipelined": _sla_sparse_ws_pipelined_kernel,
           "pingpong": _sla_sparse_ws_pingpong_kernel}


@triton.jit
def _linear_epilogue_kernel(Q, KV, KSUM, W, BIAS, OUT, L, H, sqb, sql, sqh, sob, sol, soh,
                            BLOCK_M: tl.constexpr, D: tl.constexpr):
    """out = o_s (already in OUT) + proj_l(linear branch of q): our kernels' epilogue, in place, per query block."""
    _, bh, offs_m, offs_d, q_real, q = load_row_block(Q, L, H, sqb, sql, sqh, BLOCK_M, D)
    b, h = bh // H, bh % H
    o_s = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], mask=q_real[:, None], other=0.0)
    linear_branch_and_store(q.to(tl.bfloat16), o_s, KV, KSUM, W, BIAS, OUT, bh, b, h, offs_m, offs_d, q_real,
                            sob, sol, soh, BLOCK_M, D, False, False)


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> the [B*L, H*D] matrix TMA reads (needs B == 1 or batch entries back to back)."""
    b, length, h, d = x.shape
    if x.stride(3) != 1 or x.stride(2) != d or (b > 1 and x.stride(0) != length * x.stride(1)):
        raise ValueError("sla_ws needs (B, L, H, D) with contiguous heads and batch entries back to back")
    return x.as_strided((b * length, h * d), (x.stride(1), 1))


def sla_attention_ws(q, k, v, proj_l_weight, proj_l_bias, topk, stages=3, consumer_regs=240, maxnreg=168,
                     consumers="pipelined", pair=1):
    b, length, h, d = q.shape
    if q.dtype != torch.bfloat16 or d != 128:
        raise ValueError("sla_ws handles bf16 with head dim 128")
    if consumers not in KERNELS:
        raise ValueError(f"consumers={consumers!r} is not a variant; use one of {sorted(KERNELS)}")
    if pair not in (1, 2) or stages < (2 if consumers == "pingpong" else 1):
        raise ValueError(f"pair must be 1 or 2 and stages at least {2 if consumers == 'pingpong' else 1} "
                         f"for {consumers} (got pair={pair}, stages={stages})")
    k_mean, k_sum, kv = key_stats(k, v, torch.bfloat16)
    lut, count = block_lut(q, k, k_mean, topk, 128, 64)
    lut = lut.to(torch.int32).contiguous()
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)
    n_qblocks = lut.shape[1]
    q_layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    q_desc = TensorDescriptor.from_tensor(_rows_view(q), [128, 128], q_layout)
    k_desc = TensorDescriptor.from_tensor(_rows_view(k), [64, 128], kv_layout)
    v_desc = TensorDescriptor.from_tensor(_rows_view(v), [64, 128], kv_layout)
    KERNELS[consumers][(n_qblocks, b * h)](q_desc, k_desc, v_desc, lut, out, length, h, count, n_qblocks,
                                              out.stride(1), d**-0.5 * LOG2E, STAGES=stages,
                                           CONSUMER_REGS=consumer_regs, PAIR=pair, num_warps=4, maxnreg=maxnreg)
    _linear_epilogue_kernel[(n_qblocks, b * h)](
        q, kv, k_sum, proj_l_weight.to(torch.bfloat16).contiguous(), proj_l_bias.to(torch.bfloat16).contiguous(),
        out, length, h, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=128, D=d, num_warps=8)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--res", nargs="+", default=["720p", "480p"], choices=["720p", "480p"])
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--consumers", nargs="+", default=sorted(KERNELS), choices=sorted(KERNELS),
                    help="which consumer variants to run (default: all)")
    args = ap.parse_args()
    if not 0 < args.topk <= 1:
        ap.error(f"--topk {args.topk} is not a fraction of the key blocks; give a value in (0, 1]")
    tokens = {"720p": 21 * 45 * 80, "480p": 21 * 30 * 52}
    g = torch.Generator("cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"40 heads x 128, topk {args.topk}")
    print("| res | kernel | config | ms | rel L2 vs ours | max abs diff |")
    print("|---|---|---|---|---|---|")
    for res in args.res:
        shape = (1, tokens[res], 40, 128)
        q, k, v = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
        w = (torch.randn(128, 128, device="cuda", generator=g) / 128**0.5).to(torch.bfloat16)
        bias = torch.zeros(128, device="cuda", dtype=torch.bfloat16)
        ours = sla_attention_triton(q, k, v, w, bias, args.topk)
        ms = common.median_ms(lambda: sla_attention_triton(q, k, v, w, bias, args.topk), reps=10, warmup=2)
        print(f"| {res} | ours (Triton) | default | {ms:.2f} | - | - |", flush=True)
        for consumers, pair, stages in (("plain", 1, 3), ("pipelined", 1, 3), ("pipelined", 1, 4),
                                        ("plain", 2, 2), ("pipelined", 2, 2), ("pingpong", 1, 2),
                                        ("pingpong", 1, 3), ("pingpong", 2, 2), ("pingpong", 2, 3)):
            if consumers not in args.consumers:
                continue
            regs = 240
            cfg = f"{consumers}, {64 * pair} keys per step, stages {stages}"
            try:
                got = sla_attention_ws(q, k, v, w, bias, args.topk, stages=stages, consumer_regs=regs,
                                       consumers=consumers, pair=pair)
                torch.cuda.synchronize()
            except Exception as exc:  # report and go on
                print(f"| {res} | Gluon warp-specialized | {cfg} | failed: {type(exc).__name__}: {str(exc)[:300]} "
                      "| | |", flush=True)
                continue
            rel = float((got.float() - ours.float()).norm() / ours.float().norm())
            diff = float((got.float() - ours.float()).abs().max())
            ms = common.median_ms(lambda: sla_attention_ws(q, k, v, w, bias, args.topk, stages=stages,
                                                           consumer_regs=regs, consumers=consumers, pair=pair),
                                  reps=10, warmup=2)
            print(f"| {res} | Gluon warp-specialized | {cfg} | {ms:.2f} | {rel:.1e} | {diff:.1e} |", flush=True)


if __name__ == "__main__":
    main()
