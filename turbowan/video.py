"""Frames -> a video file (mp4 H.264, webm VP9 or gif), shared by the CLI and the ComfyUI save node.

`write_video(frames, path, fps=16, format=None, quality=8, loop=True, metadata=None)` (format: from the extension)
writes a whole clip; `VideoWriter(path, ...)` takes the same settings and accepts the clip chunk by chunk, encoding
in a background thread while the caller produces the next chunk (the VAE decodes 4 frames per latent frame), so
that little is left to do once the last frame arrives:

    with VideoWriter("out.mp4", fps=16) as writer:
        for chunk in chunks:           # [t, H, W, 3] each
            writer.write(chunk)        # returns at once unless the encoder is 32 frames behind
    # leaving the block closes it: flush, then rename into place; an exception aborts it instead

* ``frames``: [T, H, W, 3] float in [0, 1] (numpy or torch, any device; clipped) or uint8.
* mp4: H.264 (libx264, preset and threads chosen in bench/VIDEO_WRITE.md), yuv420p, +faststart so browsers can play it while it downloads. yuv420p needs even
  width and height: an odd size is **padded** by one pixel (the last row / column repeated), never cropped,
  so no generated pixel is lost. webm: VP9 (libvpx-vp9), yuv420p, constant-quality mode, same padding.
  gif: Pillow, one adaptive palette per frame (Floyd-Steinberg dithering), any size; GIF delays count in
  1/100 s, so 16 fps plays at 1/0.06 = 16.7 fps.
* ``quality`` 0-10 (10 best): mp4 CRF 40..12 (8 -> 18, x264's "visually lossless"), webm CRF 55..15
  (8 -> 23), gif palette of 16..256 colours (8 and above -> 256).
* ``loop``: GIF only (play forever, or once); mp4 / webm players decide looping themselves.
* ``metadata``: optional text tags for mp4 / webm (ComfyUI stores its prompt and workflow JSON there).

The file is written to a temporary name in the destination folder and moved into place with `os.replace`,
so an error or an interrupt never leaves a half-written video under the final name; after a failure or an
abort the temporary file is removed too.
"""

from __future__ import annotations

import os
import queue
import threading
import uuid
from fractions import Fraction
from pathlib import Path
from typing import Mapping, Optional, Union

import numpy as np

from .options import VIDEO_FORMATS

# (CRF at quality 10, CRF at quality 0) per container
_CRF_RANGE = {"mp4": (12, 40), "webm": (15, 55)}
_CODEC = {"mp4": "libx264", "webm": "libvpx-vp9"}
# libx264 speed at equal quality (bench/VIDEO_WRITE.md): "faster" at the same CRF gives the same size and
# PSNR as the default "medium" in 0.6-0.7 of the time; frame threads scale past a few cores, slice threads don't
# rc-lookahead 10 (the preset's 20 otherwise): x264 holds back one frame per frame thread plus the lookahead, and
# close() waits for those; 10 shortens that tail at the same size and PSNR (bench/VIDEO_WRITE.md, --tail-sweep)
_X264_OPTIONS = {"preset": "faster", "rc-lookahead": "10"}
_X264_THREADS = "FRAME"
_X264_THREAD_COUNT = 0  # 0: x264 picks (1.5 x cores)


def check_writable(path: Union[str, os.PathLike], option: str = "-o") -> None:
    """Refuse, in one sentence, an output whose folder cannot be created or written: creates the folder and
    creates and removes a probe file there (where the writer puts its temporary file), before any work."""
    path = Path(path)
    probe = path.parent / f".{path.stem}.{uuid.uuid4().hex[:12]}.probe"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ValueError(f"{option} {str(path)!r} cannot be written ({reason} in {str(path.parent)!r}); "
                         "choose another folder") from None


def crf_for(format: str, quality: int) -> int:
    """CRF for a 0-10 quality: linear between the container's best and worst useful CRF."""
    best, worst = _CRF_RANGE[format]
    return round(worst - (worst - best) * quality / 10)


