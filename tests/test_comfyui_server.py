"""End to end in a real ComfyUI: the API workflow, queued over HTTP, with the tiny fixture models.

Skipped unless COMFYUI_DIR names a ComfyUI checkout (the folder with main.py). COMFYUI_PYTHON is the
interpreter of that install (default: this one). The server runs on the CPU on a free loopback port with
``--base-directory`` pointing at a temporary folder that holds this checkout under custom_nodes/, the tiny
models, the start image and a prompt embedding, so the ComfyUI checkout itself is not touched. The text
encoder is replaced by TurboWanLoadTextEmbedding (a real umT5-xxl is far too large for a CPU test).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from helpers import ORIGINAL_INPUTS, REPO, decode
COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR to a ComfyUI checkout to run the real-server test")

HIGH, LOW, VAE = "TurboWan2.2-I2V-tiny-high.pth", "TurboWan2.2-I2V-tiny-low.pth", "Wan2.1_VAE-tiny.pth"
T2V = "TurboWan2.1-T2V-1.3B-480P-tiny-quant.pth"
FRAMES, WIDTH, HEIGHT = 9, 64, 48
STARTUP_S, RUN_S = 180, 300

# A custom node beside ours that shows ComfyUI's memory accounting over HTTP (what comfy.model_management lists)
PROBE = """
import comfy.model_management as mm
from aiohttp import web
from server import PromptServer

NODE_CLASS_MAPPINGS = {}


@PromptServer.instance.routes.get("/test_probe/loaded_models")
async def loaded_models(request):
    return web.json_response([{"class": type(e.model.model).__name__, "patcher": type(e.model).__name__,
                               "device": str(e.device), "size": e.model_memory(), "loaded": e.model_loaded_memory()}
                              for e in mm.current_loaded_models if e.model is not None])
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base: Path, log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self.log = open(log_path, "w")
        python = os.environ.get("COMFYUI_PYTHON", sys.executable)
        self.proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT)

    def get(self, path: str, raw: bool = False):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            data = r.read()
        return data if raw else json.loads(data)

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data else None

    def wait_ready(self) -> None:
        deadline = time.time() + STARTUP_S
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_text()}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"ComfyUI did not answer within {STARTUP_S} s:\n{self.log_text()}")

    def queue(self, prompt: dict) -> str:
        return self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})["prompt_id"]

    def wait_done(self, prompt_id: str) -> dict:
        deadline = time.time() + RUN_S
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id]["status"].get("completed") is not None:
                entry = history[prompt_id]
                if entry["status"]["status_str"] in ("success", "error"):
                    return entry
            time.sleep(0.25)
        raise AssertionError(f"prompt {prompt_id} did not finish within {RUN_S} s:\n{self.log_text()}")

    def wait_running(self, prompt_id: str) -> None:
        deadline = time.time() + RUN_S
        while time.time() < deadline:
            running = self.get("/queue")["queue_running"]
            if any(item[1] == prompt_id for item in running):
                return
            time.sleep(0.05)
        raise AssertionError(f"prompt {prompt_id} never started")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        self.log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from helpers import fixtures_dir, write_tiny_lora, write_tiny_t2v

    fixtures = fixtures_dir()
    base = tmp_path_factory.mktemp("comfyui_base")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "Comfyui_turbodiffusion").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "test_probe.py").write_text(PROBE)
    for sub, folder, names in (("diffusion_models", "dit", [HIGH, LOW]), ("vae", "vae", [VAE])):
        (base / "models" / sub).mkdir(parents=True)
        for name in names:
            shutil.copy(fixtures / folder / name, base / "models" / sub / name)
    write_tiny_t2v(base / "models" / "diffusion_models" / T2V, quant=True)
    (base / "models" / "loras").mkdir(parents=True)
    write_tiny_lora(base / "models" / "loras" / "tiny_high.safetensors", seed=1)
    (base / "input").mkdir()
    shutil.copy(fixtures / "pipeline" / "input_image.png", base / "input" / "start.png")
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({"text_embedding": torch.randn(16, 4096, generator=g)}, str(base / "input" / "prompt.safetensors"))

    srv = Server(base, base / "comfyui.log")
    try:
        srv.wait_ready()
        srv.base = base
        yield srv
    finally:
        srv.stop()


