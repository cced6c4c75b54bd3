"""The SLA forward for Hopper (compute capability 9.0), warp-specialized in Gluon, Triton's low-level dialect.

Why: our Triton SLA kernel (`sla_triton`) runs its sparse part at ~450 TFLOP/s on the selected blocks: Triton keeps
every warp of a program on the same step, so the tensor cores wait while the softmax runs. Here the program is
split by role, as FlashAttention-3 does:
  * one loader warp brings the 128-row query tile once, then the K and V tiles of the selected 64-row key blocks
    (the block map's LUT), two blocks (128 keys) per step, by TMA into a ring of STAGES buffers;
  * two consumer warpgroups own 64 query rows each and run S = Q K^T (wgmma), the online softmax and O += P V
    (wgmma, P from registers), in FA3's ping-pong schedule: named barriers make the two take turns issuing their
    GEMMs, so one's softmax runs while the tensor cores work on the other's (`_attend`).
The sparse kernel writes the softmax branch o_s (rounded to bf16, as the reference does); a small Triton kernel
then adds the linear branch and proj_l with our kernels' own epilogue (`sla_common.linear_branch_and_store`). The
block map, key statistics and epilogue are `sla_triton`'s (`sla_common`), and the sparse loop does the same bf16
wgmmas over the same 128-key steps in the same order, so the output equals `sla_attention_triton`'s (bit for bit
on an H200; tests/test_sla_gluon_gpu.py allows bf16 noise, rel L2 <= 2e-3).

Chosen on an H200 (bench/sla_ws.py, topk 0.1, 40 heads x 128): ping-pong, 128 keys per step, 3 stages:
720p 26.84 ms against the Triton kernel's 28.83, 480p 6.50 against 7.04. Measured and dropped: 64 keys per step
(27.80 / 6.60 ms), 2 stages (slower), consumers without ping-pong (29.1 ms at 720p) and with FA3's intra-warpgroup
overlap (32-36 ms).

Limits: bf16 q, k, v, head dim 128, each of q, k, v one TMA row matrix [B*L, H*D] (`tma_row_matrix`: B = 1 or batch
entries back to back, heads side by side). `turbowan.kernels.sla_kernel` picks this kernel only for such inputs on a
compute capability 9.0 card, and `sla_triton.sla_attention_cuda` runs the Triton kernel everywhere else, or when
this module does not load (no Gluon in the installed Triton, a Gluon API this was not written for, a kernel that
does not compile here or does not fit the card's shared memory: `available()`). Compiled offline for sm_90a without
spills (tests/test_sla_gluon_compile.py). 229.6 KB of shared memory (Q, and 3 stages of 128-key K and V tiles).

Importing this module needs no Triton; `available()` says whether the kernel can run.
"""

from __future__ import annotations

import torch

from . import cuda_capability, gluon_api_matches, sla_contract, tma_row_matrix
from .sla_common import block_lut, key_stats, triton
from .sla_contract import LOG2E, check_sla_inputs

try:  # optional: without Gluon (no Triton, or a Triton before Gluon) `available()` is False
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
except ImportError:
    gluon = None

# STAGES: K/V ring depth; PAIR: 64-row key blocks per step (128 keys: the wgmma N of S and the K of PV);
# CONSUMER_REGS: the registers setmaxnreg gives the second consumer, a worker partition (the loader asks for 24; the
# default partition, the first consumer, gets what is left); maxnreg: the per-thread count at launch.
GLUON_CONFIG = dict(STAGES=3, PAIR=2, CONSUMER_REGS=240, maxnreg=168)


