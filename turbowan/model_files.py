"""Model files by slot: where each one usually lives in a ComfyUI models folder, and which expert is which.

Shared by the CLI (explicit paths or --models-dir), the doctor (what is there, and is it the right kind) and the
pipeline / nodes (a swapped high/low pair is refused by the file names).
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

# No torch import at module level (ModelFileError is imported where raised): the CLI imports this module
# before it knows whether it will need torch.


@dataclass(frozen=True)
class ModelSlot:
    """One model file the pipeline needs, and how to recognise it in a ComfyUI models folder."""

    key: str  # "high", "low", "vae", "text_encoder", "t2v"
    option: str  # command-line option that sets it
    what: str  # words for messages
    folders: tuple[str, ...]  # ComfyUI sub-folders searched (then the models folder itself, flat)
    names: tuple[str, ...]  # usual file names, preferred first
    patterns: tuple[str, ...]  # case-insensitive globs for renamed copies (e.g. the tiny test models)
    download: str


_TURBOWAN_HF = "https://huggingface.co/TurboDiffusion/TurboWan2.2-I2V-A14B-720P"
_COMFY_WAN_HF = "https://huggingface.co/Comfy-Org/Wan_2.1_ComfyUI_repackaged"
_TURBOWAN_T2V_HF = "https://huggingface.co/TurboDiffusion/TurboWan2.1-T2V-1.3B-480P (or -14B-480P, -14B-720P)"

MODEL_SLOTS: tuple[ModelSlot, ...] = (
    ModelSlot("high", "--high", "high-noise expert", ("diffusion_models", "unet"),
              ("TurboWan2.2-I2V-A14B-high-720P-quant.pth", "TurboWan2.2-I2V-A14B-high-720P.pth"),
              ("turbowan2.2-i2v*-high*.pth", "turbowan2.2-i2v*-high*.safetensors"), _TURBOWAN_HF),
    ModelSlot("low", "--low", "low-noise expert", ("diffusion_models", "unet"),
              ("TurboWan2.2-I2V-A14B-low-720P-quant.pth", "TurboWan2.2-I2V-A14B-low-720P.pth"),
              ("turbowan2.2-i2v*-low*.pth", "turbowan2.2-i2v*-low*.safetensors"), _TURBOWAN_HF),
    ModelSlot("vae", "--vae", "Wan2.1 VAE", ("vae",),
              ("wan_2.1_vae.safetensors", "Wan2.1_VAE.pth"),
              ("*wan*2.1*vae*.safetensors", "*wan*2.1*vae*.pth"), f"{_COMFY_WAN_HF} (split_files/vae)"),
    ModelSlot("text_encoder", "--text-encoder", "umT5-xxl text encoder", ("text_encoders", "clip"),
              ("umt5_xxl_fp8_e4m3fn_scaled.safetensors", "nsfw_wan_umt5-xxl_fp8_scaled.safetensors",
               "models_t5_umt5-xxl-enc-bf16.pth", "umt5_xxl_fp16.safetensors"),
              ("*umt5*xxl*.safetensors", "*umt5*xxl*.pth"), f"{_COMFY_WAN_HF} (split_files/text_encoders)"),
    ModelSlot("t2v", "--model", "TurboWan2.1-T2V model", ("diffusion_models", "unet"),
              tuple(f"TurboWan2.1-T2V-{size}{q}.pth" for size in ("1.3B-480P", "14B-480P", "14B-720P")
                    for q in ("-quant", "")),
              ("turbowan2.1-t2v*.pth", "turbowan2.1-t2v*.safetensors"), _TURBOWAN_T2V_HF),
)
SLOTS_BY_KEY = {s.key: s for s in MODEL_SLOTS}


def find_model_files(models_dir) -> dict[str, list[Path]]:
    """Candidate files per slot in a ComfyUI models folder (or a flat folder of checkpoints), preferred first.

    Usual names come before glob matches; among glob matches ``-quant`` files (half the size) come first.
    """
    root = Path(models_dir).expanduser()
    if not root.is_dir():
        from .checkpoint import ModelFileError

        raise ModelFileError(f"--models-dir {str(root)!r} is not a folder; point it at ComfyUI/models")
    found: dict[str, list[Path]] = {}
    for slot in MODEL_SLOTS:
        seen, out = set(), []
        for folder in [root / f for f in slot.folders] + [root]:
            if not folder.is_dir():
                continue
            files = sorted(p for p in folder.iterdir() if p.is_file())
            by_lower = {p.name.lower(): p for p in files}
            exact = [by_lower[n.lower()] for n in slot.names if n.lower() in by_lower]
            globbed = [p for p in files if any(fnmatch.fnmatch(p.name.lower(), pat) for pat in slot.patterns)]
            globbed.sort(key=lambda p: ("quant" not in p.name.lower(), p.name))
            for p in exact + globbed:
                if p.resolve() not in seen:
                    seen.add(p.resolve())
                    out.append(p)
        found[slot.key] = out
    return found


def resolve_model_files(models_dir: Union[str, os.PathLike, None], given: dict[str, Union[str, os.PathLike, None]],
                        required: tuple[str, ...] = ("high", "low", "vae")) -> dict[str, Optional[Path]]:
    """Explicit paths (`given`, by slot key) win; otherwise the first candidate in `models_dir`.
    The ``required`` slots (image-to-video: the experts and the VAE) must be filled; the others may be absent."""
    from .checkpoint import ModelFileError, read_head

    found = find_model_files(models_dir) if models_dir else {}
    files: dict[str, Optional[Path]] = {}
    for slot in MODEL_SLOTS:
        path = Path(given[slot.key]).expanduser() if given.get(slot.key) else (found.get(slot.key) or [None])[0]
        if path is not None and not path.is_file():
            try:  # says what the path is: missing, a folder, a link loop, not a regular file
                read_head(path, f"the {slot.what}")
            except ModelFileError as exc:
                raise ModelFileError(f"{slot.option}: {exc}") from None
        files[slot.key] = path
    for key in required:
        if files[key] is None:
            raise missing_slot_error(SLOTS_BY_KEY[key])
    return files


def missing_slot_error(slot: ModelSlot) -> Exception:
    """The error for a slot nobody filled: how to fill it, and where to download the file."""
    from .checkpoint import ModelFileError

    where = "/".join((slot.folders[0], slot.names[0]))
    return ModelFileError(
        f"no {slot.what} given: pass {slot.option} FILE, or --models-dir with {where} in it (download: {slot.download})"
    )


def expert_role_from_name(name: str) -> Optional[str]:
    """'high' or 'low' when a file name says which expert it is (e.g. ...-high-720P-quant.pth), else None."""
    name = str(name).replace("\\", "/").rsplit("/", 1)[-1].lower()
    has_high, has_low = "high" in name, "low" in name
    return "high" if has_high and not has_low else "low" if has_low and not has_high else None


def check_model_kind(model, text_to_video: bool, slot: str) -> None:
    """Refuse a text-to-video model where an I2V expert belongs, or the reverse, saying which sampler runs it."""
    if getattr(getattr(model, "config", None), "text_to_video", False) == text_to_video:
        return
    name = str(getattr(model, "source", "") or "?").replace("\\", "/").rsplit("/", 1)[-1]
    if text_to_video:
        raise ValueError(f"{slot} got a TurboWan2.2 image-to-video expert ({name}); image-to-video runs in "
                         "generate_i2v with the high/low pair (ComfyUI: TurboDiffusionI2VSampler; CLI: turbowan "
                         "generate --image)")
    raise ValueError(f"{slot} got a TurboWan2.1 text-to-video model ({name}); it runs in generate_t2v (ComfyUI: "
                     "TurboDiffusionT2VSampler; CLI: turbowan generate without --image)")


def check_expert_slots(high, low) -> None:
    """Refuse a text-to-video model in an expert slot, and an obviously swapped pair (file names say high/low),
    with a one-sentence fix."""
    check_model_kind(high, False, "the high-noise expert slot")
    check_model_kind(low, False, "the low-noise expert slot")

    def role(m):
        return expert_role_from_name(getattr(m, "source", ""))

    if role(high) == "low" and role(low) == "high":
        raise ValueError(
            "the high- and low-noise experts are swapped (the high slot got a '-low' file); exchange the two files"
        )
