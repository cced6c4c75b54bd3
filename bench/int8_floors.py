"""Where the W8A8 GEMM's time goes: the same tile shape with and without the per-128-K-block promotion.

    python bench/int8_floors.py [--shape 75600 5120 13824]

Issue 14 asks for the W8A8 GEMM at >= 1200 TOP/s. The reference's numerics need an fp32 fma per output element
per 128-wide K block (`turbowan.kernels.int8_triton`). To tell that cost from the tensor cores' own rate, this
times, on one shape, in one run:
  * cuBLAS: bf16 `F.linear`, int8 `torch._int_mm`, fp8 e4m3 `torch._scaled_mm` (per-tensor scales);
  * plain Triton GEMMs with our tile (128 x 256 x 128, 8 warps, 4 stages, TMA operands): int8 with one int32
    accumulator over all of K (no promotion: not our numerics), and fp8 e4m3 with an fp32 accumulator;
  * our W8A8 GEMM (per-block promotion, bit-exact to the emulation).
The plain int8 kernel is checked against torch._int_mm (exactly); the fp8 one's difference from an fp32 product
is printed (Hopper's fp8 tensor cores accumulate with reduced precision).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

import common
from turbowan.kernels.int8_triton import grouped_tile, w8a8_gemm


@triton.jit
def _plain_gemm_kernel(a_desc, b_desc, c_ptr, M, N, K, GROUP_M: tl.constexpr, ACC_INT: tl.constexpr):
    BM: tl.constexpr = 128
    BN: tl.constexpr = 256
    BK: tl.constexpr = 128
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    if ACC_INT:
        acc = tl.zeros((BM, BN), dtype=tl.int32)
    else:
        acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, K, BK):
        a = a_desc.load([pid_m * BM, k])
        b = b_desc.load([pid_n * BN, k])
        acc = tl.dot(a, b.T, acc, out_dtype=acc.dtype)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], acc.to(tl.float32), mask=mask)


@triton.jit
def _magic_chunk(acc, a, s, w_desc, n0, j):
    """acc += float(a @ W[n0:n0+128, 128j:...].T) * s, the int32 -> fp32 conversion without I2F: the tensor cores
    add the dot to 0x4B400000 (1.5 * 2**23 as float bits), so the int32 result read as fp32 is 1.5 * 2**23 + dot
    exactly (|dot| <= 2**21); one FADD removes the bias. Same value, same fma: bit-exact to the emulation."""
    b = w_desc.load([n0, j * 128])
    biased = tl.dot(a, b.T, tl.full((128, 128), 0x4B400000, tl.int32), out_dtype=tl.int32)
    partial = biased.to(tl.float32, bitcast=True) - 12582912.0
    return tl.fma(partial, tl.broadcast_to(s, partial.shape), acc)


@triton.jit
def _w8a8_magic_kernel(xq_desc, w_desc, xs_ptr, ws_ptr, y_ptr, M, N, k_tiles, GROUP_M: tl.constexpr):
    BM: tl.constexpr = 128
    BN: tl.constexpr = 256
    pid_m, pid_n = grouped_tile(M, N, BM, BN, GROUP_M)
    w_tiles_n = tl.cdiv(N, 128)
    acc0 = tl.zeros((BM, 128), dtype=tl.float32)
    acc1 = tl.zeros((BM, 128), dtype=tl.float32)
    for j in range(k_tiles):
        a = xq_desc.load([pid_m * BM, j * 128])
        xs = tl.load(xs_ptr + pid_m * k_tiles + j)
        ws0 = tl.load(ws_ptr + tl.minimum(2 * pid_n, w_tiles_n - 1) * k_tiles + j)
        ws1 = tl.load(ws_ptr + tl.minimum(2 * pid_n + 1, w_tiles_n - 1) * k_tiles + j)
        acc0 = _magic_chunk(acc0, a, xs * ws0, w_desc, pid_n * BN, j)
        acc1 = _magic_chunk(acc1, a, xs * ws1, w_desc, pid_n * BN + 128, j)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, 128)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    out = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out, acc0.to(tl.bfloat16), mask=mask)
    tl.store(out + 128, acc1.to(tl.bfloat16), mask=mask & (cols[None, :] + 128 < N))


def w8a8_magic(xq, xs, wq, ws, stages: int = 4, maxnreg: int | None = 232):
    m, k = xq.shape
    n = wq.shape[0]
    y = torch.empty(m, n, dtype=torch.bfloat16, device=xq.device)
    grid = (triton.cdiv(m, 128) * triton.cdiv(n, 256),)
    _w8a8_magic_kernel[grid](TensorDescriptor.from_tensor(xq, [128, 128]), TensorDescriptor.from_tensor(wq, [128, 128]),
                             xs, ws, y, m, n, k // 128, GROUP_M=8, num_warps=8, num_stages=stages, maxnreg=maxnreg)
    return y


def plain_gemm(a, b, acc_int: bool, stages: int = 4):
    m, k = a.shape
    n = b.shape[0]
    c = torch.empty(m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, 128) * triton.cdiv(n, 256),)
    _plain_gemm_kernel[grid](TensorDescriptor.from_tensor(a, [128, 128]), TensorDescriptor.from_tensor(b, [256, 128]),
                             c, m, n, k, GROUP_M=8, ACC_INT=acc_int, num_warps=8, num_stages=stages)
    return c


def main():
    m, k, n = common.gemm_shape(__doc__.split("\n")[0])
    dev = "cuda"
    ops = 2 * m * n * k
    xq, xs, wq, ws = common.random_w8a8_operands(m, k, n, torch.Generator(dev).manual_seed(0))
    xb, wb = xq.to(torch.bfloat16), wq.to(torch.bfloat16)
    x8, w8 = (xq.float() / 32).to(torch.float8_e4m3fn), (wq.float() / 32).to(torch.float8_e4m3fn)
    one = torch.ones((), device=dev)

    # correctness of the plain kernels on a slice (int8 exact; fp8 products are exact in fp32, sums rounded)
    ms_ = min(m, 1024)
    ref_i = torch._int_mm(xq[:ms_].contiguous(), wq.t()).float()
    got_i = plain_gemm(xq[:ms_].contiguous(), wq, True)
    assert torch.equal(got_i, ref_i), "plain int8 Triton GEMM differs from torch._int_mm"
    ref_f = x8[:ms_].float() @ w8.float().t()
    got_f = plain_gemm(x8[:ms_].contiguous(), w8, False)
    # Hopper's fp8 tensor cores add with fewer mantissa bits than fp32: report the difference, not a pass/fail
    fp8_err = float((got_f - ref_f).norm() / ref_f.norm())

    ours = w8a8_gemm(xq, xs, wq, ws, None, torch.bfloat16)
    magic_ok = {}
    for cfg in ((4, 232), (3, 232), (4, None)):
        try:
            magic_ok[cfg] = torch.equal(w8a8_magic(xq, xs, wq, ws, *cfg), ours)
        except Exception as exc:  # a config that does not compile or fit is reported, not fatal
            magic_ok[cfg] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
    print("magic-number promotion bit-exact to ours (stages, maxnreg):", magic_ok)
    rows = [
        ("bf16 cuBLAS F.linear", lambda: F.linear(xb, wb)),
        ("int8 torch._int_mm", lambda: torch._int_mm(xq, wq.t())),
        ("fp8 e4m3 torch._scaled_mm (per-tensor)",
         lambda: torch._scaled_mm(x8, w8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16)),
        ("Triton int8, int32 acc over all K (no promotion)", lambda: plain_gemm(xq, wq, True)),
        ("Triton int8, 3 stages", lambda: plain_gemm(xq, wq, True, 3)),
        ("Triton fp8 e4m3, fp32 acc", lambda: plain_gemm(x8, w8, False)),
        ("ours: W8A8 with per-128-K promotion (bit-exact)",
         lambda: w8a8_gemm(xq, xs, wq, ws, None, torch.bfloat16)),
    ]
    for cfg, ok in magic_ok.items():
        if ok is True:
            rows.append((f"magic-number promotion, stages {cfg[0]}, maxnreg {cfg[1]} (bit-exact)",
                         lambda cfg=cfg: w8a8_magic(xq, xs, wq, ws, *cfg)))
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"M={m} K={k} N={n}")
    print(f"plain fp8 Triton vs fp32 matmul of the same fp8 values: relative L2 {fp8_err:.1e}")
    print("| kernel | ms | T(FL)OP/s |")
    print("|---|---|---|")
    for name, fn in rows:
        ms = common.median_ms(fn, reps=10, warmup=3)
        print(f"| {name} | {ms:.2f} | {ops / ms / 1e9:.0f} |", flush=True)


if __name__ == "__main__":
    main()
