"""turbowan.video.VideoWriter: chunked writes in a background thread, atomic, no partial file on failure."""

from __future__ import annotations

import os
import threading
import time

import av
import numpy as np
import pytest

from turbowan import video
from turbowan.video import VideoWriter, write_video


def gradient_frames(t=9, h=48, w=64):
    """Smooth moving gradients as uint8 [t, h, w, 3]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    i = np.arange(t, dtype=np.float32)[:, None, None]
    rgb = [0.1 + 0.7 * x / w + 0.2 * i / t, 0.1 + 0.8 * y / h + 0 * i, 0.5 + 0.4 * np.sin((x + y + 4 * i) / 30)]
    return (np.stack(rgb, axis=-1) * 255 + 0.5).astype(np.uint8)


def decode(path):
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def failing_encoder(monkeypatch, on_frame):
    """Make the encoder thread raise a disk-full error when it reaches frame ``on_frame`` (1-based)."""
    real = video._AvEncoder.add
    calls = {"n": 0}

    def add(self, image):
        calls["n"] += 1
        if calls["n"] == on_frame:
            raise OSError(28, "No space left on device")
        real(self, image)

    monkeypatch.setattr(video._AvEncoder, "add", add)


def held_encoder(monkeypatch):
    """Make the encoder thread wait before its first frame until the returned event is set."""
    go = threading.Event()
    real = video._AvEncoder.add

    def add(self, image):
        go.wait(10)
        real(self, image)

    monkeypatch.setattr(video._AvEncoder, "add", add)
    return go


@pytest.mark.parametrize("fmt", ["mp4", "webm", "gif"])
def test_chunked_writes_decode_like_one_shot(tmp_path, fmt):
    # 128x96, not 64x48: libx264 output for frames that small varies from the first encode in a process to
    # the next (today's one-shot writer too), so bit-exact comparisons need a larger frame
    frames = gradient_frames(h=96, w=128)
    whole = decode(write_video(frames, tmp_path / f"whole.{fmt}"))
    with VideoWriter(tmp_path / f"chunks.{fmt}") as writer:
        for chunk in (frames[:1], frames[1:5], frames[5:]):  # the VAE's 1 + 4 + 4 frames
            writer.write(chunk)
    assert np.array_equal(decode(tmp_path / f"chunks.{fmt}"), whole)


def test_encoder_failure_is_raised_by_close_and_leaves_no_file(tmp_path, monkeypatch):
    failing_encoder(monkeypatch, on_frame=9)  # the last frame
    writer = VideoWriter(tmp_path / "clip.mp4")
    writer.write(gradient_frames())
    with pytest.raises(OSError, match="No space"):
        writer.close()
    assert os.listdir(tmp_path) == []  # neither the video nor its temporary file


def test_encoder_failure_is_raised_by_the_next_write_and_leaves_no_file(tmp_path, monkeypatch):
    failing_encoder(monkeypatch, on_frame=2)
    frames = gradient_frames()
    with pytest.raises(OSError, match="No space"):
        with VideoWriter(tmp_path / "clip.mp4") as writer:
            writer.write(frames[:4])
            for _ in range(500):  # the failure reaches write() once the thread has hit it
                time.sleep(0.01)
                writer.write(frames[:1])
            raise AssertionError("write() never raised the encoder's error")
    assert os.listdir(tmp_path) == []


def test_abort_leaves_nothing(tmp_path):
    with VideoWriter(tmp_path / "clip.mp4") as writer:
        writer.write(gradient_frames())
        writer.abort()
    assert os.listdir(tmp_path) == []


def test_exception_inside_with_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with VideoWriter(tmp_path / "clip.mp4") as writer:
            writer.write(gradient_frames())
            raise RuntimeError("cancelled by the user")
    assert os.listdir(tmp_path) == []


def test_chunk_of_another_size_is_refused(tmp_path):
    with VideoWriter(tmp_path / "clip.mp4") as writer:
        writer.write(gradient_frames(t=3))
        with pytest.raises(ValueError, match="first chunk's size 64x48 .* got 62x48"):
            writer.write(gradient_frames(t=2, w=62))
    assert decode(tmp_path / "clip.mp4").shape == (3, 48, 64, 3)  # the refused chunk was not queued


def test_close_returns_the_path_and_the_file_appears_only_then(tmp_path, monkeypatch):
    go = held_encoder(monkeypatch)
    path = tmp_path / "clip.mp4"
    writer = VideoWriter(path)
    writer.write(gradient_frames())  # returns while the encoder thread is still held
    assert not path.exists()
    go.set()
    assert writer.close() == str(path)
    assert os.listdir(tmp_path) == ["clip.mp4"] and len(decode(path)) == 9


def test_caller_may_reuse_its_buffer_after_write(tmp_path, monkeypatch):
    go = held_encoder(monkeypatch)
    frames = gradient_frames()
    buffer = frames.copy()
    writer = VideoWriter(tmp_path / "clip.mp4")
    writer.write(buffer)
    buffer[:] = 0  # the encoder has not read it yet
    go.set()
    assert np.abs(decode(writer.close()).astype(int) - frames).mean() < 3  # coding error only, no black frames



@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_chunks_copied_without_waiting_give_the_video_of_the_host_frames(tmp_path):
    import torch

    frames = gradient_frames(h=96, w=128)
    whole = decode(write_video(frames, tmp_path / "host.mp4"))
    on_gpu = torch.from_numpy(frames).cuda().float() / 255.0  # float, rounded back to the same uint8 on the GPU
    with VideoWriter(tmp_path / "cuda.mp4") as writer:
        for chunk in (on_gpu[:1], on_gpu[1:5], on_gpu[5:]):
            writer.write(chunk)
            chunk.mul_(0)  # the caller reuses its buffer at once, in stream order after the queued copy
    assert np.array_equal(decode(tmp_path / "cuda.mp4"), whole)
