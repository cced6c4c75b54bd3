"""Fuzz every model-file reader: random bytes, truncations and header mutations of every file kind.

Whatever a damaged file holds, a reader raises only `ModelFileError` (one sentence, a ValueError), runs no pickled
code, and the next load of a good file works. The text cache goes further: a bad entry is never an error at all,
it is re-encoded. Seeded, so a failure reproduces; a few seconds on two cores.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import fixtures_dir
from safetensors.torch import save_file

import turbowan
import turbowan.text_cache as text_cache
from turbowan.checkpoint import ModelFile, ModelFileError, read_state_dict
from turbowan.models.tokenizer import TEXT_LEN
from turbowan.models.umt5 import load_text_encoder
from turbowan.options import TEXT_WIDTH
from turbowan.pipeline import read_text_embedding

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on mutated pickles
SEED = 12
MUTATIONS_PER_FILE = 24


def _load_text_encoder(path):
    return load_text_encoder(path, expected_dim=None)  # the fixture encoder is 64 wide


def _model_file_tensors(path):
    file = ModelFile(path)
    return [file.tensor(name) for name in file.names] + list(file.meta().values())


# file kind -> (fixture file, the readers that must refuse its damaged forms in one error type)
MODEL_FILES = {
    "dit": ("dit/TurboWan2.2-I2V-tiny-high.pth", (turbowan.load_dit, read_state_dict, _model_file_tensors)),
    "dit-quant": ("dit/TurboWan2.2-I2V-tiny-high-quant.pth", (turbowan.load_dit, read_state_dict)),
    "vae": ("vae/Wan2.1_VAE-tiny.pth", (turbowan.load_vae, read_state_dict, _model_file_tensors)),
    "umt5": ("umt5/models_t5_umt5-tiny-enc-bf16.pth", (_load_text_encoder, read_state_dict, _model_file_tensors)),
}


class _Trace:
    """Unpickling this creates a folder: the trace that pickled code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


# -- mutations ---------------------------------------------------------------------------------------------------


def _random_bytes(rng: random.Random, good: bytes) -> bytes:
    # bare noise, and noise behind each format's magic so that the format library itself parses it
    magic = rng.choice([b"", b"PK\x03\x04", b"\x80\x02", b"\x80\x04\x95", struct.pack("<Q", rng.randrange(1 << 16)) + b"{"])
    return magic + rng.randbytes(rng.randrange(0, 4096))


def _truncated(rng: random.Random, good: bytes) -> bytes:
    return good[: rng.choice([0, 1, 8, 9, 64, rng.randrange(len(good)), len(good) - 1])]


def _flipped_header(rng: random.Random, good: bytes) -> bytes:
    """A few bytes changed where the format keeps its structure (safetensors' JSON, the zip's pickle and index)."""
    data = bytearray(good)
    if good[8:9] == b"{":
        region = range(0, 8 + struct.unpack("<Q", good[:8])[0])
    else:
        region = rng.choice([range(len(good) - 512, len(good)), _pickle_range(good)])  # central directory / data.pkl
    for _ in range(rng.randrange(1, 4)):
        data[rng.choice(region)] = rng.randrange(256)
    return bytes(data)


def _pickle_range(good: bytes) -> range:
    with zipfile.ZipFile(io.BytesIO(good)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename) + len(info.extra)
    return range(start, start + info.compress_size)


def _edited_safetensors_header(rng: random.Random, good: bytes) -> bytes:
    """A well-formed header that lies: a wrong dtype, shape or data offsets for one tensor."""
    size = struct.unpack("<Q", good[:8])[0]
    header = json.loads(good[8 : 8 + size])
    name = rng.choice([k for k in header if k != "__metadata__"])
    field = rng.choice(["dtype", "shape", "data_offsets"])
    header[name][field] = {"dtype": rng.choice(["I64", "U8", "F8_E5M2", "BOOL", "X9"]),
                           "shape": rng.choice([[], [0], [1 << 40], list(reversed(header[name]["shape"])), [-1]]),
                           "data_offsets": [rng.randrange(1 << 20), rng.randrange(1 << 20)]}[field]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + good[8 + size :]


