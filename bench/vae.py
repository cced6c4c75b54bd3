"""Wan2.1 VAE speed at full width (random weights) on one GPU: encode 81 frames, decode 21 latent frames.

    python bench/vae.py [--res 720p 480p] [--profile] [--all-variants]
    python bench/vae.py --i2v [--res 720p 480p] [--device cpu --size 128x128]

--i2v: the image-to-video encode (the image, then black frames) with the encoder's repeating segments computed
once (the library's path) against every chunk through every segment; checks the latents are equal.

Variants (same weights, same inputs; outputs compared against the first variant):
  ncdhw                      activations in PyTorch's default NCDHW layout, eager norms, cuDNN convolutions
  channels_last eager        NDHWC activations, RMSNorm + SiLU as eager PyTorch ops, cuDNN convolutions
  channels_last cuDNN conv   NDHWC and the fused Triton RMSNorm + SiLU, cuDNN convolutions (the path until 2026-11-29)
  library                    the library's CUDA path: the 96-channel causal convolutions as the Triton implicit GEMM
                             (`kernels.conv3d_triton`; bias and residual sum in its epilogue), the upsamples as
                             four-phase 2x2 convolutions (`vae.upsample2x_conv3x3`)
With --all-variants, two measured and dropped (cuDNN convolutions):
  + cudnn.benchmark          cuDNN's per-shape autotuning on (one untimed full-size call tunes first)
  + taps as conv2d           each 3x3x3 causal convolution as one 2D convolution whose channels are the three
                             frames' channels side by side (`conv3d_as_conv2d`); costs a copy three frames wide
Prints a table (median of --repeat runs, peak allocated GB). --profile instead profiles one decode of 5 latent
frames at the first --res, with the library's convolutions and with cuDNN's: GPU time by kind of kernel, and the
25 kernels that take the most.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import torch
import torch.nn.functional as F

from common import median_ms, random_vae
from e2e import SIZES

from turbowan.models import vae as V


def timed(fn, repeat):
    """(median seconds, peak GB allocated, fn's output) of `repeat` calls."""
    last = {}  # the previous output stays alive during the next call, as it would in a loop
    torch.cuda.reset_peak_memory_stats()
    seconds = median_ms(lambda: last.update(out=fn()), reps=repeat, warmup=0) / 1e3
    return seconds, torch.cuda.max_memory_allocated() / 1e9, last["out"]


def conv3d_as_conv2d(self, x, cache):
    """`CausalConv3d.forward` with the kt-frame window as channels: output frame t is a 2D convolution over the
    channels of frames t .. t+kt-1 (stacked), with the 3D kernel's taps stacked alike. Same sums, one rounding."""
    p, n = self.space_pad, self.past_frames
    past = cache.get(self)
    if past is None:
        b, c, _, h, w = x.shape
        past = torch.zeros(b, c, n, h, w, dtype=x.dtype, device=x.device).to(memory_format=V._memory_format(x))
    stream = torch.cat([past, x], dim=2)
    cache[self] = stream[:, :, -n:].clone()
    b, c, t = x.shape[0], x.shape[1], x.shape[2]
    kt = n + 1
    stacked = torch.cat([stream[:, :, i:i + t] for i in range(kt)], dim=1)  # [B, kt*C, T, H, W]
    frames = stacked.transpose(1, 2).flatten(0, 1)  # [B*T, kt*C, H, W], a view (channels-last 3D -> 2D)
    weight = self.weight.transpose(1, 2).flatten(1, 2)  # [Cout, kt*C, kh, kw]: channel i*C + c is tap i of c
    out = F.conv2d(frames, weight, self.bias, padding=p)  # [B*T, Cout, H, W]
    return out.unflatten(0, (b, t)).transpose(1, 2)  # [B, Cout, T, H, W]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def i2v_encode(vae, dev, sizes, frames: int, repeat: int) -> None:
    """Times the encode of an image followed by black frames, with and without repeating segments computed once."""
    def wall(fn):
        times = []
        for _ in range(repeat + 1):  # the first call warms up
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            out = fn()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        return statistics.median(times[1:]), out

    repeats_after = V._segments_repeat_after
    rows = []
    for name, (w, h) in sizes.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        video = torch.zeros(1, 3, frames, h, w)
        video[:, :, 0] = torch.rand(3, h, w, generator=g) * 2 - 1
        video = video.to(dev, vae.dtype)
        once_s, once = wall(lambda: vae.encode(video))
        V._segments_repeat_after = lambda video, chunks, memory: [None] * len(memory)
        try:
            every_s, every = wall(lambda: vae.encode(video))
        finally:
            V._segments_repeat_after = repeats_after
        rows.append((name, once_s, every_s, torch.equal(once, every)))
        print(rows[-1], flush=True)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{card}, torch {torch.__version__}, {datetime.date.today()}, {frames} frames, median of {repeat}")
    print("| size | repeats once s | every chunk s | saved | latents equal |")
    print("|---|---|---|---|---|")
    for name, once_s, every_s, equal in rows:
        print(f"| {name} | {once_s:.2f} | {every_s:.2f} | {1 - once_s / every_s:.0%} | {equal} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", nargs="+", default=["720p", "480p"])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--all-variants", action="store_true", help="also cudnn.benchmark and taps as conv2d (dropped)")
    ap.add_argument("--variants", nargs="+", help="only these variants (names as in the table), e.g. ncdhw library")
    ap.add_argument("--i2v", action="store_true", help="time the image-to-video encode, repeats once vs every chunk")
    ap.add_argument("--device", default="cuda", help="with --i2v: cuda (default) or cpu")
    ap.add_argument("--size", help="with --i2v: WxH instead of --res (e.g. 128x128 on a CPU)")
    ap.add_argument("--frames", type=int, default=81, help="with --i2v: frames (4n+1, default 81)")
    args = ap.parse_args()
    if args.i2v:
        if (args.frames - 1) % 4:
            ap.error(f"--frames must be 4n+1, got {args.frames}")
        dev = torch.device(args.device)
        if args.size:
            try:
                w, h = (int(v) for v in args.size.lower().split("x"))
            except ValueError:
                ap.error(f"--size takes WxH, e.g. 128x128, got {args.size!r}")
            if w % 8 or h % 8:
                ap.error(f"--size: width and height must be multiples of 8, got {args.size}")
            sizes = {args.size: (w, h)}
        else:
            sizes = {res: SIZES[res] for res in args.res}
        vae = random_vae(dev)
        if dev.type == "cpu":
            vae.model.float()
            vae._set_constants()
        i2v_encode(vae, dev, sizes, args.frames, args.repeat)
        return
    dev = torch.device("cuda")
    vae = random_vae(dev)
    if args.profile:
        profile_decode(vae, args.res[0], dev)
        return
    original_layout, original_dispatch = V.preferred_layout, V.vae_norm_dispatch
    original_conv = V.CausalConv3d.forward
    original_conv_dispatch = V.conv3d_dispatch
    cudnn_conv = dict(conv_dispatch=lambda: None)
    variants = {
        "ncdhw": dict(layout=lambda d: torch.contiguous_format, dispatch=original_dispatch, **cudnn_conv),
        "channels_last eager": dict(layout=original_layout, dispatch=lambda: None, **cudnn_conv),
        "channels_last cuDNN conv": dict(layout=original_layout, dispatch=original_dispatch, **cudnn_conv),
        "library": dict(layout=original_layout, dispatch=original_dispatch),
    }
    if args.all_variants:
        variants["+ cudnn.benchmark"] = dict(layout=original_layout, dispatch=original_dispatch, benchmark=True, **cudnn_conv)
        variants["+ taps as conv2d"] = dict(layout=original_layout, dispatch=original_dispatch, conv=conv3d_as_conv2d, **cudnn_conv)
    if args.variants:
        unknown = set(args.variants) - set(variants)
        if unknown:
            ap.error(f"unknown variants {sorted(unknown)}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in args.variants}
    rows = []
    for res in args.res:
        w, h = SIZES[res]
        g = torch.Generator(device=dev).manual_seed(0)
        video = torch.rand(1, 3, 81, h, w, device=dev, generator=g).to(torch.bfloat16) * 2 - 1
        latents = torch.randn(1, 16, 21, h // 8, w // 8, device=dev, generator=g)
        base = {}
        for name, v in variants.items():
            V.preferred_layout, V.vae_norm_dispatch = v["layout"], v["dispatch"]
            V.CausalConv3d.forward = v.get("conv", original_conv)
            V.conv3d_dispatch = v.get("conv_dispatch", original_conv_dispatch)
            vae.decode(latents[:, :, :2, :16, :16])  # warm-up (kernels, autotune, compile) on a small input
            vae.encode(video[:, :, :5, :128, :128])
            torch.backends.cudnn.benchmark = v.get("benchmark", False)
            if torch.backends.cudnn.benchmark:  # tuning happens per shape: once at full size, untimed
                vae.encode(video)
                vae.decode(latents)
            enc_s, enc_gb, enc = timed(lambda: vae.encode(video), args.repeat)
            dec_s, dec_gb, dec = timed(lambda: vae.decode(latents), args.repeat)
            if not base:
                base = dict(enc=enc, dec=dec)
            rows.append((res, name, enc_s, enc_gb, dec_s, dec_gb, rel(enc, base["enc"]), rel(dec, base["dec"])))
            print(rows[-1], flush=True)
            del enc, dec
        V.preferred_layout, V.vae_norm_dispatch = original_layout, original_dispatch
        V.CausalConv3d.forward = original_conv
        V.conv3d_dispatch = original_conv_dispatch
        torch.backends.cudnn.benchmark = False

    print(f"\n{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}, "
          f"median of {args.repeat}")
    print("| res | variant | encode 81 frames s | peak GB | decode 21 latents s | peak GB | rel L2 enc / dec vs first |")
    print("|---|---|---|---|---|---|---|")
    for res, name, es, eg, ds, dg, re_, rd in rows:
        print(f"| {res} | {name} | {es:.2f} | {eg:.1f} | {ds:.2f} | {dg:.1f} | {re_:.1e} / {rd:.1e} |")



# Kernel name -> what it does, for --profile's summary (first match wins).
KERNEL_KINDS = [
    ("convolution (Triton implicit GEMM)", ("_causal_conv3d_kernel",)),
    ("strided copy / elementwise", ("elementwise_kernel",)),
    ("reduction", ("reduce_kernel",)),
    ("convolution (cuDNN)", ("xmma", "implicit_gemm", "cutlass", "conv", "sm90_", "sm80_")),
    ("layout conversion (cuDNN)", ("nchwToNhwc", "nhwcToNchw")),
    ("RMSNorm + SiLU (Triton)", ("_rms_norm_silu",)),
    ("cat", ("CatArrayBatchedCopy",)),
    ("nearest upsample", ("upsample_nearest",)),
    ("attention", ("fmha", "flash", "attention")),
    ("memset", ("memset", "Memset")),
]


def profile_decode(vae, res: str, dev, latent_frames: int = 5) -> None:
    """GPU time of one decode of `latent_frames` by kind of kernel, and the 25 kernels that take the most."""
    from torch.profiler import ProfilerActivity, profile

    w, h = SIZES[res]
    latents = torch.randn(1, 16, latent_frames, h // 8, w // 8, device=dev)
    for label, conv_dispatch in (("library path", V.conv3d_dispatch), ("cuDNN convolutions", lambda: None)):
        original, V.conv3d_dispatch = V.conv3d_dispatch, conv_dispatch
        try:
            vae.decode(latents)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                vae.decode(latents)
                torch.cuda.synchronize()
        finally:
            V.conv3d_dispatch = original
        _print_profile(prof, f"{res} decode of {latent_frames} latent frames, {label}")


def _print_profile(prof, title: str) -> None:
    from collections import defaultdict

    per_kernel = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[e.name][0] += e.time_range.elapsed_us() / 1e3  # a kernel's own duration, ms
            per_kernel[e.name][1] += 1
    total = sum(ms for ms, _ in per_kernel.values())
    kinds = defaultdict(float)
    for name, (ms, _) in per_kernel.items():
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other")
        kinds[kind] += ms
    print(f"\nGPU time of one {title}: {total:.1f} ms")
    print("| kind | ms | share |\n|---|---|---|")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {ms:.1f} | {ms / total:.0%} |")
    print("| kernel | ms | calls |\n|---|---|---|")
    for name, (ms, calls) in sorted(per_kernel.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"| {name[:110]} | {ms:.1f} | {calls} |")


if __name__ == "__main__":
    main()
