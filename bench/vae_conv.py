"""The VAE's causal 3D convolutions at full size: cuDNN against the Triton implicit GEMM, per shape and tile.

    python bench/vae_conv.py [--repeats 5] [--shapes decode encode] [--sweep]

Each row is one convolution a 720p chunk runs (widths, kernel, frames out, frame size), in channels-last bf16 with
the causal stream (past frames + chunk) as input, bias and the residual sum included in both (cuDNN: conv3d then
an add; Triton: in the epilogue). Prints ms, TFLOP/s (2 * K * N * output pixels) and the Triton result's relative
error against cuDNN. --sweep times every tile configuration that fits the shape and marks the best; without it
only the default tile (`conv3d_triton.default_config`) runs.
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from common import median_ms, merge_results

# (name, c_in, c_out, kt, kh, frames out, height, width, residual): the 720p decode's and encode's convolutions
# (one chunk: 4 frames at full resolution, fewer at the lower stages; latent frame 0 alone at 90x160).
SHAPES = {
    "decode": [
        ("dec conv1 16->384", 16, 384, 3, 3, 1, 90, 160, False),
        ("dec mid 384", 384, 384, 3, 3, 1, 90, 160, True),
        ("dec up0 time 384->768", 384, 768, 3, 1, 1, 90, 160, False),
        ("dec st1 192->384", 192, 384, 3, 3, 2, 180, 320, False),
        ("dec st1 384", 384, 384, 3, 3, 2, 180, 320, True),
        ("dec up1 time 384->768", 384, 768, 3, 1, 2, 180, 320, False),
        ("dec st2 192", 192, 192, 3, 3, 4, 360, 640, True),
        ("dec st3 96", 96, 96, 3, 3, 4, 720, 1280, True),
        ("dec head 96->3", 96, 3, 3, 3, 4, 720, 1280, False),
    ],
    "encode": [
        ("enc st0 96", 96, 96, 3, 3, 4, 720, 1280, True),
        ("enc st1 96->192", 96, 192, 3, 3, 4, 360, 640, False),
        ("enc st1 192", 192, 192, 3, 3, 4, 360, 640, True),
        ("enc st2 384", 384, 384, 3, 3, 2, 180, 320, True),
        ("enc head 384->32", 384, 32, 3, 3, 1, 90, 160, False),
    ],
}

SWEEP = [  # (block_m, block_n, block_k, warps, stages); each new one compiles per shape (~1 s)
    (128, 128, 32, 4, 4), (128, 128, 32, 8, 4), (128, 128, 64, 4, 3), (128, 128, 64, 8, 4),
    (256, 128, 32, 8, 3), (256, 128, 64, 8, 3), (128, 64, 32, 4, 4), (128, 256, 64, 8, 3), (256, 32, 32, 4, 4),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--shapes", nargs="+", default=["decode", "encode"], choices=sorted(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="time every tile configuration that fits each shape")
    ap.add_argument("--no-results", action="store_true", help="do not merge into bench/results.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/vae_conv.py needs a CUDA GPU.")
    from turbowan.kernels import conv3d_triton as C

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    rows = []
    totals = {"cudnn": 0.0, "triton": 0.0}
    for group in args.shapes:
        for name, c_in, c_out, kt, kh, t, h, w, has_res in SHAPES[group]:
            stream = torch.randn(1, c_in, t + kt - 1, h, w, device=dev, generator=g, dtype=torch.bfloat16)
            stream = stream.contiguous(memory_format=torch.channels_last_3d)
            weight = torch.randn(c_out, c_in, kt, kh, kh, device=dev, generator=g, dtype=torch.bfloat16)
            weight /= (c_in * kt * kh * kh) ** 0.5
            bias = torch.randn(c_out, device=dev, generator=g, dtype=torch.bfloat16)
            res = None
            if has_res:
                res = torch.randn(1, c_out, t, h, w, device=dev, generator=g, dtype=torch.bfloat16)
                res = res.contiguous(memory_format=torch.channels_last_3d)
            pad = kh // 2

            def cudnn():
                out = F.conv3d(stream, weight, bias, padding=(0, pad, pad))
                return out if res is None else out + res

            flops = 2 * c_in * kt * kh * kh * c_out * t * h * w
            ref = cudnn()
            ms_cudnn = median_ms(cudnn, reps=args.repeats, warmup=1)
            configs = [C.default_config(c_in, c_out)]
            if args.sweep:
                configs += [C.TileConfig(*c) for c in SWEEP if c_in % c[2] == 0 and C.TileConfig(*c) != configs[0]]
            timed = []
            for cfg in configs:
                try:
                    out = C.causal_conv3d(stream, weight, bias, res, config=cfg)
                    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
                    ms = median_ms(lambda: C.causal_conv3d(stream, weight, bias, res, config=cfg), reps=args.repeats, warmup=1)
                except Exception as exc:  # e.g. out of shared memory for a large tile: report, go on
                    print(f"  {name} {tuple(cfg)}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                timed.append((ms, cfg, err))
                print(f"  {name} {tuple(cfg)}: {ms:.3f} ms  rel {err:.1e}", flush=True)
            default_ms, default_cfg, default_err = timed[0]
            best_ms, best_cfg, _ = min(timed, key=lambda r: r[0])
            totals["cudnn"] += ms_cudnn
            totals["triton"] += default_ms
            rows.append((name, ms_cudnn, flops / ms_cudnn / 1e9, default_ms, flops / default_ms / 1e9, default_err,
                         best_ms, best_cfg))
            print(rows[-1], flush=True)
            del stream, weight, bias, res, ref

    card = torch.cuda.get_device_name()
    print(f"\n{card}, torch {torch.__version__}, {datetime.date.today()}, bf16 channels-last, median of {args.repeats}")
    print("| convolution | cuDNN ms | TFLOP/s | Triton ms (default tile) | TFLOP/s | rel err vs cuDNN | best tile ms | best tile (m, n, k, warps, stages) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, mc, fc, mt, ft, err, mb, cb in rows:
        print(f"| {name} | {mc:.3f} | {fc:.0f} | {mt:.3f} | {ft:.0f} | {err:.1e} | {mb:.3f} | {tuple(cb)} |")
    print(f"| sum of the rows | {totals['cudnn']:.2f} | | {totals['triton']:.2f} | | | | |")
    if not args.no_results:
        merge_results({"vae_conv_rows_cudnn_ms": round(totals["cudnn"], 2),
                       "vae_conv_rows_triton_ms": round(totals["triton"], 2)},
                      card=f"{card} (torch {torch.__version__})", prefix="vae_conv_")


if __name__ == "__main__":
    main()
