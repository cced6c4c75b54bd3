"""umT5-xxl text encoder (encoder half only), as used by Wan2.2 / TurboDiffusion.

Architecture (all facts from the reference ``rcm/utils/umt5.py``, ``umt5_xxl(encoder_only=True)``):
token embedding -> 24 pre-norm blocks -> final RMS norm, width 4096. Each block:
``x + attn(norm1(x))`` then ``x + ffn(norm2(x))`` where

* attention: 64 heads of 64, q/k/v/o without bias, **no** 1/sqrt(d) scaling (T5 was trained
  without it), plus a relative-position bias that every layer owns (umT5; T5 v1.1 shares the
  first layer's): 32 buckets, 16 per direction: distances 0-7 exact, then 8 log-spaced bins
  up to 128;
* feed-forward: gated GELU (tanh approximation), ``fc2(fc1(x) * gelu(gate(x)))``, width 10240;
* RMS norms without mean subtraction or bias, computed in float32 and cast back.

Padding is masked out of the keys; rows past each prompt's length are zeroed in the output, the
``[B, 512, dim]`` format the DiT's cross-attention consumes (the zero rows are part of its input).

Why a hand-written module instead of ``transformers.UMT5EncoderModel``:

* load time: the model is built on the meta device and the checkpoint's tensors are assigned
  directly (memory-mapped ``.pth``, streamed ``.safetensors``): no random init, no second copy;
* memory: ComfyUI's fp8 files are dequantized one tensor (and row block) at a time, so the peak is
  the model in its compute dtype, about 11 GB in bf16, not that plus a float32 copy;
* exactness: the forward keeps the reference's op order and roundings (bf16 logits plus bf16
  bias, float32 softmax, float32 RMS statistics cast to the weight dtype, GELU op by op), which
  reproduces the reference's bf16 embeddings bit for bit on CPU (tests/test_umt5.py);
* dependency weight: ``sentencepiece`` (a few MB) instead of transformers + tokenizers +
  huggingface_hub, and no clash with the transformers version ComfyUI pins.

Checkpoints accepted (the layout is recognised from the tensor names, not the file extension):

* Wan / TurboDiffusion ``models_t5_umt5-xxl-enc-bf16.pth`` (and its ``.safetensors`` re-saves):
  ``token_embedding.weight``, ``blocks.N.{norm1,norm2}.weight``, ``blocks.N.attn.{q,k,v,o}.weight``,
  ``blocks.N.ffn.{gate.0,fc1,fc2}.weight``, ``blocks.N.pos_embedding.embedding.weight``, ``norm.weight``;
* ComfyUI / Hugging Face T5 names (``umt5_xxl_fp8_e4m3fn_scaled.safetensors``,
  ``nsfw_wan_umt5-xxl_fp8_scaled.safetensors``, bf16/fp16 re-saves): ``shared.weight`` or
  ``encoder.embed_tokens.weight``, ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o,
  relative_attention_bias}.weight``, ``encoder.block.N.layer.0.layer_norm.weight``,
  ``encoder.block.N.layer.1.DenseReluDense.{wi_0 (gelu'd gate), wi_1, wo}.weight``,
  ``encoder.block.N.layer.1.layer_norm.weight``, ``encoder.final_layer_norm.weight``.
  float8 weights are dequantized as ``weight * scale`` with the per-layer ``<layer>.scale_weight``
  (older files, marked by a top-level ``scaled_fp8`` tensor) or ``<layer>.weight_scale`` (newer
  files, marked by ``<layer>.comfy_quant``); ``scale_input`` / ``input_scale`` only matter to fp8
  matmuls and are ignored. The embedded ``spiece_model`` (uint8) is the SentencePiece tokenizer.

The tokenizer and prompt cleaning live in `turbowan.models.tokenizer`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..options import TEXT_WIDTH
from ..checkpoint import ModelFile, ModelFileError, describe, strip_prefixes
from .tokenizer import PathLike, UMT5Tokenizer, default_tokenizer_file

MAX_DISTANCE = 128  # relative distances >= this share the last bucket
NORM_EPS = 1e-6


# --------------------------------------------------------------------------------------------
# Network
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UMT5Config:
    vocab: int  # embedding rows (256384 for umT5-xxl; the tokenizer uses the first 256000)
    dim: int  # model width, 4096
    dim_attn: int  # heads * head_dim, 4096
    dim_ffn: int  # gated-GELU hidden width, 10240
    heads: int  # 64
    layers: int  # 24
    buckets: int  # relative-position buckets, 32

    @classmethod
    def from_state_dict(cls, shapes: dict[str, Sequence[int]]) -> "UMT5Config":
        """Infer the config from tensor shapes under this module's own names (see _load_state)."""
        layers = 0
        while f"blocks.{layers}.attn.q.weight" in shapes:
            layers += 1
        vocab, dim = shapes["token_embedding.weight"]
        dim_attn = shapes["blocks.0.attn.q.weight"][0]
        dim_ffn = shapes["blocks.0.ffn.fc1.weight"][0]
        buckets, heads = shapes["blocks.0.pos_embedding.embedding.weight"]
        return cls(vocab=vocab, dim=dim, dim_attn=dim_attn, dim_ffn=dim_ffn, heads=heads,
                   layers=layers, buckets=buckets)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, statistics in float32, result cast to the weight dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + NORM_EPS)
        return self.weight * normed.to(self.weight.dtype)


