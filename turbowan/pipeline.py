"""Image + text embedding -> video frames: the whole TurboWan2.2 I2V job, without ComfyUI (and `generate_t2v`,
text embedding -> video frames with a TurboWan2.1 T2V model: steps 4 and 5 from pure noise).

Steps (as thu-ml/TurboDiffusion's wan2.2_i2v_infer.py):
  1. pick the size: a preset (resolution x aspect ratio), or the preset's area at the image's aspect ratio
     (``adaptive_resolution``), or explicit width/height; all multiples of 16;
  2. stretch-resize the image (antialiased bilinear), scale to [-1, 1];
  3. VAE-encode [image, F-1 black frames] -> image latents; y = [mask (4 ch, 1 on latent frame 0), latents];
  4. rCM sampling with the high- then the low-noise expert (`turbowan.sampler`);
  5. VAE-decode -> frames [num_samples, F, H, W, 3] float32 in [0, 1].

Memory: the models' home is where the loaders put them (normally the CPU, memory-mapped); `turbowan.placement`
copies them to the compute device per the execution mode (the experts' copies overlap the VAE encode) and keeps
them there after the run for the next one. ``before_load(nbytes, device)`` is called first so a host
application (ComfyUI) can free memory; a failed or cancelled run releases everything it loaded.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import ModelFile, ModelFileError
from .devices import check_device, default_device
from .memory import available_ram_bytes, cpu_run_bytes
from .model_files import check_expert_slots, check_model_kind
from .ops.sequence_parallel import check_world_size
from .options import ASPECT_RATIOS, RESOLUTIONS, SIZE_MULTIPLE, TEXT_LEN, TEXT_WIDTH, latent_frames, latent_tokens
from .placement import Placement
from .progress import ProgressHook
from .sampler import expert_schedule, finite_flag, initial_noise, rcm_timesteps, require_finite, sample_rcm
from .vae_tiling import tile_for_ranks, tile_for_run

log = logging.getLogger("turbowan")

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes a 64-bit unsigned seed
# Pillow's decompression-bomb threshold (89 megapixels): the video is at most 1280x1280, so a larger input only
# costs memory; refused in one sentence instead of Pillow's warning or DecompressionBombError
MAX_IMAGE_PIXELS = 89_478_485


def check_num_frames(num_frames: int) -> None:
    """Frame counts must be 4n+1 (the VAE packs 4 frames per latent after the first)."""
    if num_frames < 1 or (num_frames - 1) % 4:
        lower = max(1, (num_frames - 1) // 4 * 4 + 1)
        upper = lower + 4
        raise ValueError(
            f"num_frames must be 4n+1 (the video VAE compresses time by 4 after the first frame); "
            f"{num_frames} is not: use {lower} or {upper}"
        )


def check_run_options(num_frames: int = 81, num_steps: int = 4, seed: int = 0, sigma_max: float = 200.0,
                      boundary: float = 0.9, num_samples: int = 1, names: Optional[dict] = None) -> None:
    """Refuse out-of-range numbers before any work; ``names`` maps a parameter to the caller's option name."""
    name = (lambda key: names.get(key, key)) if names else (lambda key: key)
    check_num_frames(num_frames)
    if not 1 <= num_steps <= 4:
        raise ValueError(f"{name('num_steps')} must be 1 to 4 (the models are distilled for 4), got {num_steps}")
    if not 0 <= seed <= SEED_MAX:
        raise ValueError(f"{name('seed')} must be between 0 and 2**64-1 ({SEED_MAX}), got {seed}")
    if not 0 < sigma_max < math.inf:  # also refuses NaN, which would sample a black video
        raise ValueError(f"{name('sigma_max')} must be a positive finite number (200 for image-to-video, 80 for text-to-video), got {sigma_max}")
    if not 0.0 <= boundary <= 1.0:
        raise ValueError(f"{name('boundary')} is a flow time between 0 and 1 (0.9 recommended), got {boundary}")
    if num_samples < 1:
        raise ValueError(f"{name('num_samples')} must be at least 1, got {num_samples}")


