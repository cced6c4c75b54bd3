"""ComfyUI nodes for TurboWan2.2 I2V: thin adapters between ComfyUI's types and `turbowan`'s pipeline.

Node names, inputs and widget order follow the seed workflow (widget values are positional in saved
workflows, so new inputs only ever go last):

* TurboWanModelLoader       model_name, attention_type, sla_topk, execution_mode, int8_compute, device -> MODEL
* TurboWanVAELoader         vae_name -> VAE (ours; the stock VAELoader's Wan2.1 VAE works in the sampler too)
* TurboDiffusionI2VSampler  experts, CONDITIONING, VAE, IMAGE + the seed's widgets -> frames, last_frame
* TurboDiffusionSaveVideo   frames -> mp4 / webm / gif in ComfyUI's output folder, shown in the node
* TurboWanLoadTextEmbedding a saved [L, 4096] umT5 embedding -> CONDITIONING (no text encoder needed)
* TurboWanLoraLoader        MODEL, lora_name, strength -> MODEL with the LoRA applied (chainable)

Memory: the pipeline places the models itself (`turbowan.placement`: both experts, one at a time, or streamed
block by block), and what it keeps on the device after a run stays for the next queue. ComfyUI knows those models:
each is listed in ``comfy.model_management.current_loaded_models`` through a `TurboWanPatcher`, a ModelPatcher
whose load is a no-op (placement already put it there, or puts it back on our next run) and whose unload is
``placement.release``. So our models count in ComfyUI's memory decisions, ComfyUI unloads them when it frees
memory for another model (``free_memory``, ``load_models_gpu``, ``unload_all_models``, ``/free``), and the
next queue reloads them. Before each of our loads the pipeline's ``before_load(nbytes, device)`` calls
``free_memory`` (weights plus an activation estimate) so ComfyUI unloads its own models, e.g. the umT5 encoder
CLIPTextEncode just used, keeping this run's models loaded. ComfyUI does not move our weights itself:
``load_models_gpu`` would fight placement's own moves and its block streaming.

Loading is lazy and cached: a loader reads its file when it first executes, and keeps the model for
later runs, keyed by the file's identity (path, size, mtime) and the options; a changed file or option
loads again and drops the stale copy. ``IS_CHANGED`` reports the file identity so that ComfyUI re-runs
a loader whose file was replaced.
"""

from __future__ import annotations

import json
import logging
import os
import weakref

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.utils
import folder_paths

from . import placement
from .checkpoint import file_identity
from .devices import check_device, indexed
from .lora import apply_lora
from .models.dit import WanI2VDiT, load_dit
from .models.vae import WanVAE, load_vae, vae_from_state_dict
from .memory import FFN_CHUNK_TOKENS, activation_bytes
from .options import (ASPECT_RATIOS, ATTENTION_KINDS, EXECUTION_MODES, QUANT_MODES, RESOLUTIONS, TEXT_WIDTH,
                      VIDEO_FORMATS, latent_frames, latent_tokens)
from .pipeline import generate_i2v, generate_t2v, read_text_embedding, target_size
from .video import write_video

log = logging.getLogger("turbowan")

CATEGORY = "video/turbodiffusion"


def model_dtype() -> torch.dtype:
    """bf16 (the released experts' and the reference's compute dtype) on GPUs; float32 when ComfyUI runs on the
    CPU (``--cpu``), where bf16 matmuls and convolutions are several times slower."""
    return torch.float32 if mm.get_torch_device().type == "cpu" else torch.bfloat16


class TurboWanError(Exception):
    """A problem the user can fix; its message is the one sentence ComfyUI shows."""


# ComfyUI titles its error dialog "<module>.<class>", and imports this package under its folder's path
TurboWanError.__module__ = "turbowan"


# -- model caches ------------------------------------------------------------------------------------------

class _FileCache:
    """Models by (file identity, options). Loading a file again with new contents or options drops the old copy,
    so switching an option never keeps two 14B experts in RAM."""

    def __init__(self):
        self.entries: dict[tuple, object] = {}

    def get(self, path: str, options: tuple, load):
        identity = file_identity(path)
        key = (identity, options)
        if key not in self.entries:
            for stale in [k for k in self.entries if k[0][0] == identity[0]]:
                del self.entries[stale]
            self.entries[key] = load()
        return self.entries[key]


