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

It is only a cache: an entry that does not read back as a finite bf16 [rows, width] tensor is deleted and
encoded again, and a cache folder that cannot be used (a file, read-only, /proc) means running without the
cache; each says so in one notice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional, Union

import torch
from safetensors.torch import save_file

from .checkpoint import MissingModelFileError, ModelFile, ModelFileError, read_head
from .models.tokenizer import TEXT_LEN
from .models.umt5 import EXPECTED_FILE, load_text_encoder
from .options import TEXT_WIDTH

PathLike = Union[str, Path]
FORMAT_VERSION = "turbowan-umt5-embedding-v1"  # bump when the stored tensors' meaning changes
_MIB = 1 << 20
log = logging.getLogger("turbowan")


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
                          tokenizer: Optional[PathLike] = None, device: Union[str, torch.device, None] = None,
                          width: Optional[int] = TEXT_WIDTH) -> torch.Tensor:
    """umT5 embedding of one prompt: [1, 512, width] bf16 on the CPU, zero rows past the prompt.

    On a miss the encoder is loaded (on ``device``, default CPU), run, stored and released. ``width`` is the
    text width the video model consumes (None accepts any, for small test encoders).
    """
    encoder_path = Path(encoder_path).expanduser()
    read_head(encoder_path, EXPECTED_FILE)  # refuses a missing file, a folder or a link loop by name
    folder = _usable_folder(Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir())
    entry = folder / f"{cache_key(encoder_path, prompt, tokenizer)}.safetensors" if folder else None

    prefix = _read_entry(entry, width) if entry else None
    if prefix is None:
        encoder = load_text_encoder(encoder_path, tokenizer=tokenizer, device=device, expected_dim=width)
        try:
            embedding = encoder.encode(prompt)[0]  # [512, dim]
            length = int(encoder.tokenizer(prompt)[1].sum())
        finally:
            del encoder
            if torch.device(device or "cpu").type == "cuda":
                torch.cuda.empty_cache()
        prefix = embedding[:length].to("cpu", torch.bfloat16).contiguous()
        if entry:
            _write_entry(entry, prefix, encoder_path)

    out = torch.zeros(1, TEXT_LEN, prefix.shape[1], dtype=prefix.dtype)
    out[0, : prefix.shape[0]] = prefix
    return out


def _usable_folder(folder: Path) -> Optional[Path]:
    """folder, created if needed; None (after one notice) where no entry can be written there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(13, "not writable")
        return folder
    except OSError as exc:
        log.warning(f"turbowan: the text cache {folder} cannot be used ({exc.strerror or exc}); running without "
                    "it (set TURBOWAN_CACHE to a writable folder to keep prompt embeddings)")
        return None


def _entry_problem(prefix: torch.Tensor, width: Optional[int]) -> Optional[str]:
    """Why a stored prefix cannot be this prompt's embedding (None if it can)."""
    if prefix.ndim != 2 or not 0 < prefix.shape[0] <= TEXT_LEN:
        return f"shape {tuple(prefix.shape)}"
    if width is not None and prefix.shape[1] != width:
        return f"{prefix.shape[1]} wide, not {width}"
    if prefix.dtype != torch.bfloat16:
        return f"dtype {prefix.dtype}"
    if not prefix.isfinite().all():
        return "non-finite values"
    return None


def _read_entry(entry: Path, width: Optional[int]) -> Optional[torch.Tensor]:
    """The stored prefix, or None: a miss, or a bad entry, which is deleted (with one notice) to be encoded again."""
    try:
        prefix = ModelFile(entry, "a text cache entry").tensor("prefix")
        problem = _entry_problem(prefix, width)
    except MissingModelFileError:
        return None
    except ModelFileError as exc:
        problem = str(exc)
    except KeyError:
        problem = "no 'prefix' tensor"
    if problem is None:
        return prefix
    log.warning(f"turbowan: text cache entry {entry.name} is unusable ({problem}); encoding the prompt again")
    try:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
    except OSError:
        pass  # the new entry replaces it, or its write says why it cannot
    return None


def _write_entry(entry: Path, prefix: torch.Tensor, encoder_path: Path) -> None:
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.stem, suffix=".tmp")
        os.close(fd)
        save_file({"prefix": prefix}, tmp, metadata={"format": FORMAT_VERSION, "encoder": encoder_path.name})
        os.replace(tmp, entry)
    except Exception as exc:  # a full disk, a folder in the way: the run goes on, only uncached
        log.warning(f"turbowan: cannot write the text cache entry {entry} ({exc}); this prompt is not cached")
    finally:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
