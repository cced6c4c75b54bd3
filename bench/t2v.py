"""TurboWan2.1 text-to-video speed with random full-size weights (one GPU), beside the reference's own forward.

    python bench/t2v.py                          # H200, about 5 min: the four figures below
    python bench/t2v.py --tiny --device cpu      # smoke run of our paths on tiny models (no reference)

Figures (merged into bench/results.json with t2v_card / t2v_date, and printed as a table):
  t2v_1p3b_step_480p_s        our 1.3B step at 480p, 81 frames (int8 W8A8, SLA 0.1): median step of the timed videos
  t2v_1p3b_next_video_480p_s  the whole 1.3B job as the second video in one process: text embedding in to file
                              written (no encode, 4 steps, VAE decode, video write), as user_next_video_* in
                              bench/user_path.py; median over --videos - 1 videos after the first
  t2v_14b_step_720p_s         our 14B forward at 720p, 81 frames (int8 W8A8, SLA 0.1, as bench/e2e.py
                              --weights int8-w8a8 for I2V): median of --repeat after a warm-up call
  ref_t2v_14b_step_720p_s     the reference's Wan2.1-14B forward, same shape, built by bench/reference_step.py
                              from the checkout --ref (its SLA Triton at 0.1, fused norms, bf16 linears)
"""

from __future__ import annotations

import argparse
import datetime
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import RESULTS_JSON, merge_results, random_vae

import turbowan
from turbowan.checkpoint import DiTConfig
from turbowan.models.dit import random_dit
from turbowan.models.vae import VAEConfig

REPO = Path(__file__).resolve().parents[1]
T2V_1P3B = DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30, in_dim=16)
T2V_14B = DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40, in_dim=16)
TINY = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2, in_dim=16)
SIZES = {"480p": (832, 480), "720p": (1280, 720)}
TINY_SIZES = {"480p": (64, 48), "720p": (96, 64)}  # --tiny: small frames too, so a CPU smoke run takes seconds


def reference_dir(ref: Path) -> Path:
    """The folder holding the reference's inference/, rcm/, ops/, SLA/ (a checkout root or its turbodiffusion/)."""
    for d in (ref / "turbodiffusion", ref):
        if (d / "inference" / "modify_model.py").is_file():
            return d
    raise SystemExit(f"--ref {ref}: no TurboDiffusion checkout there (expected turbodiffusion/inference/"
                     "modify_model.py); copy thu-ml/TurboDiffusion there or pass --ref PATH, or --skip-reference")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_calls(fn, device, repeat: int) -> list[float]:
    """Wall seconds of `repeat` calls of fn() after one untimed warm-up call (Triton compiles on first use)."""
    fn()
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


def text_embedding() -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    return (torch.randn(1, 40, 4096, generator=g) * 0.1).to(torch.bfloat16)


def one_video(model, vae, size, frames, device, out: Path) -> dict:
    """Text embedding in to file written through the API (the video encoded while the VAE decodes)."""
    from turbowan.video import VideoWriter

    w, h = size
    marks = []

    def clock(stage, done, total):
        sync(device)
        marks.append((stage, time.perf_counter()))

    t0 = time.perf_counter()
    with VideoWriter(out, fps=16) as writer:
        turbowan.generate_t2v(model, vae, text_embedding(), num_frames=frames, width=w, height=h, seed=0,
                              device=device, progress=clock, on_frames=lambda i, start, chunk: writer.write(chunk),
                              return_frames=False)
    total = time.perf_counter() - t0
    ends = [t for s, t in marks if s == "sample"]
    steps = [b - a for a, b in zip([t0] + ends[:-1], ends)][1:]  # the first includes the placement and noise
    assert out.stat().st_size > 0
    return {"total_s": total, "steps_s": steps}


def our_1p3b(args, device, dtype, quant, folder: Path) -> dict:
    cfg = TINY if args.tiny else T2V_1P3B
    model = random_dit(cfg, dtype=dtype, quant=quant, attention=args.attention, sla_topk=args.topk, device=device).to("cpu")
    model.source = "TurboWan2.1-T2V-1.3B-480P-quant (random)"
    vae = random_vae(device, VAEConfig(dim=4) if args.tiny else None).to("cpu")
    if dtype != torch.bfloat16:
        vae.model.to(dtype)
    runs = [one_video(model, vae, args.sizes["480p"], args.frames, device, folder / f"t2v-1p3b-{i}.mp4") for i in range(args.videos)]
    for i, r in enumerate(runs):
        print(f"1.3B 480p video {i}: {r['total_s']:.2f} s, steps {[round(s, 3) for s in r['steps_s']]}", flush=True)
    nxt = runs[1:]
    turbowan.release_all()
    return {"t2v_1p3b_next_video_480p_s": statistics.median(r["total_s"] for r in nxt),
            "t2v_1p3b_step_480p_s": statistics.median(s for r in nxt for s in r["steps_s"])}


