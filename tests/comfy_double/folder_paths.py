"""Test double of ComfyUI 0.3.54's `folder_paths` (see README.md in this folder).

Folders live under a temporary base folder (or $COMFY_DOUBLE_BASE); tests point model folders and the
output folder where they want with the real API (`add_model_folder_path`, `set_output_directory`).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Collection
from typing import Literal

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

base_path = os.path.abspath(os.environ.get("COMFY_DOUBLE_BASE") or tempfile.mkdtemp(prefix="comfy_double_"))
models_dir = os.path.join(base_path, "models")

folder_names_and_paths: dict[str, tuple[list[str], set[str]]] = {}


def _register(name: str, subfolders: list[str], extensions) -> None:
    folder_names_and_paths[name] = ([os.path.join(models_dir, s) for s in subfolders], extensions)


_register("checkpoints", ["checkpoints"], supported_pt_extensions)
_register("configs", ["configs"], [".yaml"])
_register("loras", ["loras"], supported_pt_extensions)
_register("vae", ["vae"], supported_pt_extensions)
_register("text_encoders", ["text_encoders", "clip"], supported_pt_extensions)
_register("diffusion_models", ["unet", "diffusion_models"], supported_pt_extensions)
_register("clip_vision", ["clip_vision"], supported_pt_extensions)
_register("embeddings", ["embeddings"], supported_pt_extensions)
_register("upscale_models", ["upscale_models"], supported_pt_extensions)
folder_names_and_paths["custom_nodes"] = ([os.path.join(base_path, "custom_nodes")], set())

output_directory = os.path.join(base_path, "output")
temp_directory = os.path.join(base_path, "temp")
input_directory = os.path.join(base_path, "input")
user_directory = os.path.join(base_path, "user")
os.makedirs(input_directory, exist_ok=True)


def map_legacy(folder_name: str) -> str:
    """Old folder names still accepted by ComfyUI: unet -> diffusion_models, clip -> text_encoders."""
    return {"unet": "diffusion_models", "clip": "text_encoders"}.get(folder_name, folder_name)


def set_output_directory(output_dir: str) -> None:
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir: str) -> None:
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir: str) -> None:
    global input_directory
    input_directory = input_dir


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def get_directory_by_type(type_name: str) -> str | None:
    return {"output": output_directory, "temp": temp_directory, "input": input_directory}.get(type_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Add a search folder; ``is_default`` puts it first (moving it there if already known)."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([full_folder_path], set())
        return
    paths = folder_names_and_paths[folder_name][0]
    if full_folder_path in paths:
        if is_default and paths[0] != full_folder_path:
            paths.remove(full_folder_path)
            paths.insert(0, full_folder_path)
    elif is_default:
        paths.insert(0, full_folder_path)
    else:
        paths.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def recursive_search(directory: str, excluded_dir_names: list[str] | None = None) -> tuple[list[str], dict[str, float]]:
    """(files relative to ``directory``, {folder: mtime}) for everything below ``directory``."""
    if not os.path.isdir(directory):
        return [], {}
    excluded = set(excluded_dir_names or [])
    files: list[str] = []
    folders = {directory: os.path.getmtime(directory)}
    for root, subdirs, names in os.walk(directory, followlinks=True, topdown=True):
        subdirs[:] = [d for d in subdirs if d not in excluded]
        files += [os.path.relpath(os.path.join(root, n), directory) for n in names]
        for d in subdirs:
            folders[os.path.join(root, d)] = os.path.getmtime(os.path.join(root, d))
    return files, folders


def filter_files_extensions(files: Collection[str], extensions: Collection[str]) -> list[str]:
    return sorted(f for f in files if len(extensions) == 0 or os.path.splitext(f)[-1].lower() in extensions)


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Full path of ``filename`` in the first search folder that has it, else None."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    filename = os.path.relpath(os.path.join("/", filename), "/")  # no climbing out with ../
    for folder in folder_names_and_paths[folder_name][0]:
        candidate = os.path.join(folder, filename)
        if os.path.isfile(candidate):
            return candidate
        if os.path.islink(candidate):
            logging.warning("WARNING path %s exists but doesn't link anywhere, skipping.", candidate)
    return None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full_path = get_full_path(folder_name, filename)
    if full_path is None:
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found.")
    return full_path


def get_filename_list(folder_name: str) -> list[str]:
    """Sorted model file names (relative to their search folder) with an accepted extension."""
    paths, extensions = folder_names_and_paths[map_legacy(folder_name)]
    names: set[str] = set()
    for folder in paths:
        files, _ = recursive_search(folder, excluded_dir_names=[".git"])
        names.update(filter_files_extensions(files, extensions))
    return sorted(names)


def get_save_image_path(filename_prefix: str, output_dir: str, image_width=0, image_height=0) -> tuple[str, str, int, str, str]:
    """(folder, file name stem, next free counter, subfolder, prefix) for saving under ``output_dir``.

    Raises Exception when the prefix would leave ``output_dir`` (e.g. ``../../x``), as ComfyUI does.
    """
    if "%" in filename_prefix:
        now = time.localtime()
        for key, value in (("%width%", image_width), ("%height%", image_height), ("%year%", now.tm_year),
                           ("%month%", f"{now.tm_mon:02}"), ("%day%", f"{now.tm_mday:02}"),
                           ("%hour%", f"{now.tm_hour:02}"), ("%minute%", f"{now.tm_min:02}"),
                           ("%second%", f"{now.tm_sec:02}")):
            filename_prefix = filename_prefix.replace(key, str(value))

    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    full_output_folder = os.path.join(output_dir, subfolder)
    if os.path.commonpath((output_dir, os.path.abspath(full_output_folder))) != output_dir:
        message = ("**** ERROR: Saving image outside the output folder is not allowed."
                   f"\n full_output_folder: {os.path.abspath(full_output_folder)}\n         output_dir: {output_dir}")
        logging.error(message)
        raise Exception(message)

    def counter_of(existing: str) -> tuple[int, str]:
        # "<prefix>_<digits>_..." -> (digits, "<prefix>_")
        n = len(os.path.basename(filename_prefix))
        try:
            digits = int(existing[n + 1:].split("_")[0])
        except ValueError:
            digits = 0
        return digits, existing[: n + 1]

    try:
        taken = [c for c, p in map(counter_of, os.listdir(full_output_folder))
                 if os.path.normcase(p[:-1]) == os.path.normcase(filename) and p[-1:] == "_"]
        counter = max(taken) + 1 if taken else 1
    except FileNotFoundError:
        os.makedirs(full_output_folder, exist_ok=True)
        counter = 1
    return full_output_folder, filename, counter, subfolder, filename_prefix


def filter_files_content_types(files: list[str], content_types: list[Literal["image", "video", "audio", "model"]]) -> list[str]:
    import mimetypes

    out = []
    for f in files:
        kind = (mimetypes.guess_type(f)[0] or "").split("/")[0]
        if kind in content_types:
            out.append(f)
    return out
