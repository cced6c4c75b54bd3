"""The warp-specialized Gluon W8A8 GEMM (`turbowan.kernels.int8_gluon`) against our Triton one, bit for bit and in time.

    cd bench && python int8_ws.py [--shape 75600 5120 13824]

Needs a Hopper card (compute capability 9.0). First the ragged checks (M and N not multiples of the tile, with and
without bias, bf16 and fp16): each Gluon configuration must equal the Triton kernel exactly. Then, on the given
shape (default: the 720p FFN up-projection), the Triton kernel and each Gluon configuration are timed (median of 10
after 3 warm-ups), and `w8a8_gemm` is checked to dispatch to the Gluon kernel. At the default shape the Triton and
default-Gluon times go into bench/results.json (`w8a8_gemm_720p_triton_ms`, `w8a8_gemm_720p_gluon_ms`). Why the
kernel is built this way: the docstring of turbowan/kernels/int8_gluon.py.
"""

from __future__ import annotations

import sys

import torch

import common
from common import merge_results

DEFAULT_SHAPE = (75600, 5120, 13824)
RAGGED = ((1000, 512, 640), (129, 256, 130), (1, 256, 384))  # (M, K, N): TMA zero-fill, masked stores
# (PERSISTENT, STAGES, GROUP_M): a program per tile or one per SM; the last is GLUON_CONFIG, the package default
CONFIGS = ((False, 4, 8), (False, 3, 8), (False, 4, 16), (True, 4, 8), (True, 3, 8))


def config_name(persistent: bool, stages: int, group_m: int) -> str:
    return f"{'persistent' if persistent else 'a program per tile'}, stages {stages}, GROUP_M {group_m}"


def main():
    m, k, n = common.gemm_shape(__doc__.split("\n")[0])
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/int8_ws.py needs a Hopper GPU (compute capability 9.0): the Gluon kernel is sm_90a code")
    import triton

    from turbowan.kernels import int8_gluon as G
    from turbowan.kernels import int8_triton as K

    def triton_gemm(*args):  # config overrides select the Triton kernel (`int8_triton.gemm_kernel`)
        return K.w8a8_gemm(*args, **K.GEMM_CONFIG)

    def gluon_gemm(args, persistent, stages, group_m):
        return G.w8a8_gemm_gluon(*args, PERSISTENT=persistent, STAGES=stages, GROUP_M=group_m)

    g = torch.Generator("cuda").manual_seed(0)
    for rm, rk, rn in RAGGED:
        rx, rxs, rw, rws = common.random_w8a8_operands(rm, rk, rn, g, scale=1.0)
        for dtype in (torch.bfloat16, torch.float16):
            for rb in (torch.randn(rn, device="cuda", generator=g).to(dtype), None):
                args = (rx, rxs, rw, rws, rb, dtype)
                try:
                    want = triton_gemm(*args)
                    same = all(torch.equal(gluon_gemm(args, *c), want) for c in CONFIGS)
                except Exception as exc:
                    same = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
                print(f"ragged {rm}x{rk}x{rn}, {str(dtype)[6:]}, bias {rb is not None}: bit-exact vs Triton: {same}",
                      flush=True)

    xq, xs, wq, ws = common.random_w8a8_operands(m, k, n, g)
    bias = torch.randn(n, device="cuda", generator=g).to(torch.bfloat16)
    args = (xq, xs, wq, ws, bias, torch.bfloat16)
    print(f"w8a8_gemm dispatches to: {K.gemm_kernel(xq, torch.bfloat16, {})} (package default {G.GLUON_CONFIG})")
    ours = triton_gemm(*args)
    ops = 2 * m * n * k
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; M={m} K={k} N={n}")
    print("| kernel | config | bit-exact vs Triton | ms | TOP/s |")
    print("|---|---|---|---|---|")
    triton_ms = common.median_ms(lambda: triton_gemm(*args), reps=10, warmup=3)
    print(f"| ours (Triton) | GEMM_CONFIG | - | {triton_ms:.2f} | {ops / triton_ms / 1e9:.0f} |", flush=True)
    default = (G.GLUON_CONFIG["PERSISTENT"], G.GLUON_CONFIG["STAGES"], G.GLUON_CONFIG["GROUP_M"])
    gluon_ms = None
    for cfg in CONFIGS:
        name = config_name(*cfg) + (" (default)" if cfg == default else "")
        try:
            got = gluon_gemm(args, *cfg)
            torch.cuda.synchronize()
        except Exception as exc:  # report and go on: one config failing must not hide the others
            print(f"| Gluon warp-specialized | {name} | failed: {type(exc).__name__}: {str(exc)[:200]} | | |",
                  flush=True)
            continue
        diff = int((got != ours).sum())
        ms = common.median_ms(lambda: gluon_gemm(args, *cfg), reps=10, warmup=3)
        if cfg == default and diff == 0:
            gluon_ms = ms
        print(f"| Gluon warp-specialized | {name} | {'yes' if diff == 0 else f'NO: {diff} elements differ'} | "
              f"{ms:.2f} | {ops / ms / 1e9:.0f} |", flush=True)
    if (m, k, n) == DEFAULT_SHAPE:
        values = {"w8a8_gemm_720p_triton_ms": round(triton_ms, 3)}
        if gluon_ms is not None:  # only a bit-exact result is recorded
            values["w8a8_gemm_720p_gluon_ms"] = round(gluon_ms, 3)
        merge_results(values, torch.cuda.get_device_name(), prefix="int8_ws_")
        print(f"merged into {common.RESULTS_JSON}: {values}")


if __name__ == "__main__":
    main()
