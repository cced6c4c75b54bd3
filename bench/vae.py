"""Wan2.1 VAE speed at full width (random weights) on one GPU: encode 81 frames, decode 21 latent frames.

    python bench/vae.py [--res 720p 480p] [--profile]

Variants (same weights, same inputs; outputs compared against the first variant):
  ncdhw           activations in PyTorch's default NCDHW layout (the layout before channels-last)
  channels_last   NDHWC activations: the library's CUDA default (`turbowan.models.vae.preferred_layout`)
  + benchmark     the same with `torch.backends.cudnn.benchmark = True`
  + fused_norm    RMSNorm compiled with torch.compile (one pass instead of four)
Prints a table (median of --repeat runs, peak allocated GB) and, with --profile, the top CUDA kernels of one
channels-last decode.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from e2e import SIZES, random_vae  # noqa: E402
from turbowan.models import vae as V  # noqa: E402


def timed(fn, repeat):
    times, out = [], None
    for _ in range(repeat):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return statistics.median(times), torch.cuda.max_memory_allocated() / 1e9, out


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", nargs="+", default=["720p", "480p"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    dev = torch.device("cuda")
    vae = random_vae(dev)
    original_layout, original_norm = V.preferred_layout, V.RMSNorm.forward
    compiled_norm = torch.compile(lambda x, scale, gamma: F.normalize(x, dim=1) * scale * gamma, dynamic=True)

    def fused_norm(self, x):
        return compiled_norm(x, self.scale, self.gamma)

    variants = {
        "ncdhw": dict(layout=lambda d: torch.contiguous_format, benchmark=False, norm=original_norm),
        "channels_last": dict(layout=original_layout, benchmark=False, norm=original_norm),
        "channels_last + benchmark": dict(layout=original_layout, benchmark=True, norm=original_norm),
        "channels_last + benchmark + fused_norm": dict(layout=original_layout, benchmark=True, norm=fused_norm),
    }
    rows = []
    for res in args.res:
        w, h = SIZES[res]
        g = torch.Generator(device=dev).manual_seed(0)
        video = torch.rand(1, 3, 81, h, w, device=dev, generator=g).to(torch.bfloat16) * 2 - 1
        latents = torch.randn(1, 16, 21, h // 8, w // 8, device=dev, generator=g)
        base = {}
        for name, v in variants.items():
            V.preferred_layout, V.RMSNorm.forward = v["layout"], v["norm"]
            torch.backends.cudnn.benchmark = v["benchmark"]
            vae.decode(latents[:, :, :2, :16, :16])  # warm-up (kernels, autotune, compile) on a small input
            vae.encode(video[:, :, :5, :128, :128])
            enc_s, enc_gb, enc = timed(lambda: vae.encode(video), args.repeat)
            dec_s, dec_gb, dec = timed(lambda: vae.decode(latents), args.repeat)
            if not base:
                base = dict(enc=enc, dec=dec)
            rows.append((res, name, enc_s, enc_gb, dec_s, dec_gb, rel(enc, base["enc"]), rel(dec, base["dec"])))
            print(rows[-1], flush=True)
            del enc, dec
        V.preferred_layout, V.RMSNorm.forward = original_layout, original_norm
        torch.backends.cudnn.benchmark = False

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"median of {args.repeat}")
    print("| res | variant | encode 81 frames s | peak GB | decode 21 latents s | peak GB | rel L2 enc / dec vs first |")
    print("|---|---|---|---|---|---|---|")
    for res, name, es, eg, ds, dg, re_, rd in rows:
        print(f"| {res} | {name} | {es:.2f} | {eg:.1f} | {ds:.2f} | {dg:.1f} | {re_:.1e} / {rd:.1e} |")

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        w, h = SIZES[args.res[0]]
        latents = torch.randn(1, 16, 6, h // 8, w // 8, device=dev)
        torch.backends.cudnn.benchmark = True
        vae.decode(latents)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            vae.decode(latents)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=70))


if __name__ == "__main__":
    main()
