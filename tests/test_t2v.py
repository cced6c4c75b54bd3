"""TurboWan2.1 text-to-video: the released T2V layouts load, the model is our I2V block math without the image
input, and generate_t2v is the reference's T2V loop (seeded CPU noise, one draw per step, stochastic update)."""

import pytest
import torch
from helpers import TINY_T2V, fixtures_dir, max_abs, write_tiny_t2v
from safetensors.torch import save_file

import turbowan
from turbowan import ModelFileError
from turbowan.checkpoint import read_dit_checkpoint
from turbowan.models.dit import w8a8_kernel_runs
from turbowan.sampler import rcm_timesteps

SIZE = dict(num_frames=5, width=64, height=48)  # latents [16, 2, 6, 8]


def _i2v_expert(dtype=torch.float32):
    return turbowan.load_dit(fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high.pth", attention="original",
                             dtype=dtype)


def _vae():
    return turbowan.load_vae(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 16, 2, 6, 8, generator=g), torch.tensor([937.0]),
            torch.randn(1, 512, 4096, generator=g) * 0.1)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("quant", [False, True])
def test_t2v_files_load_in_every_released_layout(tmp_path, suffix, quant):
    path = write_tiny_t2v(tmp_path / f"TurboWan2.1-T2V-tiny{'-quant' if quant else ''}{suffix}", quant=quant)
    model = turbowan.load_dit(path, attention="sla", sla_topk=1.0, quant="auto")  # a 48-token clip: one block
    assert model.text_to_video and model.config.in_dim == 16
    assert (model.config.dim, model.config.num_heads, model.config.num_layers) == (128, 2, 2)
    # "auto" runs a -quant file W8A8 where our int8 kernel runs (a CUDA machine), W8A16 elsewhere
    assert model.quant == (("w8a8" if w8a8_kernel_runs() else "w8a16") if quant else None)
    x, t, context = _inputs()
    assert model(x, t, context).shape == (1, 16, 2, 6, 8)


def test_t2v_sizes_are_inferred_from_the_file(tmp_path):
    # the 1.3B's widths (one of its 30 blocks, zeros: only the shapes matter)
    dim, ffn, head = 1536, 8960, 128
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in read_dit_checkpoint(
        write_tiny_t2v(tmp_path / "tiny.pth")).state_dict.items() if not k.startswith("blocks.1.")}
    shapes = {"patch_embedding.weight": (dim, 64), "time_projection.1.weight": (6 * dim, dim),
              "head.head.weight": (64, dim), "blocks.0.ffn.0.weight": (ffn, dim), "blocks.0.ffn.0.bias": (ffn,),
              "blocks.0.ffn.2.weight": (dim, ffn), "blocks.0.self_attn.proj_l.weight": (head, head),
              "blocks.0.self_attn.proj_l.bias": (head,), "text_embedding.0.weight": (dim, 4096),
              "time_embedding.0.weight": (dim, 256)}
    for k, v in sd.items():
        shape = shapes.get(k, tuple(dim if s == 128 else s for s in v.shape))
        sd[k] = torch.zeros(shape, dtype=v.dtype)
    path = tmp_path / "TurboWan2.1-T2V-1.3B-480P-1block.safetensors"
    save_file(sd, str(path))
    c = read_dit_checkpoint(path).config
    assert (c.dim, c.num_heads, c.ffn_dim, c.num_layers, c.in_dim, c.text_to_video) == (dim, 12, ffn, 1, 16, True)


def test_t2v_model_is_the_i2v_block_math_without_the_image_input(tmp_path):
    """The same weights as an I2V expert (20 extra, random patch-embedding input channels) fed an all-zero y give
    the T2V output: the T2V path is our I2V network (itself checked against the reference) minus its image input."""
    t2v_path = write_tiny_t2v(tmp_path / "t2v.pth", seed=1)
    sd = torch.load(t2v_path, weights_only=True)
    pe = sd["patch_embedding.weight"]
    sd["patch_embedding.weight"] = torch.cat([pe, torch.randn(pe.shape[0], 80).to(pe.dtype)], dim=1)
    torch.save(sd, tmp_path / "i2v.pth")
    t2v = turbowan.load_dit(t2v_path, attention="original", dtype=torch.float32)
    i2v = turbowan.load_dit(tmp_path / "i2v.pth", attention="original", dtype=torch.float32)
    assert t2v.text_to_video and not i2v.text_to_video
    x, t, context = _inputs()
    expected = i2v(x, t, context, torch.zeros(1, 20, 2, 6, 8))
    assert max_abs(t2v(x, t, context), expected) < 1e-5