_experts = _FileCache()
_vaes = _FileCache()
_stock_vae_copies: "weakref.WeakKeyDictionary[object, WanVAE]" = weakref.WeakKeyDictionary()


def _cached_load(cache: _FileCache, folder: str, name: str, options: tuple, load):
    """``load(path)`` of a file in a ComfyUI models folder, through ``cache``; a bad file or option becomes the one
    sentence ComfyUI's error dialog shows."""
    path = folder_paths.get_full_path_or_raise(folder, name)
    try:
        return cache.get(path, options, lambda: load(path))
    except ValueError as exc:  # ModelFileError and bad options
        raise TurboWanError(str(exc)) from None


def _identity_or_empty(folder: str, name: str):
    path = folder_paths.get_full_path(folder, name)
    return file_identity(path) if path else ""


# -- loaders -----------------------------------------------------------------------------------------------

DEFAULT_DEVICE = "default"  # the model loader's device input: ComfyUI's device


def device_choices() -> list[str]:
    """The model loader's device input: ComfyUI's device, the CPU, and every CUDA card torch sees."""
    cards = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return [DEFAULT_DEVICE, "cpu"] + [f"cuda:{i}" for i in range(cards)]


class TurboWanModelLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model_name": (folder_paths.get_filename_list("diffusion_models"), {
                    "tooltip": "A TurboWan2.2-I2V-A14B expert from models/diffusion_models "
                               "(…-high-720P-quant.pth for the high-noise slot, …-low-… for the low-noise slot), "
                               "or a TurboWan2.1-T2V model for the T2V sampler."}),
                "attention_type": (list(ATTENTION_KINDS), {
                    "default": "sla",
                    "tooltip": "sla: sparse-linear attention the models were distilled with (our Triton kernel on "
                               "CUDA, our Gluon kernel on H100/H200). "
                               "sagesla: SLA with int8 Q/K (Triton), falls back to sla where it cannot run. "
                               "original: dense attention, slower. sagesla_spargeattn: the reference's SageSLA "
                               "through SpargeAttn's CUDA kernels (install SpargeAttn; H100/H200)."}),
                "sla_topk": ("FLOAT", {
                    "default": 0.1, "min": 0.01, "max": 1.0, "step": 0.01,
                    "tooltip": "Fraction of key blocks each query block attends to exactly (sla / sagesla)."}),
            },
            # added after the original node: optional, so its API-format workflows (which lack them) still run
            "optional": {
                "execution_mode": (list(EXECUTION_MODES), {
                    "default": "auto",
                    "tooltip": "Where the expert's weights live on the GPU (the high-noise loader's choice applies "
                               "to the run). swap: one expert on the GPU at a time. stream: blocks copied in while "
                               "the previous one computes (least VRAM). resident: both experts stay on the GPU. "
                               "auto: the first that fits."}),
                "int8_compute": (list(QUANT_MODES), {
                    "default": "auto",
                    "tooltip": "For -quant (int8) files. auto: w8a8 where our int8 kernel runs (CUDA sm80+ with "
                               "Triton), else w8a16. w8a16: weights dequantized to bf16, works everywhere. "
                               "w8a8: int8 activations too, the reference's numerics; about 1.3x faster linear "
                               "layers on H100/H200 with Triton (falls back to an exact but slow emulation "
                               "without it). A bf16 file with w8a8 is quantized at load."}),
                "device": (device_choices(), {
                    "default": DEFAULT_DEVICE,
                    "tooltip": "Where this model runs: default is ComfyUI's device. With two cards, put the "
                               "high-noise expert on cuda:0 and the low-noise one on cuda:1: each stays on its card "
                               "(no swapping) and the latents move across at the switch; the VAE runs on ComfyUI's "
                               "device."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = ("Loads one TurboWan2.2 I2V expert or a TurboWan2.1 T2V model (read on first run, then kept for "
                   "later runs).")

    @classmethod
    def IS_CHANGED(cls, model_name, **_):
        return _identity_or_empty("diffusion_models", model_name)

    def load(self, model_name, attention_type="sla", sla_topk=0.1, execution_mode="auto", int8_compute="auto",
             device=DEFAULT_DEVICE):
        if execution_mode not in EXECUTION_MODES:
            raise TurboWanError(f"execution_mode must be one of {EXECUTION_MODES}, got {execution_mode!r}")
        try:
            run_device = None if device == DEFAULT_DEVICE else check_device(device, option="device")
        except ValueError as exc:
            raise TurboWanError(str(exc)) from None
        dtype = model_dtype()
        options = (attention_type, float(sla_topk), dtype, int8_compute)
        model = _cached_load(_experts, "diffusion_models", model_name, options, lambda path: load_dit(
            path, attention=attention_type, sla_topk=sla_topk, quant=int8_compute, device="cpu", dtype=dtype,
            mode=execution_mode))
        model.execution_mode = execution_mode  # read by the pipeline at run time: switching it needs no reload
        model.run_device = run_device  # read by the samplers (None: ComfyUI's device); no reload either
        return (model,)


class TurboWanVAELoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "vae_name": (folder_paths.get_filename_list("vae"), {
                    "tooltip": "The Wan2.1 VAE from models/vae (wan_2.1_vae.safetensors or Wan2.1_VAE.pth)."}),
            }
        }

    RETURN_TYPES = ("VAE",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads the Wan2.1 video VAE for the TurboDiffusion sampler."

    @classmethod
    def IS_CHANGED(cls, vae_name, **_):
        return _identity_or_empty("vae", vae_name)

    def load(self, vae_name):
        dtype = model_dtype()
        return (_cached_load(_vaes, "vae", vae_name, (dtype,), lambda path: load_vae(path, device="cpu", dtype=dtype)),)


class TurboWanLoadTextEmbedding:
    """A prompt embedding saved as .safetensors (one [L, 4096] or [1, L, 4096] tensor) -> CONDITIONING."""

    @classmethod
    def INPUT_TYPES(cls):
        folder = folder_paths.get_input_directory()
        files = sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                       if f.endswith(".safetensors") and os.path.isfile(os.path.join(folder, f)))
        return {
            "required": {
                "embedding": (files, {
                    "tooltip": "A .safetensors file in ComfyUI's input folder holding one umT5-xxl prompt "
                               "embedding, [tokens, 4096] (key 'text_embedding', or its only tensor)."}),
            }
        }

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "load"
    CATEGORY = CATEGORY
    DESCRIPTION = "Loads a saved umT5-xxl prompt embedding instead of running a text encoder."

    @classmethod
    def IS_CHANGED(cls, embedding, **_):
        path = os.path.join(folder_paths.get_input_directory(), embedding)
        return file_identity(path) if os.path.isfile(path) else ""

    def load(self, embedding):
        try:
            emb = read_text_embedding(os.path.join(folder_paths.get_input_directory(), embedding))
        except ValueError as exc:
            raise TurboWanError(str(exc)) from None
        return ([[emb, {"pooled_output": None}]],)


class TurboWanLoraLoader:
    """An expert with a LoRA applied (`turbowan.apply_lora`): a new MODEL sharing every untouched weight with the
    input, which stays as it was for the nodes that still use it. Chain one per LoRA."""

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A TurboWan expert (TurboWanModelLoader or another LoRA loader)."}),
                "lora_name": (folder_paths.get_filename_list("loras"), {
                    "tooltip": "A Wan2.2 I2V A14B LoRA from models/loras; Wan2.2 LoRAs come as high/low pairs: "
                               "the high-noise file on the high expert, the low-noise file on the low one."}),
                "strength": ("FLOAT", {
                    "default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01,
                    "tooltip": "LoRA scale. The rCM-distilled TurboWan experts may need less than LoRAs trained on "
                               "the base Wan2.2 were made for."}),
            }
        }

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = CATEGORY
    DESCRIPTION = "Applies a LoRA to one TurboWan expert (int8 experts are re-quantized; untouched weights shared)."

    @classmethod
    def IS_CHANGED(cls, lora_name, **_):
        return _identity_or_empty("loras", lora_name)

    def apply(self, model, lora_name, strength=1.0):
        _check_expert(model, "model")
        path = folder_paths.get_full_path_or_raise("loras", lora_name)
        try:
            return (apply_lora(model, path, strength),)
        except ValueError as exc:  # ModelFileError: not a LoRA, or one for another model
            raise TurboWanError(str(exc)) from None


