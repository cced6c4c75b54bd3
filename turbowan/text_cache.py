"""On-disk cache of umT5 prompt embeddings: each prompt is encoded once per encoder file.

The umT5-xxl encoder is 11 GB in bf16 and takes seconds to minutes to load and run (much longer
on a CPU), while re-running a video with the same prompt is the common case. So an embedding is
stored under ``<cache root>/text/<key>.safetensors`` and the encoder is only loaded on a miss.

* cache root: ``cache_dir`` if given, else ``$TURBOWAN_CACHE``, else ``~/.cache/turbowan``;
* key: sha256 of the encoder file's identity (its size plus a sha256 of its first and last MiB:
  cheap on an 11 GB file, and unlike an mtime it survives copies and does not change on touch),
  the tokenizer file's identity when one is given, the storage format version, and the prompt;
* file: the prompt's valid rows only (``prefix`` [tokens, dim], bf16); the rest of the 512 rows
  are zeros by construction and are rebuilt on read. Written to a temporary file in the same
  folder and moved into place with os.replace, so a crash or a concurrent run never leaves a
  truncated entry under the final name.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .models.tokenizer import TEXT_LEN
from .models.umt5 import load_text_encoder

PathLike = Union[str, Path]
FORMAT_VERSION = "turbowan-umt5-embedding-v1"  # bump when the stored tensors' meaning changes
_MIB = 1 << 20


def default_cache_dir() -> Path:
    root = os.environ.get("TURBOWAN_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "turbowan") / "text"


def file_identity(path: PathLike) -> str:
    """size + sha256 of the first and last MiB: identifies a large weight file without reading it."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        digest.update(f.read(_MIB))
        if size > _MIB:
            f.seek(max(size - _MIB, _MIB))
            digest.update(f.read(_MIB))
    return f"{size}:{digest.hexdigest()}"


def cache_key(encoder_path: PathLike, prompt: str, tokenizer: Optional[PathLike] = None) -> str:
    parts = [FORMAT_VERSION, file_identity(encoder_path),
             file_identity(tokenizer) if tokenizer is not None and Path(tokenizer).is_file() else
             str(tokenizer or ""), prompt]
    return hashlib.sha256("\0".join(parts).encode("utf-8")).hexdigest()


def cached_text_embedding(encoder_path: PathLike, prompt: str, cache_dir: Optional[PathLike] = None,
                          tokenizer: Optional[PathLike] = None,
                          device: Union[str, torch.device, None] = None) -> torch.Tensor:
    """umT5 embedding of one prompt: [1, 512, dim] bf16 on the CPU, zero rows past the prompt.

    On a miss the encoder is loaded (on ``device``, default CPU), run, stored and released.
    """
    encoder_path = Path(encoder_path).expanduser()
    if not encoder_path.is_file():
        raise ValueError(f"text encoder file {encoder_path} does not exist; pass the path of "
                         f"models_t5_umt5-xxl-enc-bf16.pth or umt5_xxl_fp8_e4m3fn_scaled.safetensors.")
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    entry = folder / f"{cache_key(encoder_path, prompt, tokenizer)}.safetensors"

    prefix = _read_entry(entry)
    if prefix is None:
        encoder = load_text_encoder(encoder_path, tokenizer=tokenizer, device=device)
        try:
            embedding = encoder.encode(prompt)[0]  # [512, dim]
            length = int(encoder.tokenizer(prompt)[1].sum())
        finally:
            del encoder
            if torch.device(device or "cpu").type == "cuda":
                torch.cuda.empty_cache()
        prefix = embedding[:length].to("cpu", torch.bfloat16).contiguous()
        _write_entry(entry, prefix, encoder_path)

    out = torch.zeros(1, TEXT_LEN, prefix.shape[1], dtype=prefix.dtype)
    out[0, : prefix.shape[0]] = prefix
    return out


def _read_entry(entry: Path) -> Optional[torch.Tensor]:
    if not entry.is_file():
        return None
    try:
        return load_file(str(entry))["prefix"]
    except (SafetensorError, KeyError, OSError):
        return None  # unreadable entry (e.g. disk trouble): encode again and overwrite it


def _write_entry(entry: Path, prefix: torch.Tensor, encoder_path: Path) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.stem, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"prefix": prefix}, tmp, metadata={"format": FORMAT_VERSION, "encoder": encoder_path.name})
        os.replace(tmp, entry)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
