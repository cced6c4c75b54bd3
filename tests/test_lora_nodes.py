"""TurboWanLoraLoader in the ComfyUI double: the `loras` folder, a chain of two LoRAs into the sampler, refusals."""

from __future__ import annotations

import pytest
import torch

from helpers import write_tiny_lora
from test_nodes import HIGH, HIGH_QUANT, LOW, VAE, comfy_env, conditioning, folder_paths, image, nodes  # noqa: F401


@pytest.fixture
def loras(comfy_env):
    """Two LoRA files in a `loras` model folder, as ComfyUI users keep them."""
    folder = comfy_env / "models" / "loras"
    (folder / "style").mkdir(parents=True)
    write_tiny_lora(folder / "wan22_high.safetensors", seed=1)
    write_tiny_lora(folder / "style" / "wan22_low.safetensors", seed=2)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    return folder


def test_lora_loader_lists_the_loras_folder(loras):
    (names, _) = nodes.TurboWanLoraLoader.INPUT_TYPES()["required"]["lora_name"]
    assert names == ["style/wan22_low.safetensors", "wan22_high.safetensors"]
    assert nodes.NODE_CLASS_MAPPINGS["TurboWanLoraLoader"] is nodes.TurboWanLoraLoader
    assert nodes.NODE_DISPLAY_NAME_MAPPINGS["TurboWanLoraLoader"] == "TurboWan LoRA Loader"


def test_two_chained_lora_loaders_feed_the_sampler_and_leave_the_loaded_expert_alone(loras, image):
    (high,) = nodes.TurboWanModelLoader().load(HIGH, "original", 0.1)
    (low,) = nodes.TurboWanModelLoader().load(LOW, "original", 0.1)
    before = high.blocks[0].self_attn.q.weight.clone()
    (once,) = nodes.TurboWanLoraLoader().apply(high, "wan22_high.safetensors", 0.8)
    (twice,) = nodes.TurboWanLoraLoader().apply(once, "style/wan22_low.safetensors", 0.5)
    assert [(r.name, r.strength) for r in twice.loras] == [("wan22_high.safetensors", 0.8), ("wan22_low.safetensors", 0.5)]
    assert torch.equal(high.blocks[0].self_attn.q.weight, before)
    assert not torch.equal(twice.blocks[0].self_attn.q.weight, before)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    frames, last = nodes.TurboDiffusionI2VSampler().generate(
        twice, low, conditioning(), vae, image, 5, 4, "480", "16:9", 0.9, 200.0, 0, False, width=32, height=32)
    assert frames.shape == (5, 32, 32, 3) and torch.isfinite(frames).all()


def test_lora_loader_on_an_int8_expert_requantizes(loras):
    (quant,) = nodes.TurboWanModelLoader().load(HIGH_QUANT, "original", 0.1)
    (new,) = nodes.TurboWanLoraLoader().apply(quant, "wan22_high.safetensors", 1.0)
    assert new.blocks[0].self_attn.q.int8_weight.dtype == torch.int8
    assert new.blocks[0].self_attn.k.int8_weight.data_ptr() == quant.blocks[0].self_attn.k.int8_weight.data_ptr()


def test_lora_loader_refuses_a_model_file_in_one_sentence(loras, comfy_env, fixtures):
    import shutil

    shutil.copy(fixtures / "dit" / HIGH, loras / "not_a_lora.pth")
    (high,) = nodes.TurboWanModelLoader().load(HIGH, "original", 0.1)
    with pytest.raises(nodes.TurboWanError, match="not_a_lora.pth holds no LoRA weights"):
        nodes.TurboWanLoraLoader().apply(high, "not_a_lora.pth", 1.0)
    with pytest.raises(nodes.TurboWanError, match="not a TurboWan expert"):
        nodes.TurboWanLoraLoader().apply("a model", "wan22_high.safetensors", 1.0)