if gluon is not None:  # jit functions must be module globals: defined only where Gluon imports
    import triton.language as tl

    from .sla_common import linear_branch_and_store, load_row_block

    BLKQ = gl.constexpr(sla_contract.BLKQ)  # query rows per program
    BLKK = gl.constexpr(sla_contract.BLKK)  # key rows per LUT entry
    HEAD = gl.constexpr(128)
    HALF_ROWS = gl.constexpr(64)  # query rows per consumer warpgroup

    # Named barriers of the ping-pong schedule: TURN_BARRIER + HALF is "warpgroup HALF may issue its GEMMs", counted
    # over 256 threads (one warpgroup's bar.sync, the other's bar.arrive). Triton's own ids in this kernel's PTX are
    # 0 (the default partition's thread barrier), 1 (warp_specialize's fork and join, whole CTA) and 2 (the bottom
    # consumer's thread barrier), so 8 and 9 are free; a CTA has 16.
    TURN_BARRIER = gl.constexpr(8)

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
                # an unpaired tail step loads the last block again; the consumers mask it out. Rows past L (the
                # next batch entry's, or past the tensor: TMA fills zeros) are masked out too.
                row = kv_row + gl.load(lut_ptr + gl.minimum(j * pair + i, n_sel - 1)) * BLKK
                tma.async_copy_global_to_shared(k_desc, [row, col], ready.index(s),
                                                k_bufs.index(s).slice(i * BLKK, BLKK))
                tma.async_copy_global_to_shared(v_desc, [row, col], ready.index(s),
                                                v_bufs.index(s).slice(i * BLKK, BLKK))

    @gluon.jit
    def _mask_keys(s, lut_ptr, j, n_sel, L, pair: gl.constexpr, s_layout: gl.constexpr):
        """Scores of key rows that do not exist (past L in a partial last block, or an unpaired tail's repeat)
        -> -inf."""
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
        """One consumer warpgroup (query rows HALF * 64 .. + 64 of the program's block) in FlashAttention-3's
        inter-warpgroup ping-pong: each warpgroup's GEMMs are issued in windows (window 0: S_0; window j: S_j and
        P_{j-1} V_{j-1}; window n: P_{n-1} V_{n-1}; n = steps), and the two warpgroups' windows alternate, top
        first, by two named barriers, so one's softmax runs while the tensor cores work on the other's GEMMs.
        Window j: wait for ready[j], wait for the turn (bar.sync on TURN_BARRIER + HALF), issue, pass the turn
        (bar.arrive on the other's barrier), wait for the GEMMs, free the previous step's slot, then mask and
        softmax step j (its P is kept in registers for window j + 1).

        Turn barriers: the bottom warpgroup seeds the top's barrier once, so the top's window 0 goes first; each
        window's bar.sync completes with exactly one bar.arrive of the other warpgroup: the top syncs n + 1 times
        on its barrier, which gets the seed plus the bottom's arrivals after windows 0..n-1 (the bottom skips the
        arrive after its last window: no one would sync on it); the bottom syncs n + 1 times, the top arrives after
        each of its n + 1 windows. An arrival can never land in a barrier generation it does not belong to: the
        other warpgroup's next arrival comes only after its own next turn, which needs this sync to have completed
        first.

        Why it cannot deadlock with the loader's mbarriers (needs STAGES >= 2 and n >= 1, which the LUT's at least
        one block gives): order the windows top 0, bottom 0, top 1, bottom 1, ... Everything a window waits for
        comes from earlier windows: (a) its turn: the previous window's bar.arrive, issued right after that
        window's wgmma issue and before anything there can block; (b) ready[j]: the loader, which waits only on
        empty of step j - STAGES, released by both warpgroups in their windows j - STAGES + 1 <= j - 1 (each keeps
        arriving on `empty` once per step, the bottom included after it stops passing the turn), and TMA, which
        completes; (c) wgmma_wait: the tensor cores, which complete. Induction over that order: every window
        finishes. With STAGES = 1, window j would need the slot of step j - 1, which window j itself frees after
        its wait: a deadlock, hence the kernel's static_assert."""
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
        q = q_smem.slice(HALF * HALF_ROWS, HALF_ROWS)  # [64, 128] bf16: this warpgroup's query rows
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
        s = warpgroup_mma_wait(0, deps=(s,))  # unscaled q.k, fp32
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
    def _sla_sparse_kernel(q_desc, k_desc, v_desc, lut_ptr, out_ptr, L, H, n_sel, n_qblocks, sol, qk_scale_log2,
                           STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr, PAIR: gl.constexpr):
        """Program (query block, b * H + h): o_s of its 128 query rows over the LUT's selected key blocks."""
        gl.static_assert(STAGES >= 2,
                         "the ping-pong consumers hold a step's slot until their next window: STAGES >= 2")
        qblk = gl.program_id(0)
        bh = gl.program_id(1)
        b = bh // H
        h = bh % H
        q_row = b * L + qblk * BLKQ  # rows of the [B*L, H*D] matrices
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

        args = (q_desc, k_desc, v_desc, q_smem, k_bufs, v_bufs, q_bar, ready, empty, lut, n_sel, q_row, kv_row, col,
                out_ptr, L, sol, qk_scale_log2)
        # the first partition is the default one (the kernel's own 4 warps); the loader is one warp with 24 registers
        gl.warp_specialize([(_consumer_top, args), (_consumer_bottom, args), (_loader, args)], [4, 1],
                           [CONSUMER_REGS, 24])

    @triton.jit
    def _linear_epilogue_kernel(Q, KV, KSUM, W, BIAS, OUT, L, H, sqb, sql, sqh, sob, sol, soh,
                                BLOCK_M: tl.constexpr, D: tl.constexpr):
        """out = o_s (already in OUT) + proj_l(linear branch of q): our kernels' epilogue, in place, per query
        block."""
        _, bh, offs_m, offs_d, q_real, q = load_row_block(Q, L, H, sqb, sql, sqh, BLOCK_M, D)
        b, h = bh // H, bh % H
        o_s = tl.load(OUT + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], mask=q_real[:, None],
                      other=0.0)
        linear_branch_and_store(q.to(tl.bfloat16), o_s, KV, KSUM, W, BIAS, OUT, bh, b, h, offs_m, offs_d, q_real,
                                sob, sol, soh, BLOCK_M, D, False, False)


