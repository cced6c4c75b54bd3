"""Every choice a user makes, defined once: the CLI's ``choices`` and the nodes' widget lists are built from here.

Inside the package an option has one name: ``attention`` (a kind below), ``quant`` (how int8 weights run),
``mode`` (the execution mode). The ComfyUI node keeps its public input names (``attention_type``,
``int8_compute``, ``execution_mode``) and the CLI its flags; the adapters map them to these.

No imports: every layer (models, ops, pipeline, adapters) may read this module.
"""

from __future__ import annotations

# Attention kinds (what each does: `turbowan.ops.attention`), in the order the node and the CLI list them.
ATTENTION_KINDS = ("sla", "sagesla", "original", "sagesla_spargeattn")

# How int8 (-quant) weights run: dequantized to the compute dtype, or int8 x int8 (`turbowan.ops.int8`);
# "auto": w8a8 (the reference's numerics, faster) where our int8 kernel runs, else w8a16.
QUANT_MODES = ("auto", "w8a16", "w8a8")

# Where the experts' weights live on CUDA during a run (`turbowan.placement`).
EXECUTION_MODES = ("auto", "resident", "swap", "stream")

# Output containers (`turbowan.video`): H.264 mp4, VP9 webm, palette gif.
VIDEO_FORMATS = ("mp4", "webm", "gif")

ASPECT_RATIOS = ("16:9", "9:16", "4:3", "3:4", "1:1")

# (width, height) per resolution preset and aspect ratio, from the reference's table (rcm/datasets/utils.py).
# The presets without "p" are its training sizes ("480" is 768x432 at 16:9, "720" is 1280x704); the "p" presets
# are the usual video sizes (832x480, 1280x720). So "480" and "480p" are different sizes, not two spellings.
RESOLUTIONS: dict[str, dict[str, tuple[int, int]]] = {
    "480": {"16:9": (768, 432), "9:16": (432, 768), "4:3": (640, 480), "3:4": (480, 640), "1:1": (480, 480)},
    "480p": {"16:9": (832, 480), "9:16": (480, 832), "4:3": (640, 480), "3:4": (480, 640), "1:1": (640, 640)},
    "512": {"16:9": (640, 384), "9:16": (384, 640), "4:3": (640, 512), "3:4": (512, 640), "1:1": (512, 512)},
    "720": {"16:9": (1280, 704), "9:16": (704, 1280), "4:3": (960, 704), "3:4": (704, 960), "1:1": (960, 960)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "4:3": (960, 720), "3:4": (720, 960), "1:1": (960, 960)},
}

SIZE_MULTIPLE = 16  # width and height: VAE stride 8 x DiT patch 2
FRAMES_PER_LATENT = 4  # the VAE packs 4 frames into one latent frame after the first

# The umT5-xxl prompt embedding the experts read: 512 rows (padding included) of width 4096.
TEXT_LEN = 512
TEXT_WIDTH = 4096


def latent_frames(num_frames: int) -> int:
    """Latent frames of a clip of ``num_frames`` (4n+1) frames: the first frame, then one per 4."""
    return 1 + max(0, num_frames - 1) // FRAMES_PER_LATENT


def latent_tokens(num_frames: int, width: int, height: int) -> int:
    """DiT tokens of one clip: latent frames x (height / 16) x (width / 16)."""
    return latent_frames(num_frames) * (height // SIZE_MULTIPLE) * (width // SIZE_MULTIPLE)