# -- sampler -----------------------------------------------------------------------------------------------

def embedding_from_conditioning(conditioning) -> torch.Tensor:
    """ComfyUI CONDITIONING ``[[tensor [1, L, D], {...}], ...]`` -> the one prompt's [1, L, D] tensor."""
    if not isinstance(conditioning, (list, tuple)) or len(conditioning) == 0:
        raise TurboWanError("the conditioning input is empty; connect CLIPTextEncode (with CLIPLoader type 'wan')")
    if len(conditioning) > 1:
        raise TurboWanError(
            f"the conditioning holds {len(conditioning)} prompts (e.g. from Conditioning Combine), but TurboDiffusion "
            "takes one; connect a single CLIPTextEncode")
    cond = conditioning[0][0]
    if not torch.is_tensor(cond) or cond.ndim != 3:
        shape = tuple(cond.shape) if torch.is_tensor(cond) else type(cond).__name__
        raise TurboWanError(f"the conditioning holds {shape}, not a [1, tokens, {TEXT_WIDTH}] text embedding")
    return cond


def as_turbowan_vae(vae) -> WanVAE:
    """Our WanVAE as is; the stock VAELoader's VAE (a Wan2.1 file) is rebuilt as our WanVAE from its weights.

    The rebuild (a CPU copy in our compute dtype; no copy where dtype and device already match) happens once per
    stock VAE object, which ComfyUI keeps while the loader's output is cached.
    """
    if isinstance(vae, WanVAE):
        return vae
    stock_model = getattr(vae, "first_stage_model", None)
    if not isinstance(stock_model, torch.nn.Module):
        raise TurboWanError(
            f"the vae input is a {type(vae).__name__}; connect TurboWanVAELoader, or VAELoader with the Wan2.1 VAE")
    copy = _stock_vae_copies.get(vae)
    if copy is None:
        try:
            copy = vae_from_state_dict(stock_model.state_dict(), device="cpu", dtype=model_dtype(),
                                       name="the VAE from VAELoader")
        except ValueError as exc:
            raise TurboWanError(str(exc)) from None
        _stock_vae_copies[vae] = copy
    return copy


