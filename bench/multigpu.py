"""Sequence parallelism over several GPUs: step, all-to-all, VAE and whole-job times per rank count, and the
multi-GPU command and ComfyUI paths compared with one GPU. One call on a 2-, 4- or 8-GPU machine:

    python bench/multigpu.py --ranks 1,2,4                        # all parts (about 8 min on 2 H200s)
    python bench/multigpu.py --ranks 1,2 --parts sp               # only the per-rank-count figures
    python bench/multigpu.py --parts cli,comfy --dir /tmp/tw      # only the comparisons (files kept in --dir)
    python bench/multigpu.py --ranks 1,2 --parts sp --sp-from-files --dir /tmp/tw   # ranks compared on those files
    python bench/multigpu.py --tiny --cpu --ranks 1,2             # every part on tiny models, gloo on the CPU

Weights: the per-rank-count figures (part ``sp``) use full-size A14B experts with random weights built in
memory on each rank's card (the same seeds on every rank, so the ranks hold the same weights); the command and
ComfyUI comparisons (parts ``cli`` and ``comfy``) read random experts written to --dir in the released -quant
layout by bench/user_path.py's `write_files` (29 GB, written once). 81 frames, int8 W8A8, SLA top-k 0.1.

Figures (bench/results.json, prefix ``multigpu_`` for card and date; medians of --repeats):
  sp{W}_step_{res}_s               one expert step (high-noise expert, 720p and 480p) on W ranks
  sp{W}_step_{res}_ratio           that over the one-rank step (the issue's sp2_step_720p_ratio, ...)
  sp{W}_a2a_block_{res}_ms         the two all-to-alls of one block (q/k/v in, attention out)
  sp{W}_a2a_share_{res}            40 blocks' all-to-alls over the step
  sp{W}_vae_{encode,decode}_720p_s the VAE split over W ranks (a spatial tile each; W=1: whole frame)
  sp{W}_next_video_{res}_s         second video in one process: image in to file written (user_next_video_*),
                                   with the VAE split (split_vae=True; the library's default codes the whole frame)
  sp{W}_frames_vs_1_{max,mean}_720p  the W-rank video's frames against the one-rank video's (8-bit steps)
  sp{W}_frames_whole_vae_vs_1_{max,mean}_720p  the same with split_vae=False (the DiT's share alone)
  cli_gpus2_s, cli_gpus1_s, cli_gpus2_vs_1_{max,mean}   `turbowan generate --gpus 2` against one GPU (decoded mp4s)
  cli_codec_floor_{max,mean}       the same comparison for two mp4s whose frames differ by rounding noise only
  comfy_two_cards_s, comfy_one_card_s, comfy_two_cards_vs_one_{max,mean}   the nodes with an expert per card

NVLink multicast stays off (the device notes: it can take the host's shared GPUs down): NCCL_NVLS_ENABLE=0,
TORCH_SYMM_MEM_DISABLE_MULTICAST=1, NVSHMEM_DISABLE_NVLS=1 are set here, before torch loads, and every process
this script starts inherits them.
"""

from __future__ import annotations

import os

for _name, _value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                      ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_name] = _value  # forced, not defaulted: see the docstring

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import turbowan  # noqa: E402
from turbowan.checkpoint import DiTConfig  # noqa: E402
from turbowan.models.dit import random_dit  # noqa: E402
from turbowan.models.vae import VAEConfig  # noqa: E402
from turbowan.ops.sequence_parallel import SequenceSplit  # noqa: E402
from turbowan.options import latent_frames  # noqa: E402
from turbowan.vae_tiling import tile_for_ranks  # noqa: E402
from common import merge_results, random_vae  # noqa: E402
from user_path import write_files  # noqa: E402

SIZES = {"720p": (1280, 720), "480p": (832, 480)}
TINY_SIZES = {"720p": (64, 48), "480p": (48, 32)}
TINY_DIT = DiTConfig(dim=128, ffn_dim=256, num_heads=4, num_layers=2)  # 4 heads: splits over 2 and 4 ranks
PARTS = ("sp", "cli", "comfy")