def open_image(path, option: str = "image"):
    """An image file -> RGB PIL image, refusing unreadable files and absurd sizes in one sentence."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"{option} {str(path)!r} does not exist")
    too_big = (f"{option} {path.name} is over {MAX_IMAGE_PIXELS // 10**6} megapixels; the video is at most "
               f"1280x1280, so downscale the image first")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked below
            with Image.open(path) as im:
                if im.width * im.height > MAX_IMAGE_PIXELS:
                    raise ValueError(f"{too_big} (it is {im.width}x{im.height})")
                im.load()
                return im.convert("RGB")
    except Image.DecompressionBombError:  # over twice Pillow's limit: refused by Image.open itself
        raise ValueError(too_big) from None
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"{option} {path.name} could not be read as an image ({exc})") from None


def target_size(
    image_wh: tuple[int, int],
    resolution: str = "720p",
    aspect_ratio: str = "16:9",
    adaptive: bool = False,
    width: Optional[int] = None,
    height: Optional[int] = None,
) -> tuple[int, int]:
    """Output (width, height). Explicit width/height win; else the preset, or its area at the image's aspect."""
    if width is not None or height is not None:
        if width is None or height is None:
            raise ValueError("give both width and height, or neither")
        if width % SIZE_MULTIPLE or height % SIZE_MULTIPLE or width <= 0 or height <= 0:
            raise ValueError(f"width and height must be positive multiples of {SIZE_MULTIPLE}, got {width}x{height}")
        return width, height
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {list(RESOLUTIONS)}, got {resolution!r}")
    if aspect_ratio not in RESOLUTIONS[resolution]:
        raise ValueError(f"aspect_ratio must be one of {list(ASPECT_RATIOS)}, got {aspect_ratio!r}")
    w, h = RESOLUTIONS[resolution][aspect_ratio]
    if not adaptive:
        return w, h
    # same area as the preset, at the image's aspect ratio, rounded to the latent-patch grid (reference formula)
    area = w * h
    iw, ih = image_wh
    aspect = ih / iw
    lat_h = round(math.sqrt(area * aspect) / SIZE_MULTIPLE)
    lat_w = round(math.sqrt(area / aspect) / SIZE_MULTIPLE)
    return max(1, lat_w) * SIZE_MULTIPLE, max(1, lat_h) * SIZE_MULTIPLE


def image_to_tensor(image) -> tuple[torch.Tensor, bool]:
    """PIL image / array / ComfyUI IMAGE / image file path -> ([3, H, W] tensor, is_uint8). RGBA and grayscale
    become RGB."""
    if isinstance(image, (str, os.PathLike)):
        image = open_image(image)
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None
    if Image is not None and isinstance(image, Image.Image):
        arr = np.asarray(image.convert("RGB"))  # drops alpha like the reference's .convert("RGB")
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), True
    t = torch.as_tensor(image)
    if t.ndim == 4:
        if t.shape[0] != 1:
            raise ValueError(f"expected one image, got a batch of {t.shape[0]}; pass one frame (e.g. image[0:1])")
        t = t[0]
    if t.ndim == 2:
        t = t[..., None]
    if t.ndim != 3:
        raise ValueError(f"image must be [H, W, C] or [1, H, W, C], got shape {tuple(t.shape)}")
    if t.shape[-1] not in (1, 3, 4) and t.shape[0] in (1, 3, 4):
        t = t.permute(1, 2, 0)  # CHW -> HWC
    c = t.shape[-1]
    if c == 1:
        t = t.expand(*t.shape[:2], 3)
    elif c == 4:
        t = t[..., :3]
    elif c != 3:
        raise ValueError(f"image must have 1, 3 or 4 channels, got {c}")
    is_uint8 = t.dtype == torch.uint8
    t = t.permute(2, 0, 1).contiguous()
    if not is_uint8:
        t = t.float().clamp(0, 1)
    return t, is_uint8


def preprocess_image(image, width: int, height: int) -> torch.Tensor:
    """-> [1, 3, height, width] float32 in [-1, 1]: antialiased bilinear stretch, as the reference's transforms.

    8-bit images are resized on 0..255 values and rounded back to 8 bit before scaling, like torchvision's
    uint8 path; float images (ComfyUI) are resized in float without that rounding.
    """
    return resize_image_tensor(*image_to_tensor(image), width, height)


