"""umT5 tokenizer: prompts -> (token ids, attention mask), as the Wan2.2 / TurboDiffusion reference makes them.

Tokenizer and prompt cleaning: the reference tokenizes with the Hugging Face umT5 tokenizer after
``whitespace_clean(basic_clean(text))`` (ftfy.fix_text, html.unescape twice, strip, collapse
whitespace), appends ``</s>`` (id 1), pads with 0 to 512 and truncates to 511 pieces + ``</s>``.
We run SentencePiece itself (ComfyUI does the same with the embedded model; a ``tokenizer.json``
is converted to the equivalent SentencePiece model: pieces, scores, NFKC charsmap, byte fallback;
the two agree on prompts without special-token text) and re-state the parts
of ftfy that change a prompt typed by a person: ANSI escapes and invisible control characters
removed, C1 controls read as Windows-1252, curly quotes straightened, HTML entities decoded to a
fixed point when the prompt has no ``<``; NFKC, ligature and width folding are done by the
tokenizer's own normalizer. Not re-stated: ftfy's mojibake repair (text that was decoded with the
wrong codec, e.g. ``"cafÃ©"``, stays as it is), and literal special-token text such as ``</s>``
inside a prompt is tokenized as characters, not as the special token.
"""

from __future__ import annotations

import html
import json
import os
import re
import struct
import unicodedata
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from ..options import TEXT_LEN  # tokens per prompt, padding included (the DiT's text_len)
PAD_ID = 0
EOS_ID = 1

PathLike = Union[str, Path]

_ANSI_ESCAPE = re.compile("\x1b\\[((?:\\d|;)*)([a-zA-Z])")
_CONTROL_CHARS = dict.fromkeys(
    [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
     *range(0xFFF9, 0xFFFD)])
_C1_CONTROL = re.compile("[\x80-\x9f]")
_CURLY_SINGLE = re.compile("[\u02bc\u2018-\u201b]")
_CURLY_DOUBLE = re.compile("[\u201c-\u201f]")
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
_WHITESPACE = re.compile(r"\s+")


def _c1_as_cp1252(match: re.Match) -> str:
    try:
        return bytes([ord(match.group(0))]).decode("cp1252")
    except UnicodeDecodeError:  # the five bytes cp1252 leaves undefined stay as they are
        return match.group(0)


def _unescape_strict(text: str) -> str:
    """Decode only complete ``&name;`` / ``&#n;`` entities (ftfy's cautious pass)."""
    return _ENTITY.sub(lambda m: html.unescape(m.group(0)), text)