def gif_colors(quality: int) -> int:
    """Palette size for a 0-10 quality: 16 colours at 0, 256 from 8 up."""
    return int(min(256, round(16 + 240 * quality / 8)))


def _check_frames_shape(shape: tuple) -> None:
    if len(shape) != 4 or shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3] (RGB), got shape {tuple(shape)}")
    if shape[0] == 0 or shape[1] == 0 or shape[2] == 0:
        raise ValueError(f"frames must hold at least one non-empty frame, got shape {tuple(shape)}")


def _round_to_uint8(t):
    """A float torch tensor in [0, 1] -> uint8 on its own device (float32 arithmetic, round to nearest, as 8-bit
    image writers do; the numpy path below computes the same)."""
    return (t.float().clamp(0.0, 1.0) * 255.0 + 0.5).byte()


def _is_cuda_tensor(frames) -> bool:
    return hasattr(frames, "detach") and frames.is_cuda


def _uint8_on_host_async(frames) -> tuple:
    """A CUDA chunk [T, H, W, 3] -> (pinned uint8 host tensor, CUDA event marking its copy's end), without waiting:
    rounded on the GPU as `to_uint8_frames` does, then copied asynchronously, so the caller's next GPU work (the
    next chunk's decode) is queued at once instead of after a synchronising `.cpu()` (0.4 s over a 720p decode)."""
    import torch

    t = frames.detach()
    _check_frames_shape(tuple(t.shape))
    if t.is_floating_point():
        t = _round_to_uint8(t)
    elif t.dtype != torch.uint8:
        raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {t.dtype}")
    host = torch.empty(t.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(t, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(t.device))
    return host, ready


def to_uint8_frames(frames, copy: bool = False) -> np.ndarray:
    """[T, H, W, 3] float in [0, 1] or uint8 (numpy / torch) -> contiguous uint8 numpy [T, H, W, 3].

    ``copy``: never return a view of the caller's memory (uint8 input is copied too)."""
    if hasattr(frames, "detach"):  # torch tensor, possibly on a GPU or in bf16
        t = frames.detach()
        if t.is_floating_point():
            # rounded on the tensor's own device: a GPU chunk then crosses the bus as uint8, a quarter of float32
            t = _round_to_uint8(t)
        frames = t.cpu().numpy()
    arr = np.asarray(frames)
    _check_frames_shape(arr.shape)
    if arr.dtype == np.uint8:
        return arr.copy(order="C") if copy else np.ascontiguousarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"frames must be float in [0, 1] or uint8, got dtype {arr.dtype}")
    # round to nearest, as 8-bit image writers do
    return np.ascontiguousarray((np.clip(arr, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """[..., H, W, 3]: repeat the last row / column once where H / W is odd (yuv420p needs even sizes)."""
    h, w = frames.shape[-3:-1]
    if h % 2 == 0 and w % 2 == 0:
        return frames
    return np.pad(frames, ((0, 0),) * (frames.ndim - 3) + ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")


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
    with VideoWriter(path, fps, format, quality, loop, metadata) as writer:
        writer.write(frames)
    return writer.close()


_END = object()  # queued by close() / abort(): no more frames


class VideoWriter:
    """Streaming `write_video`: ``write()`` chunks of frames as they are made, ``close()`` to finish the file.

    ``write(chunk)`` takes [t, H, W, 3] like ``write_video``'s ``frames`` (the first chunk fixes the frame size),
    rounds it to uint8 (on the tensor's device for torch) and queues it; a background thread converts to
    yuv420p and encodes. Up to ``max_queued_frames`` frames wait in the queue; beyond that ``write()`` waits
    for the encoder, so memory stays bounded. ``close()`` flushes the encoder, moves the file into place and
    returns its path: everything else already happened during the writes, so timing ``close()`` gives the
    "tail" a caller waits for after its last frame. ``abort()`` drops what is queued and removes the
    temporary file. An error in the encoder thread is raised again from the next ``write()`` or from
    ``close()``, with no file left under either name. As a context manager, leaving the block closes the
    writer, or aborts it if an exception is leaving.
    """

    def __init__(self, path: Union[str, os.PathLike], fps: float = 16, format: Optional[str] = None,
                 quality: int = 8, loop: bool = True, metadata: Optional[Mapping[str, str]] = None,
                 max_queued_frames: int = 32):
        self.path = Path(path)
        self.format = (format or self.path.suffix.lstrip(".") or "mp4").lower()
        if self.format not in VIDEO_FORMATS:
            raise ValueError(f"video format must be one of {VIDEO_FORMATS}, got {self.format!r}")
        if not 0 <= quality <= 10:
            raise ValueError(f"quality must be between 0 and 10 (10 = best), got {quality}")
        if not fps > 0:
            raise ValueError(f"fps must be positive, got {fps}")
        self.fps, self.quality, self.loop, self.metadata = fps, quality, loop, metadata
        # a unique hidden name beside the target; created by the encoder itself, so it gets the usual permissions
        self._tmp = self.path.parent / f".{self.path.stem}.{uuid.uuid4().hex[:12]}.part.{self.format}"
        self._queue: queue.Queue = queue.Queue(maxsize=max_queued_frames)
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None  # started by the first chunk, which fixes the size
        self._size: Optional[tuple] = None
        self._error: Optional[BaseException] = None
        self._state = "open"  # -> "closed" (file in place) or "aborted" (nothing left)
        self.frames_written = 0

    @property
    def temporary_path(self) -> Path:
        """Where the video is written until `close` moves it into place (removed by `abort`)."""
        return self._tmp

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None and self._state == "open":
            self.close()
        else:
            self.abort()  # does nothing once closed or aborted

    def write(self, frames) -> None:
        """Queue a chunk [t, H, W, 3] (float in [0, 1] or uint8, numpy or torch); raises the encoder's error."""
        if self._state != "open":
            raise ValueError(f"this video writer is already {self._state}")
        self._raise_encoder_error()
        # a copy: the encoder reads it later, after the caller may have reused its buffer
        if _is_cuda_tensor(frames):
            pixels, ready = _uint8_on_host_async(frames)
        else:
            pixels, ready = to_uint8_frames(frames, copy=True), None
        size = tuple(pixels.shape[1:3])
        if self._size is None:
            self._start(size)
        elif size != self._size:
            raise ValueError(f"every chunk must hold frames of the first chunk's size {self._size[1]}x{self._size[0]} "
                             f"(W x H), got {size[1]}x{size[0]}")
        for image in pixels:  # per frame, so the queue bound is in frames and an abort stops within a frame
            self._queue.put((image, ready))
        self.frames_written += len(pixels)
        self._raise_encoder_error()

    def close(self) -> str:
        """Finish the file and move it into place; return its path (as str). Waits for the queued frames."""
        if self._state == "closed":
            return str(self.path)
        if self._state == "aborted":
            raise ValueError("this video writer was aborted")
        if self._thread is None:
            self.abort()
            raise ValueError("no frames were written")
        self._queue.put(_END)
        self._thread.join()
        self._raise_encoder_error()
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._state = "closed"
        return str(self.path)

    def abort(self) -> None:
        """Stop encoding and remove the temporary file; the final name is never touched. Safe to repeat."""
        if self._state != "open":
            return
        self._state = "aborted"
        self._cancel.set()
        if self._thread is not None:
            if self._thread.is_alive():
                # the thread drops frames once cancelled, so this put never waits long; close() may
                # already have queued _END, and then the thread is finishing or gone
                self._queue.put(_END)
            self._thread.join()
        self._tmp.unlink(missing_ok=True)

    def _start(self, size: tuple) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._size = size
        self._thread = threading.Thread(target=self._encode_queued, name="turbowan-video-writer", daemon=True)
        self._thread.start()

    def _raise_encoder_error(self) -> None:
        if self._error is not None:
            self.abort()
            raise self._error

    def _encode_queued(self) -> None:
        """The encoder thread: frames from the queue into the temporary file, until _END."""
        encoder = item = None
        try:
            while (item := self._queue.get()) is not _END:
                if self._cancel.is_set():
                    continue  # aborted: drop what is queued, until _END
                image, ready = item
                if ready is not None:  # a GPU chunk: its copy to this pinned buffer was queued, not waited for
                    ready.synchronize()
                    image = image.numpy()
                if encoder is None:
                    encoder = _ENCODERS[self.format](self, str(self._tmp), self._size)
                encoder.add(image)
            if not self._cancel.is_set():
                encoder.finish()
        except BaseException as error:  # KeyboardInterrupt included: raised again in the caller's thread
            self._error = error
            self._cancel.set()
            while item is not _END:  # keep taking frames, so that a write() never blocks on a full queue
                item = self._queue.get()
        finally:
            if encoder is not None:
                encoder.close()


class _AvEncoder:
    """mp4 (libx264) / webm (libvpx-vp9) through PyAV, yuv420p, odd sizes padded."""

    def __init__(self, writer: VideoWriter, dest: str, size: tuple):
        import av

        fmt = writer.format
        # mp4 keeps arbitrary tags only with use_metadata_tags; faststart moves the index to the front
        options = {"movflags": "use_metadata_tags+faststart"} if fmt == "mp4" else {}
        self.container = av.open(dest, mode="w", format=fmt, options=options)
        try:
            for key, value in (writer.metadata or {}).items():
                self.container.metadata[key] = value
            self.stream = self.container.add_stream(_CODEC[fmt], rate=Fraction(writer.fps).limit_denominator(1000))
            self.stream.height, self.stream.width = (n + n % 2 for n in size)
            self.stream.pix_fmt = "yuv420p"
            crf = crf_for(fmt, writer.quality)
            if fmt == "mp4":
                self.stream.options = {"crf": str(crf), **_X264_OPTIONS}
                self.stream.codec_context.thread_type = _X264_THREADS
                self.stream.codec_context.thread_count = _X264_THREAD_COUNT
            else:
                self.stream.options = {"crf": str(crf)}
                self.stream.bit_rate = 0  # libvpx: CRF alone sets the quality (constant-quality mode)
        except BaseException:
            self.container.close()
            raise

    def add(self, image: np.ndarray) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(pad_to_even(image), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def finish(self) -> None:
        self.container.mux(self.stream.encode())  # flush delayed frames

    def close(self) -> None:
        self.container.close()


class _GifEncoder:
    """Pillow: frames quantized as they come (the slow part), the file written by finish()."""

    def __init__(self, writer: VideoWriter, dest: str, size: tuple):
        self.writer, self.dest, self.images = writer, dest, []

    def add(self, image: np.ndarray) -> None:
        from PIL import Image

        self.images.append(Image.fromarray(image).quantize(
            colors=gif_colors(self.writer.quality), method=Image.Quantize.MEDIANCUT, dither=Image.Dither.FLOYDSTEINBERG))

    def finish(self) -> None:
        # GIF delays are in 1/100 s; Pillow takes milliseconds and rounds to 10 ms
        extra = {"loop": 0} if self.writer.loop else {}
        self.images[0].save(self.dest, format="GIF", save_all=True, append_images=self.images[1:],
                            duration=1000.0 / self.writer.fps, disposal=1, optimize=False, **extra)

    def close(self) -> None:
        self.images.clear()


_ENCODERS = {"mp4": _AvEncoder, "webm": _AvEncoder, "gif": _GifEncoder}
