"""What a user waits for: the whole job through the CLI and the API, with full-size files on disk (one GPU).

    python bench/user_path.py --dir /tmp/tw            # writes random A14B -quant.pth experts (29 GB) there first
    python bench/user_path.py --dir /tmp/tw --tiny --device cpu   # a smoke run of every path on tiny models

Figures (medians where a figure is repeated; written to bench/results.json and printed as a table):
  user_first_video_720p_s   `turbowan generate` 720p 81 frames, process start to file written (warm caches)
  user_next_video_{720p,480p}_s   second video in one process (API), image in to file written
  video_write_tail_720p_s   last decoded frame to file complete
  stream_ring_step_ratio_{720p,480p}   stream step / resident step (staging ring; page cache warm)
  stream_host_anon_gb       peak anonymous RSS during a 720p stream run
  stream_*_dropped_*        the same with the page cache dropped after loading (what a small host sees)
  budget{24,12}_720p_ratio  next video with the GPU limited to 24 / 12 GB (auto mode) over the unlimited one
  first_process_encode_720p_*_s   (--parts first_encode, alone) a process's first I2V encode, the second, and one
                            while both experts upload: one-off costs against upload contention
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import turbowan  # noqa: E402
from turbowan.checkpoint import DiTConfig  # noqa: E402
from turbowan.models.dit import random_dit  # noqa: E402
from turbowan.models.vae import VAEConfig  # noqa: E402
from common import merge_results, random_vae  # noqa: E402

SIZES = {"480p": (832, 480), "720p": (1280, 720)}
TINY_DIT = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=2)


# -- files in the released layout ------------------------------------------------------------------------------

def released_state_dict(model) -> dict:
    """Our module's state dict under the released checkpoint's key names."""
    return {k.replace("self_attn.proj_l", "self_attn.attn_op.local_attn.proj_l"): v.contiguous()
            for k, v in model.state_dict().items()}


def write_files(folder: Path, tiny: bool, device) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    files = {"high": folder / "TurboWan2.2-I2V-A14B-high-720P-quant.pth",
             "low": folder / "TurboWan2.2-I2V-A14B-low-720P-quant.pth",
             "vae": folder / "Wan2.1_VAE.pth", "text": folder / "prompt.safetensors", "image": folder / "start.png"}
    cfg = TINY_DIT if tiny else DiTConfig()
    for seed, key in ((0, "high"), (1, "low")):
        if not files[key].exists():
            t = time.perf_counter()
            m = random_dit(cfg, quant="w8a8", device=device, seed=seed)
            sd = {k: v.cpu() for k, v in released_state_dict(m).items()}
            del m
            torch.save(sd, files[key])
            print(f"wrote {files[key].name} ({files[key].stat().st_size / 1e9:.1f} GB) in "
                  f"{time.perf_counter() - t:.0f} s", flush=True)
    if not files["vae"].exists():
        vae = random_vae("cpu", VAEConfig(dim=4) if tiny else None)
        torch.save({k: v.contiguous() for k, v in vae.model.state_dict().items()}, files["vae"])
    if not files["text"].exists():
        from safetensors.torch import save_file

        g = torch.Generator().manual_seed(2)
        save_file({"text_embedding": (torch.randn(1, 40, 4096, generator=g) * 0.1).to(torch.bfloat16)},
                  str(files["text"]))
    if not files["image"].exists():
        from PIL import Image

        x = torch.linspace(0, 255, 1280).to(torch.uint8)
        img = torch.stack([x[None].expand(720, -1), x.flip(0)[None].expand(720, -1),
                           torch.full((720, 1280), 128, dtype=torch.uint8)], -1)
        Image.fromarray(img.numpy()).save(files["image"])
    return files


# -- measuring -------------------------------------------------------------------------------------------------

class AnonRss:
    """Peak anonymous resident memory of this process (sampled every 50 ms; Linux)."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def now() -> int:
        try:
            for line in open("/proc/self/status"):
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.05)

    def __enter__(self):
        self.peak = self.now()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class Clock:
    """Progress hook: wall time of every unit (GPU synchronised first), and the last decoded frame's time."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.t0 = time.perf_counter()
        self.marks = []

    def __call__(self, stage, done, total):
        if self.cuda:
            torch.cuda.synchronize()
        self.marks.append((stage, done, time.perf_counter()))

    def steps(self) -> list:
        t = [m[2] for m in self.marks if m[0] == "sample"]
        starts = [max(m[2] for m in self.marks if m[0] == "encode")] + t[:-1]
        return [b - a for a, b in zip(starts, t)]

    def last_decode(self) -> float:
        return max(m[2] for m in self.marks if m[0] == "decode")

    def stage_s(self, stage: str, after: str | None = None) -> float:
        """From the end of ``after`` (the clock's start if None) to the last mark of ``stage``."""
        start = max((m[2] for m in self.marks if m[0] == after), default=self.t0)
        return max(m[2] for m in self.marks if m[0] == stage) - start


def drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return True
    except OSError as exc:
        print(f"could not drop the page cache ({exc})", flush=True)
        return False


def one_video(high, low, vae, files, res, device, frames, out: Path) -> dict:
    """Image in to file written through the API, the video encoded while the VAE decodes."""
    from PIL import Image

    from turbowan.video import VideoWriter

    w, h = SIZES[res]
    clock = Clock(device)
    t0 = time.perf_counter()
    image = Image.open(files["image"]).convert("RGB")
    text = turbowan.pipeline.read_text_embedding(files["text"])
    with VideoWriter(out, fps=16) as writer:
        turbowan.generate_i2v(high, low, vae, image, text, num_frames=frames, width=w, height=h, seed=0, device=device,
                              progress=clock, on_frames=lambda i, start, chunk: writer.write(chunk),
                              return_frames=False)
        t_closing = time.perf_counter()
    t_end = time.perf_counter()
    steps = clock.steps()
    return {"total_s": t_end - t0, "steps_s": steps, "tail_s": t_end - clock.last_decode(),
            "encode_s": clock.stage_s("encode"), "decode_s": clock.stage_s("decode", after="sample"),
            "close_s": t_end - t_closing, "peak_gb": torch.cuda.max_memory_allocated(device) / 1e9 if clock.cuda else 0}


def first_encodes(files, res, device, frames) -> dict:
    """Where a process's first VAE encode spends its extra time: the I2V encode timed as the first CUDA work of the
    process, again, then once more while both experts' uploads run (as in a first video). Run it alone
    (``--parts first_encode``) on files that exist already, so nothing else has used CUDA in the process."""
    from turbowan.placement import Placement, release_all

    w, h = SIZES[res]
    vae = turbowan.load_vae(files["vae"], device="cpu", dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
    place = Placement(device)
    place.load_vae(vae)
    video = torch.zeros(1, 3, frames, h, w)
    video[:, :, 0] = torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def encode() -> float:
        t = time.perf_counter()
        vae.encode(video.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    out = {"first": encode(), "second": encode()}
    high, low = load_experts(files, device)
    t = time.perf_counter()
    for model in (high, low):
        place.start_expert(model, "resident")
    out["start_uploads"] = time.perf_counter() - t
    out["during_uploads"] = encode()
    release_all()
    return out


def load_experts(files, device):
    kw = dict(quant="w8a8", dtype=torch.bfloat16) if device.type == "cuda" else dict(quant="w8a16", dtype=torch.float32)
    return turbowan.load_dit(files["high"], **kw), turbowan.load_dit(files["low"], **kw)


def median(xs):
    return statistics.median(xs) if xs else float("nan")


CLI_PARTS: list[dict] = []  # per CLI run: where the time outside the stages went


def cli_video(files, res, out: Path, env=None) -> float:
    """One ``turbowan generate`` from process start to exit. Also notes (in CLI_PARTS) the time before its first
    stage line (imports, argument checks) and after its summary line (process exit), from the stderr timestamps."""
    w, h = SIZES[res]
    cmd = [sys.executable, "-m", "turbowan", "generate", "--image", str(files["image"]), "--text-embedding",
           str(files["text"]), "--high", str(files["high"]), "--low", str(files["low"]), "--vae", str(files["vae"]),
           "--width", str(w), "--height", str(h), "-o", str(out)]
    lines: list[tuple[float, str]] = []

    def read(stream):
        for line in stream:
            lines.append((time.perf_counter(), line.rstrip()))

    t = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    readers = [threading.Thread(target=read, args=(s,)) for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    code = proc.wait()
    elapsed = time.perf_counter() - t
    for r in readers:
        r.join()
    wrote = [ts for ts, line in lines if line.startswith("wrote ")]
    print(next((line for _, line in lines if line.startswith("wrote ")), "\n".join(l for _, l in lines)[-2000:]),
          flush=True)
    if code != 0 or not out.exists():
        raise RuntimeError(f"turbowan generate failed ({code})")
    stages = [ts for ts, line in lines if line.startswith("progress: ")]
    if stages and wrote:
        CLI_PARTS.append({"before_first_stage_s": stages[0] - t, "after_summary_s": t + elapsed - wrote[-1]})
        print(f"  process start to first stage line {stages[0] - t:.2f} s, summary line to exit "
              f"{t + elapsed - wrote[-1]:.2f} s", flush=True)
    return elapsed


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/turbowan-user-path")
    ap.add_argument("--tiny", action="store_true", help="tiny models, 5 frames: a smoke run of every path")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--parts", default="cli,api,stream,budget")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--save", help="write the figures to this json file too")
    ap.add_argument("--next-720p", type=float, help="unlimited next-video time for the budget ratios (without --parts api)")
    args = ap.parse_args()
    device = torch.device(args.device)
    folder = Path(args.dir)
    frames = 5 if args.tiny else 81
    files = write_files(folder, args.tiny, device)
    parts = args.parts.split(",")
    results, rows = {}, []
    if args.next_720p:
        results["_next_720p"] = args.next_720p

    def row(name, value, how):
        results[name] = value
        rows.append((name, value, how))
        print(f"{name} = {value:.3f}  ({how})", flush=True)

    if "cli" in parts and not args.tiny:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        cold = cli_video(files, "720p", folder / "cli-cold.mp4", env)
        row("user_first_video_cold_cache_720p_s", cold, "the same on a new machine: kernels compiled on first use")
        t = [cli_video(files, "720p", folder / f"cli{i}.mp4", env) for i in range(args.repeats)]
        row("user_first_video_720p_s", median(t), f"turbowan generate 720p 81f, runs {', '.join(f'{x:.1f}' for x in t)}")
        warm = CLI_PARTS[1:]
        if warm:
            row("cli_process_start_s", median([p["before_first_stage_s"] for p in warm]),
                "process start to the first stage (imports, checks)")
            row("cli_process_exit_s", median([p["after_summary_s"] for p in warm]), "summary line to process exit")

    if "first_encode" in parts:
        for name, seconds in first_encodes(files, "720p", device, frames).items():
            row(f"first_process_encode_720p_{name}_s", seconds,
                {"first": "the process's first CUDA work", "second": "the same encode again",
                 "start_uploads": "queueing both experts' uploads", "during_uploads": "while they copy"}[name])

    if set(parts) & {"api", "stream", "budget", "rss"}:
        t = time.perf_counter()
        high, low = load_experts(files, device)
        vae = turbowan.load_vae(files["vae"], device="cpu", dtype=high.dtype)
        print(f"loaded in {time.perf_counter() - t:.1f} s", flush=True)
        resident_steps = {}
        if "api" in parts:
            for res in ("720p", "480p"):
                runs = [one_video(high, low, vae, files, res, device, frames, folder / f"api-{res}-{i}.mp4")
                        for i in range(args.repeats + 1)]
                if res == "720p":
                    row("user_first_video_in_process_720p_s", runs[0]["total_s"], "API, first video (uploads)")
                for i, r in enumerate(runs):
                    print(f"api {res} run {i}: {r['total_s']:.2f} s, encode (from the call) {r['encode_s']:.2f} s, "
                          f"steps {[round(s, 2) for s in r['steps_s']]}, decode {r['decode_s']:.2f} s, "
                          f"tail {r['tail_s']:.2f} s, peak {r['peak_gb']:.1f} GB", flush=True)
                nxt = runs[1:]
                row(f"user_next_video_{res}_s", median([r["total_s"] for r in nxt]), "API, second and later videos")
                resident_steps[res] = median([s for r in nxt for s in r["steps_s"]])
                if res == "720p":
                    results["_next_720p"] = results[f"user_next_video_{res}_s"]
                    row("video_write_tail_720p_s", median([r["tail_s"] for r in nxt]), "last decoded frame to file")
        if "stream" in parts:
            turbowan.release_all()
            high.execution_mode = low.execution_mode = "stream"
            for dropped in (False, True):
                for res in ("720p", "480p"):
                    if dropped:
                        # pages our process has mapped are never dropped: reopen the files after dropping
                        del high, low
                        gc.collect()
                        if not drop_page_cache():
                            break
                        high, low = load_experts(files, device)
                        high.execution_mode = low.execution_mode = "stream"
                    with AnonRss() as rss:
                        runs = [one_video(high, low, vae, files, res, device, frames, folder / f"stream-{res}.mp4")
                                for _ in range(2)]
                    for i, r in enumerate(runs):
                        print(f"stream {res} dropped={dropped} run {i}: {r['total_s']:.2f} s, steps "
                              f"{[round(s, 2) for s in r['steps_s']]}, peak {r['peak_gb']:.1f} GB", flush=True)
                    tag = "_dropped" if dropped else ""
                    steps = [s for r in runs for s in r["steps_s"]]
                    if res in resident_steps:
                        row(f"stream_ring_step_ratio_{res}{tag}", median(steps) / resident_steps[res],
                            f"median stream step {median(steps):.2f} s / resident {resident_steps[res]:.2f} s")
                    if dropped:
                        row(f"stream_first_step_{res}_dropped_s", runs[0]["steps_s"][0], "first step reads from disk")
                    if res == "720p":
                        row(f"stream_host_anon_after_api_gb{tag}", rss.peak / 1e9,
                            "peak RssAnon, 720p stream, in the process that wrote the files and ran the API part")
                    turbowan.release_all()
            high.execution_mode = low.execution_mode = "auto"
        if "rss" in parts:
            # a process that only loads and streams: what a small host must hold besides the page cache
            high.execution_mode = low.execution_mode = "stream"
            with AnonRss() as rss:
                r = one_video(high, low, vae, files, "720p", device, frames, folder / "stream-rss.mp4")
            print(f"stream 720p (fresh process) {r['total_s']:.2f} s, steps {[round(s, 2) for s in r['steps_s']]}",
                  flush=True)
            row("stream_host_anon_gb", rss.peak / 1e9, "peak RssAnon of a process that loads and streams 720p")
            turbowan.release_all()
            high.execution_mode = low.execution_mode = "auto"
        if "budget" in parts and device.type == "cuda" and "_next_720p" in results:
            total = torch.cuda.get_device_properties(device).total_memory
            for gb in (24, 12):
                turbowan.release_all()
                torch.cuda.empty_cache()
                torch.cuda.set_per_process_memory_fraction(gb * 1e9 / total, torch.cuda.current_device())
                runs = [one_video(high, low, vae, files, "720p", device, frames, folder / f"budget{gb}.mp4")
                        for _ in range(2)]
                for i, r in enumerate(runs):
                    print(f"budget {gb} GB run {i}: {r['total_s']:.2f} s, steps {[round(s, 2) for s in r['steps_s']]}, "
                          f"peak {r['peak_gb']:.1f} GB", flush=True)
                row(f"budget{gb}_720p_ratio", runs[1]["total_s"] / results["_next_720p"],
                    f"next video {runs[1]['total_s']:.1f} s with {gb} GB")
            torch.cuda.set_per_process_memory_fraction(1.0, torch.cuda.current_device())
    results.pop("_next_720p", None)

    print("\n| figure | value | how |\n|---|---|---|")
    for name, value, how in rows:
        print(f"| {name} | {value:.3f} | {how} |")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    if args.save:
        Path(args.save).write_text(json.dumps({"card": card, "date": time.strftime("%Y-%m-%d"),
                                               "torch": torch.__version__, "figures": results}, indent=1))
    if not args.tiny and device.type == "cuda":
        merge_results(results, card, prefix="user_path_")


if __name__ == "__main__":
    main()