def _check_expert(model, slot: str) -> None:
    if not isinstance(model, WanI2VDiT):
        raise TurboWanError(
            f"{slot} is a {type(model).__name__}, not a TurboWan expert; load it with TurboWanModelLoader")


class ComfyProgress:
    """The pipeline's ``progress(stage, done, total)`` -> one node progress bar over encode + sample + decode.

    Called between units of work, it is also where Cancel lands: ComfyUI's interrupt flag raises
    InterruptProcessingException here and the pipeline moves its models off the GPU on the way out.
    """

    STAGES = ("encode", "sample", "decode")

    def __init__(self, expected: dict[str, int]):
        self.totals = {s: int(expected.get(s, 0)) for s in self.STAGES}
        self.done = {s: 0 for s in self.STAGES}
        self.bar = comfy.utils.ProgressBar(sum(self.totals.values()))

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage in self.totals:
            self.totals[stage], self.done[stage] = total, done
            self.bar.update_absolute(sum(self.done.values()), sum(self.totals.values()))
        mm.throw_exception_if_processing_interrupted()


# -- ComfyUI's model management ---------------------------------------------------------------------------

class TurboWanPatcher(comfy.model_patcher.ModelPatcher):
    """Stands for one of our models (an expert or the VAE) in ComfyUI's list of loaded models.

    `turbowan.placement` moves the weights (whole, or streamed block by block); this only reports what placement
    keeps on the device and gives it back when ComfyUI unloads the model. Loading is a no-op: our next run puts
    the model back where its execution mode wants it."""

    def loaded_size(self):
        return placement.device_bytes(self.model, self.load_device)

    def current_loaded_device(self):
        return self.load_device if self.loaded_size() > 0 else self.offload_device

    def patch_model(self, device_to=None, lowvram_model_memory=0, load_weights=True, force_patch_weights=False):
        return self.model

    def partially_load(self, device_to, extra_memory=0, force_patch_weights=False):
        return 0

    def partially_unload(self, device_to, memory_to_free=0):
        return 0  # all or nothing: ComfyUI then unloads the whole model (detach)

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            placement.release(self.model)

    def detach(self, unpatch_all=True):
        self.unpatch_model(unpatch_weights=unpatch_all)
        return self.model