def resize_image_tensor(t: torch.Tensor, is_uint8: bool, width: int, height: int) -> torch.Tensor:
    """The second half of `preprocess_image`, for an image already converted by `image_to_tensor`."""
    x = t[None].float()
    if tuple(x.shape[-2:]) != (height, width):
        x = F.interpolate(x, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
    if is_uint8:
        x = x.round().clamp(0, 255) / 255.0
    return (x - 0.5) / 0.5


def prepare_text_embedding(text_embedding: torch.Tensor) -> torch.Tensor:
    """[L, 4096] or [1, L, 4096] -> [1, 512, 4096]: padded with zero rows or cut, like the umT5 encoder output."""
    e = torch.as_tensor(text_embedding)
    if e.ndim == 2:
        e = e[None]
    if e.ndim != 3:
        raise ValueError(f"text embedding must be [1, L, {TEXT_WIDTH}], got shape {tuple(e.shape)}")
    if e.shape[-1] != TEXT_WIDTH:
        raise ValueError(
            f"text embedding is {e.shape[-1]} wide, but these models need the {TEXT_WIDTH}-wide umT5-xxl encoder "
            f"(in ComfyUI: CLIPLoader with type 'wan' and umt5_xxl / nsfw_wan_umt5-xxl)"
        )
    if e.shape[0] != 1:
        raise ValueError(f"expected one prompt's embedding, got a batch of {e.shape[0]}")
    require_finite(finite_flag(e), "the text embedding",
                   "a bad embedding (re-encode the prompt; a broken text-encoder file or fp16 overflow gives this)")
    L = e.shape[1]
    if L >= TEXT_LEN:
        return e[:, :TEXT_LEN]
    return F.pad(e, (0, 0, 0, TEXT_LEN - L))


def read_text_embedding(path) -> torch.Tensor:
    """A prompt embedding saved as .safetensors -> [1, L, D] (its only tensor, or the one named 'text_embedding')."""
    expects = f"one prompt's text embedding ([tokens, {TEXT_WIDTH}] under the key 'text_embedding')"
    file = ModelFile(path, expects)
    if "text_embedding" in file.names:
        emb = file.tensor("text_embedding")
    elif len(file.names) == 1:
        emb = file.tensor(file.names[0])
    else:
        raise ModelFileError(f"{file.path.name} holds {len(file.names)} tensors ({', '.join(file.names[:4])}) and "
                             "none is named 'text_embedding'; save the embedding under that key")
    if emb.ndim == 2:
        emb = emb[None]
    if emb.ndim != 3 or emb.shape[0] != 1 or not emb.is_floating_point():
        raise ModelFileError(f"{file.path.name} holds a {tuple(emb.shape)} {emb.dtype} tensor; expected one prompt's "
                             f"float embedding of shape [tokens, {TEXT_WIDTH}]")
    return emb


def generate_i2v(
    high,
    low,
    vae,
    image,
    text_embedding: torch.Tensor,
    *,
    num_frames: int = 81,
    num_steps: int = 4,
    resolution: str = "720p",
    aspect_ratio: str = "16:9",
    adaptive_resolution: bool = False,
    width: Optional[int] = None,
    height: Optional[int] = None,
    boundary: float = 0.9,
    sigma_max: float = 200.0,
    seed: int = 0,
    ode: bool = False,
    num_samples: int = 1,
    progress: Optional[ProgressHook] = None,
    device=None,
    before_load: Optional[Callable[[int, torch.device], None]] = None,
    one_expert_at_a_time: bool = False,
    keep_loaded: bool = True,
    on_frames: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    return_frames: bool = True,
    sequence_parallel: bool = False,
    split_vae: bool = False,
    expert_devices: Optional[dict] = None,
) -> Optional[torch.Tensor]:
    """Generate ``num_samples`` videos from one image and one prompt embedding.

    Returns frames [num_samples, num_frames, H, W, 3] float32 in [0, 1] on the CPU.
    ``image``: PIL image, an image file path, or [H, W, 3] / [1, H, W, 3] float in [0, 1] (ComfyUI IMAGE).
    ``text_embedding``: [1, L, 4096] umT5-xxl output (padded or cut to 512 rows).
    ``progress(stage, done, total)`` is called after each VAE chunk and each sampling step; raising from it
    cancels the run (models are moved back all the same).
    ``before_load(nbytes, device)`` is called before models go onto the GPU (ComfyUI frees memory there);
    ``one_expert_at_a_time`` keeps execution mode ``auto`` from holding both experts on the GPU.
    ``keep_loaded``: the models stay on the GPU after the run, so the next run with them moves nothing; they
    leave when memory is needed or on `turbowan.release_all()` (False: everything goes back at the end).
    ``on_frames(sample, start, frames)`` gets each decoded chunk as soon as it is final ([t, H, W, 3] float in
    [0, 1] on the device, frames ``start .. start + t - 1`` of that sample): a video writer can encode while the
    VAE decodes. ``return_frames=False`` returns None instead of copying the whole video to the CPU (for a
    caller that takes the frames through ``on_frames``).
    ``sequence_parallel=True``: call on every rank of an initialised default `torch.distributed` process group
    with the same arguments (on GPUs, ``device`` is each rank's own card); the experts split the tokens over the
    ranks (Ulysses) and every rank returns the same frames, equal to a one-process run's (the noise is drawn
    once from the seeded CPU generator, so the result does not depend on the rank count). Each rank's
    execution mode counts its own device and its share of the activations. ``split_vae=True`` (with
    ``sequence_parallel``): the VAE encode and decode are cut into one overlapping spatial tile per rank, blended
    as the memory tiling blends (`turbowan.vae_tiling.tile_for_ranks`), so they take about 1/W of the time, but
    the seams make the video differ visibly from a whole-frame one (on two H200s at 720p: up to 31 of 255, mean
    2.2, against 9 / 1.0 for the whole frame). Default False: every rank codes the whole frame.
    ``expert_devices``: {"high": device, "low": device}, an expert on a card of its own (e.g. cuda:0 and cuda:1;
    missing keys: ``device``). Each card keeps its expert (resident where it fits; no swapping between them) and
    the latents follow the expert at the switch; the VAE runs on ``device``.
    """
    # everything that can be refused is refused here, before any VAE or DiT work
    check_run_options(num_frames, num_steps, seed, sigma_max, boundary, num_samples)
    check_expert_slots(high, low)
    context = prepare_text_embedding(text_embedding)
    device = check_device(device) if device is not None else default_device()
    dtype = high.dtype
    if low.dtype != dtype:
        raise ValueError(f"the two experts were loaded with different dtypes ({high.dtype} and {low.dtype})")
    group = _sequence_group(high, low) if sequence_parallel else None
    device = _card(device)
    devices = _expert_devices(expert_devices, device)

    img, is_uint8 = image_to_tensor(image)
    w, h = target_size((img.shape[-1], img.shape[-2]), resolution, aspect_ratio, adaptive_resolution, width, height)
    if device.type == "cpu":
        check_cpu_memory(high.config, num_frames, w, h, num_samples)
    image_tensor = resize_image_tensor(img, is_uint8, w, h)  # [1, 3, h, w]
    log.info("turbowan: %dx%d, %d frames, %d steps, seed %d", w, h, num_frames, num_steps, seed)

    experts = {"high": high, "low": low}
    places = {d: Placement(d, before_load, keep_loaded=keep_loaded) for d in {device, *devices.values()}}
    place = places[device]  # the VAE's
    lat_h, lat_w = h // 8, w // 8  # VAE latents
    tokens = num_samples * latent_tokens(num_frames, w, h)
    ranks = 1 if group is None else dist_world_size(group)
    if set(devices.values()) == {device}:
        mode = place.resolve_mode(high, low, tokens=tokens, allow_resident=not one_expert_at_a_time, ranks=ranks)
        modes = {"high": mode, "low": mode}
    else:  # a card per expert: each card's mode is that of a one-model run
        modes = {name: places[devices[name]].resolve_mode(experts[name], None, tokens=tokens, ranks=ranks)
                 for name in experts}
        mode = next((modes[n] for n in experts if devices[n] == device), "resident")  # for the VAE's memory
    vae_group = group if split_vae else None
    ok = False
    try:
        # Start copying the experts in now: the copies run in the background while the VAE encodes.
        first = expert_schedule(rcm_timesteps(num_steps, sigma_max), boundary)[0]
        for name in experts:
            if name == first or modes[name] == "resident":
                places[devices[name]].start_expert(experts[name], modes[name])

        # 1. image latents
        place.load_vae(vae)
        frames_in = torch.zeros(1, 3, num_frames, h, w, device=device)  # the image, then black frames
        frames_in[:, :, 0] = image_tensor.to(device)
        tile = tile_for_run(vae, "encode", (lat_h, lat_w), mode, device, num_frames)
        if vae_group is not None:
            tile = tile_for_ranks((lat_h, lat_w), ranks, tile)
        latents = vae.encode(frames_in, progress=progress, tile=tile, group=vae_group)  # [1, 16, T, h/8, w/8]
        require_finite(finite_flag(latents), "the VAE encode of the input image",
                       "a broken VAE checkpoint or fp16 overflow (load the VAE in bf16 or float32)")
        del frames_in
        if mode != "resident":
            place.unload(vae)  # its memory goes to the expert
        _, zc, T, lh, lw = latents.shape
        mask = torch.zeros(1, 4, T, lh, lw, device=latents.device)
        mask[:, :, 0] = 1.0
        y = torch.cat([mask, latents.float()], dim=1).to(dtype).repeat(num_samples, 1, 1, 1, 1)

        # 2. sampling
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = initial_noise((num_samples, zc, T, lh, lw), generator)

        samples = _sample({n: places[devices[n]] for n in experts}, modes, experts, noise,
                          context.repeat(num_samples, 1, 1), y, num_steps=num_steps, sigma_max=sigma_max,
                          boundary=boundary, ode=ode, generator=generator, dtype=dtype, device=device,
                          progress=progress, group=group)

        # 3. decode
        frames = _decode(place, vae, samples, mode, device, num_frames, progress, on_frames, return_frames,
                         vae_group)
        ok = True
        return frames
    finally:
        for p in places.values():
            p.finish(ok)


def dist_world_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _expert_devices(expert_devices: Optional[dict], device: torch.device) -> dict:
    """{"high": device, "low": device} from the caller's (partial) mapping, each checked; missing: ``device``.
    ``cuda`` without an index is the current card, so that it and ``cuda:N`` name one placement."""
    unknown = set(expert_devices or {}) - {"high", "low"}
    if unknown:
        raise ValueError(f"expert_devices takes the keys 'high' and 'low', got {sorted(unknown)}")
    out = {}
    for name in ("high", "low"):
        d = (expert_devices or {}).get(name)
        d = device if d is None else check_device(d, option=f"expert_devices[{name!r}]")
        out[name] = _card(d)
    return out


def _card(device: torch.device) -> torch.device:
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _sequence_group(*experts):
    """The default process group, checked to be running and to split the experts' heads evenly."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sequence_parallel=True runs on every rank of a torch.distributed process group, and none "
                         "is initialised; call torch.distributed.init_process_group on each rank first")
    for expert in experts:
        check_world_size(expert.config.num_heads, dist.get_world_size())
    return dist.group.WORLD


def generate_t2v(
    model,
    vae,
    text_embedding: torch.Tensor,
    *,
    num_frames: int = 81,
    num_steps: int = 4,
    resolution: str = "480p",
    aspect_ratio: str = "16:9",
    width: Optional[int] = None,
    height: Optional[int] = None,
    sigma_max: float = 80.0,
    seed: int = 0,
    num_samples: int = 1,
    progress: Optional[ProgressHook] = None,
    device=None,
    before_load: Optional[Callable[[int, torch.device], None]] = None,
    keep_loaded: bool = True,
    on_frames: Optional[Callable[[int, int, torch.Tensor], None]] = None,
    return_frames: bool = True,
    sequence_parallel: bool = False,
    split_vae: bool = False,
) -> Optional[torch.Tensor]:
    """Generate ``num_samples`` videos from one prompt embedding with a TurboWan2.1-T2V model (1.3B or 14B).

    As thu-ml/TurboDiffusion's wan2.1_t2v_infer.py: pure noise [num_samples, 16, T, H/8, W/8] from the seeded CPU
    generator, ``num_steps`` rCM steps of the one model (always the stochastic update, one noise draw per step;
    sigma_max 80 by default), then the VAE decode. Returns frames [num_samples, num_frames, H, W, 3] float32 in
    [0, 1] on the CPU. The size is the preset (``resolution`` x ``aspect_ratio``, 480p 16:9 by default) or the
    explicit ``width`` / ``height``; every other argument means what it means in `generate_i2v`.
    """
    check_run_options(num_frames, num_steps, seed, sigma_max, num_samples=num_samples)
    check_model_kind(model, text_to_video=True, slot="generate_t2v's model")
    context = prepare_text_embedding(text_embedding)
    device = check_device(device) if device is not None else default_device()
    group = _sequence_group(model) if sequence_parallel else None
    vae_group = group if split_vae else None
    w, h = target_size((0, 0), resolution, aspect_ratio, False, width, height)
    if device.type == "cpu":
        check_cpu_memory(model.config, num_frames, w, h, num_samples)
    log.info("turbowan: text-to-video %dx%d, %d frames, %d steps, seed %d", w, h, num_frames, num_steps, seed)

    place = Placement(device, before_load, keep_loaded=keep_loaded)
    mode = place.resolve_mode(model, None, tokens=num_samples * latent_tokens(num_frames, w, h),
                              ranks=1 if group is None else dist_world_size(group))
    ok = False
    try:
        place.start_expert(model, mode)
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        noise = initial_noise((num_samples, model.config.out_dim, latent_frames(num_frames), h // 8, w // 8),
                              generator)
        samples = _sample({"model": place}, {"model": mode}, {"model": model}, noise,
                          context.repeat(num_samples, 1, 1), None, num_steps=num_steps, sigma_max=sigma_max,
                          boundary=None, ode=False, generator=generator, dtype=model.dtype, device=device,
                          progress=progress, group=group)
        frames = _decode(place, vae, samples, mode, device, num_frames, progress, on_frames, return_frames,
                         vae_group)
        ok = True
        return frames
    finally:
        place.finish(ok)


def _sample(places: dict, modes: dict, models: dict, noise: torch.Tensor, context: torch.Tensor, y, group=None,
            **loop):
    """`sample_rcm` with each model placed on its device (``places[name]``) as its execution mode
    (``modes[name]``) says when its steps begin; afterwards what the mode does not keep through the decode leaves
    the device. ``group``: the process group the models split their tokens over (sequence parallelism), or None."""
    def select(name: str):
        place, mode = places[name], modes[name]
        if mode == "swap":
            for other in models.values():
                if other is not models[name]:
                    place.unload(other)  # only what is on this placement's device
        if mode == "stream":
            place.drop_prefetched()  # the previous expert's blocks copied in ahead
        place.load_expert(models[name], mode)
        return models[name] if group is None else functools.partial(models[name], sequence_group=group)

    samples = sample_rcm(select, noise, context, y, **loop)
    for name, model in models.items():
        if modes[name] == "swap":
            places[name].unload(model)
        elif modes[name] == "stream":
            places[name].drop_prefetched()
    return samples


def _decode(place: Placement, vae, samples: torch.Tensor, mode: str, device: torch.device, num_frames: int,
            progress, on_frames, return_frames: bool, group=None) -> Optional[torch.Tensor]:
    """Latents -> frames [S, F, H, W, 3] on the CPU (None without ``return_frames``), one sample at a time (the
    same result as a batch, less memory). ``group``: the ranks share the decode out, a tile each."""
    place.load_vae(vae)
    videos = []
    grid = tuple(samples.shape[-2:])
    tile = tile_for_run(vae, "decode", grid, mode, device, num_frames)
    if group is not None:
        tile = tile_for_ranks(grid, dist_world_size(group), tile)
    for i in range(samples.shape[0]):
        frames_hook = None if on_frames is None else (lambda start, chunk, i=i: on_frames(i, start, _to_rgb(chunk)[0]))
        video = vae.decode(samples[i : i + 1], progress=progress, tile=tile, on_frames=frames_hook, group=group)
        if return_frames:
            videos.append(_to_rgb(video)[0].contiguous().cpu())  # [F, H, W, 3]
    return torch.stack(videos) if return_frames else None


def check_cpu_memory(config, num_frames: int, width: int, height: int, num_samples: int) -> None:
    """Refuse a CPU run whose working memory (estimated from its size) exceeds the memory available now."""
    needed = cpu_run_bytes(num_frames, width, height, num_samples, config.dim, config.ffn_dim)
    available = available_ram_bytes()
    if available is not None and needed > available:
        tokens = num_samples * latent_tokens(num_frames, width, height)
        raise ValueError(f"this CPU run needs about {needed / 1e9:.0f} GB of memory ({num_frames} frames at "
                         f"{width}x{height}, {tokens} tokens) but {available / 1e9:.0f} GB are available; use fewer "
                         f"frames, a smaller resolution, or a CUDA GPU")


def _to_rgb(video: torch.Tensor) -> torch.Tensor:
    """VAE output [B, 3, F, H, W] in [-1, 1] -> [B, F, H, W, 3] float32 in [0, 1], on the same device."""
    return ((video.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 4, 1)
