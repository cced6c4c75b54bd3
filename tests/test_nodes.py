"""The ComfyUI nodes, run through the in-repo ComfyUI double (tests/comfy_double) with the tiny fixture models.

Every run here is 5 frames at 32x32 with dense attention (the tiny clip is too short for SLA at topk 0.1).
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from helpers import ORIGINAL_INPUTS, REPO, decode

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS / "comfy_double"))  # ComfyUI's module names resolve to the double

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402

from turbowan import comfy_nodes as nodes  # noqa: E402
from turbowan import generate_i2v, placement, rcm_timesteps  # noqa: E402
from turbowan.placement import Placement, tensor_bytes  # noqa: E402

HIGH, LOW, HIGH_QUANT = "TurboWan2.2-I2V-tiny-high.pth", "TurboWan2.2-I2V-tiny-low.pth", "TurboWan2.2-I2V-tiny-high-quant.pth"
VAE = "Wan2.1_VAE-tiny.pth"
SIZE = dict(width=32, height=32)  # explicit size: the presets are far too large for CPU tests
SEED_SAMPLER_WIDGETS = ["num_frames", "num_steps", "resolution", "aspect_ratio", "boundary", "sigma_max", "seed",
                        "control_after_generate", "use_ode"]


@pytest.fixture
def comfy_env(fixtures, tmp_path):
    """Model folders holding copies of the tiny fixtures, an output folder, empty caches and a clean interrupt flag."""
    saved = {k: (list(v[0]), v[1]) for k, v in folder_paths.folder_names_and_paths.items()}
    saved_dirs = (folder_paths.get_output_directory(), folder_paths.get_input_directory())
    models = tmp_path / "models"
    for sub, names in (("diffusion_models", [HIGH, LOW, HIGH_QUANT]), ("vae", [VAE])):
        (models / sub).mkdir(parents=True)
        folder = "dit" if sub == "diffusion_models" else "vae"
        for name in names:
            shutil.copy(fixtures / folder / name, models / sub / name)
        folder_paths.add_model_folder_path(sub, str(models / sub), is_default=True)
    (tmp_path / "output").mkdir()
    (tmp_path / "input").mkdir()
    folder_paths.set_output_directory(str(tmp_path / "output"))
    folder_paths.set_input_directory(str(tmp_path / "input"))
    nodes._experts.entries.clear()
    nodes._vaes.entries.clear()
    mm.interrupt_current_processing(False)
    yield tmp_path
    mm.interrupt_current_processing(False)
    comfy.utils.set_progress_bar_global_hook(None)
    mm.current_loaded_models.clear()
    folder_paths.folder_names_and_paths.clear()
    folder_paths.folder_names_and_paths.update(saved)
    folder_paths.set_output_directory(saved_dirs[0])
    folder_paths.set_input_directory(saved_dirs[1])


@pytest.fixture
def image(fixtures):
    """The fixture start image as ComfyUI's LoadImage outputs it: [1, H, W, 3] float32 in [0, 1]."""
    import numpy as np
    from PIL import Image

    arr = np.array(Image.open(fixtures / "pipeline" / "input_image.png").convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def conditioning(width: int = 4096, tokens: int = 16, seed: int = 0):
    """CONDITIONING as CLIPTextEncode returns it: [[tensor [1, L, D], {"pooled_output": ...}]]."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, width, generator=g), {"pooled_output": None}]]


def load_experts(attention="original"):
    loader = nodes.TurboWanModelLoader()
    (high,) = loader.load(HIGH, attention, 0.1, "auto")
    (low,) = loader.load(LOW, attention, 0.1, "auto")
    return high, low


def run_sampler(high, low, vae, image, cond=None, num_frames=5, seed=0, **kw):
    return nodes.TurboDiffusionI2VSampler().generate(
        high, low, cond if cond is not None else conditioning(), vae, image, num_frames, 4, "480", "16:9", 0.9,
        200.0, seed, False, kw.pop("adaptive_resolution", False), **{**SIZE, **kw})


# -- registration and the workflow files -------------------------------------------------------------------

def test_repo_root_registers_the_seed_nodes_without_triton(comfy_env, monkeypatch):
    """ComfyUI imports the checkout as a package named after its folder; no optional GPU library is needed."""
    monkeypatch.setitem(sys.modules, "triton", None)  # any `import triton` now raises ImportError
    spec = importlib.util.spec_from_file_location(
        "Comfyui_turbodiffusion", REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "Comfyui_turbodiffusion", module)
    spec.loader.exec_module(module)
    assert {"TurboWanModelLoader", "TurboWanVAELoader", "TurboDiffusionI2VSampler",
            "TurboDiffusionSaveVideo"} <= set(module.NODE_CLASS_MAPPINGS)
    assert set(module.NODE_DISPLAY_NAME_MAPPINGS) == set(module.NODE_CLASS_MAPPINGS)
    for cls in module.NODE_CLASS_MAPPINGS.values():
        assert callable(getattr(cls(), cls.FUNCTION))
        cls.INPUT_TYPES()


def widget_names(node_class) -> list[str]:
    """Widget inputs in the order a saved UI workflow lists their values (a seed INT adds its control widget)."""
    spec = node_class.INPUT_TYPES()
    names = []
    for section in ("required", "optional"):
        for name, (kind, *opts) in spec.get(section, {}).items():
            if isinstance(kind, (list, tuple)) or kind in ("INT", "FLOAT", "STRING", "BOOLEAN"):
                names.append(name)
                options = opts[0] if opts else {}
                if kind == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed")):
                    names.append("control_after_generate")
    return names


def check_widget_value(node_class, name, value):
    if name == "control_after_generate":
        assert value in ("fixed", "increment", "decrement", "randomize")
        return
    spec = {**node_class.INPUT_TYPES()["required"], **node_class.INPUT_TYPES().get("optional", {})}
    kind, *opts = spec[name]
    options = opts[0] if opts else {}
    if isinstance(kind, (list, tuple)):
        if name not in ("model_name", "vae_name", "embedding"):  # file lists depend on the machine
            assert value in kind, (name, value)
    elif kind in ("INT", "FLOAT"):
        assert isinstance(value, (int, float)) and not isinstance(value, bool), (name, value)
        assert options.get("min", value) <= value <= options.get("max", value), (name, value)
    elif kind == "BOOLEAN":
        assert isinstance(value, bool), (name, value)
    elif kind == "STRING":
        assert isinstance(value, str), (name, value)


def test_seed_widget_layout_loads_into_our_nodes():
    """The seed workflow's widgets (names and order) are the first widgets of our nodes; new ones come after."""
    assert widget_names(nodes.TurboWanModelLoader)[:3] == ["model_name", "attention_type", "sla_topk"]
    assert widget_names(nodes.TurboWanVAELoader) == ["vae_name"]
    assert widget_names(nodes.TurboDiffusionI2VSampler)[:9] == SEED_SAMPLER_WIDGETS
    assert widget_names(nodes.TurboDiffusionSaveVideo) == ["filename_prefix", "fps", "format", "quality", "loop"]
    seed_values = {  # a workflow saved by the seed's nodes: its values must stay valid for ours
        nodes.TurboWanModelLoader: ["TurboWan2.2-I2V-A14B-high-720P-quant.pth", "sla", 0.1],
        nodes.TurboDiffusionI2VSampler: [77, 4, "480", "16:9", 0.9, 200, 0, "fixed", False],
        nodes.TurboDiffusionSaveVideo: ["turbodiffusion", 24, "mp4", 8, True],
    }
    for cls, values in seed_values.items():
        for name, value in zip(widget_names(cls), values):
            check_widget_value(cls, name, value)


def test_ui_workflow_widgets_map_onto_input_types():
    workflow = json.loads((REPO / "workflows" / "turbowan_i2v.json").read_text())
    ours = [n for n in workflow["nodes"] if n["type"] in nodes.NODE_CLASS_MAPPINGS]
    assert sorted(n["type"] for n in ours) == sorted(
        ["TurboWanModelLoader", "TurboWanModelLoader", "TurboWanVAELoader", "TurboDiffusionI2VSampler",
         "TurboDiffusionSaveVideo"])
    assert {n["type"] for n in workflow["nodes"]} - set(nodes.NODE_CLASS_MAPPINGS) == {"CLIPLoader", "CLIPTextEncode", "LoadImage"}
    for node in ours:
        cls = nodes.NODE_CLASS_MAPPINGS[node["type"]]
        names = widget_names(cls)
        assert len(node["widgets_values"]) == len(names), node["type"]
        for name, value in zip(names, node["widgets_values"]):
            check_widget_value(cls, name, value)
        linked = [i["name"] for i in node.get("inputs", [])]
        sockets = [k for k, (kind, *_) in cls.INPUT_TYPES()["required"].items() if k not in names]
        assert linked == sockets, node["type"]


def test_api_workflow_gives_every_required_input():
    workflow = json.loads((REPO / "workflows" / "turbowan_i2v_api.json").read_text())
    assert len(workflow) == 8
    for node_id, node in workflow.items():
        cls = nodes.NODE_CLASS_MAPPINGS.get(node["class_type"])
        if cls is None:
            continue
        spec = cls.INPUT_TYPES()
        assert set(spec["required"]) <= set(node["inputs"]), node["class_type"]
        assert set(node["inputs"]) <= set(spec["required"]) | set(spec.get("optional", {})), node["class_type"]
        for name, value in node["inputs"].items():
            if isinstance(value, list):  # a link: [node id, output slot]
                assert value[0] in workflow
            else:
                check_widget_value(cls, name, value)


# -- loaders ---------------------------------------------------------------------------------------------

def test_model_loader_lists_diffusion_models(comfy_env):
    choices = nodes.TurboWanModelLoader.INPUT_TYPES()["required"]["model_name"][0]
    assert {HIGH, LOW, HIGH_QUANT} <= set(choices)


def test_model_loader_reads_once_and_reuses(comfy_env):
    high, _ = load_experts()
    again, _ = load_experts()
    assert again is high
    assert high.device.type == "cpu"  # the pipeline places it when it runs
    assert high.dtype == torch.float32  # ComfyUI on the CPU (--cpu, as the double): float32 compute


def test_model_loader_reloads_on_changed_option_or_file(comfy_env):
    (first,) = nodes.TurboWanModelLoader().load(HIGH, "original", 0.1, "auto")
    (other_option,) = nodes.TurboWanModelLoader().load(HIGH, "sla", 0.2, "auto")
    assert other_option is not first and other_option.attention == "sla"
    path = comfy_env / "models" / "diffusion_models" / HIGH
    before = nodes.TurboWanModelLoader.IS_CHANGED(HIGH, attention_type="sla")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # the file was replaced
    assert nodes.TurboWanModelLoader.IS_CHANGED(HIGH, attention_type="sla") != before
    (reloaded,) = nodes.TurboWanModelLoader().load(HIGH, "sla", 0.2, "auto")
    assert reloaded is not other_option
    assert len(nodes._experts.entries) == 1  # the stale copies were dropped
    (same,) = nodes.TurboWanModelLoader().load(HIGH, "sla", 0.2, "swap")
    assert same is reloaded and same.execution_mode == "swap"  # a placement choice, not a reason to reload


def test_wrong_file_in_model_slot_is_one_sentence(comfy_env, fixtures):
    shutil.copy(fixtures / "vae" / VAE, comfy_env / "models" / "diffusion_models" / VAE)
    with pytest.raises(nodes.TurboWanError) as err:
        nodes.TurboWanModelLoader().load(VAE, "sla", 0.1, "auto")
    message = str(err.value)
    assert "VAE" in message and "expert" in message and "\n" not in message
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no chain of internals


def test_wrong_file_in_vae_slot_is_one_sentence(comfy_env, fixtures):
    shutil.copy(fixtures / "dit" / HIGH, comfy_env / "models" / "vae" / HIGH)
    with pytest.raises(nodes.TurboWanError) as err:
        nodes.TurboWanVAELoader().load(HIGH)
    assert "DiT" in str(err.value) and "Wan2.1 VAE" in str(err.value) and "\n" not in str(err.value)


def test_text_embedding_node_reads_a_saved_embedding(comfy_env):
    from safetensors.torch import save_file

    emb = torch.randn(7, 4096)
    save_file({"text_embedding": emb}, str(comfy_env / "input" / "prompt.safetensors"))
    assert nodes.TurboWanLoadTextEmbedding.INPUT_TYPES()["required"]["embedding"][0] == ["prompt.safetensors"]
    ((cond, extra),) = nodes.TurboWanLoadTextEmbedding().load("prompt.safetensors")[0]
    assert torch.equal(cond, emb[None]) and extra == {"pooled_output": None}
    save_file({"a": emb, "b": emb.clone()}, str(comfy_env / "input" / "two.safetensors"))
    with pytest.raises(nodes.TurboWanError, match="text_embedding"):
        nodes.TurboWanLoadTextEmbedding().load("two.safetensors")


# -- sampler ---------------------------------------------------------------------------------------------

def test_sampler_outputs_frames_and_last_frame(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    frames, last = run_sampler(high, low, vae, image)
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == torch.float32
    assert 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    assert torch.equal(last, frames[-1:])
    # the node adds nothing to the pipeline: same call, same frames (bitwise: same CPU ops in the same order)
    direct = generate_i2v(high, low, vae, image, conditioning()[0][0], num_frames=5, num_steps=4, seed=0,
                          device="cpu", **SIZE)
    assert torch.equal(frames, direct[0])


def test_last_frame_chains_into_a_second_clip(comfy_env, image, monkeypatch):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    first, last = run_sampler(high, low, vae, image)
    assert torch.equal(last[0], first[-1])
    # Random tiny experts do not keep frame 0, so the second clip runs experts that trust the conditioning (as the
    # trained ones do for frame 0): each predicts the clean latents are y's image latents.
    flow_times = rcm_timesteps(4, 200.0).tolist()

    def trusts_the_image(x, t, context, y):
        t_flow = min(flow_times, key=lambda s: abs(s - float(t.float()[0]) / 1000))  # undo the bf16 timestep rounding
        return ((x.double() - y[:, 4:].double()) / t_flow).float()

    for expert in (high, low):
        monkeypatch.setattr(expert, "forward", trusts_the_image)
    second, _ = run_sampler(high, low, vae, last, num_frames=9, seed=1)
    assert second.shape == (9, 32, 32, 3)

    def round_trip(frame):  # [1, H, W, 3] in [0, 1]: VAE-encoded as the pipeline does (then black frames), decoded
        clip = torch.zeros(1, 3, 9, 32, 32)
        clip[:, :, 0] = frame[0].permute(2, 0, 1) * 2 - 1
        return ((vae.decode(vae.encode(clip)).clamp(-1, 1) + 1) / 2)[0, :, 0].permute(1, 2, 0)

    # measured: 1.1e-5 from the last frame's VAE round trip (the random tiny VAE's round trip itself is far from
    # identity), 0.58 from the first frame's: the second clip starts from the first clip's last frame
    assert float((second[0] - round_trip(last)).abs().max()) < 1e-4
    assert float((second[0] - round_trip(first[:1])).abs().max()) > 0.1


def test_stock_vae_loader_output_gives_the_same_video(comfy_env, image, fixtures):
    """VAELoader's comfy.sd.VAE (Wan2.1 file) works in the sampler and gives what TurboWanVAELoader gives."""
    high, low = load_experts()
    (ours,) = nodes.TurboWanVAELoader().load(VAE)
    stock = comfy.sd.VAE(sd=torch.load(fixtures / "vae" / VAE, map_location="cpu", weights_only=True))
    assert stock.vae_dtype == torch.float32  # ComfyUI picks float32 for a CPU VAE
    expected, _ = run_sampler(high, low, ours, image)
    got, _ = run_sampler(high, low, stock, image)
    assert torch.equal(got, expected)  # same fp32 weights, same code path: bitwise equal
    assert nodes.as_turbowan_vae(stock) is nodes.as_turbowan_vae(stock)  # converted once per VAE object


def test_stock_vae_of_another_family_is_rejected(comfy_env, image):
    high, low = load_experts()
    sd_vae = comfy.sd.VAE(sd={"decoder.conv_in.weight": torch.zeros(512, 4, 3, 3), "encoder.conv_in.weight": torch.zeros(128, 3, 3, 3)})
    with pytest.raises(nodes.TurboWanError, match="Wan2.1 VAE"):
        run_sampler(high, low, sd_vae, image)


def test_1024_wide_conditioning_names_the_right_clip_type(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    with pytest.raises(nodes.TurboWanError) as err:
        run_sampler(high, low, vae, image, cond=conditioning(width=1024))
    assert "1024" in str(err.value) and "'wan'" in str(err.value) and "\n" not in str(err.value)


def test_80_frames_is_refused_with_the_nearest_valid_counts(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    with pytest.raises(nodes.TurboWanError, match=r"4n\+1.*77 or 81"):
        run_sampler(high, low, vae, image, num_frames=80)


def test_sampler_refuses_inputs_it_cannot_use(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    with pytest.raises(nodes.TurboWanError, match="one"):
        run_sampler(high, low, vae, image, cond=conditioning() + conditioning(seed=1))
    with pytest.raises(nodes.TurboWanError, match="batch of 2"):
        run_sampler(high, low, vae, image.repeat(2, 1, 1, 1))
    patcher = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    with pytest.raises(nodes.TurboWanError, match="TurboWanModelLoader"):
        run_sampler(patcher, low, vae, image)


def test_progress_bar_advances_per_chunk_and_step(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: updates.append((value, total)))
    run_sampler(high, low, vae, image)
    # 5 frames = 2 latent frames: encode 2 chunks, 4 steps, decode 2 latent frames
    assert [v for v, _ in updates] == list(range(1, 9))
    assert all(total == 8 for _, total in updates)


def test_cancel_after_first_step_stops_and_next_run_is_clean(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    expected, _ = run_sampler(high, low, vae, image)
    seen = []

    def press_cancel_after_first_step(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:  # 2 encode chunks + the first sampling step
            mm.interrupt_current_processing(True)

    comfy.utils.set_progress_bar_global_hook(press_cancel_after_first_step)
    with pytest.raises(mm.InterruptProcessingException):  # not wrapped: ComfyUI reports it as "interrupted"
        run_sampler(high, low, vae, image)
    assert seen[-1] == 3  # stopped right at the step boundary
    assert high.device.type == low.device.type == vae.device.type == "cpu"
    assert not mm.processing_interrupted()
    comfy.utils.set_progress_bar_global_hook(None)
    again, _ = run_sampler(high, low, vae, image)
    assert torch.equal(again, expected)


def test_before_load_asks_comfyui_to_free_its_models(comfy_env):
    """The pipeline's before_load hook unloads ComfyUI's resident models (e.g. the text encoder) as needed."""
    text_encoder = comfy.model_patcher.ModelPatcher(torch.nn.Linear(64, 64), torch.device("cpu"), torch.device("cpu"))
    mm.load_models_gpu([text_encoder])
    assert mm.loaded_models() == [text_encoder]
    nodes.make_before_load(working_bytes=0)(1 << 60, torch.device("cpu"))  # more than any machine has free
    assert mm.loaded_models() == []
    mm.load_models_gpu([text_encoder])
    nodes.make_before_load(working_bytes=0)(1, torch.device("cpu"))  # already enough free: keep it
    assert mm.loaded_models() == [text_encoder]


# -- saving ----------------------------------------------------------------------------------------------

def test_save_node_writes_mp4_into_output_and_shows_it(comfy_env):
    frames = torch.rand(9, 48, 64, 3)
    save = nodes.TurboDiffusionSaveVideo()
    ui = save.save(frames, "clips/TurboDiffusion", 16, "mp4", 8, True, prompt={"7": {"class_type": "x"}},
                   extra_pnginfo={"workflow": {"nodes": []}})
    assert ui == {"ui": {"images": [{"filename": "TurboDiffusion_00001_.mp4", "subfolder": "clips", "type": "output"}],
                         "animated": (True,)}}
    path = comfy_env / "output" / "clips" / "TurboDiffusion_00001_.mp4"
    decoded = decode(path)
    assert len(decoded.frames) == 9 and decoded.frames[0].shape == (48, 64, 3) and decoded.codec == "h264"
    assert json.loads(decoded.metadata["prompt"]) == {"7": {"class_type": "x"}}
    assert json.loads(decoded.metadata["workflow"]) == {"nodes": []}
    second = save.save(frames, "clips/TurboDiffusion", 16, "mp4", 8, True)
    assert second["ui"]["images"][0]["filename"] == "TurboDiffusion_00002_.mp4"


@pytest.mark.parametrize("fmt", ["webm", "gif"])
def test_save_node_other_formats(comfy_env, fmt):
    ui = nodes.TurboDiffusionSaveVideo().save(torch.rand(5, 32, 48, 3), "TurboDiffusion", 16, fmt, 8, True)
    name = ui["ui"]["images"][0]["filename"]
    assert name.endswith("." + fmt)
    decoded = decode(comfy_env / "output" / name).frames
    assert len(decoded) == 5 and decoded[0].shape == (32, 48, 3)


def test_save_prefix_cannot_escape_the_output_folder(comfy_env):
    with pytest.raises(nodes.TurboWanError, match="outside ComfyUI's output folder"):
        nodes.TurboDiffusionSaveVideo().save(torch.rand(2, 16, 16, 3), "../../escape", 16, "mp4", 8, True)
    assert not (comfy_env.parent / "escape_00001_.mp4").exists()


# -- our models in ComfyUI's model management ------------------------------------------------------------------

def ours():
    """The models of ours that ComfyUI lists as loaded."""
    return [p.model for p in mm.loaded_models() if isinstance(p, nodes.TurboWanPatcher)]


def test_queue_leaves_its_models_in_comfyuis_loaded_models(comfy_env, image):
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    expected, _ = run_sampler(high, low, vae, image)
    assert sorted(map(id, ours())) == sorted(map(id, (high, low, vae)))  # on the CPU they compute where they live
    for entry in mm.current_loaded_models:
        assert entry.device == torch.device("cpu")
        assert entry.model_loaded_memory() == entry.model_memory() == placement.model_bytes(entry.model.model) > 0

    mm.unload_all_models()  # what ComfyUI's /free with unload_models does
    assert ours() == []
    again, _ = run_sampler(high, low, vae, image)
    assert torch.equal(again, expected) and len(ours()) == 3


CUDA = torch.device("cuda", 0)  # as ComfyUI names its card: torch.device(torch.cuda.current_device())


def placement_only(mode: str):
    """generate_i2v reduced to what it asks of placement for the experts in ``mode`` (the fake GPU cannot compute)."""

    def generate(high, low, vae, image, text, *, device, before_load, keep_loaded, **_):
        place = Placement(device, before_load, keep_loaded=keep_loaded)
        try:
            for expert in (high, low):
                place.load_expert(expert, mode)
                if mode == "swap":
                    place.unload(expert)
        finally:
            place.finish(True)
        return torch.zeros(1, 5, 32, 32, 3)

    return generate


@pytest.fixture
def comfy_gpu(comfy_env, fake_gpu, monkeypatch):
    """The double as ComfyUI on a (simulated) CUDA card, whose free memory is ``fake_gpu['free']``."""
    monkeypatch.setattr(mm, "get_torch_device", lambda: CUDA)
    monkeypatch.setattr(mm, "get_free_memory", lambda dev=None, torch_free_too=False: torch.cuda.mem_get_info(dev)[0])
    return fake_gpu


def gpu_queue(monkeypatch, image, mode="resident"):
    monkeypatch.setattr(nodes, "generate_i2v", placement_only(mode))
    high, low = load_experts()
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    run_sampler(high, low, vae, image)
    return high, low


def test_resident_experts_count_in_comfyuis_memory_and_free_reloads_them(comfy_gpu, image, monkeypatch):
    high, low = gpu_queue(monkeypatch, image)
    assert placement.resident_models(CUDA) == [high, low] and ours() == [low, high]  # most recently used first
    assert [e.model_loaded_memory() for e in mm.current_loaded_models] == [tensor_bytes(low), tensor_bytes(high)]
    assert all(e.device == CUDA and e.model_offloaded_memory() == 0 for e in mm.current_loaded_models)

    mm.unload_all_models()
    assert placement.resident_models(CUDA) == [] and ours() == []
    uploads = comfy_gpu["uploads"]
    gpu_queue(monkeypatch, image)
    assert comfy_gpu["uploads"] > uploads  # copied in again by our placement
    assert placement.resident_models(CUDA) == [high, low] and ours() == [low, high]


def test_comfyui_freeing_memory_for_its_own_model_offloads_only_what_it_needs(comfy_gpu, image, monkeypatch):
    high, low = gpu_queue(monkeypatch, image)
    comfy_gpu["free"] = tensor_bytes(high) + tensor_bytes(low) + 1000  # the experts fill the card
    (unloaded,) = mm.free_memory(tensor_bytes(low), CUDA)  # as load_models_gpu does for a model of its own
    left = low if unloaded.model.model is high else high
    assert placement.resident_models(CUDA) == [left] and ours() == [left]


@pytest.mark.parametrize("mode, kept", [("swap", 0), ("stream", 2)])
def test_only_what_the_mode_keeps_resident_is_registered(comfy_gpu, image, monkeypatch, mode, kept):
    gpu_queue(monkeypatch, image)  # resident first: its entries must not outlive the next run's placement
    high, low = gpu_queue(monkeypatch, image, mode)
    assert len(ours()) == kept
    for entry in mm.current_loaded_models:  # stream: the small parts stay, the blocks live in host memory
        assert 0 < entry.model_loaded_memory() < entry.model_memory()


def test_before_load_keeps_the_running_jobs_models(comfy_gpu, image, monkeypatch):
    high, low = gpu_queue(monkeypatch, image)
    nodes.make_before_load(0, (high, low))(1 << 60, CUDA)
    assert ours() == [low, high]
    nodes.make_before_load(0)(1 << 60, CUDA)  # a run with other experts: ComfyUI frees ours
    assert ours() == [] and placement.resident_models(CUDA) == []


def test_inputs_added_after_the_original_node_are_optional():
    for name, original in ORIGINAL_INPUTS.items():
        assert set(nodes.NODE_CLASS_MAPPINGS[name].INPUT_TYPES()["required"]) == original, name


def test_original_node_inputs_alone_run(comfy_env, image, monkeypatch):
    seen = {}

    def fake_generate(*args, **kwargs):  # the pipeline itself is tested elsewhere; this checks the node's defaults
        seen.update(kwargs)
        return torch.zeros(1, 5, 32, 32, 3)

    monkeypatch.setattr(nodes, "generate_i2v", fake_generate)
    (high,) = nodes.TurboWanModelLoader().load(HIGH, "original", 0.1)
    (low,) = nodes.TurboWanModelLoader().load(LOW, "original", 0.1)
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    frames, _ = nodes.TurboDiffusionI2VSampler().generate(high, low, conditioning(), vae, image, 5, 4, "480", "16:9",
                                                          0.9, 200.0, 0, False)
    assert frames.shape[0] == 5
    assert high.execution_mode == "auto" and seen["adaptive_resolution"] is False
    assert seen["width"] is None and seen["height"] is None


# -- an expert per card (the model loader's device input) --------------------------------------------------


def test_model_loader_device_input_is_optional_and_lists_ComfyUIs_device_the_cpu_and_each_card(monkeypatch):
    optional = nodes.TurboWanModelLoader.INPUT_TYPES()["optional"]
    assert "device" not in nodes.TurboWanModelLoader.INPUT_TYPES()["required"]
    assert optional["device"][0][:2] == ["default", "cpu"] and optional["device"][1]["default"] == "default"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert nodes.device_choices() == ["default", "cpu", "cuda:0", "cuda:1"]


def test_a_card_that_is_not_there_is_refused_in_one_sentence(comfy_env):
    with pytest.raises(nodes.TurboWanError, match="cuda:7"):
        nodes.TurboWanModelLoader().load(HIGH, "original", 0.1, "auto", "auto", "cuda:7")


def test_experts_on_two_cards_stay_there_and_are_registered_with_comfyui_on_each(comfy_gpu, image, monkeypatch):
    seen = {}

    def per_card_placement(high, low, vae, image, text, *, device, before_load, keep_loaded, expert_devices, **_):
        """generate_i2v reduced to its placement of an expert per card (the simulated cards cannot compute)."""
        seen.update(expert_devices)
        places = {name: Placement(expert_devices[name], before_load, keep_loaded=keep_loaded) for name in expert_devices}
        try:
            for name, expert in (("high", high), ("low", low)):
                places[name].load_expert(expert, places[name].resolve_mode(expert, None, tokens=100))
        finally:
            for place in places.values():
                place.finish(True)
        return torch.zeros(1, 5, 32, 32, 3)

    monkeypatch.setattr(nodes, "generate_i2v", per_card_placement)
    loader = nodes.TurboWanModelLoader()
    with monkeypatch.context() as two_cards:  # for the loader's check that the card exists
        two_cards.setattr(torch.cuda, "is_available", lambda: True)
        two_cards.setattr(torch.cuda, "device_count", lambda: 2)
        (high,) = loader.load(HIGH, "original", 0.1, "auto", "auto", "cuda:0")
        (low,) = loader.load(LOW, "original", 0.1, "auto", "auto", "cuda:1")
    (vae,) = nodes.TurboWanVAELoader().load(VAE)
    run_sampler(high, low, vae, image)
    cards = torch.device("cuda", 0), torch.device("cuda", 1)
    assert seen == {"high": cards[0], "low": cards[1]}
    assert placement.resident_models(cards[0]) == [high] and placement.resident_models(cards[1]) == [low]
    assert {e.model.model: e.device for e in mm.current_loaded_models} == {high: cards[0], low: cards[1]}
    mm.free_memory(1 << 60, cards[1])  # ComfyUI making room on the second card unloads the expert there
    assert placement.resident_models() == [high] and ours() == [high]
    mm.free_memory(1 << 60, cards[0])
    assert placement.resident_models() == [] and ours() == []
    (again,) = loader.load(HIGH, "original", 0.1, "auto", "auto")  # the option back at its default
    assert again is high and high.run_device is None