def available() -> bool:
    """Gluon imports, is the API the kernel is written for, a CUDA device is present, and the kernel compiles for the
    current device and fits its shared memory (the caller checks that it is a Hopper card). The compile check runs
    once per process (`turbowan.kernels._load` caches this answer) and is cached on disk by Triton."""
    if gluon is None or not gluon_api_matches() or not torch.cuda.is_available():
        return False
    driver = triton.runtime.driver.active
    kernel = compile_for(driver.get_current_target())
    return kernel.metadata.shared <= driver.utils.get_device_properties(driver.get_current_device())["max_shared_mem"]


def _descriptors(q_rows: torch.Tensor, k_rows: torch.Tensor, v_rows: torch.Tensor):
    """TMA descriptors of the [B*L, H*D] bf16 row matrices: a [128, 128] query box and [64, 128] key and value boxes
    (block shapes as plain ints: the host side rejects constexpr-wrapped ones)."""
    q_layout = gl.NVMMASharedLayout.get_default_for([128, 128], gl.bfloat16)
    kv_layout = gl.NVMMASharedLayout.get_default_for([64, 128], gl.bfloat16)
    return (TensorDescriptor.from_tensor(q_rows, [128, 128], q_layout),
            TensorDescriptor.from_tensor(k_rows, [64, 128], kv_layout),
            TensorDescriptor.from_tensor(v_rows, [64, 128], kv_layout))


def compile_for(target):
    """The sparse kernel with GLUON_CONFIG compiled ahead of time for a `triton.backends.compiler.GPUTarget` (no GPU
    needed): `available()` checks that it builds here, tests/test_sla_gluon_compile.py reads its PTX and registers."""
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    rows = torch.zeros(256, 256, dtype=torch.bfloat16)
    q_desc, k_desc, v_desc = _descriptors(rows, rows, rows)
    signature = dict(q_desc=mangle_type(q_desc), k_desc=mangle_type(k_desc), v_desc=mangle_type(v_desc),
                     lut_ptr="*i32", out_ptr="*bf16", L="i32", H="i32", n_sel="i32", n_qblocks="i32", sol="i32",
                     qk_scale_log2="fp32", STAGES="constexpr", CONSUMER_REGS="constexpr", PAIR="constexpr")
    cfg = GLUON_CONFIG
    constexprs = dict(STAGES=cfg["STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"], PAIR=cfg["PAIR"])
    return triton.compile(GluonASTSource(_sla_sparse_kernel, signature, constexprs), target=target,
                          options=dict(num_warps=4, maxnreg=cfg["maxnreg"]))