def patcher_of(model, device) -> TurboWanPatcher:
    """The model's patcher for ``device``, made once and kept on the model (ComfyUI holds patchers weakly)."""
    patchers = getattr(model, "_turbowan_patchers", None)
    if patchers is None or any(p.model is not model for p in patchers.values()):  # a shallow copy shares the dict
        patchers = model._turbowan_patchers = {}
    if device not in patchers:
        patchers[device] = TurboWanPatcher(model, load_device=device, offload_device=torch.device("cpu"),
                                           size=placement.model_bytes(model))
    return patchers[device]


def _our_entries():
    return [e for e in mm.current_loaded_models if isinstance(e.model, TurboWanPatcher)]


def sync_loaded_models(models, devices) -> None:
    """After a run, make ComfyUI's loaded models list ours exactly as placement left them on ``devices``.

    Not through ``load_models_gpu``: it would first free its inference reserve, which can evict the experts this
    run just left resident. An entry is made as load_models_gpu makes it (`LoadedModel.model_load`)."""
    for entry in _our_entries():  # placement released these itself (swap, a failed run, room for another)
        if entry.model.loaded_size() == 0:
            entry.model_unload()
            mm.current_loaded_models.remove(entry)
    # one entry per card, named as ComfyUI names it ("cuda" and "cuda:0" are one card; ComfyUI's device comes first)
    cards = {}
    for device in devices:
        cards.setdefault(indexed(device), device)
    devices = list(cards.values())
    for model in models:
        for device in devices:
            if placement.device_bytes(model, device) == 0:
                continue
            entry = mm.LoadedModel(patcher_of(model, device))
            if entry in mm.current_loaded_models:
                entry = mm.current_loaded_models.pop(mm.current_loaded_models.index(entry))
                entry.currently_used = True
            else:
                entry.model_load()
            mm.current_loaded_models.insert(0, entry)  # most recently used first, as ComfyUI keeps the list


def make_before_load(working_bytes: int, models=()):
    """``before_load(nbytes, device)`` for the pipeline: ask ComfyUI to free room for the weights + activations,
    keeping ``models`` (this run's, which placement reuses where they are) loaded."""

    def before_load(nbytes: int, device) -> None:
        wanted = int(nbytes) + int(working_bytes)
        keep = [e for e in _our_entries() if e.model.model in models]
        mm.free_memory(wanted, device, keep_loaded=keep)
        free = mm.get_free_memory(device)
        if free < nbytes:
            log.warning("turbowan: %.1f GiB free on %s for %.1f GiB of weights after ComfyUI unloaded what it could",
                        free / 2**30, device, nbytes / 2**30)

    return before_load


def run_device_of(model):
    """The device the model loader's ``device`` input chose for ``model``; None: ComfyUI's."""
    return getattr(model, "run_device", None)


def run_sampler(models, num_frames: int, num_steps: int, run, encodes: bool, size, device=None):
    """One pipeline run inside ComfyUI: its progress bar (and Cancel), memory freed for the models' weights and
    activations, what stays on the GPU registered with ComfyUI (also after a failure or Cancel, which release the
    models), and bad inputs (4n+1, conditioning width, the wrong kind of model, ...) as one sentence.
    ``size()`` -> the output (width, height); ``run(progress, device, before_load)`` -> frames. ``device``: the
    run's device (default ComfyUI's); a model whose loader chose another card is registered there."""
    device = device or mm.get_torch_device()
    devices = [device] + [d for d in {run_device_of(m) for m in models} - {None, device}]
    try:
        w, h = size()
        config = models[0].config
        chunks = latent_frames(num_frames)  # expected VAE progress units; the VAE reports its own totals
        progress = ComfyProgress({"encode": chunks if encodes else 0, "sample": num_steps, "decode": chunks})
        working_bytes = activation_bytes(latent_tokens(num_frames, w, h), config.dim, config.ffn_dim,
                                         FFN_CHUNK_TOKENS)
        return run(progress, device, make_before_load(working_bytes, models))
    except ValueError as exc:
        raise TurboWanError(str(exc)) from None
    finally:
        sync_loaded_models(models, devices)
        mm.soft_empty_cache()