def _mutants(rng: random.Random, good: bytes):
    kinds = [_random_bytes, _truncated, _flipped_header]
    if good[8:9] == b"{":
        kinds.append(_edited_safetensors_header)
    for i in range(MUTATIONS_PER_FILE):
        mutate = kinds[i % len(kinds)]
        yield mutate is _random_bytes, mutate(rng, good)


# -- the files ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_files(tmp_path_factory):
    """kind -> (good file, readers): the released .pth fixtures and .safetensors saves of the same tensors."""
    folder = tmp_path_factory.mktemp("good")
    out = {}
    for kind, (rel, readers) in MODEL_FILES.items():
        pth = fixtures_dir() / rel
        st = folder / f"{kind}.safetensors"
        save_file({k: v.contiguous() for k, v in torch.load(pth, map_location="cpu", weights_only=True).items()}, str(st))
        out[kind + ".pth"] = (pth, readers)
        out[kind + ".safetensors"] = (st, readers)
    embedding = folder / "prompt.safetensors"
    save_file({"text_embedding": torch.randn(7, TEXT_WIDTH).to(torch.bfloat16)}, str(embedding))
    out["embedding"] = (embedding, (read_text_embedding, read_state_dict))
    return out


@pytest.mark.parametrize("kind", [k + s for k in MODEL_FILES for s in (".pth", ".safetensors")] + ["embedding"])
def test_damaged_files_raise_only_model_file_error(kind, good_files, tmp_path):
    good, readers = good_files[kind]
    rng = random.Random(f"{SEED}:{kind}")
    path = tmp_path / good.name
    for noise, data in _mutants(rng, good.read_bytes()):
        path.write_bytes(data)
        for read in readers:
            try:
                read(path)
            except ModelFileError as exc:
                message = str(exc)
                assert "\n" not in message and path.name in message, message
                assert not (noise and "pickled" in message), message  # noise is not a pickled object
    for read in readers:
        read(good)  # the next good load works


@pytest.mark.parametrize("as_zip", [True, False], ids=["torch-zip", "raw-pickle"])
def test_pickled_payload_never_runs(as_zip, good_files, tmp_path):
    trace = tmp_path / "trace"
    path = tmp_path / "evil.pth"
    payload = {"weight": torch.zeros(2), "hook": _Trace(trace)}
    if as_zip:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    for kind, (good, readers) in good_files.items():
        for read in readers:
            with pytest.raises(ModelFileError):
                read(path)
        assert not trace.exists(), f"{kind}: unpickling ran code"


# -- text cache entries --------------------------------------------------------------------------------------------


class _FakeEncoder:
    """Stands in for umT5-xxl: the cache only needs encode() and the token count."""

    rows = 5
    embedding = torch.cat([torch.randn(rows, TEXT_WIDTH), torch.zeros(TEXT_LEN - rows, TEXT_WIDTH)])[None]

    def __init__(self, *args, **kwargs):
        pass

    def encode(self, prompt):
        return self.embedding.to(torch.bfloat16)

    def tokenizer(self, prompt):
        return None, torch.ones(self.rows)


def test_damaged_cache_entries_are_encoded_again(monkeypatch, tmp_path):
    monkeypatch.setattr(text_cache, "load_text_encoder", _FakeEncoder)
    encoder = tmp_path / "umt5.safetensors"
    encoder.write_bytes(b"stands for the encoder file: only its identity is read")
    cache = tmp_path / "cache"
    good = text_cache.cached_text_embedding(encoder, "a fox", cache_dir=cache)
    (entry,) = cache.glob("*.safetensors")
    rng = random.Random(f"{SEED}:cache")
    for _, data in _mutants(rng, entry.read_bytes()):
        entry.write_bytes(data)
        out = text_cache.cached_text_embedding(encoder, "a fox", cache_dir=cache)
        assert out.shape == good.shape and out.dtype == good.dtype and out.isfinite().all()
        assert torch.equal(text_cache.cached_text_embedding(encoder, "a fox", cache_dir=cache), out)  # kept
        entry.write_bytes(b"")  # the next mutation starts from a good entry again
        assert torch.equal(text_cache.cached_text_embedding(encoder, "a fox", cache_dir=cache), good)