def _rows_view(x: torch.Tensor) -> torch.Tensor:
    """(B, L, H, D) -> the [B*L, H*D] matrix TMA reads, a view (`tma_row_matrix` must hold)."""
    b, length, h, d = x.shape
    return x.as_strided((b * length, h * d), (x.stride(1), 1))


def sla_attention_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_l_weight: torch.Tensor,
                        proj_l_bias: torch.Tensor, topk: float) -> torch.Tensor:
    """`sla_triton.sla_attention_triton`'s contract on a Hopper card, with this kernel for the sparse part.

    q, k, v: (B, L, H, 128) bf16 CUDA tensors, each one TMA row matrix (`tma_row_matrix`: B = 1 or batch entries
    back to back, heads side by side; other inputs: use `sla_triton.sla_attention_cuda`, which picks the kernel).
    proj_l: weight (128, 128), bias (128,). -> (B, L, H, 128) contiguous bf16.
    """
    check_sla_inputs(q, k, v, proj_l_weight, proj_l_bias)
    b, length, h, d = q.shape
    if q.dtype != torch.bfloat16 or d != 128:
        raise ValueError(f"sla_attention_gluon takes bf16 q, k, v with head dim 128, got {q.dtype} with head dim {d}; "
                         "use turbowan.kernels.sla_triton.sla_attention_cuda, which runs the Triton kernel for these.")
    if cuda_capability(q) != (9, 0):
        raise ValueError(f"sla_attention_gluon runs on a compute capability 9.0 GPU (H100/H200), not on {q.device}; "
                         "use turbowan.kernels.sla_triton.sla_attention_cuda, which runs the Triton kernel elsewhere.")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not tma_row_matrix(x):
            raise ValueError(f"sla_attention_gluon reads {name} as one [B*L, H*D] matrix, but its strides "
                             f"{tuple(x.stride())} do not allow that (heads side by side, batch entries back to back, "
                             "16-byte aligned); use turbowan.kernels.sla_triton.sla_attention_cuda, which takes any "
                             "strides.")
    cfg = GLUON_CONFIG
    k_mean, k_sum, kv = key_stats(k, v, torch.bfloat16)
    lut, count = block_lut(q, k, k_mean, topk, sla_contract.BLKQ, sla_contract.BLKK)
    lut = lut.to(torch.int32).contiguous()
    out = torch.empty(b, length, h, d, dtype=q.dtype, device=q.device)
    n_qblocks = lut.shape[1]
    q_desc, k_desc, v_desc = _descriptors(_rows_view(q), _rows_view(k), _rows_view(v))
    _sla_sparse_kernel[(n_qblocks, b * h)](
        q_desc, k_desc, v_desc, lut, out, length, h, count, n_qblocks, out.stride(1), d**-0.5 * LOG2E,
        STAGES=cfg["STAGES"], CONSUMER_REGS=cfg["CONSUMER_REGS"], PAIR=cfg["PAIR"], num_warps=4,
        maxnreg=cfg["maxnreg"])
    _linear_epilogue_kernel[(n_qblocks, b * h)](
        q, kv, k_sum, proj_l_weight.to(torch.bfloat16).contiguous(), proj_l_bias.to(torch.bfloat16).contiguous(),
        out, length, h, q.stride(0), q.stride(1), q.stride(2), out.stride(0), out.stride(1), out.stride(2),
        BLOCK_M=128, D=d, num_warps=8)
    return out
