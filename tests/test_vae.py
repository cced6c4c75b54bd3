"""Wan2.1 VAE (turbowan/models/vae.py) against the reference fixtures (fixtures README, section vae/).

The fixture VAE is the real architecture at base width 4 with random weights. The reference outputs
were produced on another CPU, so our results differ from them by kernel accumulation order only
(running the reference code on this machine during development gave results bit-identical to ours);
the tolerances below are set from that.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import fixtures_dir, gpu, max_abs, rel_err
from safetensors.torch import load_file, save_file

from turbowan.models.vae import (
    LATENT_MEAN,
    LATENT_STD,
    WanVAE,
    _tiled,
    load_vae,
    vae_from_state_dict,
)
from turbowan.vae_tiling import auto_tile, tile_for_budget

TINY_VAE = "vae/Wan2.1_VAE-tiny.pth"


@pytest.fixture(scope="module")
def io():
    return load_file(str(fixtures_dir() / "vae" / "vae_io.safetensors"))


@pytest.fixture(scope="module")
def vae_fp32() -> WanVAE:
    return load_vae(fixtures_dir() / TINY_VAE, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def vae_bf16() -> WanVAE:
    return load_vae(fixtures_dir() / TINY_VAE, device="cpu", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def decoded_fp32(vae_fp32, io) -> torch.Tensor:
    """Our untiled float32 decode of the fixture latents (shared: several tests compare against it)."""
    return vae_fp32.decode(io["latent_in"].float())


# ------------------------------------------------------------------------------------------------
# Parity with the reference
# ------------------------------------------------------------------------------------------------


def test_encode_matches_reference_fp32(vae_fp32, io):
    latents = vae_fp32.encode(io["video_in"].float())
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 3, 8, 8)
    # Measured 4.0e-7 relative / 8.3e-7 max abs; the reference itself is 1.35e-6 from a float64 run,
    # so two float32 runs with different accumulation orders sit around 1e-6.
    assert rel_err(latents, io["encode_fp32"]) < 1e-5
    assert max_abs(latents, io["encode_fp32"]) < 1e-5


def test_encode_matches_reference_bf16(vae_bf16, io):
    latents = vae_bf16.encode(io["video_in"])
    assert latents.dtype == torch.float32  # documented: encode always returns float32
    # Measured 4.5e-3 relative / 0.0156 max abs (2 bf16 ulps at |x| < 2). The bound is what separates
    # the reference's own bf16 result from its fp32 one (1.6e-2 relative, 0.036 max abs).
    assert rel_err(latents, io["encode_bf16"]) < 1.6e-2
    assert max_abs(latents, io["encode_bf16"]) < 0.036


def test_decode_matches_reference_fp32(decoded_fp32, io):
    video = decoded_fp32
    assert video.dtype == torch.float32 and video.shape == (1, 3, 5, 64, 64)
    # Measured 1.3e-6 relative / 9.7e-6 max abs (reference vs float64: 5.6e-6 max abs).
    assert rel_err(video, io["decode_fp32"]) < 1e-5
    assert max_abs(video, io["decode_fp32"]) < 5e-5


def test_decode_matches_reference_bf16(vae_bf16, io):
    video = vae_bf16.decode(io["latent_in"])
    assert video.dtype == torch.bfloat16 and video.shape == (1, 3, 5, 64, 64)
    # Measured 1.6e-2 relative / 0.072 max abs: bf16 rounding differences compounding through ~40
    # layers. Bound: the reference's own bf16-vs-fp32 gap (3.0e-2 relative, 0.18 max abs).
    assert rel_err(video, io["decode_bf16"]) < 3e-2
    assert max_abs(video, io["decode_bf16"]) < 0.18


def test_decode_is_not_clamped(decoded_fp32):
    assert decoded_fp32.abs().max() > 1.0  # the fixture decode reaches 2.17; the reference does not clamp


def test_latent_constants_are_rounded_in_bf16_like_the_reference(vae_bf16, fixtures):
    cfg = json.loads((fixtures / "config.json").read_text())["vae"]
    assert vae_bf16.latent_mean.flatten().tolist() == cfg["mean_bf16"]
    assert vae_bf16.latent_inv_std.flatten().tolist() == cfg["inv_std_bf16"]


def test_latent_constants_stay_fp32_in_an_fp32_model(vae_fp32):
    assert torch.equal(vae_fp32.latent_mean.flatten(), torch.tensor(LATENT_MEAN))
    assert torch.equal(vae_fp32.latent_inv_std.flatten(), 1.0 / torch.tensor(LATENT_STD))


def test_public_constants_and_properties(vae_bf16):
    assert (vae_bf16.spatial_compression, vae_bf16.temporal_compression, vae_bf16.z_dim) == (8, 4, 16)
    assert vae_bf16.dtype == torch.bfloat16 and vae_bf16.device.type == "cpu"
    assert vae_bf16.model.cfg.dim == 4  # inferred from the state dict


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_state_dict():
    return torch.load(fixtures_dir() / TINY_VAE, map_location="cpu", weights_only=True)


def test_fp32_safetensors_gives_identical_output(tiny_state_dict, decoded_fp32, io, tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(tiny_state_dict, str(path))
    vae = load_vae(path, device="cpu", dtype=torch.float32)
    assert torch.equal(vae.decode(io["latent_in"].float()), decoded_fp32)  # same weights, same numbers


def test_fp16_safetensors_gives_the_same_output_up_to_weight_rounding(tiny_state_dict, decoded_fp32, io, tmp_path):
    path = tmp_path / "wan_2.1_vae_fp16.safetensors"
    save_file({k: v.half() for k, v in tiny_state_dict.items()}, str(path))
    vae = load_vae(path, device="cpu", dtype=torch.float32)
    # fp16 weights carry 2^-11 relative rounding; measured 1.8e-3 relative after the whole decoder.
    assert rel_err(vae.decode(io["latent_in"].float()), decoded_fp32) < 1e-2


def test_state_dict_of_a_loaded_model_round_trips(vae_fp32, decoded_fp32, io):
    # ComfyUI's VAELoader model (comfy/ldm/wan/vae.py) has the same module tree, so its
    # first_stage_model.state_dict() has these key names, usually in bf16: any dtype is accepted.
    state_dict = {k: v.to(torch.bfloat16) for k, v in vae_fp32.model.state_dict().items()}
    vae = vae_from_state_dict(state_dict, device="cpu", dtype=torch.float32)
    assert vae.dtype == torch.float32
    # bf16 weights (2^-9 relative rounding) in an fp32 model: measured 1.3e-2 relative.
    assert rel_err(vae.decode(io["latent_in"].float()), decoded_fp32) < 5e-2


def test_load_refuses_a_dit_checkpoint(fixtures):
    with pytest.raises(ValueError, match="diffusion model"):
        load_vae(fixtures / "dit" / "TurboWan2.2-I2V-tiny-high.pth", device="cpu")


def test_load_refuses_a_text_encoder(fixtures):
    with pytest.raises(ValueError, match="text encoder"):
        load_vae(fixtures / "umt5" / "models_t5_umt5-tiny-enc-bf16.pth", device="cpu")


def test_refuses_a_wan22_vae(tiny_state_dict):
    # Wan2.2's VAE shares the marker key but has a 48-channel latent (and nested upsample blocks).
    state_dict = dict(tiny_state_dict)
    state_dict["conv2.weight"] = torch.zeros(48, 48, 1, 1, 1)
    state_dict["decoder.upsamples.0.upsamples.0.residual.2.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="Wan2.2 VAE"):
        vae_from_state_dict(state_dict, device="cpu")


def test_load_refuses_a_truncated_pth(fixtures, tmp_path):
    data = (fixtures / TINY_VAE).read_bytes()
    path = tmp_path / "Wan2.1_VAE.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt; re-download it"):
        load_vae(path, device="cpu")


def test_load_refuses_a_truncated_safetensors(tiny_state_dict, tmp_path):
    path = tmp_path / "wan_2.1_vae.safetensors"
    save_file(tiny_state_dict, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt; re-download it"):
        load_vae(path, device="cpu")


def test_load_reports_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_vae(tmp_path / "nothing.pth", device="cpu")


# ------------------------------------------------------------------------------------------------
# Input checks and progress
# ------------------------------------------------------------------------------------------------


def test_encode_refuses_8_frames_naming_5_and_9(vae_fp32):
    with pytest.raises(ValueError, match=r"8 frames.*use 5 or 9"):
        vae_fp32.encode(torch.zeros(1, 3, 8, 16, 16))


def test_encode_refuses_sizes_not_multiple_of_8(vae_fp32):
    with pytest.raises(ValueError, match="multiples of 8, e.g. crop to 16x16"):
        vae_fp32.encode(torch.zeros(1, 3, 5, 20, 16))


def test_decode_refuses_wrong_channel_count(vae_fp32):
    with pytest.raises(ValueError, match=r"\[B, 16, T, H, W\]"):
        vae_fp32.decode(torch.zeros(1, 48, 2, 4, 4))


def test_progress_hook_called_after_each_chunk(vae_fp32):
    calls = []
    vae_fp32.encode(torch.zeros(1, 3, 9, 16, 16), progress=lambda *a: calls.append(a))
    assert calls == [("encode", 1, 3), ("encode", 2, 3), ("encode", 3, 3)]  # frame 0, then 4 + 4 frames
    calls.clear()
    vae_fp32.decode(torch.zeros(1, 16, 3, 2, 2), progress=lambda *a: calls.append(a))
    assert calls == [("decode", 1, 3), ("decode", 2, 3), ("decode", 3, 3)]  # one per latent frame


def test_progress_hook_can_cancel_decoding(vae_fp32):
    calls = []

    def cancel(stage, done, total):
        calls.append(done)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        vae_fp32.decode(torch.zeros(1, 16, 3, 2, 2), progress=cancel)
    assert calls == [1]


# ------------------------------------------------------------------------------------------------
# Spatial tiling
# ------------------------------------------------------------------------------------------------


def test_tiled_decode_with_one_covering_tile_equals_untiled(vae_fp32, decoded_fp32, io):
    # Goes through the tiling path (per-tile caches, float32 blend buffer) with weights of exactly 1.
    assert torch.equal(vae_fp32.decode(io["latent_in"].float(), tile=(8, 8)), decoded_fp32)


def test_tiled_encode_with_one_covering_tile_equals_untiled(vae_fp32):
    torch.manual_seed(0)
    video = torch.rand(1, 3, 5, 32, 48) * 2 - 1
    assert torch.equal(vae_fp32.encode(video, tile=(4, 6)), vae_fp32.encode(video))


def test_tile_blending_reassembles_a_local_function(vae_fp32):
    # For a per-pixel function, every tile agrees with the untiled result, so a correct blend
    # (coverage, placement, weights normalised to 1) reproduces it up to float32 rounding.
    torch.manual_seed(0)
    x = torch.randn(1, 16, 2, 13, 29)

    def fn(region):
        return torch.tanh(region[:, :3]).repeat_interleave(8, dim=-2).repeat_interleave(8, dim=-1)

    tiled = _tiled(fn, x, grid=(13, 29), tile=(6, 10), in_scale=1, out_scale=8, out_lead=(1, 3, 2),
                   out_dtype=torch.float32)
    assert max_abs(tiled, fn(x)) < 1e-6


@pytest.fixture(scope="module")
def local_vae(tiny_state_dict):
    """The fixture VAE with the decoder's attention output projection zeroed (its init in the reference):
    attention then adds only a bias, so every output pixel depends on a bounded neighbourhood."""
    state_dict = dict(tiny_state_dict)
    state_dict["decoder.middle.1.proj.weight"] = torch.zeros_like(state_dict["decoder.middle.1.proj.weight"])
    return vae_from_state_dict(state_dict, device="cpu", dtype=torch.float32)


def test_tiled_decode_equals_untiled_away_from_the_seam(local_vae):
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 32)
    full = local_vae.decode(latents)
    tiled = local_vae.decode(latents, tile=(4, 20))  # tiles at latent columns [0, 20) and [12, 32)
    column_error = (tiled - full).abs().amax(dim=(0, 1, 2, 3))
    # The overlap is video columns 96..159 (measured error there up to 0.3). Border effects decay
    # with distance (measured 1e-3 at 8 px, 1e-5 at 30 px); beyond 64 px each pixel comes from one
    # tile, decoded with its own caches, and must equal the untiled value up to float32 rounding
    # (measured <= 1e-6), over both latent frames.
    assert column_error[:32].max() < 1e-5 and column_error[224:].max() < 1e-5
    assert column_error[96:160].max() > 1e-2  # the seam really is a blend of two different tiles


def test_tiled_decode_is_close_to_untiled(vae_fp32):
    torch.manual_seed(0)
    latents = torch.randn(1, 16, 2, 4, 32)
    full = vae_fp32.decode(latents)
    tiled = vae_fp32.decode(latents, tile=(4, 20))
    # The decoder's attention mixes the whole frame, so each tile misses the other's context; with
    # these random weights that costs 0.20 relative (measured; a trained VAE's seams are far smaller).
    # A misplaced tile (~1.4) or an unnormalised blend (~0.5) would exceed the bound.
    assert rel_err(tiled, full) < 0.3


def test_auto_tile_never_tiles_on_cpu(vae_fp32, decoded_fp32, io):
    assert auto_tile(vae_fp32, "decode", (8, 8)) is None
    assert torch.equal(vae_fp32.decode(io["latent_in"].float(), tile=auto_tile(vae_fp32, "decode", (8, 8))), decoded_fp32)


def test_tile_for_budget_picks_the_largest_fitting_tile(vae_bf16):
    grid = (90, 160)  # 720p
    whole = tile_for_budget(vae_bf16, "decode", grid, budget=1e15, frames=81)
    assert whole is None
    budget = 60e6  # fits a ~36x36 tile of the width-4 fixture model, well inside [16, 90)
    tile = tile_for_budget(vae_bf16, "decode", grid, budget=budget, frames=1)
    assert tile is not None and tile[0] == tile[1]
    assert vae_bf16.memory_needed("decode", grid, tile, frames=1) <= budget
    bigger = (tile[0] + 4, tile[1] + 4)
    assert vae_bf16.memory_needed("decode", grid, bigger, frames=1) > budget


def test_bad_tile_spec_is_refused(vae_fp32):
    with pytest.raises(ValueError, match="tile="):
        vae_fp32.decode(torch.zeros(1, 16, 1, 2, 2), tile=(0, 4))


def test_channels_last_layout_gives_the_same_video(vae_fp32, decoded_fp32, io, monkeypatch):
    # CUDA runs the VAE channels-last (NDHWC, fast cuDNN kernels); the layout changes only the order of float32
    # sums (the norms reduce over channels stored side by side instead of a plane apart).
    from turbowan.models import vae as vae_module

    latents = vae_fp32.encode(io["video_in"].float())
    monkeypatch.setattr(vae_module, "preferred_layout", lambda device: torch.channels_last_3d)
    assert rel_err(vae_fp32.decode(io["latent_in"].float()), decoded_fp32) < 1e-5
    assert rel_err(vae_fp32.encode(io["video_in"].float()), latents) < 1e-5


def test_stream_runs_tile_the_vae_from_half_the_free_memory(vae_bf16, monkeypatch):
    import turbowan.vae_tiling as tiling

    grid, seen = (90, 160), []
    monkeypatch.setattr(tiling, "free_cuda_bytes", lambda device: 8e9)
    monkeypatch.setattr(tiling, "tile_for_budget", lambda vae, stage, g, budget, *a, **k: seen.append(budget))
    monkeypatch.setattr(vae_bf16.__class__, "device", property(lambda self: torch.device("cuda")))
    tiling.tile_for_run(vae_bf16, "decode", grid, "stream", torch.device("cuda"), 81)
    tiling.tile_for_run(vae_bf16, "decode", grid, "resident", torch.device("cuda"), 81)
    assert seen == [4e9, 0.9 * 8e9]


def _count_segments(vae, monkeypatch) -> list:
    """The encoder segments run, in order, as their indices."""
    calls = []
    run = vae.model.encoder.run_segment
    monkeypatch.setattr(vae.model.encoder, "run_segment", lambda s, x, cache: calls.append(s) or run(s, x, cache))
    return calls


def _every_chunk(monkeypatch):
    monkeypatch.setattr("turbowan.models.vae._segments_repeat_after", lambda video, chunks, memory: [None] * len(memory))


def _image_then_black(frames: int, size: int = 32, device="cpu") -> torch.Tensor:
    video = torch.zeros(1, 3, frames, size, size, device=device)  # as image-to-video encodes: the image, then black
    video[:, :, 0] = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    return video


def test_image_then_black_frames_encode_reuses_repeating_segments_and_gives_the_same_latents(vae_fp32, monkeypatch):
    video = _image_then_black(61)  # 16 chunks
    with monkeypatch.context() as m:
        _every_chunk(m)
        every_chunk = vae_fp32.encode(video)
    calls = _count_segments(vae_fp32, monkeypatch)
    reused = vae_fp32.encode(video)
    # segments at 4, 2 and 1 frames per chunk see 5, 5 and 19 chunks back: the first repeats from chunk 6 (its
    # output reused for chunks 7-15), the second from chunk 11 (reused for 12-15), the third never in 16 chunks
    assert vae_fp32.model.encoder.segment_memory() == [5, 5, 19]
    assert [calls.count(s) for s in range(3)] == [7, 12, 16]
    assert torch.equal(reused, every_chunk)


def test_a_video_whose_later_frames_differ_runs_every_chunk_through_every_segment(vae_fp32, monkeypatch):
    video = _image_then_black(33)
    video[:, :, 30] = 0.5  # one later frame differs
    calls = _count_segments(vae_fp32, monkeypatch)
    vae_fp32.encode(video)
    assert [calls.count(s) for s in range(3)] == [9, 9, 9]


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_on_cuda_the_reused_segments_give_the_latents_of_every_chunk(dtype, monkeypatch):
    # the GPU path: channels-last activations, the fused norm kernel, cuDNN's convolutions
    vae = load_vae(fixtures_dir() / TINY_VAE, device="cuda", dtype=dtype)
    video = _image_then_black(61, size=64, device="cuda")
    reused = vae.encode(video)
    _every_chunk(monkeypatch)
    assert torch.equal(reused, vae.encode(video))


def test_where_the_device_prefers_channels_last_every_layer_gets_channels_last_activations(monkeypatch):
    """One NCDHW activation (e.g. the attention's 2D output added first) sends every later layer down cuDNN's
    conversions and the eager norms: a 720p decode ran 40% slower that way. bf16 on the CPU keeps channels-last
    through convolutions, as CUDA does; the preferred layout is forced to what CUDA prefers."""
    from turbowan.models import vae as V

    monkeypatch.setattr(V, "preferred_layout", lambda device: torch.channels_last_3d)
    torch.manual_seed(0)
    vae = V.WanVAE(V.WanVAEModel(V.VAEConfig(dim=16)).to(torch.bfloat16))
    inputs = []
    layers = (V.CausalConv3d, V.ResidualBlock, V.AttentionBlock, V.Upsample, V.Downsample)
    for module in vae.model.modules():
        if isinstance(module, layers):
            module.register_forward_pre_hook(
                lambda m, args: inputs.append((type(m).__name__, args[0].is_contiguous(memory_format=torch.channels_last_3d))))
    latents = vae.encode(torch.rand(1, 3, 9, 32, 48) * 2 - 1)
    vae.decode(latents)
    assert len(inputs) > 100
    assert [name for name, channels_last in inputs if not channels_last] == []


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_upsample_then_3x3_convolution_equals_the_four_phase_2x2_convolution(layout):
    import torch.nn.functional as F

    from turbowan.models.vae import upsample2x_conv3x3

    g = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(6, 5, 3, padding=1).double()
    x = torch.randn(2, 6, 7, 9, generator=g, dtype=torch.float64).contiguous(memory_format=layout)  # odd sizes
    with torch.no_grad():
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
        got = upsample2x_conv3x3(x, conv)
    assert got.shape == want.shape
    assert max_abs(got, want) < 1e-12
    assert got.is_contiguous(memory_format=layout)


def test_four_phase_weights_are_made_once_and_follow_a_changed_weight():
    import torch.nn.functional as F

    from turbowan.models import vae as V

    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 3, 3, padding=1).double()
    x = torch.randn(1, 4, 5, 6, generator=g, dtype=torch.float64)
    with torch.no_grad():
        first = V._phase_weights(conv, x.dtype)
        assert V._phase_weights(conv, x.dtype)[0] is first[0]  # reused, not recomputed per chunk
        conv.weight.mul_(-2.0)  # changed in place (a LoRA merge, a reload into the same tensor)
        got = V.upsample2x_conv3x3(x, conv)
        want = conv(F.interpolate(x, scale_factor=2.0, mode="nearest-exact"))
    assert max_abs(got, want) < 1e-12
