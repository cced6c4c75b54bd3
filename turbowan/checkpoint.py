"""The one checkpoint reader: opens .pth / .safetensors files without unpickling code or doubling RAM.

`read_state_dict` loads tensors (``torch.load(weights_only=True, mmap=True)`` or safetensors' lazy reader);
`describe_state_dict` says in words what a state dict looks like, so that every loader can refuse a file of
the wrong kind with one sentence; `read_dit_checkpoint` reads a Wan2.2 I2V expert and infers its config.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import TEXT_WIDTH


class ModelFileError(ValueError):
    """A model file that cannot be used where it was given; the message says why and what to do."""


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of a .pth / .pt / .ckpt / .safetensors file, on CPU, memory-mapped where the format allows."""
    path = Path(path)
    name = path.name
    if not path.is_file():
        raise ModelFileError(f"model file {str(path)!r} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")  # lazy mmap reads; no pickle
        else:
            try:
                sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                # legacy (non-zip) torch.save format cannot be memory-mapped
                sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except ModelFileError:
        raise
    except Exception as exc:
        if isinstance(exc, (zipfile.BadZipFile, EOFError)) or _looks_truncated(exc):
            raise ModelFileError(
                f"{name} looks truncated or corrupt ({path.stat().st_size:,} bytes could not be read as a model); "
                "download it again"
            ) from None
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ModelFileError(
                f"{name} contains pickled Python objects besides tensors; refusing to execute code from a model file "
                "(use a plain state-dict .pth or a .safetensors file)"
            ) from None
        raise ModelFileError(f"{name} could not be read as a model file ({type(exc).__name__}: {exc})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]  # training-style {"state_dict": {...}} wrapper
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{name} is not a state dict of tensors")
    return sd


def _looks_truncated(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("failed finding central directory", "unexpected eof", "incomplete", "invalid header",
                  "header too large", "file too small", "pytorchstreamreader failed", "end of file", "truncated",
                  "metadataincompletebuffer", "invalid load key")
    )


_PREFIXES = ("net.", "model.diffusion_model.", "diffusion_model.", "_orig_mod.")


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop training / wrapper prefixes: ``net.``, ``_checkpoint_wrapped_module.`` and ComfyUI's ``model.diffusion_model.``."""
    out = {}
    for k, v in sd.items():
        for p in _PREFIXES:
            if k.startswith(p):
                k = k[len(p) :]
                break
        out[k.replace("_checkpoint_wrapped_module.", "")] = v
    return out


def describe_state_dict(sd: dict[str, torch.Tensor]) -> str:
    """A short phrase naming what kind of model a (prefix-stripped) state dict holds."""
    keys = sd.keys()
    if "patch_embedding.weight" in sd:
        w = sd["patch_embedding.weight"]
        dim = w.shape[0]
        in_ch = w.shape[1] if w.ndim == 5 else w.shape[1] // 4
        if any("img_emb" in k or "k_img" in k for k in keys):
            return f"a Wan2.1 image-to-video DiT (dim {dim}, with a CLIP image branch)"
        if in_ch == 16:
            size = {1536: "1.3B", 5120: "14B / A14B"}.get(dim, f"dim {dim}")
            return f"a Wan text-to-video DiT ({size}, 16 input channels)"
        if in_ch == 48:
            return f"a Wan2.2 TI2V-5B DiT (dim {dim}, 48 input channels)"
        if in_ch == 36:
            return f"a Wan2.2 image-to-video DiT (dim {dim}, 36 input channels)"
        return f"a Wan-style DiT with {in_ch} input channels"
    if any(k.startswith(("encoder.", "decoder.")) for k in keys) and any("conv1" in k for k in keys):
        z = sd.get("conv1.weight")
        z_dim = z.shape[0] // 2 if z is not None else "?"
        return f"a video VAE (latent channels {z_dim})"
    if any(k.startswith(("token_embedding.", "shared.", "encoder.block.", "encoder.embed_tokens")) for k in keys):
        return "a text encoder (T5/umT5)"
    if any(k.startswith(("text_model.", "vision_model.", "visual.", "transformer.resblocks")) for k in keys):
        return "a CLIP model"
    if any(k.startswith("model.diffusion_model.input_blocks") or k.startswith("input_blocks.") for k in keys):
        return "a Stable Diffusion UNet"
    sample = ", ".join(list(keys)[:3])
    return f"an unrecognised model ({len(sd)} tensors, e.g. {sample})"


@dataclass(frozen=True)
class DiTConfig:
    """Wan2.2 I2V DiT hyper-parameters. Defaults are the A14B expert's."""

    dim: int = 5120
    ffn_dim: int = 13824
    num_heads: int = 40
    num_layers: int = 40
    in_dim: int = 36
    out_dim: int = 16
    text_dim: int = TEXT_WIDTH
    freq_dim: int = 256
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads


@dataclass
class DiTCheckpoint:
    config: DiTConfig
    state_dict: dict[str, torch.Tensor]  # our module's key names
    quantized: bool  # int8_weight/scale triples inside the blocks
    has_sla: bool  # each block carries its SLA proj_l
    nbytes: int


_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def read_dit_checkpoint(path: str | os.PathLike, slot: str = "Wan2.2 I2V expert") -> DiTCheckpoint:
    """Read a TurboWan2.2 I2V expert (released .pth, -quant.pth, or .safetensors of either) and infer its config."""
    name = Path(path).name
    sd = strip_prefixes(read_state_dict(path))
    what = describe_state_dict(sd)
    expected = "a TurboWan2.2-I2V-A14B high- or low-noise expert (e.g. TurboWan2.2-I2V-A14B-high-720P-quant.pth)"
    if "patch_embedding.weight" not in sd or not what.startswith("a Wan2.2 image-to-video DiT"):
        raise ModelFileError(f"{name} looks like {what}, but the {slot} slot expects {expected}")

    # Renames into our module's names: SLA's projection sits directly on the self-attention.
    sd = {k.replace("self_attn.attn_op.local_attn.proj_l", "self_attn.proj_l"): v for k, v in sd.items()}
    pe = sd["patch_embedding.weight"]
    if pe.ndim == 5:  # Conv3d layout [dim, C, kt, kh, kw] -> Linear [dim, C*kt*kh*kw] in (c kt kh kw) order
        sd["patch_embedding.weight"] = pe.reshape(pe.shape[0], -1)

    dim = sd["patch_embedding.weight"].shape[0]
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    num_layers = max(layer_ids) + 1 if layer_ids else 0
    quantized = "blocks.0.ffn.0.int8_weight" in sd
    wkey = "int8_weight" if quantized else "weight"
    try:
        ffn_dim = sd[f"blocks.0.ffn.0.{wkey}"].shape[0]
        proj = sd.get("blocks.0.self_attn.proj_l.weight")
        head_dim = proj.shape[0] if proj is not None else 128  # every released Wan model uses 128-wide heads
        config = DiTConfig(
            dim=dim,
            ffn_dim=ffn_dim,
            num_heads=dim // head_dim,
            num_layers=num_layers,
            in_dim=sd["patch_embedding.weight"].shape[1] // 4,
            out_dim=sd["head.head.weight"].shape[0] // 4,
            text_dim=sd["text_embedding.0.weight"].shape[1],
            freq_dim=sd["time_embedding.0.weight"].shape[1],
        )
    except KeyError as exc:
        raise ModelFileError(
            f"{name} is an incomplete Wan2.2 I2V checkpoint (tensor {exc.args[0]} is missing); download it again"
        ) from None

    expected_keys = _expected_keys(config, quantized)
    missing = [k for k in expected_keys if k not in sd]
    if missing or layer_ids != set(range(num_layers)):
        raise ModelFileError(
            f"{name} is an incomplete Wan2.2 I2V checkpoint ({len(missing)} tensors missing, e.g. "
            f"{missing[0] if missing else 'a block'}); download it again"
        )
    has_sla = all(f"blocks.{i}.self_attn.proj_l.weight" in sd for i in range(num_layers))
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    return DiTCheckpoint(config, sd, quantized, has_sla, nbytes)


def _expected_keys(c: DiTConfig, quantized: bool) -> list[str]:
    keys = ["patch_embedding.weight", "patch_embedding.bias", "head.modulation", "head.head.weight", "head.head.bias"]
    keys += [f"{m}.{i}.{p}" for m, i in (("text_embedding", 0), ("text_embedding", 2), ("time_embedding", 0),
                                         ("time_embedding", 2)) for p in ("weight", "bias")]
    keys += ["time_projection.1.weight", "time_projection.1.bias"]
    lin = ("int8_weight", "scale", "bias") if quantized else ("weight", "bias")
    for i in range(c.num_layers):
        b = f"blocks.{i}."
        keys += [b + "modulation", b + "norm3.weight", b + "norm3.bias"]
        keys += [b + f"{a}.norm_{n}.weight" for a in ("self_attn", "cross_attn") for n in ("q", "k")]
        keys += [b + f"{name}.{p}" for name in _BLOCK_LINEARS for p in lin]
    return keys


def file_identity(path: str | os.PathLike) -> tuple[str, int, int]:
    """(resolved path, size, mtime_ns): changes whenever the file is replaced; used as a cache key."""
    st = os.stat(path)
    return (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
