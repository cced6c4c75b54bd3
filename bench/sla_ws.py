"""The Hopper SLA kernel (`turbowan.kernels.sla_gluon`, warp-specialized in Gluon) against our Triton one, in output
and in time.

    python bench/sla_ws.py [--res 720p 480p] [--topk 0.1] [--reps 10]

Needs a Hopper card (compute capability 9.0). Per resolution (81 frames: B = 1, 40 heads x 128, bf16 random q, k,
v): the Triton kernel (`sla_triton.sla_attention_triton`) and the Gluon one (`sla_gluon.sla_attention_gluon`), each
with its block map and key statistics, timed (median of --reps after 2 warm-ups); the Gluon output against the
Triton one (relative L2 and max abs difference: 0 on an H200); and the kernel the `sla` attention type runs for
these inputs (`sla_triton.attention_kernel`). Both times go into bench/results.json (`sla_ws_triton_<res>_topk<k>_ms`,
`sla_ws_gluon_<res>_topk<k>_ms`; the Gluon one only when its output is within bf16 noise of the Triton one).
Why the kernel is built this way, and the variants measured before it was chosen: turbowan/kernels/sla_gluon.py.
"""

from __future__ import annotations

import argparse
import sys

import torch

import common

TOKENS = {"720p": 21 * 45 * 80, "480p": 21 * 30 * 52}  # latent frames x patches of an 81-frame clip
HEADS, HEAD_DIM = 40, 128
SAME_AS_TRITON = 2e-3  # rel L2 within bf16 noise (tests/test_sla_gluon_gpu.py): only then is the time recorded


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", nargs="+", default=["720p", "480p"], choices=sorted(TOKENS))
    ap.add_argument("--topk", type=float, default=0.1, help="fraction of key blocks kept (default 0.1)")
    ap.add_argument("--reps", type=int, default=10, help="timed calls per kernel (default 10)")
    args = ap.parse_args(argv)
    if not 0 < args.topk <= 1:
        ap.error(f"--topk {args.topk} is not a fraction of the key blocks; give a value in (0, 1]")
    if args.reps < 1:
        ap.error(f"--reps {args.reps}: give at least 1")
    return args


def _sci(x: float | None) -> str:
    return "-" if x is None else f"{x:.1e}"


def main(argv=None) -> dict:
    args = parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0):
        sys.exit("bench/sla_ws.py needs a Hopper GPU (compute capability 9.0): the Gluon kernel is sm_90a code")
    import triton

    from turbowan.kernels import sla_gluon, sla_triton

    if not sla_gluon.available():
        sys.exit(f"turbowan.kernels.sla_gluon does not run here (Triton {triton.__version__}; it is written for "
                 "Triton 3.6's Gluon)")
    g = torch.Generator("cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{HEADS} heads x {HEAD_DIM}, topk {args.topk}, Gluon config {sla_gluon.GLUON_CONFIG}")
    print("| res | kernel | ms | rel L2 vs Triton | max abs diff | `sla` runs |")
    print("|---|---|---|---|---|---|")
    values = {}
    for res in args.res:
        shape = (1, TOKENS[res], HEADS, HEAD_DIM)
        q, k, v = (torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
        w = (torch.randn(HEAD_DIM, HEAD_DIM, device="cuda", generator=g) / HEAD_DIM**0.5).to(torch.bfloat16)
        bias = torch.zeros(HEAD_DIM, device="cuda", dtype=torch.bfloat16)
        runs = sla_triton.attention_kernel(q, k, v)
        kernels = (("Triton", sla_triton.sla_attention_triton), ("Gluon", sla_gluon.sla_attention_gluon))
        want = None
        for name, fn in kernels:
            out = fn(q, k, v, w, bias, args.topk)
            ms = common.median_ms(lambda: fn(q, k, v, w, bias, args.topk), reps=args.reps, warmup=2)
            if want is None:
                want, rel, diff = out, None, None
            else:
                rel = float((out.float() - want.float()).norm() / want.float().norm())
                diff = float((out.float() - want.float()).abs().max())
            if rel is None or rel <= SAME_AS_TRITON:
                values[f"sla_ws_{name.lower()}_{res}_topk{args.topk}_ms"] = round(ms, 2)
            print(f"| {res} | {name} | {ms:.2f} | {_sci(rel)} | {_sci(diff)} | "
                  f"{'yes' if runs == name.lower() else ''} |", flush=True)
        del q, k, v, want, out
    common.merge_results(values, f"{torch.cuda.get_device_name()} (torch {torch.__version__}, triton "
                                 f"{triton.__version__})", prefix="sla_ws_")
    print(f"merged into {common.RESULTS_JSON}: {values}")
    return values


if __name__ == "__main__":
    main()
