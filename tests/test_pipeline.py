"""The whole image-to-video job reproduces the reference run, and bad input is refused in one sentence."""

import pytest
import torch
from helpers import fixtures_dir, max_abs, rel_err
from PIL import Image
from safetensors.torch import load_file

import turbowan
from turbowan.pipeline import preprocess_image, prepare_text_embedding, target_size
from turbowan.sampler import initial_noise


def _models(dtype=torch.bfloat16, attention="original"):
    f = fixtures_dir()
    high = turbowan.load_dit(f / "dit" / "TurboWan2.2-I2V-tiny-high.pth", attention=attention, dtype=dtype)
    low = turbowan.load_dit(f / "dit" / "TurboWan2.2-I2V-tiny-low.pth", attention=attention, dtype=dtype)
    vae = turbowan.load_vae(f / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=dtype)
    return high, low, vae


def _reference():
    return load_file(fixtures_dir() / "pipeline" / "pipeline.safetensors")


def _image():
    return Image.open(fixtures_dir() / "pipeline" / "input_image.png")


def test_image_preprocessing_matches_reference_transforms():
    ref = _reference()["image_tensor"]
    x = preprocess_image(_image(), 64, 48)
    # same antialiased bilinear + 8-bit rounding as torchvision's uint8 path; at most one 8-bit step apart
    assert x.shape == ref.shape
    assert max_abs(x, ref) <= 2 / 255 + 1e-6


