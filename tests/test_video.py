"""turbowan.video.write_video: mp4 (H.264 yuv420p), webm (VP9), gif; atomic writes."""

from __future__ import annotations

import os

import av
import numpy as np
import pytest
import torch
from helpers import decode
from PIL import Image

from turbowan import video
from turbowan.video import write_video


def gradient_frames(t=9, h=48, w=64):
    """Smooth moving gradients: easy to compress, so decoded pixels stay close to the originals."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    frames = []
    for i in range(t):
        r = 0.1 + 0.7 * x / w + 0.2 * i / t
        g = 0.1 + 0.8 * y / h
        b = 0.5 + 0.4 * np.sin((x + y + 4 * i) / 30)
        frames.append(np.stack([r, g, b], axis=-1))
    return np.stack(frames).astype(np.float32)


@pytest.mark.parametrize("fmt,codec", [("mp4", "h264"), ("webm", "vp9"), ("gif", "gif")])
def test_round_trip_keeps_frame_count_and_size(tmp_path, fmt, codec):
    frames = gradient_frames()
    path = write_video(frames, tmp_path / f"clip.{fmt}", fps=16, format=fmt)
    assert path == str(tmp_path / f"clip.{fmt}")
    decoded = decode(path)
    assert decoded.frames.shape == (9, 48, 64, 3)
    assert decoded.codec == codec
    # quality 8 on smooth gradients: measured mean error ~2.2 levels of 255 for mp4 / webm (4:2:0 chroma and
    # limited-range YUV dominate) and ~2.9 for gif (palette + dither); a channel swap or range bug gives tens
    limit = 4.0 if fmt == "gif" else 3.0
    assert np.abs(decoded.frames.astype(np.float32) - frames * 255).mean() < limit


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_mp4_and_webm_are_yuv420p_at_the_requested_rate(tmp_path, fmt):
    path = write_video(gradient_frames(), tmp_path / f"clip.{fmt}", fps=16)
    decoded = decode(path)
    assert decoded.pix_fmt == "yuv420p"
    assert decoded.average_rate == 16


@pytest.mark.parametrize("fmt", ["mp4", "webm"])
def test_odd_sizes_are_padded_to_even_by_repeating_the_edge(tmp_path, fmt):
    frames = gradient_frames(h=47, w=63)
    decoded = decode(write_video(frames, tmp_path / f"odd.{fmt}")).frames
    assert decoded.shape == (9, 48, 64, 3)  # padded, nothing cropped
    # the added row / column repeats its neighbour (up to coding error, as above)
    assert np.abs(decoded[:, -1].astype(int) - decoded[:, -2].astype(int)).mean() < 4
    assert np.abs(decoded[:, :, -1].astype(int) - decoded[:, :, -2].astype(int)).mean() < 4


def test_gif_keeps_odd_sizes_and_loop_flag(tmp_path):
    looping = write_video(gradient_frames(h=47, w=63), tmp_path / "loop.gif", loop=True)
    once = write_video(gradient_frames(h=47, w=63), tmp_path / "once.gif", loop=False)
    with Image.open(looping) as im:
        assert im.size == (63, 47) and im.n_frames == 9 and im.info.get("loop") == 0
    with Image.open(once) as im:
        assert "loop" not in im.info


def test_higher_quality_means_larger_file(tmp_path):
    noise = np.random.default_rng(0).random((9, 48, 64, 3), dtype=np.float32)
    low = os.path.getsize(write_video(noise, tmp_path / "q2.mp4", quality=2))
    high = os.path.getsize(write_video(noise, tmp_path / "q10.mp4", quality=10))
    assert high > low
    assert video.crf_for("mp4", 8) == 18 and video.crf_for("mp4", 10) == 12 and video.crf_for("mp4", 0) == 40


def test_accepts_torch_and_uint8_frames(tmp_path):
    frames = gradient_frames()
    as_torch = decode(write_video(torch.from_numpy(frames).to(torch.bfloat16), tmp_path / "t.mp4")).frames
    as_uint8 = decode(write_video((frames * 255 + 0.5).astype(np.uint8), tmp_path / "u.mp4")).frames
    assert as_torch.shape == as_uint8.shape == (9, 48, 64, 3)


def test_metadata_is_stored_in_mp4(tmp_path):
    metadata = decode(write_video(gradient_frames(), tmp_path / "m.mp4", metadata={"prompt": '{"1": {}}'})).metadata
    assert metadata["prompt"] == '{"1": {}}'


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def interrupt_on_third_frame(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", interrupt_on_third_frame)
    with pytest.raises(KeyboardInterrupt):
        write_video(gradient_frames(), tmp_path / "clip.mp4")
    assert os.listdir(tmp_path) == []  # neither the video nor its temporary file


def test_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    os.umask(umask)
    path = write_video(gradient_frames(t=5), tmp_path / "clip.mp4")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask  # readable like any other output, not 0600


def test_existing_file_is_replaced_whole(tmp_path):
    target = tmp_path / "clip.mp4"
    target.write_bytes(b"old")
    write_video(gradient_frames(t=5), target)
    decoded = decode(target).frames
    assert len(decoded) == 5 and os.listdir(tmp_path) == ["clip.mp4"]


@pytest.mark.parametrize("bad,kwargs,message", [
    (np.zeros((4, 8, 8)), {}, r"\[T, H, W, 3\]"),
    (np.zeros((4, 8, 8, 3), np.float32), {"quality": 11}, "between 0 and 10"),
    (np.zeros((4, 8, 8, 3), np.float32), {"format": "avi"}, "one of"),
    (np.zeros((4, 8, 8, 3), np.float32), {"fps": 0}, "positive"),
])
def test_bad_arguments_are_refused_before_writing(tmp_path, bad, kwargs, message):
    with pytest.raises(ValueError, match=message):
        write_video(bad, tmp_path / "x.mp4", **kwargs)
    assert os.listdir(tmp_path) == []