def has_av() -> bool:
    try:
        import av  # noqa: F401
        return True
    except ImportError:
        return False


# -- one rank count (a spawned process per rank) ----------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_s(fn, device, reps: int, warmup: int = 1) -> float:
    """Median wall time of fn() over ``reps`` calls on every rank at once (a barrier before each)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if dist.is_initialized():
            dist.barrier()
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _image(width: int, height: int):
    from PIL import Image

    x = torch.linspace(0, 255, width).to(torch.uint8)
    img = torch.stack([x[None].expand(height, -1), x.flip(0)[None].expand(height, -1),
                       torch.full((height, width), 128, dtype=torch.uint8)], -1)
    return Image.fromarray(img.numpy())


def rank_worker(rank: int, world: int, opts: dict, out_dir: str) -> None:
    """Every figure of one rank count; rank 0 writes them to ``out_dir/w{world}.json``."""
    cpu = opts["cpu"]
    device = torch.device("cpu") if cpu else torch.device("cuda", rank)
    if not cpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    group = None
    if world > 1:
        dist.init_process_group("gloo" if cpu else "nccl", init_method=f"file://{out_dir}/store{world}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(minutes=5),
                                **({} if cpu else {"device_id": device}))
        group = dist.group.WORLD
    try:
        figures = _rank_figures(rank, world, opts, device, group, Path(out_dir))
        if rank == 0:
            (Path(out_dir) / f"w{world}.json").write_text(json.dumps(figures))
    finally:
        if world > 1:
            dist.destroy_process_group()


def _rank_figures(rank, world, opts, device, group, out_dir: Path) -> dict:
    tiny, reps, frames = opts["tiny"], opts["repeats"], opts["frames"]
    sizes = TINY_SIZES if tiny else SIZES
    config = TINY_DIT if tiny else DiTConfig()
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    quant = "w8a16" if device.type == "cpu" else "w8a8"
    attention = "original" if tiny else "sla"  # tiny clips are too short for SLA at top-k 0.1
    t = time.perf_counter()
    if opts.get("expert_files"):  # the released-layout files of the cli part: the experts the command runs
        high, low = (turbowan.load_dit(opts["expert_files"][name], attention=attention, sla_topk=0.1, quant=quant,
                                       dtype=dtype, device=device) for name in ("high", "low"))
    else:
        high, low = (random_dit(config, dtype=dtype, quant=quant, attention=attention, sla_topk=0.1, device=device,
                                seed=seed) for seed in (0, 1))
    vae = random_vae(device, VAEConfig(dim=4) if tiny else None)
    if dtype == torch.float32:
        vae.model.float()
        vae._set_constants()
    say = (lambda *a: print(f"[{world} rank{'s' if world > 1 else ''}]", *a, flush=True)) if rank == 0 else (
        lambda *a: None)
    source = "loaded the experts from the command's files" if opts.get("expert_files") else "built the experts"
    say(f"{source} and the VAE in {time.perf_counter() - t:.1f} s")
    out: dict = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    text = torch.randn(1, 40, 4096, generator=g) * 0.1

    for res in opts["res"]:
        w, h = sizes[res]
        T, lh, lw = latent_frames(frames), h // 8, w // 8
        x = torch.randn(1, 16, T, lh, lw, generator=g).to(device, dtype)
        y = torch.randn(1, 20, T, lh, lw, generator=g).to(device, dtype)
        ctx = torch.randn(1, 512, 4096, generator=g).to(device, dtype) * 0.1
        tt = torch.full((1,), 900.0, device=device, dtype=dtype)
        with torch.no_grad():
            step = _median_s(lambda: high(x, tt, ctx, y, sequence_group=group), device, reps)
        out[f"step_{res}_s"] = step
        say(f"{res} step {step:.3f} s")
        if group is not None:
            tokens = T * (lh // 2) * (lw // 2)
            sp = SequenceSplit(tokens, config.num_heads, group)
            head_dim = config.dim // config.num_heads
            qkv = torch.randn(3, sp.local, config.num_heads, head_dim, device=device, dtype=dtype)
            attn = torch.randn(1, tokens, config.num_heads // world, head_dim, device=device, dtype=dtype)
            a2a = _median_s(lambda: (sp.tokens_to_heads(qkv), sp.heads_to_tokens(attn)), device, max(reps, 5) * 2)
            out[f"a2a_block_{res}_ms"] = a2a * 1e3
            out[f"a2a_share_{res}"] = a2a * config.num_layers / step
            say(f"{res} all-to-all per block {a2a * 1e3:.2f} ms, {100 * out[f'a2a_share_{res}']:.1f}% of the step")
        del x, y, ctx

    # the VAE alone, split over the ranks (a tile each) or whole on one
    w, h = sizes["720p"]
    video = (torch.rand(1, 3, frames, h, w, generator=g) * 2 - 1).to(device, vae.dtype)
    latents = torch.randn(1, 16, latent_frames(frames), h // 8, w // 8, generator=g).to(device)
    tile = tile_for_ranks((h // 8, w // 8), world)
    out["vae_encode_720p_s"] = _median_s(lambda: vae.encode(video, tile=tile, group=group), device, 1)
    out["vae_decode_720p_s"] = _median_s(lambda: vae.decode(latents, tile=tile, group=group), device, 1)
    say(f"VAE 720p encode {out['vae_encode_720p_s']:.2f} s, decode {out['vae_decode_720p_s']:.2f} s (tile {tile})")
    del video, latents

    # the whole job, as user_next_video_*: image in to file written, the experts already on the card
    from turbowan.video import VideoWriter

    for res in opts["res"]:
        w, h = sizes[res]
        image = _image(w, h)
        runs = []
        kept: list = []
        for i in range(reps + 1):  # the first run places the models
            last = i == reps
            chunks: list = []
            path = out_dir / f"job-w{world}-{res}.{opts['format']}"
            t = time.perf_counter()
            writer = VideoWriter(path, fps=16) if rank == 0 else None

            def on_frames(sample, start, chunk, writer=writer, chunks=chunks, last=last):
                if writer is not None:
                    writer.write(chunk)
                    if last and res == "720p":
                        chunks.append(chunk)

            try:
                turbowan.generate_i2v(high, low, vae, image, text, num_frames=frames, width=w, height=h, seed=0,
                                      device=device, sequence_parallel=group is not None, on_frames=on_frames,
                                      return_frames=False, split_vae=group is not None)  # the fastest setting
                if writer is not None:
                    writer.close()
            except BaseException:
                if writer is not None:
                    writer.abort()
                raise
            runs.append(time.perf_counter() - t)
            kept = chunks
        out[f"next_video_{res}_s"] = statistics.median(runs[1:])
        say(f"{res} whole job {', '.join(f'{r:.2f}' for r in runs)} s (the first places the models)")
        if kept:
            torch.save(_u8(torch.cat(kept)), out_dir / f"frames-w{world}-720p.pt")
        if res == "720p" and group is not None:  # the DiT's share of the difference: the VAE whole on each rank
            whole = turbowan.generate_i2v(high, low, vae, image, text, num_frames=frames, width=w, height=h, seed=0,
                                          device=device, sequence_parallel=True, split_vae=False)
            if rank == 0:
                torch.save(_u8(whole[0]), out_dir / f"frames-w{world}-720p-whole-vae.pt")
    turbowan.release_all()
    return out


def _u8(frames: torch.Tensor) -> torch.Tensor:
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu()


def run_rank_count(world: int, opts: dict, out_dir: Path) -> dict:
    t = time.perf_counter()
    if world == 1:
        mp.start_processes(rank_worker, args=(1, opts, str(out_dir)), nprocs=1, start_method="spawn")
    else:
        mp.start_processes(rank_worker, args=(world, opts, str(out_dir)), nprocs=world, start_method="spawn")
    print(f"[{world} ranks] done in {time.perf_counter() - t:.0f} s", flush=True)
    return json.loads((out_dir / f"w{world}.json").read_text())


# -- comparisons ----------------------------------------------------------------------------------------------

def frame_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """Largest and mean absolute difference of two 8-bit videos, in 8-bit steps."""
    d = (a.float() - b.float()).abs()
    return d.max().item(), d.mean().item()


def decode_video(path: Path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        return torch.stack([torch.from_numpy(f.to_ndarray(format="rgb24")) for f in container.decode(video=0)])


def cli_part(files: dict, opts: dict, out_dir: Path) -> dict:
    """`turbowan generate --gpus 2` and the same run on one GPU, from the files: times and frame differences."""
    w, h = (TINY_SIZES if opts["tiny"] else SIZES)["720p"]
    base = [sys.executable, "-m", "turbowan", "generate", "--image", str(files["image"]), "--text-embedding",
            str(files["text"]), "--high", str(files["high"]), "--low", str(files["low"]), "--vae", str(files["vae"]),
            "--width", str(w), "--height", str(h), "--frames", str(opts["frames"])]
    if opts["tiny"]:
        base += ["--attention", "original"]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    if opts["cpu"]:
        env["TURBOWAN_RANKS_ON_CPU"] = "1"
    out = {}
    videos = {}
    for gpus in (2, 1):
        path = out_dir / f"cli-gpus{gpus}.mp4"
        cmd = base + ["-o", str(path)] + (["--gpus", "2"] if gpus == 2 else (["--device", "cpu"] if opts["cpu"] else []))
        t = time.perf_counter()
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        out[f"cli_gpus{gpus}_s"] = time.perf_counter() - t
        print(r.stdout.strip() or r.stderr.strip()[-3000:], flush=True)
        if r.returncode != 0 or not path.exists():
            raise RuntimeError(f"turbowan generate {'--gpus 2 ' if gpus == 2 else ''}failed ({r.returncode})")
        videos[gpus] = decode_video(path)
    out["cli_gpus2_vs_1_max"], out["cli_gpus2_vs_1_mean"] = frame_diff(videos[2], videos[1])
    out["cli_codec_floor_max"], out["cli_codec_floor_mean"] = codec_floor(videos[1], out_dir)
    return out


def codec_floor(frames: torch.Tensor, out_dir: Path, seed: int = 0) -> tuple:
    """How far apart two of the command's mp4 files are after decoding when their frames differ only by rounding
    noise (N(0, 1.25) in 8-bit steps: the in-process bf16 difference between rank counts, max ~9, mean ~1): the
    frames and a perturbed copy, both written as the command writes, decoded and compared. Random-weight videos are
    noise-like, and x264 at the default quality turns such small differences into large ones; on synthetic noise at
    720p, 7 / 1.0 went to 58 / 4.5 this way, so the command's 2-GPU vs 1-GPU difference is read against this floor."""
    from turbowan.video import write_video

    g = torch.Generator().manual_seed(seed)
    perturbed = (frames.float() + torch.randn(frames.shape, generator=g) * 1.25).round().clamp(0, 255).to(torch.uint8)
    paths = [out_dir / "codec-floor-a.mp4", out_dir / "codec-floor-b.mp4"]
    for video, path in zip((frames, perturbed), paths):
        write_video(video.numpy(), path)
    return frame_diff(decode_video(paths[1]), decode_video(paths[0]))


