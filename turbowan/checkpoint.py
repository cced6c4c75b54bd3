"""The one model-file reader: opens .pth / .safetensors files without unpickling code or doubling RAM.

`ModelFile` gives lazy access to a file's tensors (safetensors' ``safe_open``, ``torch.load(weights_only=True,
mmap=True)``) and turns every read failure into one `ModelFileError` sentence; `read_state_dict` loads them all.
`identify` / `describe` say what a state dict looks like, so that every loader (DiT, VAE, umT5, embeddings) and
the doctor refuse a file of the wrong kind alike; `read_dit_checkpoint` reads a Wan2.2 I2V expert or a
TurboWan2.1 text-to-video model and infers its config.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from .options import TEXT_WIDTH


class ModelFileError(ValueError):
    """A model file that cannot be used where it was given; the message says why and what to do."""


class MissingModelFileError(ModelFileError, FileNotFoundError):
    """A model file path that does not exist (also a FileNotFoundError, for callers that catch that)."""


# safetensors dtype names -> torch dtypes, for tensor shapes read from the header alone
_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                       "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


class ModelFile:
    """Lazy read access to the tensors of one .safetensors / .pth / .pt / .ckpt file, never unpickling code.

    The format is recognised from the first bytes, not the extension. safetensors files are opened with
    ``safe_open`` (names and shapes from the header; each tensor read when asked for); torch files are
    ``torch.load(weights_only=True, mmap=True)``-ed (legacy non-zip files, which cannot be memory-mapped, are
    read whole). `expects` names what the caller's slot wants, for the error messages.
    """

    def __init__(self, path: str | os.PathLike, expects: str = "a model file"):
        self.path = Path(path).expanduser()
        self.expects = expects
        head = read_head(self.path, expects)
        self._safetensors = None
        self._tensors: dict[str, torch.Tensor] = {}
        if head[:4] == b"GGUF":
            raise ModelFileError(f"{self.path.name} is a GGUF file, which this loader does not read; {expects} in "
                                 ".safetensors or .pth form is expected")
        with self._reading():
            if len(head) >= 9 and head[8:9] == b"{":  # safetensors: u64 header size, then JSON
                from safetensors import safe_open

                self._safetensors = safe_open(str(self.path), framework="pt", device="cpu")
                self.names = list(self._safetensors.keys())
            elif head[:2] == b"PK" or head[:1] == b"\x80":  # torch.save zip archive, or its legacy pickle format
                self._tensors = self._torch_load()
                self.names = list(self._tensors)
            else:
                raise ModelFileError(f"{self.path.name} is neither a .safetensors nor a PyTorch checkpoint; "
                                     f"{expects} is expected")

    @contextmanager
    def _reading(self):
        """Turns whatever the format libraries raise for a damaged file into one ModelFileError sentence."""
        try:
            yield
        except ModelFileError:
            raise
        except Exception as exc:  # they raise many exception types for a damaged file
            raise self._unreadable(exc) from None

    def _torch_load(self) -> dict[str, torch.Tensor]:
        try:
            sd = torch.load(str(self.path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            sd = torch.load(str(self.path), map_location="cpu", weights_only=True)
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]  # training-style {"state_dict": {...}} wrapper
        if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                               for k, v in sd.items()):
            raise ModelFileError(f"{self.path.name} is not a plain state dict of tensors; {self.expects} is expected")
        return sd

    def _unreadable(self, exc: Exception) -> ModelFileError:
        name, text = self.path.name, str(exc)
        code = re.search(r"GLOBAL ([A-Za-z_][\w.]*) ", text)  # a name to import: a pickled object, not noise
        if code:
            return ModelFileError(f"{name} contains pickled Python objects ({code.group(1)}) besides tensors; "
                                  f"refusing to execute code from a model file ({self.expects} as a plain "
                                  "state-dict .pth or a .safetensors file is expected)")
        if isinstance(exc, OSError) and exc.strerror:
            return ModelFileError(f"{name} could not be read ({exc.strerror}); check the disk and the file")
        if isinstance(exc, (zipfile.BadZipFile, EOFError)) or _looks_truncated(exc):
            return ModelFileError(f"{name} looks truncated or corrupt; re-download it (its "
                                  f"{self.path.stat().st_size:,} bytes do not read as {self.expects}, so download "
                                  "it again)")
        detail = text.strip().split("\n")[0][:80] or type(exc).__name__
        return ModelFileError(f"{name} is corrupt or not {self.expects} ({detail}); download it again")

    def shape(self, name: str) -> tuple[int, ...]:
        if self._safetensors is None:
            return tuple(self._tensors[name].shape)
        with self._reading():
            return tuple(self._safetensors.get_slice(name).get_shape())

    def tensor(self, name: str) -> torch.Tensor:
        if self._safetensors is None:
            return self._tensors[name]
        with self._reading():
            return self._safetensors.get_tensor(name)

    def meta(self) -> dict[str, torch.Tensor]:
        """Every tensor as a meta tensor (name, shape, dtype) without reading any data."""
        if self._safetensors is None:
            return {k: v.to("meta") for k, v in self._tensors.items()}
        out = {}
        with self._reading():
            for k in self.names:
                part = self._safetensors.get_slice(k)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8)  # unknown one-byte formats as uint8
                out[k] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
        return out

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors, on CPU (memory-mapped .pth; safetensors read tensor by tensor)."""
        return {k: self.tensor(k) for k in self.names}


