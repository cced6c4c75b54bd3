"""Frames -> a video file (mp4 H.264, webm VP9 or gif), shared by the CLI and the ComfyUI save node.

`write_video(frames, path, fps=16, format=None, quality=8, loop=True, metadata=None)` (format: from the extension):

* ``frames``: [T, H, W, 3] float in [0, 1] (numpy or torch, any device; clipped) or uint8.
* mp4: H.264 (libx264), yuv420p, +faststart so browsers can play it while it downloads. yuv420p needs even
  width and height: an odd size is **padded** by one pixel (the last row / column repeated), never cropped,
  so no generated pixel is lost. webm: VP9 (libvpx-vp9), yuv420p, constant-quality mode, same padding.
  gif: Pillow, one adaptive palette per frame (Floyd-Steinberg dithering), any size; GIF delays count in
  1/100 s, so 16 fps plays at 1/0.06 = 16.7 fps.
* ``quality`` 0-10 (10 best): mp4 CRF 40..12 (8 -> 18, x264's "visually lossless"), webm CRF 55..15
  (8 -> 23), gif palette of 16..256 colours (8 and above -> 256).
* ``loop``: GIF only (play forever, or once); mp4 / webm players decide looping themselves.
* ``metadata``: optional text tags for mp4 / webm (ComfyUI stores its prompt and workflow JSON there).

The file is written to a temporary name in the destination folder and moved into place with `os.replace`,
so an error or an interrupt never leaves a half-written video under the final name.
"""

from __future__ import annotations

import os
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from .options import VIDEO_FORMATS

# (CRF at quality 10, CRF at quality 0) per container
_CRF_RANGE = {"mp4": (12, 40), "webm": (15, 55)}
_CODEC = {"mp4": "libx264", "webm": "libvpx-vp9"}


def crf_for(format: str, quality: int) -> int:
    """CRF for a 0-10 quality: linear between the container's best and worst useful CRF."""
    best, worst = _CRF_RANGE[format]
    return round(worst - (worst - best) * quality / 10)


def gif_colors(quality: int) -> int:
    """Palette size for a 0-10 quality: 16 colours at 0, 256 from 8 up."""
    return int(min(256, round(16 + 240 * quality / 8)))


def to_uint8_frames(frames) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] or uint8 (numpy / torch) -> contiguous uint8 numpy [T, H, W, 3]."""
    if hasattr(frames, "detach"):  # torch tensor, possibly on a GPU or in bf16
        t = frames.detach()
        if t.is_floating_point():
            t = t.float()
        frames = t.cpu().numpy()
    arr = np.asarray(frames)
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (RGB), got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(arr.shape)}")
    if arr.dtype == np.uint8:
        return np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {arr.dtype}")
    # round to nearest, as 8-bit image writers do
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Repeat the last row / column once where height / width is odd (yuv420p needs even sizes)."""
    _, h, w, _ = frames.shape
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def write_video(
    frames,
    path: Union[str, os.PathLike],
    fps: float = 16,
    format: Optional[str] = None,
    quality: int = 8,
    loop: bool = True,
    metadata: Optional[Mapping[str, str]] = None,
) -> str:
    """Write ``frames`` to ``path`` and return the path (as str). ``format`` defaults to the file extension."""
    path = Path(path)
    fmt = (format or path.suffix.lstrip(".") or "mp4").lower()
    if fmt not in VIDEO_FORMATS:
        raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {fmt!r}")
    if not 0 <= quality <= 10:
        raise ValueError(f"quality must be between 0 and 10 (10 = best), got {quality}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    pixels = to_uint8_frames(frames)
    path.parent.mkdir(parents=True, exist_ok=True)

    # a unique hidden name beside the target; created by the writer itself, so it gets the usual permissions
    tmp = str(path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.part.{fmt}")
    try:
        if fmt == "gif":
            _write_gif(pixels, tmp, fps, quality, loop)
        else:
            _write_av(pixels, tmp, fmt, fps, quality, metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(path)


def _write_av(pixels: np.ndarray, dest: str, fmt: str, fps: float, quality: int,
              metadata: Optional[Mapping[str, str]]) -> None:
    import av

    pixels = pad_to_even(pixels)
    _, h, w, _ = pixels.shape
    # mp4 keeps arbitrary tags only with use_metadata_tags; faststart moves the index to the front
    options = {"movflags": "use_metadata_tags+faststart"} if fmt == "mp4" else {}
    with av.open(dest, mode="w", format=fmt, options=options) as container:
        for key, value in (metadata or {}).items():
            container.metadata[key] = value
        stream = container.add_stream(_CODEC[fmt], rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = w, h
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf_for(fmt, quality))}
        if fmt == "webm":
            stream.bit_rate = 0  # libvpx: CRF alone sets the quality (constant-quality mode)
        for image in pixels:
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():  # flush delayed frames
            container.mux(packet)


def _write_gif(pixels: np.ndarray, dest: str, fps: float, quality: int, loop: bool) -> None:
    from PIL import Image

    colors = gif_colors(quality)
    images = [
        Image.fromarray(image).quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG)
        for image in pixels
    ]
    # GIF delays are in 1/100 s; Pillow takes milliseconds and rounds to 10 ms
    extra = {"loop": 0} if loop else {}
    images[0].save(dest, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps,
                   disposal=1, optimize=False, **extra)