def test_forward_refuses_the_wrong_conditioning(tmp_path):
    t2v = turbowan.load_dit(write_tiny_t2v(tmp_path / "t2v.pth"), attention="original")
    x, t, context = _inputs()
    with pytest.raises(ValueError, match="text-to-video model takes no image conditioning"):
        t2v(x, t, context, torch.zeros(1, 20, 2, 6, 8))
    with pytest.raises(ValueError, match="needs its image conditioning y"):
        _i2v_expert()(x, t, context)


def test_generate_t2v_is_the_reference_t2v_loop(tmp_path):
    """Initial noise [N, 16, T, H, W] from the seeded CPU generator, then per step one draw of the same shape and
    x = (1 - t_next)(x - t v) + t_next * noise, sigma_max 80; then the VAE decode."""
    model = turbowan.load_dit(write_tiny_t2v(tmp_path / "t2v.pth"), attention="original", dtype=torch.float32)
    vae = _vae()
    context = torch.randn(1, 7, 4096, generator=torch.Generator().manual_seed(5)) * 0.1
    stages = []
    frames = turbowan.generate_t2v(model, vae, context, seed=3, device="cpu", num_samples=2,
                                   progress=lambda *a: stages.append(a), **SIZE)

    g = torch.Generator().manual_seed(3)
    t_steps = rcm_timesteps(4, 80.0)
    x = torch.randn(2, 16, 2, 6, 8, generator=g).double() * t_steps[0]
    ctx = torch.nn.functional.pad(context, (0, 0, 0, 505)).repeat(2, 1, 1)
    for t, t_next in zip(t_steps[:-1].tolist(), t_steps[1:].tolist()):
        timestep = torch.full((2,), float(torch.tensor(t).float()) * 1000)
        v = model(x.float(), timestep, ctx).double()
        x = (1 - t_next) * (x - t * v) + t_next * torch.randn(2, 16, 2, 6, 8, generator=g)
    expected = [((vae.decode(x[i : i + 1].float()).clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0) for i in range(2)]
    assert frames.shape == (2, 5, 48, 64, 3) and frames.dtype == torch.float32
    assert max_abs(frames, torch.stack(expected)) < 1e-5
    assert [s for s in stages if s[0] == "sample"] == [("sample", i, 4) for i in range(1, 5)]
    assert not any(s[0] == "encode" for s in stages)


def test_generate_t2v_presets_and_cancel(tmp_path):
    model = turbowan.load_dit(write_tiny_t2v(tmp_path / "t2v.pth"), attention="original")

    def cancel(stage, done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # the preset size (480p 16:9 = 832x480) runs until the first step
        turbowan.generate_t2v(model, _vae(), torch.zeros(1, 4, 4096), num_frames=1, device="cpu", progress=cancel)


@pytest.mark.parametrize("bad, match", [
    (dict(num_frames=8), "num_frames must be 4n\\+1.*use 5 or 9"),
    (dict(num_steps=5), "num_steps must be 1 to 4"),
    (dict(sigma_max=float("nan")), "sigma_max must be a positive finite number"),
    (dict(resolution="1080p"), "resolution must be one of"),
    (dict(width=60, height=48), "multiples of 16"),
])
def test_generate_t2v_refuses_bad_options_before_any_work(tmp_path, bad, match):
    model = turbowan.load_dit(write_tiny_t2v(tmp_path / "t2v.pth"), attention="original")
    with pytest.raises(ValueError, match=match):
        turbowan.generate_t2v(model, None, torch.zeros(1, 4, 4096), device="cpu", **bad)


def test_samplers_refuse_the_other_kind_of_model_saying_which_to_use(tmp_path):
    t2v = turbowan.load_dit(write_tiny_t2v(tmp_path / "TurboWan2.1-T2V-tiny.pth"), attention="original")
    high = _i2v_expert(torch.bfloat16)
    with pytest.raises(ValueError, match="text-to-video model \\(TurboWan2.1-T2V-tiny.pth\\); it runs in "
                                         "generate_t2v") as e:
        turbowan.generate_i2v(t2v, high, None, torch.zeros(48, 64, 3), torch.zeros(1, 4, 4096), device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="image-to-video expert.*runs in generate_i2v") as e:
        turbowan.generate_t2v(high, None, torch.zeros(1, 4, 4096), device="cpu")
    assert "\n" not in str(e.value)


def test_non_dit_files_are_still_refused_naming_both_model_kinds():
    with pytest.raises(ModelFileError, match="looks like a video VAE.*TurboWan2.1-T2V model"):
        turbowan.load_dit(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth")


def test_tiny_size_matches_the_i2v_fixtures():
    assert read_dit_checkpoint(fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high.pth").config.dim == TINY_T2V["dim"]
