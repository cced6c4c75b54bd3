"""How long writing 81 frames of 1280x720 takes, and at what quality, per libx264 setting (issue 11, item 5).

    python bench/video_write.py [--frames 81] [--width 1280] [--height 720] [--skip-settings]

Prints a markdown table: one row per preset / thread setting / CRF, with the encode time (rgb24 array in,
finished file out), the file size and the PSNR of the decoded video against the source (RGB, all frames).
Then times the rgb24 -> yuv420p conversion alone, and the writer as the pipeline will use it: chunks of
1 + 4 + 4 ... frames arriving at the VAE decode's pace on an H200 (21 chunks over 3.5 s), and the "tail",
the time `VideoWriter.close()` takes after the last `write()`.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from fractions import Fraction

import av
import numpy as np

from turbowan.video import VideoWriter, crf_for, write_video


def make_clip(t: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth moving gradients, a few moving shapes and mild noise: content like a generated video, not noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    y, x = y / h, x / w
    shapes = [(rng.random(2), rng.uniform(-0.01, 0.01, 2), rng.uniform(0.05, 0.15), rng.random(3)) for _ in range(6)]
    frames = np.empty((t, h, w, 3), np.uint8)
    for i in range(t):
        img = np.stack([0.2 + 0.6 * x + 0.1 * np.sin(6 * y + i / 9),
                        0.3 + 0.5 * y * (0.8 + 0.2 * np.cos(i / 13)),
                        0.5 + 0.3 * np.sin(4 * (x + y) + i / 7)], axis=-1)
        img += (0.04 * np.sin(70 * x - i / 3) * np.sin(50 * y + i / 5))[..., None]  # moving fine texture
        for (cy, cx), (vy, vx), radius, colour in shapes:
            inside = (y - cy - vy * i) ** 2 + ((x - cx - vx * i) * w / h) ** 2 < radius ** 2
            img[inside] = colour
        img += rng.normal(0, 2.0 / 255, img.shape).astype(np.float32)  # sensor-like grain
        frames[i] = np.clip(img * 255 + 0.5, 0, 255)
    return frames


def encode(pixels: np.ndarray, dest: str, preset: str, crf: int, thread_type: str) -> float:
    """Encode like turbowan.video's mp4 path with the given setting; return wall seconds."""
    start = time.perf_counter()
    with av.open(dest, mode="w", format="mp4", options={"movflags": "faststart"}) as container:
        stream = container.add_stream("libx264", rate=Fraction(16))
        stream.width, stream.height, stream.pix_fmt = pixels.shape[2], pixels.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        stream.codec_context.thread_count = 0  # auto: x264 picks from the core count
        stream.codec_context.thread_type = thread_type
        for image in pixels:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
    return time.perf_counter() - start


def psnr(path: str, source: np.ndarray, source_yuv: np.ndarray) -> tuple[float, float]:
    """(RGB PSNR against the source frames, YUV PSNR against the yuv420p frames the encoder was given).

    The RGB figure is what a viewer gets; it includes the 4:2:0 chroma loss common to every setting, so the
    YUV figure is the one that tells encoder settings apart."""
    with av.open(path) as container:
        frames = list(container.decode(video=0))
    rgb = np.stack([f.to_ndarray(format="rgb24") for f in frames])
    yuv = np.stack([f.to_ndarray(format="yuv420p") for f in frames])
    return _psnr(rgb, source), _psnr(yuv, source_yuv)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255 ** 2 / np.mean((a.astype(np.float32) - b.astype(np.float32)) ** 2)))


def paced_tail(pixels: np.ndarray, dest: str, decode_s: float = 2.0) -> tuple[float, float]:
    """Feed chunks of 1, 4, 4, ... frames at the decode pace; return (seconds in write() calls, close() seconds)."""
    chunks = [pixels[:1]] + [pixels[i:i + 4] for i in range(1, len(pixels), 4)]
    pace = decode_s / len(chunks)
    in_write = 0.0
    with VideoWriter(dest, fps=16) as writer:
        for chunk in chunks:
            time.sleep(pace)  # the VAE decoding the next latent frame
            start = time.perf_counter()
            writer.write(chunk)
            in_write += time.perf_counter() - start
        start = time.perf_counter()
        writer.close()
        return in_write, time.perf_counter() - start


