"""Issue 12, the API side: `generate_i2v` refuses what it can check in one ValueError sentence before any VAE or
DiT work, and takes an image file path. Runs on the demo's tiny random models."""

from __future__ import annotations

import pytest
import torch

import turbowan
from turbowan.demo import DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH, build_demo_models, demo_image


@pytest.fixture
def models(monkeypatch):
    """The demo's tiny (high, low, vae), whose VAE fails the test if it is used: refusals come before the work."""
    high, low, vae = build_demo_models()

    def fail(*args, **kwargs):
        raise AssertionError("the VAE ran before the refusal")

    monkeypatch.setattr(vae, "encode", fail)
    return high, low, vae


def generate(models, image=None, **kwargs):
    text = 0.1 * torch.randn(1, 16, 4096, generator=torch.Generator().manual_seed(0))
    kwargs = {"num_frames": DEMO_FRAMES, "width": DEMO_WIDTH, "height": DEMO_HEIGHT, "device": "cpu", **kwargs}
    return turbowan.generate_i2v(*models, demo_image() if image is None else image, text, **kwargs)


def assert_one_sentence(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message and all(w in message for w in words), message


@pytest.mark.parametrize("option, value", [("num_steps", 0), ("seed", 2**64), ("seed", -1),
                                           ("sigma_max", float("nan")), ("sigma_max", float("inf")),
                                           ("boundary", float("nan")), ("num_samples", 0)])
def test_out_of_range_number_is_refused_before_the_vae_runs(models, option, value):
    with pytest.raises(ValueError) as exc_info:
        generate(models, **{option: value})
    assert_one_sentence(exc_info, option)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a torch that sees no CUDA GPU")
def test_cuda_device_without_cuda_is_refused_in_one_sentence(models):
    with pytest.raises(ValueError) as exc_info:
        generate(models, device="cuda")
    assert_one_sentence(exc_info, "sees no CUDA GPU")


def test_device_that_cannot_run_the_models_is_refused_in_one_sentence(models):
    with pytest.raises(ValueError) as exc_info:
        generate(models, device="meta")
    assert_one_sentence(exc_info, "meta", "cpu")


def test_cpu_run_that_would_not_fit_in_memory_is_refused_before_the_vae_runs(models, monkeypatch):
    monkeypatch.setattr("turbowan.pipeline.available_ram_bytes", lambda: 16 * 10**9)
    with pytest.raises(ValueError) as exc_info:
        generate(models, num_frames=10001, width=1280, height=720)
    assert_one_sentence(exc_info, "needs about", "16 GB are available", "fewer frames")


def test_image_path_string_is_opened_like_the_image(tmp_path):
    path = tmp_path / "photo.png"
    demo_image().save(path)
    models = build_demo_models()
    from_path = generate(models, image=str(path), num_steps=1)
    from_image = generate(models, num_steps=1)
    assert torch.equal(from_path, from_image)


def test_missing_image_path_is_refused_in_one_sentence(models, tmp_path):
    with pytest.raises(ValueError) as exc_info:
        generate(models, image=str(tmp_path / "nothing.png"))
    assert_one_sentence(exc_info, "does not exist")
