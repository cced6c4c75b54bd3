"""LoRA on the tiny experts: every key layout against a float32 hand merge, int8 re-quantization and branch,
sharing of untouched tensors, refusals. LoRA files are written here, one per layout, from the same factors."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file

import turbowan
from turbowan.checkpoint import ModelFileError
from turbowan.models.dit import load_dit
from turbowan.ops.int8 import TILE, Int8LoraLinear, dequantize_int8_blockwise

RANK, ALPHA = 4, 2.0
# the layers each test LoRA touches: our name -> diffusers' name (written out here, independently of the code)
LAYERS = {"blocks.0.self_attn.q": "blocks.0.attn1.to_q", "blocks.1.cross_attn.o": "blocks.1.attn2.to_out.0",
          "blocks.0.ffn.0": "blocks.0.ffn.net.0.proj", "blocks.1.ffn.2": "blocks.1.ffn.net.2",
          "text_embedding.0": "condition_embedder.text_embedder.linear_1", "head.head": "proj_out"}
BLOCK_LAYERS = [n for n in LAYERS if n.startswith("blocks.")]  # the int8 ones in a -quant expert
LAYOUTS = ("native", "native_AB", "kohya", "diffusers", "diff")


def factors(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Seeded (down [r, K], up [N, r]) for each of LAYERS, sized from the model."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name in LAYERS:
        layer = model.get_submodule(name)
        out[name] = (0.1 * torch.randn(RANK, layer.in_features, generator=g),
                     0.1 * torch.randn(layer.out_features, RANK, generator=g))
    return out


def layout_scale(layout: str) -> float:
    """alpha / rank where the layout writes alpha (native, kohya), 1 where it does not (diffusers, diff)."""
    return ALPHA / RANK if layout in ("native", "kohya") else 1.0


def write_lora(path, layout: str, fs) -> str:
    sd = {}
    for name, (down, up) in fs.items():
        if layout == "diff":
            sd[f"diffusion_model.{name}.diff"] = up @ down
            sd[f"diffusion_model.{name}.diff_b"] = up.sum(1)
            continue
        base, (d, u) = {
            "native": (f"diffusion_model.{name}", ("lora_down", "lora_up")),
            "native_AB": (f"diffusion_model.{name}", ("lora_A", "lora_B")),
            "kohya": ("lora_unet_" + name.replace(".", "_"), ("lora_down", "lora_up")),
            "diffusers": (f"transformer.{LAYERS[name]}", ("lora_A", "lora_B")),
        }[layout]
        sd[f"{base}.{d}.weight"], sd[f"{base}.{u}.weight"] = down.to(torch.bfloat16), up.to(torch.bfloat16)
        if layout_scale(layout) != 1.0:
            sd[f"{base}.alpha"] = torch.tensor(ALPHA)
    save_file(sd, str(path))
    return str(path)


def hand_deltas(layout: str, fs, strength: float) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
    """our layer -> (weight delta, bias delta or None) in float32, from the factors as the file stores them."""
    out = {}
    for name, (down, up) in fs.items():
        if layout == "diff":
            out[name] = (strength * (up @ down), strength * up.sum(1))
        else:
            d, u = down.to(torch.bfloat16).float(), up.to(torch.bfloat16).float()
            out[name] = (strength * layout_scale(layout) * (u @ d), None)
    return out


@pytest.fixture
def tiny(fixtures):
    return {"bf16": fixtures / "dit" / "TurboWan2.2-I2V-tiny-high.pth",
            "quant": fixtures / "dit" / "TurboWan2.2-I2V-tiny-high-quant.pth"}


def load(path, dtype=torch.bfloat16):
    return load_dit(path, attention="original", dtype=dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_layout_equals_a_float32_hand_merge(tiny, tmp_path, layout):
    model = load(tiny["bf16"], torch.float32)  # float32 weights: the merge itself, without the final rounding
    fs = factors(model)
    new = turbowan.apply_lora(model, write_lora(tmp_path / "l.safetensors", layout, fs), strength=0.7)
    for name, (dw, db) in hand_deltas(layout, fs, 0.7).items():
        old, layer = model.get_submodule(name), new.get_submodule(name)
        torch.testing.assert_close(layer.weight, old.weight + dw, rtol=0, atol=1e-5)
        torch.testing.assert_close(layer.bias, old.bias + (0 if db is None else db), rtol=0, atol=1e-5)
    assert new.loras[-1].matched == new.loras[-1].total == len(LAYERS)


def test_bf16_expert_is_merged_in_float32_and_rounded_once(tiny, tmp_path):
    model = load(tiny["bf16"])
    fs = factors(model)
    new = turbowan.apply_lora(model, write_lora(tmp_path / "l.safetensors", "native", fs))
    for name, (dw, _) in hand_deltas("native", fs, 1.0).items():
        want = model.get_submodule(name).weight.float() + dw
        got = new.get_submodule(name).weight
        assert got.dtype == torch.bfloat16
        # one rounding of the float32 sum: within half a bf16 step (8 significant bits) of it
        assert ((got.float() - want).abs() <= want.abs() * 2**-8 + 1e-6).all()


def tile_scales(scale: torch.Tensor, shape) -> torch.Tensor:
    return scale.repeat_interleave(TILE, 0)[: shape[0]].repeat_interleave(TILE, 1)[:, : shape[1]]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_int8_requantize_is_within_the_requantization_error_of_a_float32_merge(tiny, tmp_path, layout):
    model = load(tiny["quant"])
    fs = factors(model)
    new = turbowan.apply_lora(model, write_lora(tmp_path / "l.safetensors", layout, fs), strength=0.7)
    for name in BLOCK_LAYERS:
        dw = hand_deltas(layout, fs, 0.7)[name][0]
        old, layer = model.get_submodule(name), new.get_submodule(name)
        want = dequantize_int8_blockwise(old.int8_weight, old.scale, torch.float32) + dw
        got = dequantize_int8_blockwise(layer.int8_weight, layer.scale, torch.float32)
        assert layer.int8_weight.dtype == torch.int8
        # round to nearest on each tile's grid: half a step (scale / 2) off at most, a full step where a tile's
        # largest positive value saturates at 127 (the reference's rule: scale = amax / 128)
        steps = torch.where(layer.int8_weight == 127, 1.0, 0.5) + 1e-5
        assert ((got - want).abs() <= tile_scales(layer.scale, got.shape) * steps).all()


def test_int8_branch_keeps_the_int8_weight_and_adds_the_low_rank_product(tiny, tmp_path):
    model = load(tiny["quant"], torch.float32)
    fs = factors(model)
    path = write_lora(tmp_path / "l.safetensors", "native", fs)
    new = turbowan.apply_lora(model, path, int8_merge="branch")
    x = torch.randn(3, model.config.dim, generator=torch.Generator().manual_seed(2))
    name = "blocks.0.self_attn.q"
    old, layer = model.get_submodule(name), new.get_submodule(name)
    assert isinstance(layer, Int8LoraLinear) and layer.int8_weight.data_ptr() == old.int8_weight.data_ptr()
    want = old(x) + x @ hand_deltas("native", fs, 1.0)[name][0].T
    torch.testing.assert_close(layer(x), want, rtol=0, atol=1e-5)
    chained = turbowan.apply_lora(new, path, int8_merge="branch")  # a second LoRA: one branch of twice the rank
    assert chained.get_submodule(name).lora_down.shape[0] == 2 * RANK
    torch.testing.assert_close(chained.get_submodule(name)(x), want + (want - old(x)), rtol=0, atol=1e-5)


def test_original_is_unchanged_and_untouched_tensors_are_shared(tiny, tmp_path):
    model = load(tiny["quant"])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    new = turbowan.apply_lora(model, write_lora(tmp_path / "l.safetensors", "kohya", factors(model)))
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    touched = {f"{name}.{t}" for name in LAYERS for t in ("weight", "int8_weight", "scale")}
    shared = {k for k, v in new.state_dict().items() if v.data_ptr() == after[k].data_ptr()}
    assert shared == set(after) - touched
    assert new.blocks[0].self_attn.k is not model.blocks[0].self_attn.k  # new objects over the same storage
    assert new.quant == model.quant and new.attention == model.attention and not hasattr(model, "loras")


def test_loras_chain_by_calling_again(tiny, tmp_path):
    model = load(tiny["bf16"], torch.float32)
    fs = factors(model)
    path = write_lora(tmp_path / "l.safetensors", "diffusers", fs)
    twice = turbowan.apply_lora(turbowan.apply_lora(model, path, 0.5), path, 0.25)
    dw = hand_deltas("diffusers", fs, 0.75)["blocks.0.ffn.0"][0]
    torch.testing.assert_close(twice.blocks[0].ffn[0].weight, model.blocks[0].ffn[0].weight + dw, rtol=0, atol=1e-5)
    assert [r.strength for r in twice.loras] == [0.5, 0.25]


def test_a_lora_merged_model_runs_the_same_as_hand_merged_weights(tiny, tmp_path):
    model = load(tiny["bf16"], torch.float32)
    fs = factors(model)
    new = turbowan.apply_lora(model, write_lora(tmp_path / "l.safetensors", "native", fs))
    hand = load(tiny["bf16"], torch.float32)
    for name, (dw, _) in hand_deltas("native", fs, 1.0).items():
        hand.get_submodule(name).weight.data += dw
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(1, 16, 1, 4, 4, generator=g), torch.randn(1, 20, 1, 4, 4, generator=g)
    ctx, t = torch.randn(1, 8, 4096, generator=g), torch.tensor([900.0])
    torch.testing.assert_close(new(x, t, ctx, y), hand(x, t, ctx, y), rtol=1e-4, atol=1e-4)


def other_model_lora(kind: str) -> dict[str, torch.Tensor]:
    down, up = torch.zeros(4, 320), torch.zeros(320, 4)
    names = {"sd": "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
             "flux": "lora_unet_double_blocks_0_img_attn_qkv",
             "wan_1.3b": "diffusion_model.blocks.0.self_attn.q"}
    base = names[kind]
    if kind == "wan_1.3b":
        down, up = torch.zeros(4, 1536), torch.zeros(1536, 4)
    return {f"{base}.lora_down.weight": down, f"{base}.lora_up.weight": up}


@pytest.mark.parametrize("kind, words", [("sd", "a Stable Diffusion (UNet) LoRA"), ("flux", "a Flux LoRA"),
                                         ("wan_1.3b", "a Wan model of another size")])
def test_a_lora_for_another_model_is_refused_in_one_sentence(tiny, tmp_path, kind, words):
    path = tmp_path / f"{kind}.safetensors"
    save_file(other_model_lora(kind), str(path))
    with pytest.raises(ModelFileError, match="fits none of this Wan2.2 A14B expert's layers") as exc:
        turbowan.apply_lora(load(tiny["bf16"]), path)
    assert words in str(exc.value) and "\n" not in str(exc.value)


def test_a_file_without_lora_weights_is_refused_saying_what_it_is(tiny):
    with pytest.raises(ModelFileError, match="holds no LoRA weights.*Wan2.2 image-to-video DiT"):
        turbowan.apply_lora(load(tiny["bf16"]), tiny["bf16"])


def test_a_lora_matching_some_layers_applies_and_reports_how_many(tiny, tmp_path, caplog):
    model = load(tiny["bf16"])
    sd = other_model_lora("flux") | {
        "diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.zeros(RANK, 128),
        "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.zeros(128, RANK)}
    save_file(sd, str(tmp_path / "mixed.safetensors"))
    with caplog.at_level(logging.WARNING, logger="turbowan"):
        new = turbowan.apply_lora(model, tmp_path / "mixed.safetensors")
    report = new.loras[-1]
    assert (report.matched, report.total) == (1, 2)
    assert "applied 1 of its 2 layers" in caplog.text and "double_blocks" in caplog.text


def test_bad_int8_merge_and_strength_are_refused(tiny, tmp_path):
    model = load(tiny["bf16"])
    path = write_lora(tmp_path / "l.safetensors", "native", factors(model))
    with pytest.raises(ValueError, match="int8_merge"):
        turbowan.apply_lora(model, path, int8_merge="fuse")
    with pytest.raises(ValueError, match="finite"):
        turbowan.apply_lora(model, path, float("nan"))