def tail_sweep(pixels: np.ndarray, source_yuv: np.ndarray, tmp: str, repeats: int = 3) -> None:
    """VideoWriter's tail at the 720p decode pace (2.0 s) by x264 frame-thread count and rc-lookahead: frames
    still queued in x264 (one per frame thread plus the lookahead) are what close() waits for."""
    from turbowan import video

    saved = video._X264_THREAD_COUNT, dict(video._X264_OPTIONS)
    print("| threads | rc-lookahead | tail s (median of 3) | size KiB | PSNR RGB dB | PSNR YUV dB |")
    print("|---|---|---|---|---|---|")
    try:
        for threads in (0, 8):
            for lookahead in (None, 10):
                video._X264_THREAD_COUNT = threads
                video._X264_OPTIONS = {k: v for k, v in saved[1].items() if k != "rc-lookahead"}
                if lookahead:
                    video._X264_OPTIONS["rc-lookahead"] = str(lookahead)
                dest = os.path.join(tmp, f"tail-{threads}-{lookahead}.mp4")
                tails = sorted(paced_tail(pixels, dest)[1] for _ in range(repeats))
                rgb, yuv = psnr(dest, pixels, source_yuv)
                print(f"| {threads or 'auto'} | {lookahead or 'preset (20)'} | {tails[len(tails) // 2]:.2f} "
                      f"| {os.path.getsize(dest) / 1024:.0f} | {rgb:.2f} | {yuv:.2f} |", flush=True)
    finally:
        video._X264_THREAD_COUNT, video._X264_OPTIONS = saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--skip-settings", action="store_true", help="only the conversion and the writer")
    parser.add_argument("--tail-sweep", action="store_true",
                        help="only the writer's tail (close) by x264 thread count and lookahead, fed at the decode pace")
    args = parser.parse_args()
    pixels = make_clip(args.frames, args.height, args.width)
    start = time.perf_counter()
    frames = [av.VideoFrame.from_ndarray(image, format="rgb24") for image in pixels]
    wrap = time.perf_counter() - start
    start = time.perf_counter()
    source_yuv = np.stack([frame.reformat(format="yuv420p").to_ndarray() for frame in frames])
    convert = time.perf_counter() - start
    crf = crf_for("mp4", 8)
    tmp = tempfile.mkdtemp()
    print(f"{args.frames} frames of {args.width}x{args.height}, nproc {os.cpu_count()}, PyAV {av.__version__}\n")
    if args.tail_sweep:
        tail_sweep(pixels, source_yuv, tmp)
        return

    if not args.skip_settings:
        settings = [(p, "SLICE", crf) for p in ("medium", "fast", "faster", "veryfast")]
        settings += [(p, "FRAME", crf) for p in ("medium", "fast", "faster", "veryfast")]
        settings += [(p, "FRAME", crf - 1) for p in ("faster", "veryfast")]
        settings += [(p, "FRAME", crf - 2) for p in ("faster", "veryfast")]
        print("| preset | threads | CRF | encode s | fps | size KiB | PSNR RGB dB | PSNR YUV dB |")
        print("|---|---|---|---|---|---|---|---|")
        for preset, threads, c in settings:
            dest = os.path.join(tmp, f"{preset}-{threads}-{c}.mp4")
            seconds = encode(pixels, dest, preset, c, threads)
            rgb, yuv = psnr(dest, pixels, source_yuv)
            print(f"| {preset} | {threads} | {c} | {seconds:.2f} | {len(pixels) / seconds:.1f} "
                  f"| {os.path.getsize(dest) / 1024:.0f} | {rgb:.2f} | {yuv:.2f} |", flush=True)

    print(f"\nrgb24 -> yuv420p: from_ndarray {wrap:.2f} s + reformat {convert:.2f} s for {len(pixels)} frames "
          "(one thread)")

    dest = os.path.join(tmp, "writer.mp4")
    start = time.perf_counter()
    write_video(pixels, dest)
    seconds = time.perf_counter() - start
    rgb, yuv = psnr(dest, pixels, source_yuv)
    print(f"write_video (all frames at once): {seconds:.2f} s, {os.path.getsize(dest) / 1024:.0f} KiB, "
          f"PSNR RGB {rgb:.2f} dB, YUV {yuv:.2f} dB")
    in_write, tail = paced_tail(pixels, dest)
    print(f"VideoWriter fed 1+4+4... frames over 2.0 s: {in_write:.3f} s inside write(), tail (close) {tail:.2f} s")


if __name__ == "__main__":
    main()