def _sampler_inputs() -> dict:
    """The inputs both samplers take, spelled once; each node lists them in its own (saved-workflow) order."""
    return {
        "conditioning": ("CONDITIONING", {
            "tooltip": "Prompt from CLIPTextEncode with CLIPLoader type 'wan' (umT5-xxl, 4096 wide)."}),
        "vae": ("VAE", {"tooltip": "Wan2.1 VAE from TurboWanVAELoader or the stock VAELoader."}),
        "num_frames": ("INT", {
            "default": 81, "min": 1, "max": 241, "step": 4,
            "tooltip": "Frames to generate; must be 4n+1 (81 = 5 s at 16 fps)."}),
        "num_steps": ("INT", {
            "default": 4, "min": 1, "max": 4,
            "tooltip": "Sampling steps; the models were distilled for 1-4 (4 recommended)."}),
        "aspect_ratio": (list(ASPECT_RATIOS), {"default": "16:9"}),
        "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
        **{side: ("INT", {
            "default": 0, "min": 0, "max": 4096, "step": 16,
            "tooltip": f"Explicit {side} (multiple of 16) with {other}; 0 uses the resolution preset."})
           for side, other in (("width", "height"), ("height", "width"))},
    }


def _explicit_size(width: int, height: int) -> dict:
    """The width / height widgets as the pipeline's keywords: 0 (the widgets' default) = from the preset."""
    return {"width": width or None, "height": height or None}