def clean_prompt(text: str) -> str:
    """The reference's ``whitespace_clean(basic_clean(text))`` without ftfy (module docstring)."""
    if "<" not in text:  # ftfy leaves entities alone in text that may be markup
        while True:
            decoded = _unescape_strict(text)
            if decoded == text:
                break
            text = decoded
    text = _C1_CONTROL.sub(_c1_as_cp1252, text)
    text = _CURLY_SINGLE.sub("'", _CURLY_DOUBLE.sub('"', text))
    text = _ANSI_ESCAPE.sub("", text)
    text = text.translate(_CONTROL_CHARS)
    text = unicodedata.normalize("NFC", text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


class UMT5Tokenizer:
    """SentencePiece umT5 tokenizer: prompts -> (ids, mask) [B, 512] int64, ``</s>`` last, pad 0."""

    def __init__(self, model_proto: bytes, source: str = "tokenizer"):
        import sentencepiece  # lazily: only prompts need it

        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=model_proto)
        except Exception as err:  # sentencepiece raises RuntimeError / OSError with C++ text
            raise ValueError(f"{source} is not a valid SentencePiece model ({err}); point "
                             f"tokenizer= at the spiece.model of google/umt5-xxl.") from None
        if self.sp.id_to_piece(PAD_ID) != "<pad>" or self.sp.id_to_piece(EOS_ID) != "</s>":
            raise ValueError(f"{source} does not use umT5's special ids (<pad>=0, </s>=1); point "
                             f"tokenizer= at the spiece.model of google/umt5-xxl.")

    @classmethod
    def from_file(cls, path: PathLike) -> "UMT5Tokenizer":
        """``spiece.model``, a Hugging Face ``tokenizer.json``, or a folder holding either."""
        path = Path(path).expanduser()
        if path.is_dir():
            found = _find_tokenizer_file(path, ("spiece.model", "tokenizer.json"))
            if found is None:
                raise ValueError(f"{path} holds neither spiece.model nor tokenizer.json; point "
                                 f"tokenizer= at the umT5 tokenizer file itself.")
            path = found
        if not path.is_file():
            raise ValueError(f"tokenizer file {path} does not exist; point tokenizer= at the "
                             f"spiece.model or tokenizer.json of google/umt5-xxl.")
        if path.suffix == ".json":
            with open(path, encoding="utf-8") as f:
                return cls(spm_proto_from_tokenizer_json(json.load(f), str(path)), str(path))
        return cls(path.read_bytes(), str(path))

    def __call__(self, prompts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        ids = torch.full((len(prompts), TEXT_LEN), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(prompts), TEXT_LEN), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            pieces = self.sp.encode(clean_prompt(prompt), out_type=int)[: TEXT_LEN - 1] + [EOS_ID]
            ids[row, : len(pieces)] = torch.tensor(pieces)
            mask[row, : len(pieces)] = 1
        return ids, mask


def _find_tokenizer_file(folder: Path, names: Sequence[str]) -> Optional[Path]:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    return None


# Minimal protobuf writer for sentencepiece's ModelProto (field numbers of sentencepiece_model.proto),
# so a tokenizer.json can be run by SentencePiece without the protobuf or tokenizers packages.
def _pb_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 fields are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _pb_int(field: int, value: int) -> bytes:
    return _pb_varint(field << 3) + _pb_varint(value)


def _pb_bytes(field: int, payload: bytes) -> bytes:
    return _pb_varint(field << 3 | 2) + _pb_varint(len(payload)) + payload


def _pb_float(field: int, value: float) -> bytes:
    return _pb_varint(field << 3 | 5) + struct.pack("<f", value)


_PIECE_NORMAL, _PIECE_UNKNOWN, _PIECE_CONTROL, _PIECE_BYTE = 1, 2, 3, 6
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")


def _find_component(node, kind: str):
    """The first {"type": kind} entry of a tokenizer.json normalizer/pre_tokenizer (or Sequence)."""
    if not isinstance(node, dict):
        return None
    if node.get("type") == kind:
        return node
    for child in node.get("normalizers") or node.get("pretokenizers") or []:
        found = _find_component(child, kind)
        if found is not None:
            return found
    return None


def spm_proto_from_tokenizer_json(data: dict, source: str = "tokenizer.json") -> bytes:
    """Serialized SentencePiece ModelProto equivalent to a Hugging Face Unigram tokenizer.json."""
    model = data.get("model") or {}
    if model.get("type") != "Unigram" or not model.get("vocab"):
        raise ValueError(f"{source} is not a SentencePiece Unigram tokenizer; point tokenizer= at the "
                         f"spiece.model or tokenizer.json of google/umt5-xxl.")
    vocab = model["vocab"]
    unk_id = model.get("unk_id")
    byte_fallback = bool(model.get("byte_fallback", False))
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}

    pieces = b""
    for index, (piece, score) in enumerate(vocab):
        if index == unk_id:
            kind = _PIECE_UNKNOWN
        elif piece in special:
            kind = _PIECE_CONTROL
        elif byte_fallback and _BYTE_PIECE.fullmatch(piece):
            kind = _PIECE_BYTE
        else:
            kind = _PIECE_NORMAL
        entry = _pb_bytes(1, piece.encode("utf-8")) + _pb_float(2, float(score)) + _pb_int(3, kind)
        pieces += _pb_bytes(1, entry)

    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    trainer = (_pb_int(3, 1) + _pb_int(4, len(vocab)) + _pb_int(35, int(byte_fallback))
               + _pb_int(40, -1 if unk_id is None else unk_id) + _pb_int(41, ids.get("<s>", -1))
               + _pb_int(42, ids.get("</s>", -1)) + _pb_int(43, ids.get("<pad>", -1)))

    precompiled = _find_component(data.get("normalizer"), "Precompiled")
    charsmap = b""
    if precompiled is not None and precompiled.get("precompiled_charsmap"):
        import base64

        charsmap = base64.b64decode(precompiled["precompiled_charsmap"])
    metaspace = _find_component(data.get("pre_tokenizer"), "Metaspace") or {}
    if "prepend_scheme" in metaspace:
        dummy_prefix = metaspace["prepend_scheme"] != "never"
    else:
        dummy_prefix = bool(metaspace.get("add_prefix_space", True))
    normalizer = (_pb_bytes(1, b"nmt_nfkc" if charsmap else b"identity") + _pb_bytes(2, charsmap)
                  + _pb_int(3, int(dummy_prefix)) + _pb_int(4, 1) + _pb_int(5, 1))
    return pieces + _pb_bytes(2, trainer) + _pb_bytes(3, normalizer)


TOKENIZER_NEIGHBOURS = ("spiece.model", "tokenizer.json", "google/umt5-xxl/spiece.model",
                         "google/umt5-xxl/tokenizer.json", "umt5-xxl/spiece.model", "umt5-xxl/tokenizer.json")


def default_tokenizer_file(checkpoint: Path) -> Optional[Path]:
    """A umT5 tokenizer beside the checkpoint, else the one the reference downloaded
    (``AutoTokenizer.from_pretrained("google/umt5-xxl")``) in the Hugging Face hub cache."""
    found = _find_tokenizer_file(checkpoint.parent, TOKENIZER_NEIGHBOURS)
    if found is not None:
        return found
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    for snapshot in sorted(Path(hub).glob("models--google--umt5-xxl/snapshots/*")):
        found = _find_tokenizer_file(snapshot, ("spiece.model", "tokenizer.json"))
        if found is not None:
            return found
    return None
