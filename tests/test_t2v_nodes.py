"""The text-to-video nodes in the ComfyUI double: the loader reads T2V files, TurboDiffusionT2VSampler runs the
pipeline's generate_t2v, and the T2V workflows fit the nodes."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import REPO, write_tiny_t2v
from test_nodes import HIGH, VAE, check_widget_value, comfy_env, conditioning, widget_names  # noqa: F401

import comfy.model_management as mm
import comfy.utils

from turbowan import comfy_nodes as nodes
from turbowan import generate_t2v

T2V = "TurboWan2.1-T2V-tiny-quant.pth"


@pytest.fixture
def t2v_env(comfy_env):
    write_tiny_t2v(comfy_env / "models" / "diffusion_models" / T2V, quant=True)
    return comfy_env


def run_t2v(model, vae, cond=None, num_frames=5, seed=0, **kw):
    return nodes.TurboDiffusionT2VSampler().generate(
        model, cond if cond is not None else conditioning(), vae, num_frames, 4, "480p", "16:9", 80.0, seed,
        **{"width": 32, "height": 32, **kw})


def test_loader_reads_a_t2v_file_with_the_same_widgets(t2v_env):
    (model,) = nodes.TurboWanModelLoader().load(T2V, "original", 0.1, "auto", "auto")
    assert model.text_to_video and model.quant == "w8a16"


def test_t2v_sampler_gives_generate_t2vs_frames_with_a_progress_bar(t2v_env):
    (model,) = nodes.TurboWanModelLoader().load(T2V, "original", 0.1)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    (frames,) = run_t2v(model, vae, seed=7)
    comfy.utils.set_progress_bar_global_hook(None)
    expected = generate_t2v(model, vae, conditioning()[0][0], num_frames=5, width=32, height=32, seed=7,
                            device="cpu")
    assert frames.shape == (5, 32, 32, 3) and torch.equal(frames, expected[0])
    assert updates == [(i, 6) for i in range(1, 7)]  # 4 steps, then 2 latent frames decoded; no encode


def test_t2v_sampler_refuses_an_i2v_expert_and_bad_frame_counts_in_one_sentence(t2v_env):
    (high,) = nodes.TurboWanModelLoader().load(HIGH, "original", 0.1)
    (model,) = nodes.TurboWanModelLoader().load(T2V, "original", 0.1)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    with pytest.raises(nodes.TurboWanError, match="image-to-video expert.*TurboDiffusionI2VSampler"):
        run_t2v(high, vae)
    with pytest.raises(nodes.TurboWanError, match="use 77 or 81"):
        run_t2v(model, vae, num_frames=80)


def test_i2v_sampler_refuses_a_t2v_model_naming_the_t2v_sampler(t2v_env):
    (model,) = nodes.TurboWanModelLoader().load(T2V, "original", 0.1)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    with pytest.raises(nodes.TurboWanError, match="text-to-video model.*TurboDiffusionT2VSampler"):
        nodes.TurboDiffusionI2VSampler().generate(model, model, conditioning(), vae, torch.zeros(1, 32, 32, 3), 5,
                                                  4, "480", "16:9", 0.9, 200.0, 0, False, width=32, height=32)


def test_cancel_after_the_first_step(t2v_env):
    (model,) = nodes.TurboWanModelLoader().load(T2V, "original", 0.1)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    comfy.utils.set_progress_bar_global_hook(
        lambda value, total, preview, node_id=None: value == 1 and mm.interrupt_current_processing(True))
    with pytest.raises(mm.InterruptProcessingException):
        run_t2v(model, vae)
    comfy.utils.set_progress_bar_global_hook(None)
    assert not mm.processing_interrupted() and model.device.type == "cpu"


def test_t2v_workflows_fit_the_nodes():
    ui = json.loads((REPO / "workflows" / "turbowan_t2v.json").read_text())
    assert {n["type"] for n in ui["nodes"]} == {"TurboWanModelLoader", "CLIPLoader", "CLIPTextEncode",
                                                "TurboWanVAELoader", "TurboDiffusionT2VSampler",
                                                "TurboDiffusionSaveVideo"}
    for node in ui["nodes"]:
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["type"])
        if cls is None:
            continue
        names = widget_names(cls)
        assert len(node["widgets_values"]) == len(names), node["type"]
        for name, value in zip(names, node["widgets_values"]):
            check_widget_value(cls, name, value)
        sockets = [k for k in cls.INPUT_TYPES()["required"] if k not in names]
        assert [i["name"] for i in node.get("inputs", [])] == sockets, node["type"]
    api = json.loads((REPO / "workflows" / "turbowan_t2v_api.json").read_text())
    for node in api.values():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        assert set(spec["required"]) <= set(node["inputs"]) <= set(spec["required"]) | set(spec.get("optional", {}))
        for name, value in node["inputs"].items():
            if isinstance(value, list):
                assert value[0] in api
            else:
                check_widget_value(cls, name, value)
    assert widget_names(nodes.TurboDiffusionT2VSampler) == [
        "num_frames", "num_steps", "resolution", "aspect_ratio", "sigma_max", "seed", "control_after_generate",
        "width", "height"]