def relative_position_buckets(length: int, buckets: int, device=None) -> torch.Tensor:
    """Bidirectional T5 bucket of (key position - query position): LongTensor [length, length].

    Half the buckets are for keys after the query. Within a half, distances below a quarter of
    the buckets get their own bucket, larger ones share log-spaced buckets up to MAX_DISTANCE.
    """
    pos = torch.arange(length, device=device)
    relative = pos[None, :] - pos[:, None]  # [Lq, Lk]
    half = buckets // 2
    exact = half // 2
    distance = relative.abs()
    # float32 log then truncation, as the reference does (bucket edges depend on this rounding)
    log_bucket = exact + (
        torch.log(distance.clamp(min=exact).float() / exact) / math.log(MAX_DISTANCE / exact) * (half - exact)
    ).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return (relative > 0).long() * half + torch.where(distance < exact, distance, log_bucket)


class RelativePositionBias(nn.Module):
    """Per-layer learned bias per (bucket, head): returns [1, heads, L, L] in the weight dtype."""

    def __init__(self, buckets: int, heads: int):
        super().__init__()
        self.embedding = nn.Embedding(buckets, heads)

    def forward(self, bucket_ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(bucket_ids).permute(2, 0, 1).unsqueeze(0)


class SelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.heads = cfg.heads
        self.q = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.k = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.v = nn.Linear(cfg.dim, cfg.dim_attn, bias=False)
        self.o = nn.Linear(cfg.dim_attn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, pos_bias: torch.Tensor) -> torch.Tensor:
        """x [B, L, dim]; padding [B, 1, 1, L] bool (True = padded key); pos_bias [1, H, L, L]."""
        b, length, _ = x.shape
        q = self.q(x).view(b, length, self.heads, -1)
        k = self.k(x).view(b, length, self.heads, -1)
        v = self.v(x).view(b, length, self.heads, -1)
        bias = pos_bias.expand(b, -1, -1, -1).masked_fill(padding, torch.finfo(x.dtype).min)
        # No 1/sqrt(head_dim): T5 was trained without it. Logits + bias are added in the model
        # dtype and only the softmax runs in float32, as in the reference.
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) + bias
        probs = F.softmax(logits.float(), dim=-1).to(x.dtype)
        out = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, length, -1)
        return self.o(out)