def latent(size, frames: int, device, dtype, g):
    w, h = size
    t = (frames - 1) // 4 + 1
    x = torch.randn(1, 16, t, h // 8, w // 8, generator=g).to(device, dtype)
    ctx = torch.nn.functional.pad(text_embedding(), (0, 0, 0, 512 - 40)).to(device, dtype)
    return x, ctx


def our_14b(args, device, dtype, quant) -> dict:
    cfg = TINY if args.tiny else T2V_14B
    model = random_dit(cfg, dtype=dtype, quant=quant, attention=args.attention, sla_topk=args.topk, device=device)
    x, ctx = latent(args.sizes["720p"], args.frames, device, dtype, torch.Generator().manual_seed(1))
    t = torch.full((1,), 900.0, device=device).to(dtype)
    with torch.no_grad():
        times = timed_calls(lambda: model(x, t, ctx), device, args.repeat)
    print(f"our 14B 720p forward: {' / '.join(f'{s:.3f}' for s in times)} s", flush=True)
    del model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"t2v_14b_step_720p_s": statistics.median(times)}


def reference_14b(args, device) -> dict:
    sys.path.insert(0, str(REPO / "bench"))
    from reference_step import build

    net = build(str(reference_dir(Path(args.ref))), 0.1, model="Wan2.1-14B")
    x, ctx = latent(args.sizes["720p"], args.frames, device, torch.bfloat16, torch.Generator().manual_seed(1))
    ts = torch.full((1, 1), 900.0, device=device).to(torch.bfloat16)
    out = {}
    with torch.no_grad():
        def forward():
            out["v"] = net(x_B_C_T_H_W=x, timesteps_B_T=ts, crossattn_emb=ctx)

        times = timed_calls(forward, device, args.repeat)
    assert out["v"].shape == x.shape and torch.isfinite(out["v"]).all()
    print(f"reference 14B 720p forward: {' / '.join(f'{s:.3f}' for s in times)} s", flush=True)
    return {"ref_t2v_14b_step_720p_s": statistics.median(times)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", default=str(REPO / ".ref" / "TurboDiffusion"),
                    help="thu-ml/TurboDiffusion checkout for the reference forward (default: .ref/TurboDiffusion)")
    ap.add_argument("--skip-reference", action="store_true", help="time ours only")
    ap.add_argument("--tiny", action="store_true", help="tiny models, 5 frames, no reference: a smoke run")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--frames", type=int, help="81 (5 with --tiny)")
    ap.add_argument("--videos", type=int, default=3, help="1.3B videos in one process; the first is not timed")
    ap.add_argument("--repeat", type=int, default=3, help="timed 14B forwards after the warm-up")
    ap.add_argument("--attention", default="sla", help="our attention kind (sla, sagesla, original)")
    ap.add_argument("--results", default=str(RESULTS_JSON))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU here; use --tiny --device cpu for a smoke run")
    if args.videos < 2 or args.repeat < 1:
        raise SystemExit("--videos must be at least 2 (the first is not timed) and --repeat at least 1")
    args.frames = args.frames or (5 if args.tiny else 81)
    args.sizes = TINY_SIZES if args.tiny else SIZES
    args.topk = 1.0 if args.tiny else 0.1  # SLA at 0.1 needs 10+ key blocks of 64 tokens; tiny clips have one
    if (args.frames - 1) % 4:
        raise SystemExit(f"--frames must be 4n+1, got {args.frames}")
    if not (args.tiny or args.skip_reference):
        reference_dir(Path(args.ref))  # refuse a missing checkout before minutes of work
    cuda = device.type == "cuda"
    dtype, quant = (torch.bfloat16, "w8a8") if cuda else (torch.float32, "w8a16")
    card = torch.cuda.get_device_name(device) if cuda else "cpu"

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        results.update(our_1p3b(args, device, dtype, quant, Path(tmp)))
    results.update(our_14b(args, device, dtype, quant))
    if args.tiny or args.skip_reference:
        print("reference forward: skipped" + (" (--tiny)" if args.tiny else ""), flush=True)
    else:
        results.update(reference_14b(args, device))

    how = {"t2v_1p3b_step_480p_s": "our 1.3B step, 480p", "t2v_1p3b_next_video_480p_s": "our 1.3B whole job, 480p",
           "t2v_14b_step_720p_s": "our 14B step, 720p", "ref_t2v_14b_step_720p_s": "reference 14B step, 720p"}
    size = "tiny models" if args.tiny else "full size, random weights"
    print(f"\n{card}, torch {torch.__version__}, {size}, {args.frames} frames, {quant}, attention {args.attention}, "
          f"{datetime.date.today()}")
    print("| figure | seconds | what |\n|---|---|---|")
    for k, v in results.items():
        print(f"| {k} | {v:.3f} | {how[k]} |")
    if "ref_t2v_14b_step_720p_s" in results:
        print(f"14B 720p step speed-up over the reference: "
              f"{results['ref_t2v_14b_step_720p_s'] / results['t2v_14b_step_720p_s']:.2f}x")
    if not args.tiny:
        merge_results({k: round(v, 3) for k, v in results.items()}, card, prefix="t2v_", path=args.results)
    return results


if __name__ == "__main__":
    main()