class TurboDiffusionI2VSampler:
    @classmethod
    def INPUT_TYPES(cls):
        shared = _sampler_inputs()
        return {
            "required": {
                "high_noise_model": ("MODEL", {"tooltip": "High-noise expert (…-high-…) from TurboWanModelLoader."}),
                "low_noise_model": ("MODEL", {"tooltip": "Low-noise expert (…-low-…) from TurboWanModelLoader."}),
                "conditioning": shared["conditioning"],
                "vae": shared["vae"],
                "image": ("IMAGE", {"tooltip": "The first frame of the video (one image)."}),
                "num_frames": shared["num_frames"],
                "num_steps": shared["num_steps"],
                "resolution": (list(RESOLUTIONS), {
                    "default": "720p", "tooltip": "Size preset (with aspect_ratio); 480 / 480p need less VRAM."}),
                "aspect_ratio": shared["aspect_ratio"],
                "boundary": ("FLOAT", {
                    "default": 0.9, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Flow time below which the low-noise expert takes over (0.9: two steps each)."}),
                "sigma_max": ("FLOAT", {
                    "default": 200.0, "min": 1.0, "max": 10000.0, "step": 1.0,
                    "tooltip": "Initial noise level of rCM sampling."}),
                "seed": shared["seed"],
                "use_ode": ("BOOLEAN", {
                    "default": False, "tooltip": "ODE sampling: sharper but less robust than the default SDE."}),
            },
            # added after the original node: optional, so its API-format workflows (which lack them) still run
            "optional": {
                "adaptive_resolution": ("BOOLEAN", {
                    "default": False,
                    "tooltip": "Keep the preset's pixel count but follow the input image's aspect ratio."}),
                "width": shared["width"],
                "height": shared["height"],
            }
        }

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("frames", "last_frame")
    OUTPUT_TOOLTIPS = ("The video, [frames, height, width, 3].",
                       "Its last frame, to start the next clip from.")
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "TurboDiffusion Wan2.2 image-to-video: encodes the image, samples with both experts, decodes."

    def generate(self, high_noise_model, low_noise_model, conditioning, vae, image, num_frames, num_steps,
                 resolution, aspect_ratio, boundary, sigma_max, seed, use_ode, adaptive_resolution=False, width=0, height=0):
        _check_expert(high_noise_model, "high_noise_model")
        _check_expert(low_noise_model, "low_noise_model")
        text = embedding_from_conditioning(conditioning)
        wan_vae = as_turbowan_vae(vae)
        if image.ndim == 4 and image.shape[0] != 1:
            raise TurboWanError(
                f"the image input is a batch of {image.shape[0]} images; connect one (e.g. through ImageFromBatch)")

        size = _explicit_size(width, height)
        expert_devices = {name: run_device_of(m) for name, m in (("high", high_noise_model), ("low", low_noise_model))
                          if run_device_of(m) is not None}

        def run(progress, device, before_load):
            return generate_i2v(
                high_noise_model, low_noise_model, wan_vae, image, text,
                num_frames=num_frames, num_steps=num_steps, resolution=resolution, aspect_ratio=aspect_ratio,
                adaptive_resolution=adaptive_resolution, **size, boundary=boundary, sigma_max=sigma_max, seed=seed,
                ode=use_ode, progress=progress, device=device, before_load=before_load,
                one_expert_at_a_time=True,  # 'auto' never parks both experts on a GPU ComfyUI shares
                keep_loaded=True,  # what stays is registered afterwards, so ComfyUI can unload it when it needs room
                expert_devices=expert_devices or None,  # the loaders' device inputs: an expert per card
            )

        frames = run_sampler(
            (high_noise_model, low_noise_model, wan_vae), num_frames, num_steps, run, encodes=True,
            size=lambda: target_size((image.shape[-2], image.shape[-3]), resolution, aspect_ratio,
                                     adaptive_resolution, **size))
        video = frames[0]  # [T, H, W, 3], float32 in [0, 1], CPU
        return (video, video[-1:].clone())


class TurboDiffusionT2VSampler:
    @classmethod
    def INPUT_TYPES(cls):
        shared = _sampler_inputs()
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A TurboWan2.1-T2V model (1.3B or 14B) from TurboWanModelLoader."}),
                "conditioning": shared["conditioning"],
                "vae": shared["vae"],
                "num_frames": shared["num_frames"],
                "num_steps": shared["num_steps"],
                "resolution": (list(RESOLUTIONS), {
                    "default": "480p", "tooltip": "Size preset (with aspect_ratio); the 1.3B and 14B-480P models "
                                                  "are made for 480p, the 14B-720P for 720p."}),
                "aspect_ratio": shared["aspect_ratio"],
                "sigma_max": ("FLOAT", {
                    "default": 80.0, "min": 1.0, "max": 10000.0, "step": 1.0,
                    "tooltip": "Initial noise level of rCM sampling (80, as the reference's T2V script)."}),
                "seed": shared["seed"],
            },
            "optional": {
                "width": shared["width"],
                "height": shared["height"],
            }
        }

    RETURN_TYPES = ("IMAGE",)
    RETURN_NAMES = ("frames",)
    OUTPUT_TOOLTIPS = ("The video, [frames, height, width, 3].",)
    FUNCTION = "generate"
    CATEGORY = CATEGORY
    DESCRIPTION = "TurboDiffusion Wan2.1 text-to-video: samples with one TurboWan2.1-T2V model, decodes."

    def generate(self, model, conditioning, vae, num_frames, num_steps, resolution, aspect_ratio, sigma_max, seed,
                 width=0, height=0):
        _check_expert(model, "model")
        text = embedding_from_conditioning(conditioning)
        wan_vae = as_turbowan_vae(vae)
        size = _explicit_size(width, height)

        def run(progress, device, before_load):
            return generate_t2v(model, wan_vae, text, num_frames=num_frames, num_steps=num_steps,
                                resolution=resolution, aspect_ratio=aspect_ratio, **size, sigma_max=sigma_max,
                                seed=seed, progress=progress, device=device, before_load=before_load,
                                keep_loaded=True)

        frames = run_sampler((model, wan_vae), num_frames, num_steps, run, encodes=False,
                             size=lambda: target_size((0, 0), resolution, aspect_ratio, False, **size),
                             device=run_device_of(model))  # one model: the whole run on its loader's device
        return (frames[0],)