def comfy_part(files: dict, opts: dict) -> dict:
    """The nodes (in-process, through tests/comfy_double) with the experts on cuda:0 and cuda:1, against both on
    ComfyUI's device: times of the second run of each, and the frame difference."""
    sys.path.insert(0, str(REPO / "tests" / "comfy_double"))
    import comfy.model_management as mm
    import folder_paths

    from turbowan import comfy_nodes as nodes

    if not opts["cpu"]:
        mm.cpu_state = mm.CPUState.GPU
    for folder, key in (("diffusion_models", "high"), ("vae", "vae")):
        folder_paths.add_model_folder_path(folder, str(files[key].parent), is_default=True)
    cards = ("cpu", "cpu") if opts["cpu"] else ("cuda:0", "cuda:1")
    w, h = (TINY_SIZES if opts["tiny"] else SIZES)["720p"]
    attention = "original" if opts["tiny"] else "sla"
    import numpy as np
    from PIL import Image

    image = torch.from_numpy(np.asarray(Image.open(files["image"]).convert("RGB"), dtype=np.float32) / 255)[None]
    text = turbowan.pipeline.read_text_embedding(files["text"])
    (vae,) = nodes.TurboWanVAELoader().load(files["vae"].name)
    out, frames = {}, {}
    for name, devices in (("two_cards", cards), ("one_card", ("default", "default"))):
        loader = nodes.TurboWanModelLoader()
        (high,) = loader.load(files["high"].name, attention, 0.1, "auto", "auto", devices[0])
        (low,) = loader.load(files["low"].name, attention, 0.1, "auto", "auto", devices[1])
        times = []
        for _ in range(2):  # the first run places the experts
            t = time.perf_counter()
            video, _ = nodes.TurboDiffusionI2VSampler().generate(
                high, low, [[text, {"pooled_output": None}]], vae, image, opts["frames"], 4, "720p", "16:9", 0.9,
                200.0, 0, False, False, w, h)
            times.append(time.perf_counter() - t)
        out[f"comfy_{name}_s"] = times[1]
        frames[name] = (video.clamp(0, 1) * 255).round().to(torch.uint8)
        print(f"ComfyUI nodes, experts on {devices}: {', '.join(f'{x:.2f}' for x in times)} s", flush=True)
        mm.unload_all_models()
        turbowan.release_all()
    out["comfy_two_cards_vs_one_max"], out["comfy_two_cards_vs_one_mean"] = frame_diff(frames["two_cards"],
                                                                                       frames["one_card"])
    return out