class GatedGeluFFN(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.gate = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc1 = nn.Linear(cfg.dim, cfg.dim_ffn, bias=False)
        self.fc2 = nn.Linear(cfg.dim_ffn, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x) * gelu_tanh(self.gate(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """tanh-approximated GELU written out op by op in the input dtype, as the reference computes
    it: F.gelu(approximate="tanh") rounds once instead, slightly more accurate but no longer
    bit-identical to the reference's bf16 embeddings."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


class UMT5Block(nn.Module):
    def __init__(self, cfg: UMT5Config):
        super().__init__()
        self.norm1 = RMSNorm(cfg.dim)
        self.attn = SelfAttention(cfg)
        self.norm2 = RMSNorm(cfg.dim)
        self.ffn = GatedGeluFFN(cfg)
        self.pos_embedding = RelativePositionBias(cfg.buckets, cfg.heads)

    def forward(self, x: torch.Tensor, padding: torch.Tensor, bucket_ids: torch.Tensor) -> torch.Tensor:
        x = _fp16_clamp(x + self.attn(self.norm1(x), padding, self.pos_embedding(bucket_ids)))
        return _fp16_clamp(x + self.ffn(self.norm2(x)))


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # T5 activations outgrow float16 in the FFN; the reference clamps instead of returning inf.
    if x.dtype == torch.float16 and torch.isinf(x).any():
        limit = torch.finfo(torch.float16).max - 1000
        x = x.clamp(-limit, limit)
    return x


class UMT5TextEncoder(nn.Module):
    """The encoder plus its tokenizer: ``encode(prompts)`` -> [B, 512, dim] embeddings."""

    def __init__(self, cfg: UMT5Config, tokenizer: Optional["UMT5Tokenizer"] = None):
        super().__init__()
        self.config = cfg
        self.tokenizer = tokenizer
        self.token_embedding = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(UMT5Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @torch.no_grad()
    def encode(self, prompts: Union[str, Sequence[str]]) -> torch.Tensor:
        """Prompt(s) -> [B, 512, dim] in the model dtype, zero rows past each prompt's tokens."""
        if self.tokenizer is None:
            raise ValueError(
                "this text encoder has no tokenizer: pass tokenizer='path/to/spiece.model' (or the "
                "tokenizer.json of google/umt5-xxl) to load_text_encoder, or load ComfyUI's "
                "umt5_xxl_fp8_e4m3fn_scaled.safetensors, which embeds it.")
        ids, mask = self.tokenizer(prompts)
        return self.encode_ids(ids, mask)

    @torch.no_grad()
    def encode_ids(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids / attention_mask [B, L] (1 on real tokens, a prefix) -> [B, L, dim].

        Only the first max(lengths) positions are computed: padded keys are masked and relative
        positions depend only on distances, so the valid rows are the same as over all L, at a
        fraction of the cost for short prompts (what matters when the encoder runs on a CPU).
        """
        if input_ids.shape != attention_mask.shape or input_ids.ndim != 2:
            raise ValueError(f"input_ids {tuple(input_ids.shape)} and attention_mask "
                             f"{tuple(attention_mask.shape)} must both be [batch, tokens].")
        batch, full_length = input_ids.shape
        lengths = attention_mask.gt(0).sum(dim=1)  # [B]
        length = max(int(lengths.max()), 1)
        ids = input_ids[:, :length].to(self.device)
        padding = attention_mask[:, :length].to(self.device).eq(0)[:, None, None, :]  # [B,1,1,L]
        bucket_ids = relative_position_buckets(length, self.config.buckets, device=self.device)

        x = self.token_embedding(ids)  # [B, L, dim]
        for block in self.blocks:
            x = block(x, padding, bucket_ids)
        x = self.norm(x)

        out = x.new_zeros(batch, full_length, self.config.dim)
        rows = torch.arange(length, device=self.device)[None, :] < lengths.to(self.device)[:, None]
        out[:, :length] = x.masked_fill(~rows[..., None], 0)  # zero rows past each prompt
        return out


# --------------------------------------------------------------------------------------------
# Checkpoint loading
# --------------------------------------------------------------------------------------------


EXPECTED_FILE = ("a umT5-xxl text encoder file (models_t5_umt5-xxl-enc-bf16.pth or "
                 "umt5_xxl_fp8_e4m3fn_scaled.safetensors)")


_HF_BLOCK = re.compile(r"encoder\.block\.(\d+)\.layer\.(\d)\.(.+)")
_HF_BLOCK_NAMES = {
    ("0", "layer_norm.weight"): "norm1.weight",
    ("0", "SelfAttention.q.weight"): "attn.q.weight",
    ("0", "SelfAttention.k.weight"): "attn.k.weight",
    ("0", "SelfAttention.v.weight"): "attn.v.weight",
    ("0", "SelfAttention.o.weight"): "attn.o.weight",
    ("0", "SelfAttention.relative_attention_bias.weight"): "pos_embedding.embedding.weight",
    ("1", "layer_norm.weight"): "norm2.weight",
    ("1", "DenseReluDense.wi_0.weight"): "ffn.gate.weight",  # the GELU'd half
    ("1", "DenseReluDense.wi_1.weight"): "ffn.fc1.weight",
    ("1", "DenseReluDense.wo.weight"): "ffn.fc2.weight",
}
# Tensors of ComfyUI / HF files that carry no encoder weight of their own.
_HF_IGNORED = re.compile(r"(.*\.(scale_weight|weight_scale|comfy_quant|scale_input|input_scale)"
                         r"|(.*\.)?(scaled_fp8|spiece_model)|decoder\..*|lm_head\.weight)")


def _own_name_hf(name: str) -> Optional[str]:
    if name in ("shared.weight", "encoder.embed_tokens.weight"):
        return "token_embedding.weight"
    if name == "encoder.final_layer_norm.weight":
        return "norm.weight"
    match = _HF_BLOCK.fullmatch(name)
    if match and (match.group(2), match.group(3)) in _HF_BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{_HF_BLOCK_NAMES[match.group(2), match.group(3)]}"
    return None


def _own_name_wan(name: str) -> str:
    return re.sub(r"\.ffn\.gate\.0\.weight$", ".ffn.gate.weight", name)


def _load_state(ckpt: ModelFile, dtype: torch.dtype, device: torch.device, check_dim: Optional[int]):
    """(config, state dict under this module's names in dtype on device)."""
    name = ckpt.path.name
    prefix = ""
    for key in ckpt.names:  # ComfyUI saves may nest the encoder under a prefix
        if key.endswith("encoder.final_layer_norm.weight"):
            prefix = key[: -len("encoder.final_layer_norm.weight")]
            break
    if "token_embedding.weight" in ckpt.names and "blocks.0.attn.q.weight" in ckpt.names:
        layout = "wan"
        sources = {_own_name_wan(k): k for k in ckpt.names}
    elif prefix + "encoder.block.0.layer.0.SelfAttention.q.weight" in ckpt.names:
        layout = "hf"
        sources = {}
        for k in ckpt.names:
            if not k.startswith(prefix):
                continue
            own = _own_name_hf(k[len(prefix):])
            if own is not None:
                sources.setdefault(own, k)  # shared.weight and embed_tokens are the same tensor
            elif not _HF_IGNORED.fullmatch(k[len(prefix):]):
                sources[k] = k  # reported as unexpected below
    else:
        raise ModelFileError(f"{name} looks like {describe(strip_prefixes(ckpt.meta()))}; {EXPECTED_FILE} is expected.")

    shapes = {own: ckpt.shape(src) for own, src in sources.items()}
    if "blocks.0.pos_embedding.embedding.weight" in shapes and "blocks.1.attn.q.weight" in shapes \
            and "blocks.1.pos_embedding.embedding.weight" not in shapes:
        raise ModelFileError(
            f"{name} looks like a T5 v1.1 encoder (e.g. the Flux/SD3 t5xxl), whose relative position "
            f"bias lives in the first layer only; a umT5-xxl text encoder file is expected.")
    required = ["token_embedding.weight", "norm.weight", "blocks.0.attn.q.weight",
                "blocks.0.ffn.fc1.weight", "blocks.0.pos_embedding.embedding.weight"]
    missing = [k for k in required if k not in shapes]
    if missing:
        raise ModelFileError(
            f"{name} lacks the umT5 tensor {sources.get(missing[0], missing[0])!r} ({layout} layout); "
            f"a complete umT5-xxl text encoder file is expected.")
    cfg = UMT5Config.from_state_dict(shapes)
    if check_dim is not None and cfg.dim != check_dim:
        raise ModelFileError(
            f"{name} looks like a T5/umT5 encoder of width {cfg.dim}, not the {check_dim}-wide "
            f"umT5-xxl the video model needs; a umT5-xxl text encoder file is expected.")

    with torch.device("meta"):
        expected = UMT5TextEncoder(cfg).state_dict()
    unexpected = sorted(set(sources) - set(expected))
    absent = sorted(set(expected) - set(sources))
    if unexpected or absent:
        what = f"unexpected tensor {sources[unexpected[0]]!r}" if unexpected else f"no tensor for {absent[0]!r}"
        raise ModelFileError(f"{name} has {what} for a {cfg.layers}-layer umT5 encoder; a complete "
                                   f"umT5-xxl text encoder file is expected.")

    state = {}
    for own, src in sources.items():
        if tuple(expected[own].shape) != shapes[own]:
            raise ModelFileError(f"{name}: tensor {src!r} has shape {shapes[own]}, expected "
                                       f"{tuple(expected[own].shape)}; the file is inconsistent or not umT5-xxl.")
        state[own] = _dequantized(ckpt, src, layout, dtype, device)
    return cfg, state


def _scale_for(ckpt: ModelFile, weight_name: str) -> Optional[torch.Tensor]:
    """The fp8 scale of ``<layer>.weight``, checking the layer's comfy_quant marker if present."""
    layer = weight_name[: -len(".weight")]
    marker = layer + ".comfy_quant"
    if marker in ckpt.names:
        conf = json.loads(bytes(ckpt.tensor(marker).tolist()).decode("utf-8"))
        if conf.get("format") not in ("float8_e4m3fn", "float8_e5m2"):
            raise ModelFileError(
                f"{ckpt.path.name}: layer {layer!r} is quantized as {conf.get('format')!r}, which this "
                f"loader does not read; use the bf16 or fp8_scaled umT5-xxl file.")
    for scale_name in (layer + ".weight_scale", layer + ".scale_weight"):
        if scale_name in ckpt.names:
            return ckpt.tensor(scale_name).float()
    return None


_ROW_BLOCK = 8192  # rows dequantized at a time (bounds the float32 temporary)


def _dequantized(ckpt: ModelFile, name: str, layout: str, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    weight = ckpt.tensor(name)
    if not weight.is_floating_point():
        raise ModelFileError(
            f"{ckpt.path.name}: tensor {name!r} is stored as {weight.dtype} (an unsupported quantization); "
            f"use the bf16 or fp8_scaled umT5-xxl file.")
    scale = _scale_for(ckpt, name) if layout == "hf" and name.endswith(".weight") else None
    if scale is None:
        return weight.to(device=device, dtype=dtype)
    if scale.numel() != 1:
        raise ModelFileError(
            f"{ckpt.path.name}: {name!r} has a {tuple(scale.shape)} scale, not one per tensor; "
            f"use the bf16 or fp8_scaled umT5-xxl file.")
    scale = scale.reshape(()).to(device)
    out = torch.empty(weight.shape, dtype=dtype, device=device)
    for start in range(0, weight.shape[0], _ROW_BLOCK):
        rows = weight[start:start + _ROW_BLOCK].to(device)
        out[start:start + _ROW_BLOCK] = (rows.float() * scale).to(dtype)
    return out


def load_text_encoder(path: PathLike, tokenizer: Union[PathLike, UMT5Tokenizer, None] = None,
                      device: Union[str, torch.device, None] = None, dtype: torch.dtype = torch.bfloat16,
                      *, expected_dim: Optional[int] = TEXT_WIDTH) -> UMT5TextEncoder:
    """Load a umT5-xxl encoder checkpoint (either layout, see the module docstring).

    tokenizer: a ``spiece.model`` / ``tokenizer.json`` path (or folder) or a UMT5Tokenizer; by
    default the ``spiece_model`` embedded in ComfyUI files, else a spiece.model / tokenizer.json
    beside the checkpoint (the Wan release keeps it in ``google/umt5-xxl/``) or in the Hugging Face
    hub cache (where the reference's download of google/umt5-xxl went); without one only
    ``encode_ids`` works. device: where the weights go (default CPU). expected_dim: the text width
    the caller's video model consumes (Wan: 4096); None accepts any width (small test models).
    """
    path = Path(path).expanduser()
    device = torch.device(device if device is not None else "cpu")
    ckpt = ModelFile(path, EXPECTED_FILE)
    cfg, state = _load_state(ckpt, dtype, device, expected_dim)

    embedded = [k for k in ckpt.names if k == "spiece_model" or k.endswith(".spiece_model")]
    if isinstance(tokenizer, UMT5Tokenizer):
        tok = tokenizer
    elif tokenizer is not None:
        tok = UMT5Tokenizer.from_file(tokenizer)
    elif embedded:
        tok = UMT5Tokenizer(ckpt.tensor(embedded[0]).numpy().tobytes(), f"{path.name}:{embedded[0]}")
    else:
        found = default_tokenizer_file(path)
        tok = UMT5Tokenizer.from_file(found) if found is not None else None

    with torch.device("meta"):
        model = UMT5TextEncoder(cfg, tok)
    model.load_state_dict(state, assign=True, strict=True)
    return model.requires_grad_(False).eval()


__all__ = [
    "UMT5Config", "UMT5TextEncoder", "load_text_encoder", "relative_position_buckets",
]