# -- saving ------------------------------------------------------------------------------------------------

class TurboDiffusionSaveVideo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "frames": ("IMAGE", {"tooltip": "The frames to save, e.g. the sampler's frames output."}),
                "filename_prefix": ("STRING", {
                    "default": "TurboDiffusion",
                    "tooltip": "File name prefix inside ComfyUI's output folder; may contain subfolders and %date%-style "
                               "variables."}),
                "fps": ("INT", {
                    "default": 16, "min": 1, "max": 120,
                    "tooltip": "Frames per second; 16 is the TurboWan2.2 / Wan2.2 A14B models' native rate."}),
                "format": (list(VIDEO_FORMATS), {
                    "default": "mp4", "tooltip": "mp4: H.264 yuv420p. webm: VP9. gif: 256-colour palette per frame."}),
                "quality": ("INT", {
                    "default": 8, "min": 0, "max": 10,
                    "tooltip": "0-10, higher is better and larger (mp4 8 = CRF 18, webm 8 = CRF 23)."}),
                "loop": ("BOOLEAN", {"default": True, "tooltip": "GIF: play forever (on) or once (off)."}),
            },
            "hidden": {"prompt": "PROMPT", "extra_pnginfo": "EXTRA_PNGINFO"},
        }

    RETURN_TYPES = ()
    OUTPUT_NODE = True
    FUNCTION = "save"
    CATEGORY = CATEGORY
    DESCRIPTION = "Saves frames as a video in ComfyUI's output folder and shows it in the node."

    def save(self, frames, filename_prefix, fps, format, quality, loop, prompt=None, extra_pnginfo=None):
        if frames.ndim != 4 or frames.shape[0] == 0:
            raise TurboWanError(f"frames must be a non-empty IMAGE batch [frames, height, width, 3], got {tuple(frames.shape)}")
        output_dir = folder_paths.get_output_directory()
        try:
            folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
                filename_prefix, output_dir, frames.shape[2], frames.shape[1])
        except Exception as exc:
            if type(exc) is not Exception:  # OSError etc.: not the prefix check
                raise
            raise TurboWanError(
                f"filename_prefix {filename_prefix!r} points outside ComfyUI's output folder; "
                "use a name or a subfolder inside it") from None
        file = f"{name}_{counter:05}_.{format}"
        metadata = None
        if format != "gif":  # ComfyUI's convention: the prompt and the workflow JSON travel in the file
            metadata = {}
            if prompt is not None:
                metadata["prompt"] = json.dumps(prompt)
            for key, value in (extra_pnginfo or {}).items():
                metadata[key] = json.dumps(value)
        try:
            write_video(frames, os.path.join(folder, file), fps=fps, format=format, quality=quality, loop=loop,
                        metadata=metadata)
        except ValueError as exc:
            raise TurboWanError(str(exc)) from None
        return {"ui": {"images": [{"filename": file, "subfolder": subfolder, "type": "output"}], "animated": (True,)}}


NODE_CLASS_MAPPINGS = {
    "TurboWanModelLoader": TurboWanModelLoader,
    "TurboWanVAELoader": TurboWanVAELoader,
    "TurboDiffusionI2VSampler": TurboDiffusionI2VSampler,
    "TurboDiffusionT2VSampler": TurboDiffusionT2VSampler,
    "TurboDiffusionSaveVideo": TurboDiffusionSaveVideo,
    "TurboWanLoadTextEmbedding": TurboWanLoadTextEmbedding,
    "TurboWanLoraLoader": TurboWanLoraLoader,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "TurboWanModelLoader": "TurboWan Model Loader",
    "TurboWanVAELoader": "TurboWan VAE Loader",
    "TurboDiffusionI2VSampler": "TurboDiffusion I2V Sampler",
    "TurboDiffusionT2VSampler": "TurboDiffusion T2V Sampler",
    "TurboDiffusionSaveVideo": "TurboDiffusion Save Video",
    "TurboWanLoadTextEmbedding": "TurboWan Load Text Embedding",
    "TurboWanLoraLoader": "TurboWan LoRA Loader",
}