# -- main -----------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", default="1,2", help="rank counts to measure, comma-separated (default 1,2); 1 "
                    "first: the ratios are over it")
    ap.add_argument("--parts", default="sp,cli,comfy", help="sp (per rank count), cli, comfy (default all)")
    ap.add_argument("--res", default="720p,480p", help="sizes for the step and the whole job (default 720p,480p)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per figure (default 3)")
    ap.add_argument("--dir", default="/tmp/turbowan-multigpu", help="random model files (cli, comfy) and outputs")
    ap.add_argument("--tiny", action="store_true", help="tiny models and clips (5 frames): a smoke run")
    ap.add_argument("--cpu", action="store_true", help="ranks on the CPU over gloo (with --tiny)")
    ap.add_argument("--no-save", action="store_true", help="print the table only, leave bench/results.json alone")
    ap.add_argument("--sp-from-files", action="store_true", help="part sp loads the experts from the files in --dir "
                    "(written first, as for cli) instead of building random ones in memory: the command's experts")
    args = ap.parse_args(argv)
    try:
        args.ranks = [int(r) for r in args.ranks.split(",")]
    except ValueError:
        ap.error(f"--ranks takes whole numbers separated by commas, got {args.ranks!r}")
    args.parts = args.parts.split(",")
    args.res = args.res.split(",")
    for part in args.parts:
        if part not in PARTS:
            ap.error(f"--parts: {part!r} is not one of {', '.join(PARTS)}")
    for res in args.res:
        if res not in SIZES:
            ap.error(f"--res: {res!r} is not one of {', '.join(SIZES)}")
    if args.cpu and not args.tiny:
        ap.error("--cpu runs the full-size models for hours; add --tiny")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.cpu:
        if gpus == 0:
            ap.error("no CUDA GPU here; add --tiny --cpu for a smoke run on the CPU")
        too_many = [r for r in args.ranks if r > gpus]
        if too_many:
            print(f"skipping rank counts {too_many}: this machine has {gpus} GPUs", flush=True)
            args.ranks = [r for r in args.ranks if r <= gpus]
        if ("cli" in args.parts or "comfy" in args.parts) and gpus < 2:
            ap.error("the cli and comfy parts compare 2 GPUs with 1; this machine has 1 (use --parts sp)")
    heads = (TINY_DIT if args.tiny else DiTConfig()).num_heads
    bad = [r for r in args.ranks if heads % r]
    if bad:
        ap.error(f"rank counts {bad} do not divide the {heads} attention heads")
    if "sp" in args.parts and 1 not in args.ranks:
        ap.error("--ranks must include 1: the ratios are over the one-rank figures")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = dict(tiny=args.tiny, cpu=args.cpu, repeats=args.repeats, res=args.res,
                frames=5 if args.tiny else 81, format="mp4" if has_av() else "gif")
    if not has_av():
        print("PyAV is missing: the whole-job videos are written as gif (slower to encode); the cli part needs PyAV",
              flush=True)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    results, rows = {}, []

    def row(name, value, how):
        results[name] = value
        rows.append((name, value, how))

    t0 = time.perf_counter()
    if args.sp_from_files and "sp" in args.parts:
        opts["expert_files"] = write_files(folder, args.tiny, torch.device("cpu" if args.cpu else "cuda"))
    if "sp" in args.parts:
        with tempfile.TemporaryDirectory(prefix="multigpu-", dir=folder) as tmp:
            per = {w: run_rank_count(w, opts, Path(tmp)) for w in sorted(args.ranks)}
            for w, f in per.items():
                for res in args.res:
                    row(f"sp{w}_step_{res}_s", f[f"step_{res}_s"], "one expert step")
                    if w > 1:
                        row(f"sp{w}_step_{res}_ratio", f[f"step_{res}_s"] / per[1][f"step_{res}_s"],
                            "over the one-rank step")
                        row(f"sp{w}_a2a_block_{res}_ms", f[f"a2a_block_{res}_ms"], "two all-to-alls of one block")
                        row(f"sp{w}_a2a_share_{res}", f[f"a2a_share_{res}"], "all blocks' all-to-alls / step")
                    row(f"sp{w}_next_video_{res}_s", f[f"next_video_{res}_s"], "image in to file written, 2nd+ video")
                row(f"sp{w}_vae_encode_720p_s", f["vae_encode_720p_s"], "VAE encode, a tile per rank")
                row(f"sp{w}_vae_decode_720p_s", f["vae_decode_720p_s"], "VAE decode, a tile per rank")
                path = Path(tmp) / f"frames-w{w}-720p.pt"
                if w > 1 and path.exists() and (Path(tmp) / "frames-w1-720p.pt").exists():
                    one = torch.load(Path(tmp) / "frames-w1-720p.pt", weights_only=True)
                    mx, mean = frame_diff(torch.load(path, weights_only=True), one)
                    row(f"sp{w}_frames_vs_1_max_720p", mx, "largest 8-bit difference from the one-rank video")
                    row(f"sp{w}_frames_vs_1_mean_720p", mean, "mean 8-bit difference from the one-rank video")
                    mx, mean = frame_diff(torch.load(Path(tmp) / f"frames-w{w}-720p-whole-vae.pt", weights_only=True),
                                          one)
                    row(f"sp{w}_frames_whole_vae_vs_1_max_720p", mx, "the same with the VAE whole on every rank")
                    row(f"sp{w}_frames_whole_vae_vs_1_mean_720p", mean, "(the DiT's share of the difference)")
    if "cli" in args.parts or "comfy" in args.parts:
        files = write_files(folder, args.tiny, torch.device("cpu" if args.cpu else "cuda"))
        if "cli" in args.parts:
            if not has_av():
                raise SystemExit("the cli part decodes the two videos with PyAV, which is missing here; carry it")
            for name, value in cli_part(files, opts, folder).items():
                row(name, value, "turbowan generate --gpus 2 vs one GPU, process start to file written")
        if "comfy" in args.parts:
            for name, value in comfy_part(files, opts).items():
                row(name, value, "ComfyUI nodes, high expert on cuda:0 and low on cuda:1 vs both on cuda:0")
    print(f"\nall parts in {time.perf_counter() - t0:.0f} s")

    card = "cpu (gloo)" if args.cpu else f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
    print(f"\n{card}, torch {torch.__version__}\n\n| figure | value | how |\n|---|---|---|")
    for name, value, how in rows:
        print(f"| {name} | {value:.3f} | {how} |")
    if not args.tiny and not args.no_save and results:
        merge_results(results, card, prefix="multigpu_")
        print("merged into bench/results.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