def tiny_prompt(seed: int = 0, num_frames: int = FRAMES, width: int = WIDTH, height: int = HEIGHT) -> dict:
    """workflows/turbowan_i2v_api.json with the tiny models, and the text encoder swapped for a saved embedding."""
    prompt = copy.deepcopy(json.loads((REPO / "workflows" / "turbowan_i2v_api.json").read_text()))
    text_node = next(k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    clip_node = next(k for k, v in prompt.items() if v["class_type"] == "CLIPLoader")
    del prompt[clip_node]
    prompt[text_node] = {"class_type": "TurboWanLoadTextEmbedding", "inputs": {"embedding": "prompt.safetensors"}}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "TurboWanModelLoader":
            inputs["model_name"] = HIGH if "high" in inputs["model_name"] else LOW
            inputs["sla_topk"] = 1.0  # a 64x48 clip has one key block: keep SLA (the default) but select it all
        elif node["class_type"] == "TurboWanVAELoader":
            inputs["vae_name"] = VAE
        elif node["class_type"] == "LoadImage":
            inputs["image"] = "start.png"
        elif node["class_type"] == "TurboDiffusionI2VSampler":
            inputs.update(num_frames=num_frames, width=width, height=height, seed=seed)
    return prompt


def saved_video(server, entry: dict) -> Path:
    (save_node,) = [k for k, v in entry["prompt"][2].items() if v["class_type"] == "TurboDiffusionSaveVideo"]
    out = entry["outputs"][save_node]
    assert out["animated"] == [True]
    (image,) = out["images"]
    assert image["type"] == "output" and image["filename"].endswith(".mp4")
    query = urllib.parse.urlencode(image)
    data = server.get(f"/view?{query}", raw=True)
    path = server.base / "downloaded" / image["filename"]
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def messages(entry: dict, kind: str) -> list[dict]:
    return [data for name, data in entry["status"]["messages"] if name == kind]


def test_nodes_are_registered(server):
    info = server.get("/object_info/TurboDiffusionI2VSampler")["TurboDiffusionI2VSampler"]
    assert info["output_name"] == ["frames", "last_frame"]
    for name in ("TurboWanModelLoader", "TurboWanVAELoader", "TurboDiffusionSaveVideo", "TurboWanLoadTextEmbedding"):
        assert name in server.get(f"/object_info/{name}")
    loader = server.get("/object_info/TurboWanModelLoader")["TurboWanModelLoader"]
    assert loader["input"]["required"]["model_name"][0] == [T2V, HIGH, LOW]  # the folder, sorted


def test_api_workflow_runs_end_to_end(server):
    entry = server.wait_done(server.queue(tiny_prompt()))
    assert entry["status"]["status_str"] == "success", server.log_text()
    video = decode(saved_video(server, entry))
    frames, codec = video.frames, video.codec
    assert codec == "h264" and len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_second_queue_reuses_the_loaded_models(server):
    entry = server.wait_done(server.queue(tiny_prompt(seed=1)))  # new seed: the sampler runs again
    assert entry["status"]["status_str"] == "success", server.log_text()
    cached = set(messages(entry, "execution_cached")[0]["nodes"])
    loaders = {k for k, v in entry["prompt"][2].items() if v["class_type"] in ("TurboWanModelLoader", "TurboWanVAELoader")}
    assert loaders <= cached  # the experts and the VAE were not loaded again
    frames = decode(saved_video(server, entry)).frames
    assert len(frames) == FRAMES


def ours_loaded(server) -> list[str]:
    return sorted(m["class"] for m in server.get("/test_probe/loaded_models") if m["patcher"] == "TurboWanPatcher")


def test_comfyui_accounting_sees_our_models_and_free_releases_them(server):
    loaded = [m for m in server.get("/test_probe/loaded_models") if m["patcher"] == "TurboWanPatcher"]
    assert sorted(m["class"] for m in loaded) == ["WanI2VDiT", "WanI2VDiT", "WanVAE"], server.log_text()
    assert all(m["device"] == "cpu" and m["loaded"] == m["size"] > 0 for m in loaded)

    server.post("/free", {"unload_models": True})
    deadline = time.time() + 30
    while ours_loaded(server) and time.time() < deadline:  # the prompt worker unloads between queue items
        time.sleep(0.1)
    assert ours_loaded(server) == []

    entry = server.wait_done(server.queue(tiny_prompt(seed=5)))  # the loaders are cached: the same expert objects
    assert entry["status"]["status_str"] == "success", server.log_text()
    assert len(decode(saved_video(server, entry)).frames) == FRAMES
    assert ours_loaded(server) == ["WanI2VDiT", "WanI2VDiT", "WanVAE"]


def test_stock_vae_loader_works_in_the_same_workflow(server):
    """ComfyUI's own VAELoader with a (random-weight, full-width) Wan2.1 VAE file drives the sampler too.

    The real loader builds Wan2.1's network at its released width, so the tiny fixture VAE cannot stand in here.
    """
    import torch
    from safetensors.torch import save_file

    from turbowan.models.vae import VAEConfig, WanVAEModel

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanVAEModel(VAEConfig(dim=96)).state_dict().items()}
    g = torch.Generator().manual_seed(0)
    weights = {k: (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16) for k, shape in shapes.items()}
    save_file(weights, str(server.base / "models" / "vae" / "wan_2.1_vae.safetensors"))
    del weights
    prompt = tiny_prompt(seed=4)
    vae_node = next(k for k, v in prompt.items() if v["class_type"] == "TurboWanVAELoader")
    prompt[vae_node] = {"class_type": "VAELoader", "inputs": {"vae_name": "wan_2.1_vae.safetensors"}}
    entry = server.wait_done(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", server.log_text()
    frames = decode(saved_video(server, entry)).frames
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_bad_frame_count_is_one_readable_error(server):
    entry = server.wait_done(server.queue(tiny_prompt(num_frames=80)))
    assert entry["status"]["status_str"] == "error"
    (error,) = messages(entry, "execution_error")
    assert error["node_type"] == "TurboDiffusionI2VSampler"
    assert error["exception_type"] == "turbowan.TurboWanError"
    assert "4n+1" in error["exception_message"] and "77 or 81" in error["exception_message"]
    assert "\n" not in error["exception_message"].strip()


def test_interrupt_then_clean_run(server):
    # a longer clip (161 frames: seconds of VAE and DiT work), so the interrupt lands while the sampler works
    long_id = server.queue(tiny_prompt(seed=2, num_frames=161))
    server.wait_running(long_id)
    time.sleep(0.5)  # the other nodes are cached: by now the sampler is encoding
    server.post("/interrupt", {})
    entry = server.wait_done(long_id)
    assert entry["status"]["status_str"] == "error"
    (interrupted,) = messages(entry, "execution_interrupted")
    assert interrupted["node_type"] == "TurboDiffusionI2VSampler"

    after = server.wait_done(server.queue(tiny_prompt(seed=3)))
    assert after["status"]["status_str"] == "success", server.log_text()
    frames = decode(saved_video(server, after)).frames
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_lora_loader_chains_between_the_model_loader_and_the_sampler(server):
    prompt = tiny_prompt(seed=5)
    sampler = next(v for v in prompt.values() if v["class_type"] == "TurboDiffusionI2VSampler")
    prompt["90"] = {"class_type": "TurboWanLoraLoader",
                    "inputs": {"model": sampler["inputs"]["high_noise_model"], "lora_name": "tiny_high.safetensors",
                               "strength": 0.8}}
    sampler["inputs"]["high_noise_model"] = ["90", 0]
    entry = server.wait_done(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", server.log_text()
    assert len(decode(saved_video(server, entry)).frames) == FRAMES


def test_text_to_video_api_workflow_runs_end_to_end(server):
    prompt = copy.deepcopy(json.loads((REPO / "workflows" / "turbowan_t2v_api.json").read_text()))
    text_node = next(k for k, v in prompt.items() if v["class_type"] == "CLIPTextEncode")
    del prompt[next(k for k, v in prompt.items() if v["class_type"] == "CLIPLoader")]
    prompt[text_node] = {"class_type": "TurboWanLoadTextEmbedding", "inputs": {"embedding": "prompt.safetensors"}}
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "TurboWanModelLoader":
            inputs.update(model_name=T2V, sla_topk=1.0)
        elif node["class_type"] == "TurboWanVAELoader":
            inputs["vae_name"] = VAE
        elif node["class_type"] == "TurboDiffusionT2VSampler":
            inputs.update(num_frames=FRAMES, width=WIDTH, height=HEIGHT, seed=4)
    entry = server.wait_done(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", server.log_text()
    frames = decode(saved_video(server, entry)).frames
    assert len(frames) == FRAMES and frames[0].shape == (HEIGHT, WIDTH, 3)


def test_original_node_api_workflow_runs_unchanged(server):  # last: it replaces the cached loaders
    # scripts written for the original node queue only its inputs: ours added since must not be required
    prompt = tiny_prompt()
    for node in prompt.values():
        original = ORIGINAL_INPUTS.get(node["class_type"])
        if original is not None:
            node["inputs"] = {k: v for k, v in node["inputs"].items() if k in original}
        if node["class_type"] == "TurboDiffusionI2VSampler":
            node["inputs"].update(resolution="480", aspect_ratio="1:1")  # the smallest preset: 480x480
    entry = server.wait_done(server.queue(prompt))
    assert entry["status"]["status_str"] == "success", server.log_text()
    frames = decode(saved_video(server, entry)).frames
    assert len(frames) == FRAMES and frames[0].shape == (480, 480, 3)


# -- the UI workflow in the real front end (headless Chromium driven over the DevTools protocol) --------------

def seed_layout(workflow: dict) -> dict:
    """The UI workflow as the seed's nodes saved it: only their widgets (fps 24), no last_frame output."""
    seed = copy.deepcopy(workflow)
    for node in seed["nodes"]:
        if node["type"] == "TurboWanModelLoader":
            node["widgets_values"] = node["widgets_values"][:3]
        elif node["type"] == "TurboDiffusionI2VSampler":
            node["widgets_values"] = [77, 4, "480", "16:9", 0.9, 200, 0, "fixed", False]
            node["outputs"] = node["outputs"][:1]
        elif node["type"] == "TurboDiffusionSaveVideo":
            node["widgets_values"] = ["turbodiffusion", 24, "mp4", 8, True]
    return seed


def load_in_frontend(server, workflows: list[dict]) -> list[dict]:
    """Open ComfyUI's page, app.loadGraphData() each workflow, return its nodes' widgets and graphToPrompt()."""
    aiohttp = pytest.importorskip("aiohttp")
    import asyncio

    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no Chromium to load the UI workflow into the front end")
    debug_port = free_port()
    chrome = subprocess.Popen(
        [browser, "--headless=new", "--no-sandbox", "--disable-gpu", f"--remote-debugging-port={debug_port}",
         f"--user-data-dir={server.base / 'chromium'}", server.url + "/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def drive():
        async with aiohttp.ClientSession() as http:
            page = None
            for _ in range(120):
                try:
                    async with http.get(f"http://127.0.0.1:{debug_port}/json") as r:
                        page = next((p for p in await r.json() if p["type"] == "page"), None)
                except aiohttp.ClientError:
                    pass
                if page:
                    break
                await asyncio.sleep(0.5)
            assert page, "Chromium did not open the page"
            ws = await http.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0)
            counter = 0

            async def js(expression):
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": "Runtime.evaluate",
                                    "params": {"expression": expression, "awaitPromise": True, "returnByValue": True}})
                while True:
                    reply = await ws.receive_json()
                    if reply.get("id") == counter:
                        result = reply["result"]
                        assert "exceptionDetails" not in result, result["exceptionDetails"]
                        return result["result"].get("value")

            for _ in range(240):
                if await js("!!(window.app && window.app.graph && window.LiteGraph && app.graph.extra)"):
                    break
                await asyncio.sleep(0.5)
            out = []
            for workflow in workflows:
                await js(f"app.loadGraphData({json.dumps(workflow)}).then(() => true)")
                nodes = await js("app.graph._nodes.map(n => ({id: String(n.id), type: n.type, "
                                 "registered: !!LiteGraph.registered_node_types[n.type], "
                                 "widgets: Object.fromEntries((n.widgets || []).map(w => [w.name, w.value]))}))")
                api = await js("app.graphToPrompt().then(p => p.output)")
                out.append({"nodes": {n["id"]: n for n in nodes}, "api": api})
            await ws.close()
            return out

    try:
        return asyncio.run(asyncio.wait_for(drive(), 240))
    finally:
        chrome.terminate()
        chrome.wait(timeout=20)


def test_ui_workflow_loads_in_the_frontend_like_the_api_workflow(server):
    ui = json.loads((REPO / "workflows" / "turbowan_i2v.json").read_text())
    api = json.loads((REPO / "workflows" / "turbowan_i2v_api.json").read_text())
    ours, seed = load_in_frontend(server, [ui, seed_layout(ui)])

    assert all(n["registered"] for n in ours["nodes"].values())
    # what the front end would queue for the UI workflow is exactly the API workflow
    assert {k: (v["class_type"], v["inputs"]) for k, v in ours["api"].items()} == \
           {k: (v["class_type"], v["inputs"]) for k, v in api.items()}

    # a workflow saved with the seed's nodes: its values land on the same widgets, new widgets take defaults
    sampler = next(n for n in seed["nodes"].values() if n["type"] == "TurboDiffusionI2VSampler")["widgets"]
    assert {k: sampler[k] for k in ("num_frames", "resolution", "seed", "control_after_generate", "use_ode")} == \
           {"num_frames": 77, "resolution": "480", "seed": 0, "control_after_generate": "fixed", "use_ode": False}
    assert (sampler["adaptive_resolution"], sampler["width"], sampler["height"]) == (False, 0, 0)
    loader = next(n for n in seed["nodes"].values() if n["type"] == "TurboWanModelLoader")["widgets"]
    assert (loader["attention_type"], loader["sla_topk"], loader["execution_mode"]) == ("sla", 0.1, "auto")
    save = next(n for n in seed["nodes"].values() if n["type"] == "TurboDiffusionSaveVideo")["widgets"]
    assert (save["fps"], save["format"], save["loop"]) == (24, "mp4", True)
