"""TurboWan2.1 T2V against the reference's own code (tests/fixtures/t2v, README §9): the released layout loads, the
forward matches wan2pt1.WanModel in float32 and the reference's bf16 inference path, and the T2V loop with the
seeded CPU generator reproduces wan2.1_t2v_infer.py's samples."""

import pytest
import torch
import torch.nn.functional as F
from helpers import fixtures_dir, max_abs, rel_err
from safetensors.torch import load_file

import turbowan
from turbowan import ModelFileError
from turbowan.ops.int8 import quantize_int8_blockwise
from turbowan.sampler import sample_rcm


def _dir():
    return fixtures_dir() / "t2v"


def _file(quant=False):
    return _dir() / f"TurboWan2.1-T2V-tiny{'-quant' if quant else ''}.pth"


def _forward_inputs():
    d = load_file(_dir() / "forward_inputs.safetensors")
    prefix = d["crossattn_emb_prefix"]
    return d["x_B_C_T_H_W"], d["timesteps_B_T"][:, 0], F.pad(prefix, (0, 0, 0, 512 - prefix.shape[1]))


def test_released_t2v_layout_loads_as_a_text_to_video_model():
    sd = torch.load(_file(), map_location="cpu", weights_only=True)
    assert "blocks.0.self_attn.attn_op.local_attn.proj_l.weight" in sd and not any(k.startswith("net.") for k in sd)
    assert sd["blocks.0.self_attn.norm_q.weight"].dtype == torch.float32
    assert sd["patch_embedding.weight"].shape == (64, 16 * 4)  # 16 input channels: no image latent, no mask
    for quant in (False, True):
        model = turbowan.load_dit(_file(quant), attention="sla", quant="auto")
        assert model.text_to_video and model.quant == ("w8a16" if quant else None)
        assert (model.config.dim, model.config.num_heads, model.config.num_layers) == (64, 1, 2)


def test_fp32_forward_matches_reference_wan2pt1():
    x, t, context = _forward_inputs()
    ref = load_file(_dir() / "forward_outputs_cpu.safetensors")["fp32"]
    model = turbowan.load_dit(_file(), attention="original", dtype=torch.float32)
    out = model(x.float(), t, context.float())
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert max_abs(out, ref) < 1e-5  # measured 1.2e-6 (outputs |v| <= 4.1)


def test_bf16_forward_matches_reference_inference_path():
    """The reference's create_model path (fused-norm modules, bf16, attention 'original')."""
    x, t, context = _forward_inputs()
    ref = load_file(_dir() / "forward_outputs_cpu.safetensors")["bf16"]
    model = turbowan.load_dit(_file(), attention="original", dtype=torch.bfloat16)
    out = model(x, t.bfloat16(), context)
    assert out.dtype == torch.float32
    # bf16 residual stream: measured 1.9e-2 max abs (under one bf16 ulp at |v| ~ 4; the reference's own
    # bf16-vs-fp32 gap is 2.2e-2) and 3e-3 relative
    assert rel_err(out, ref) < 1e-2
    assert max_abs(out, ref) < 3e-2


def test_quant_file_holds_the_reference_quantization_of_the_bf16_file():
    dense = torch.load(_file(), map_location="cpu", weights_only=True)
    quant = torch.load(_file(True), map_location="cpu", weights_only=True)
    names = [k[: -len(".int8_weight")] for k in quant if k.endswith(".int8_weight")]
    assert len(names) == 2 * 10  # q, k, v, o of both attentions and the two FFN linears, per block
    for name in names:
        q, scale = quantize_int8_blockwise(dense[f"{name}.weight"])
        assert torch.equal(quant[f"{name}.int8_weight"], q) and torch.equal(quant[f"{name}.scale"], scale), name
    x, t, context = _forward_inputs()
    ref = load_file(_dir() / "forward_outputs_cpu.safetensors")["fp32"]
    out = turbowan.load_dit(_file(True), attention="original", quant="w8a16", dtype=torch.float32)(
        x.float(), t, context.float())
    assert rel_err(out, ref) < 3e-2  # int8 weights, 0.4% per layer


def _recording(model):
    seen = []

    def net(x, t, context, y=None):
        seen.append(t.clone())
        return model(x, t, context, y)

    return net, seen


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_t2v_loop_matches_reference_loop(dtype_name):
    runs = load_file(_dir() / "sampling_runs.safetensors")
    ref = {k.split(".", 1)[1]: v for k, v in runs.items() if k.startswith(dtype_name + ".")}
    dtype = torch.float32 if dtype_name == "fp32" else torch.bfloat16
    model = turbowan.load_dit(_file(), attention="original", dtype=dtype)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(ref["init_noise"].shape, generator=generator)
    assert torch.equal(noise, ref["init_noise"])
    context = F.pad(runs["crossattn_emb_prefix"], (0, 0, 0, 512 - runs["crossattn_emb_prefix"].shape[1]))
    net, seen = _recording(model)
    samples = sample_rcm(lambda name: net, noise, context.repeat(2, 1, 1), None, boundary=None, sigma_max=80.0,
                         generator=generator, dtype=dtype)
    for i, t in enumerate(seen):  # what the network saw: 1000 t rounded to the compute dtype (988, 932, ...)
        assert torch.equal(t.reshape(-1), ref[f"step{i}.timesteps_B_T"].reshape(-1)), i
    if dtype == torch.float32:
        assert max_abs(samples, ref["samples"]) < 1e-5  # measured 1e-6 (|x| <= 4.4)
    else:
        assert rel_err(samples, ref["samples"]) < 1e-2  # bf16 network, measured 0.024 max abs at |x| <= 4.2


def test_generate_t2v_decodes_the_reference_loop_samples():
    """The whole generate_t2v (seed 0, 2 samples, sigma_max 80, 4 steps) ends in the reference loop's latents:
    its frames are the VAE decode of the fixture's fp32 samples."""
    runs = load_file(_dir() / "sampling_runs.safetensors")
    model = turbowan.load_dit(_file(), attention="original", dtype=torch.float32)
    vae = turbowan.load_vae(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth", device="cpu", dtype=torch.float32)
    frames = turbowan.generate_t2v(model, vae, runs["crossattn_emb_prefix"], num_frames=5, width=32, height=32,
                                   seed=0, num_samples=2, device="cpu")
    expected = torch.stack([((vae.decode(s[None]).clamp(-1, 1) + 1) / 2)[0].permute(1, 2, 3, 0)
                            for s in runs["fp32.samples"]])
    assert frames.shape == (2, 5, 32, 32, 3)
    assert max_abs(frames, expected) < 1e-4


def test_reference_t2v_file_is_refused_where_it_does_not_belong(tmp_path):
    x, t, context = _forward_inputs()
    t2v = turbowan.load_dit(_file(), attention="original")
    with pytest.raises(ValueError, match="text-to-video model \\(TurboWan2.1-T2V-tiny.pth\\); it runs in generate_t2v"):
        turbowan.generate_i2v(t2v, t2v, None, torch.zeros(48, 64, 3), context, device="cpu")
    with pytest.raises(ValueError, match="text-to-video model takes no image conditioning"):
        t2v(x, t, context, torch.zeros(1, 20, *x.shape[2:]))
    sd = torch.load(_file(), map_location="cpu", weights_only=True)
    sd["blocks.1.ffn.0.weight"] = sd["blocks.1.ffn.0.weight"][:, :32]
    torch.save(sd, tmp_path / "damaged.pth")
    with pytest.raises(ModelFileError, match="damaged.pth.*blocks.1.ffn.0.weight.*download it again"):
        turbowan.load_dit(tmp_path / "damaged.pth", attention="original")
