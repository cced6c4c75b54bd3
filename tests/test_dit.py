"""The Wan2.2 I2V DiT reproduces the reference forward pass on the fixture experts."""

import pytest
import torch
import torch.nn.functional as F
from helpers import fixtures_dir, max_abs, rel_err
from safetensors.torch import load_file

from turbowan import load_dit


def _inputs():
    d = load_file(fixtures_dir() / "dit" / "forward_inputs.safetensors")
    prefix = d["crossattn_emb_prefix"]
    d["context"] = F.pad(prefix, (0, 0, 0, 512 - prefix.shape[1]))  # zero rows up to 512, as umT5 returns
    return d


def _expert(name):
    return fixtures_dir() / "dit" / f"TurboWan2.2-I2V-tiny-{name}.pth"


@pytest.mark.parametrize("expert", ["high", "low"])
def test_fp32_forward_matches_reference(expert):
    d = _inputs()
    ref = load_file(fixtures_dir() / "dit" / "forward_outputs_cpu.safetensors")[f"{expert}_fp32"]
    model = load_dit(_expert(expert), attention="original", dtype=torch.float32)
    out = model(d["x_B_C_T_H_W"], d[f"timesteps_B_T_{expert}"][:, 0], d["context"], d["y_B_C_T_H_W"])
    assert out.dtype == torch.float32 and out.shape == ref.shape
    # same fp32 math in a different op order: measured ~2e-7 relative
    assert rel_err(out, ref) < 1e-5


def test_bf16_forward_matches_reference_autocast_run():
    d = _inputs()
    ref = load_file(fixtures_dir() / "dit" / "forward_outputs_cpu.safetensors")["high_bf16_cpu_autocast_emu"]
    model = load_dit(_expert("high"), attention="original", dtype=torch.bfloat16)
    t = d["timesteps_B_T_high"][:, 0].bfloat16()
    out = model(d["x_B_C_T_H_W"], t, d["context"], d["y_B_C_T_H_W"])
    # bf16 residual stream; the reference's own bf16-vs-fp32 gap is 5e-3 max abs, we measure ~2e-3
    assert out.dtype == torch.float32
    assert max_abs(out, ref) < 1e-2
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("variant,file,quant", [
    ("original", "high", "w8a16"),
    ("sla", "high", "w8a16"),
    ("sla_quant", "high-quant", "w8a8"),
])
def test_bf16_forward_matches_reference_gpu_path(variant, file, quant):
    """The reference's real inference path (fused norms, SLA Triton, int8 CUDA) ran on a GPU."""
    d = _inputs()
    ref = load_file(fixtures_dir() / "dit" / "forward_outputs_gpu.safetensors")[variant].float()
    attention = "original" if variant == "original" else "sla"
    model = load_dit(_expert(file), attention=attention, sla_topk=0.1, quant=quant, dtype=torch.bfloat16)
    out = model(d["x_B_C_T_H_W"], d["timesteps_B_T_high"][:, 0].bfloat16(), d["context"], d["y_B_C_T_H_W"])
    # README: GPU vs CPU paths differ by 5e-3..8e-3 max abs (outputs |v| <= ~1); reference suggests 2e-2
    assert max_abs(out, ref) < 2e-2
    assert rel_err(out, ref) < 1e-2


def test_quant_file_w8a16_is_close_to_bf16_file():
    d = _inputs()
    t = d["timesteps_B_T_high"][:, 0]
    args = (d["x_B_C_T_H_W"].float(), t, d["context"].float(), d["y_B_C_T_H_W"].float())
    dense = load_dit(_expert("high"), attention="original", dtype=torch.float32)(*args)
    quant = load_dit(_expert("high-quant"), attention="original", quant="w8a16", dtype=torch.float32)(*args)
    # int8 weights with 128x128 tile scales: ~0.4% weight error per layer
    assert rel_err(quant, dense) < 3e-2


def test_bf16_file_can_run_w8a8():
    d = _inputs()
    args = (d["x_B_C_T_H_W"], d["timesteps_B_T_high"][:, 0].bfloat16(), d["context"], d["y_B_C_T_H_W"])
    from_bf16 = load_dit(_expert("high"), attention="original", quant="w8a8")(*args)
    from_quant = load_dit(_expert("high-quant"), attention="original", quant="w8a8")(*args)
    # the released -quant file was made with the same quantization rule, so both agree exactly
    assert torch.equal(from_bf16, from_quant)


def test_original_attention_drops_sla_weights_and_loads():
    model = load_dit(_expert("high"), attention="original")
    assert all(b.self_attn.proj_l is None for b in model.blocks)


def test_loader_infers_config_from_shapes():
    model = load_dit(_expert("high"))
    c = model.config
    assert (c.dim, c.ffn_dim, c.num_heads, c.head_dim, c.num_layers, c.in_dim, c.out_dim) == (128, 256, 2, 64, 2, 36, 16)


def test_loader_keeps_weights_on_cpu_by_default():
    model = load_dit(_expert("low"))
    assert model.device.type == "cpu" and model.dtype == torch.bfloat16