@pytest.mark.parametrize("mode", ["ode", "sde"])
def test_pipeline_matches_reference_run(mode):
    ref = _reference()
    high, low, vae = _models()
    stages = []
    frames = turbowan.generate_i2v(
        high, low, vae, _image(), ref["crossattn_emb_prefix"], num_frames=9, width=64, height=48,
        seed=0, ode=(mode == "ode"), device="cpu", progress=lambda s, d, t: stages.append((s, d, t)),
    )
    video = ref[f"{mode}.decoded_video"].float()  # [1, 3, 9, 48, 64] in [-1, 1]
    expected = ((video.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
    assert frames.shape == (1, 9, 48, 64, 3) and frames.dtype == torch.float32
    # bf16 end to end (VAE + 4 DiT calls + decode); the reference's bf16 decode alone has 0.18 max abs vs float64
    assert rel_err(frames, expected) < 2e-2
    assert [s for s in stages if s[0] == "sample"] == [("sample", i, 4) for i in range(1, 5)]
    assert ("decode", 3, 3) in stages  # one report per latent frame


def test_sde_frames_match_reference_uint8_within_a_few_levels():
    ref = _reference()
    high, low, vae = _models()
    frames = turbowan.generate_i2v(high, low, vae, _image(), ref["crossattn_emb_prefix"], num_frames=9,
                                   width=64, height=48, seed=0, device="cpu")
    ours = (frames[0] * 255 + 0.5).to(torch.uint8).int()
    theirs = ref["sde.frames_uint8_THWC"].int()
    diff = (ours - theirs).abs().float()
    assert diff.mean() < 1.5  # bf16 rounding moves a few pixels by a few levels
    assert (diff > 8).float().mean() < 0.01


def test_frame_count_not_4n_plus_1_is_refused_with_the_nearest_counts():
    high, low, vae = _models()
    with pytest.raises(ValueError, match=r"4n\+1.*use 77 or 81"):
        turbowan.generate_i2v(high, low, vae, _image(), torch.zeros(1, 8, 4096), num_frames=80, device="cpu")


def test_text_embedding_of_the_wrong_width_names_the_right_encoder():
    with pytest.raises(ValueError, match="umT5-xxl.*CLIPLoader with type 'wan'"):
        prepare_text_embedding(torch.zeros(1, 77, 1024))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_text_embedding_is_refused_before_any_model_runs(bad, monkeypatch):
    high, low, vae = _models(torch.float32)
    emb = torch.zeros(1, 12, 4096)
    emb[0, 3, 7] = bad

    def not_yet(*args, **kwargs):
        raise AssertionError("the VAE ran before the embedding was checked")

    monkeypatch.setattr(vae, "encode", not_yet)
    with pytest.raises(ValueError, match="the text embedding went non-finite .*likely cause: a bad embedding"):
        turbowan.generate_i2v(high, low, vae, _image(), emb, num_frames=5, width=64, height=48, device="cpu")


def test_non_finite_vae_encode_is_an_error_not_a_black_video(monkeypatch):
    high, low, vae = _models(torch.float32)
    monkeypatch.setattr(vae, "encode", lambda video, **kw: torch.full((1, 16, 2, 6, 8), float("nan")))
    with pytest.raises(ValueError, match="the VAE encode of the input image went non-finite .*broken VAE checkpoint"):
        turbowan.generate_i2v(high, low, vae, _image(), torch.zeros(1, 8, 4096), num_frames=5, width=64, height=48,
                              device="cpu")


def test_text_embedding_is_padded_or_cut_to_512_rows():
    assert prepare_text_embedding(torch.ones(1, 10, 4096))[0, 10:].abs().sum() == 0
    assert prepare_text_embedding(torch.ones(1, 600, 4096)).shape == (1, 512, 4096)


def test_presets_follow_the_reference_table():
    assert target_size((100, 100), "720p", "16:9") == (1280, 720)
    assert target_size((100, 100), "480", "1:1") == (480, 480)
    assert target_size((100, 100), "480p", "9:16") == (480, 832)


def test_adaptive_resolution_matches_reference_examples():
    import json

    examples = json.loads((fixtures_dir() / "config.json").read_text())["pipeline"]["adaptive_resolution_examples_(w,h)"]
    for key, (w, h) in examples.items():
        size, rest = key.split("@")
        res, aspect = rest.split("/")
        iw, ih = map(int, size.split("x"))
        assert target_size((iw, ih), res, aspect, adaptive=True) == (w, h), key


@pytest.mark.parametrize("mode", ["RGBA", "L"])
def test_rgba_and_grayscale_images_are_accepted(mode):
    img = _image().convert(mode)
    assert preprocess_image(img, 64, 48).shape == (1, 3, 48, 64)


def test_comfyui_image_tensor_is_accepted():
    img = torch.rand(1, 80, 96, 3)
    assert preprocess_image(img, 64, 48).shape == (1, 3, 48, 64)


def test_swapped_experts_are_refused(tmp_path):
    import shutil

    f = fixtures_dir() / "dit"
    hi = shutil.copy(f / "TurboWan2.2-I2V-tiny-high.pth", tmp_path / "model-high.pth")
    lo = shutil.copy(f / "TurboWan2.2-I2V-tiny-low.pth", tmp_path / "model-low.pth")
    high, low = turbowan.load_dit(hi, attention="original"), turbowan.load_dit(lo, attention="original")
    with pytest.raises(ValueError, match="swapped"):
        turbowan.generate_i2v(low, high, None, _image(), torch.zeros(1, 8, 4096), num_frames=9, device="cpu")


def test_num_samples_share_one_noise_batch(monkeypatch):
    ref = _reference()
    high, low, vae = _models()
    two = turbowan.generate_i2v(high, low, vae, _image(), ref["crossattn_emb_prefix"], num_frames=5, width=64,
                                height=48, seed=3, ode=True, num_samples=2, device="cpu")
    assert two.shape[0] == 2 and not torch.equal(two[0], two[1])
    # one run whose noise is the second row of that batch (ODE: no other noise is drawn) gives the second sample
    monkeypatch.setattr(turbowan.pipeline, "initial_noise", lambda shape, g: initial_noise((2, *shape[1:]), g)[1:])
    one = turbowan.generate_i2v(high, low, vae, _image(), ref["crossattn_emb_prefix"], num_frames=5, width=64,
                                height=48, seed=3, ode=True, device="cpu")
    assert torch.equal(one[0], two[1])  # bitwise, measured on the CPU


def test_an_expert_on_a_device_of_its_own_gives_the_same_frames():
    """expert_devices with a second CPU 'device' (cpu:0 is a placement of its own): the per-card path (a
    placement and a mode per expert, the sampler following the expert) gives the one-device frames."""
    import turbowan
    from helpers import fixtures_dir
    from PIL import Image

    f = fixtures_dir()
    high, low = (turbowan.load_dit(f / "dit" / f"TurboWan2.2-I2V-tiny-{n}.pth", attention="original",
                                   dtype=torch.float32) for n in ("high", "low"))
    vae = turbowan.load_vae(f / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)
    text = torch.randn(1, 10, 4096, generator=torch.Generator().manual_seed(0))
    run = dict(num_frames=5, width=32, height=32, seed=1, device="cpu")
    image = Image.open(f / "pipeline" / "input_image.png")
    one = turbowan.generate_i2v(high, low, vae, image, text, **run)
    two = turbowan.generate_i2v(high, low, vae, image, text, expert_devices={"low": torch.device("cpu", 0)}, **run)
    assert torch.equal(one, two)
    with pytest.raises(ValueError, match="expert_devices takes the keys 'high' and 'low'"):
        turbowan.generate_i2v(high, low, vae, image, text, expert_devices={"middle": "cpu"}, **run)