def read_head(path: Path, expects: str) -> bytes:
    """A model file's first 16 bytes; a path that is not a readable regular file is refused saying what it is."""
    where = f"{str(path)!r}"
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        target = f" (a symbolic link to {os.readlink(path)!r})" if path.is_symlink() else ""
        raise MissingModelFileError(f"model file {where}{target} does not exist; {expects} is expected there") \
            from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ModelFileError(f"model file {where} is a symbolic link loop (it leads back to itself); point it "
                                 f"at {expects}") from None
        raise ModelFileError(f"model file {where} cannot be opened ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise ModelFileError(f"{where} is a folder, not a model file; give the path of {expects} inside it")
    if not stat.S_ISREG(mode):  # a pipe or a device would block or stream forever
        raise ModelFileError(f"{where} is not a regular file; {expects} is expected")
    try:
        with open(path, "rb") as f:
            return f.read(16)
    except OSError as exc:
        raise ModelFileError(f"model file {where} cannot be read ({exc.strerror}); check its permissions") from None


def read_state_dict(path: str | os.PathLike, expects: str = "a model file") -> dict[str, torch.Tensor]:
    """All tensors of a .pth / .pt / .ckpt / .safetensors file, on CPU, memory-mapped where the format allows."""
    return ModelFile(path, expects).state_dict()


def _looks_truncated(exc: Exception) -> bool:
    text = str(exc).lower()
    return any(
        s in text
        for s in ("failed finding central directory", "unexpected eof", "incomplete", "invalid header",
                  "header too large", "file too small", "pytorchstreamreader failed", "end of file", "truncated",
                  "metadataincompletebuffer", "invalid load key", "not fully covered")
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


_WAN_VAE_KEY = "decoder.middle.0.residual.0.gamma"


def identify(sd: dict[str, torch.Tensor]) -> tuple[str, str]:
    """(kind, words) for a (prefix-stripped) state dict; meta tensors will do.

    kind is one of "wan22_i2v_dit", "wan_t2v_dit", "dit", "wan21_vae", "vae", "text_encoder", "clip", "llm", "unet", "unknown";
    words is a short phrase ("a video VAE (latent channels 16)") for "<file> looks like <words>" messages.
    """
    keys = list(sd)
    joined = "\n".join(keys)
    if "patch_embedding.weight" in sd:
        w = sd["patch_embedding.weight"]
        dim = w.shape[0]
        in_ch = w.shape[1] if w.ndim == 5 else w.shape[1] // 4
        if "img_emb" in joined or "k_img" in joined:
            return "dit", f"a Wan2.1 image-to-video DiT (diffusion model, dim {dim}, with a CLIP image branch)"
        if in_ch == 16:
            size = {1536: "1.3B", 5120: "14B / A14B"}.get(dim, f"dim {dim}")
            return "wan_t2v_dit", f"a Wan text-to-video DiT (diffusion model, {size}, 16 input channels)"
        if in_ch == 48:
            return "dit", f"a Wan2.2 TI2V-5B DiT (diffusion model, dim {dim}, 48 input channels)"
        if in_ch == 36:
            return "wan22_i2v_dit", f"a Wan2.2 image-to-video DiT (diffusion model, dim {dim}, 36 input channels)"
        return "dit", f"a Wan-style DiT (diffusion model) with {in_ch} input channels"
    if any(k.startswith(("token_embedding.", "shared.", "encoder.block.", "encoder.embed_tokens")) for k in keys):
        return "text_encoder", "a text encoder (T5/umT5)"
    clip_keys = r"^(text_model|vision_model|visual)\.|text_projection|(^|\.)transformer\.resblocks\."
    if re.search(clip_keys, joined, re.M):
        return "clip", "a CLIP model"
    if re.search(r"(^|\.)model\.layers\.\d+\.", joined, re.M):
        return "llm", "an LLM text encoder (e.g. Qwen/Llama)"
    if re.search(r"self_attn\.|cross_attn\.|time_embedding|head\.modulation", joined):  # after CLIP/LLM
        return "dit", "a diffusion model (DiT) checkpoint"
    if _WAN_VAE_KEY in sd:
        z = sd["conv2.weight"].shape[0] if "conv2.weight" in sd else "?"
        if z == 48 or "decoder.upsamples.0.upsamples.0.residual.2.weight" in sd:
            return "vae", "a Wan2.2 VAE (48 latent channels, used by the TI2V-5B model)"
        return "wan21_vae", f"a video VAE (latent channels {z})"
    if re.search(r"^(encoder|decoder)\.|first_stage_model|post_quant_conv", joined, re.M):
        return "vae", "an image VAE or a diffusers-format VAE"
    if re.search(r"^(model\.diffusion_model\.)?input_blocks\.", joined, re.M):
        return "unet", "a Stable Diffusion UNet"
    return "unknown", f"an unrecognised model ({len(sd)} tensors, e.g. {', '.join(keys[:3])})"


def describe(sd: dict[str, torch.Tensor]) -> str:
    """A short phrase naming what kind of model a (prefix-stripped) state dict holds."""
    return identify(sd)[1]


@dataclass(frozen=True)
class DiTConfig:
    """Wan DiT hyper-parameters. Defaults are the Wan2.2 I2V A14B expert's; in_dim 16 is a text-to-video model."""

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

    @property
    def text_to_video(self) -> bool:
        """The input is the noisy latents alone (TurboWan2.1-T2V); an I2V expert also reads mask + image latents."""
        return self.in_dim == self.out_dim


@dataclass
class DiTCheckpoint:
    config: DiTConfig
    state_dict: dict[str, torch.Tensor]  # our module's key names
    quantized: bool  # int8_weight/scale triples inside the blocks
    has_sla: bool  # each block carries its SLA proj_l
    nbytes: int


_BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                  "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


DIT_FILES = ("a TurboWan2.2-I2V-A14B expert (e.g. TurboWan2.2-I2V-A14B-high-720P-quant.pth) or a TurboWan2.1-T2V "
             "model")


def read_dit_checkpoint(path: str | os.PathLike, slot: str = "TurboWan model") -> DiTCheckpoint:
    """Read a TurboWan2.2 I2V expert or a TurboWan2.1 T2V model (released .pth, -quant.pth, or .safetensors of
    either) and infer its config."""
    name = Path(path).name
    sd = strip_prefixes(read_state_dict(path, DIT_FILES))
    kind, what = identify(sd)
    if kind not in ("wan22_i2v_dit", "wan_t2v_dit"):
        raise ModelFileError(f"{name} looks like {what}, but the {slot} slot expects {DIT_FILES}")

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
            f"{name} is an incomplete TurboWan checkpoint (tensor {exc.args[0]} is missing); download it again"
        ) from None

    expected_keys = _expected_keys(config, quantized)
    missing = [k for k in expected_keys if k not in sd]
    if missing or layer_ids != set(range(num_layers)):
        raise ModelFileError(
            f"{name} is an incomplete TurboWan checkpoint ({len(missing)} tensors missing, e.g. "
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
