"""Wan2.1 video VAE (the tokenizer TurboDiffusion's Wan2.2-I2V-A14B uses), pure torch.

Compression: 8x in height and width, 4x in time, 3 RGB channels <-> 16 latent channels:

    video   [B, 3, 1 + 4k, H, W]  in [-1, 1]
    latents [B, 16, 1 + k, H/8, W/8]  normalised with the fixed per-channel mean / std below

Every temporal operation is causal. The first frame is coded on its own, later frames in chunks
(4 video frames <-> 1 latent frame); each causal layer keeps the trailing frames it saw in the previous
chunk in a `Cache` dict, so a long video is processed one chunk at a time with bounded memory and gives
the same numbers as the reference (`rcm/tokenizers/wan2pt1.py`, run as `Wan2pt1VAEInterface`:
weights and latent constants in the model dtype, no autocast).

Module and parameter names follow the released `Wan2.1_VAE.pth`, so checkpoints load without renaming
(ComfyUI's `wan_2.1_vae.safetensors` and its `comfy.ldm.wan.vae.WanVAE` state dict use the same names).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple, Union

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import ModelFileError, identify, read_state_dict, strip_prefixes
from ..kernels import conv3d_dispatch, conv3d_fits, conv3d_kernel, cuda_capability, vae_norm_dispatch
from ..progress import ProgressHook, report

SPATIAL_COMPRESSION = 8
TEMPORAL_COMPRESSION = 4
Z_DIM = 16

# Per-channel statistics of the Wan2.1 latent space (the values the model was trained with).
LATENT_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]
LATENT_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]

# A layer -> the trailing input frames it saw in the previous chunk (absent before the first chunk).
Cache = Dict[nn.Module, Optional[torch.Tensor]]

# `tile` argument of encode/decode: None = whole frame, (tile_h, tile_w) = fixed tiles, in latent pixels
# (`turbowan.vae_tiling` picks them from a memory budget).
TileSpec = Optional[Tuple[int, int]]


@dataclass
class VAEConfig:
    dim: int = 96  # channels of the first (full-resolution) stage
    z_dim: int = Z_DIM
    dim_mult: Tuple[int, ...] = (1, 2, 4, 4)  # channel multiplier per resolution stage
    num_res_blocks: int = 2  # per encoder stage; the decoder has one more
    temporal_downsample: Tuple[bool, ...] = (False, True, True)  # which 2x spatial downsamples also halve time


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """3D convolution that sees only the current and past frames.

    Spatially it is "same"-padded; in time the input is prefixed with the last `kernel_t - 1` frames of
    the previous chunk (zeros at the start of the video), so running a video chunk by chunk equals
    running it whole with zero padding on the past side.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Tuple[int, int, int]]):
        super().__init__(in_channels, out_channels, kernel_size)  # padding is applied in forward
        self.past_frames = self.kernel_size[0] - 1
        self.space_pad = self.kernel_size[1] // 2

    def forward(self, x: torch.Tensor, cache: Cache, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """conv(x) (+ residual, added after the convolution: the residual block's sum)."""
        p, n = self.space_pad, self.past_frames
        past = cache.get(self)
        if past is None:
            b, c, _, h, w = x.shape
            past = torch.empty(b, c, n, h, w, dtype=x.dtype, device=x.device, memory_format=_memory_format(x)).zero_()
        stream = torch.cat([past, x], dim=2)  # [past frames | x]; keeps x's memory format
        cache[self] = stream[:, :, -n:].clone()  # the last n frames, for the next chunk
        kernel = conv3d_kernel(cuda_capability(stream), self.in_channels, self.out_channels, self.kernel_size)
        if kernel == "triton" and conv3d_fits(stream, self.weight):
            fused = conv3d_dispatch()
            if fused is not None:  # bias and residual in the kernel's epilogue, rounded once
                return fused(stream, self.weight, self.bias, residual)
        out = F.conv3d(stream, self.weight, self.bias, padding=(0, p, p))
        return out if residual is None else out + residual


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    """channels-last if x [B, C, T, H, W] (or [N, C, H, W]) is laid out that way (the CUDA layout), else contiguous."""
    channels_last = _channels_last(x)
    if not x.is_contiguous() and x.is_contiguous(memory_format=channels_last):
        return channels_last
    return torch.contiguous_format


def _in_preferred_layout(x: torch.Tensor) -> torch.Tensor:
    """x [B, C, T, H, W] in its device's preferred layout. Some ops return NCDHW whatever their input (the nearest
    upsample, 2D convolutions of 1-frame chunks whose strides are ambiguous), and one NCDHW activation sends every
    later layer down the slow path. A no-op where the layout already holds, and always on the CPU (contiguous
    format: the fixtures' float results stay exactly as they are)."""
    layout = preferred_layout(x.device)
    return x if layout == torch.contiguous_format else x.contiguous(memory_format=layout)


def preferred_layout(device: torch.device) -> torch.memory_format:
    """Activation layout for a device: cuDNN's 3D convolutions are much faster channels-last (NDHWC); the CPU
    keeps the reference's NCDHW, whose float results the fixtures pin exactly."""
    return torch.channels_last_3d if device.type == "cuda" else torch.contiguous_format


class RMSNorm(nn.Module):
    """x / ||x||_channels * sqrt(C) * gamma (gamma stored with trailing singleton dims, as released)."""

    def __init__(self, dim: int, spatial_dims: int):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * spatial_dims)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


def rms_norm_silu(norm: RMSNorm, x: torch.Tensor, silu: bool) -> torch.Tensor:
    """norm(x), then SiLU if `silu`. Channels-last CUDA activations go through one fused Triton kernel (eager
    PyTorch makes 5-6 passes over the tensor; the norms were ~40% of a 720p decode); elsewhere the eager modules
    run, with the arithmetic the CPU fixtures pin."""
    channels_last = x.is_contiguous(memory_format=_channels_last(x))
    forward_only = not (x.requires_grad or norm.gamma.requires_grad)  # the kernel has no backward
    if x.is_cuda and channels_last and forward_only and x.dtype in (torch.float32, torch.bfloat16, torch.float16):
        fused = vae_norm_dispatch()
        if fused is not None:
            return fused(x, norm.gamma, silu)
    x = norm(x)
    return F.silu(x) if silu else x


def _channels_last(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last_3d if x.ndim == 5 else torch.channels_last


def _frames_to_images(x: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B*T, C, H, W] for per-frame 2D layers."""
    return x.transpose(1, 2).flatten(0, 1)


def _images_to_frames(x: torch.Tensor, batch: int) -> torch.Tensor:
    """[B*T, C, H, W] -> [B, C, T, H, W] (a view)."""
    return x.unflatten(0, (batch, -1)).transpose(1, 2)


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, 3),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3),
            RMSNorm(out_dim, 3),
            nn.SiLU(),
            nn.Identity(),  # dropout in training; kept so the checkpoint indices (…residual.6…) line up
            CausalConv3d(out_dim, out_dim, 3),
        )
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # The last convolution adds the shortcut itself (on CUDA inside the kernel: one pass less).
        *branch, last = self.residual
        return last(_run(branch, x, cache), cache, residual=self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention among the pixels of each frame (no mixing across frames)."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        qkv = self.to_qkv(rms_norm_silu(self.norm, _frames_to_images(x), silu=False))  # [B*T, 3C, H, W]
        # [B*T, 1 head, H*W tokens, 3C] -> q, k, v of [B*T, 1, H*W, C]
        q, k, v = qkv.flatten(2).transpose(1, 2).unsqueeze(1).contiguous().chunk(3, dim=-1)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.proj(out.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w))  # NCHW, whatever x's layout
        # attention + input, in this order (the reference's), in x's layout: a sum takes its first operand's layout,
        # and an NCDHW tensor here would send every later layer of the decoder down cuDNN's and eager PyTorch's
        # NCDHW paths (a 720p decode ran 40% slower that way)
        return _images_to_frames(out, b).contiguous(memory_format=_memory_format(x)) + x


class Downsample(nn.Module):
    """2x spatial downsample (stride-2 conv); `temporal` also halves time (except for the first frame)."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        # Pad right/bottom only, so an even size halves exactly.
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = _images_to_frames(self.resample(_frames_to_images(x)), x.shape[0])
        if self.time_conv is None:
            return x
        # The first chunk (frame 0) passes through; each later chunk of 2n frames becomes n frames,
        # each output seeing the frame before its pair (the last frame of the previous chunk first).
        previous = cache.get(self)
        cache[self] = x[:, :, -1:].clone()
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))


class Upsample(nn.Module):
    """2x spatial upsample (nearest + conv, halving channels); `temporal` also doubles time after frame 0."""

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim // 2, 3, padding=1))
        # Predicts two output frames (as 2*dim channels) per input frame.
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self._time_upsample(x, cache)
        images = _frames_to_images(x)
        if preferred_layout(x.device) == torch.contiguous_format:
            out = self.resample(images)  # the reference's arithmetic (the CPU fixtures pin it)
        else:
            out = upsample2x_conv3x3(images, self.resample[1])
        return _images_to_frames(out, x.shape[0])

    def _time_upsample(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        if self.time_conv is not None:
            if self in cache:
                b, c, t, h, w = x.shape
                pairs = self.time_conv(x, cache)  # [B, 2C, T, H, W]: two predicted frames per input frame
                # Interleave them: frame i -> frames 2i (first C channels), 2i+1 (last C), in x's layout.
                x = torch.empty(b, c, 2 * t, h, w, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
                x[:, :, 0::2] = pairs[:, :c]
                x[:, :, 1::2] = pairs[:, c:]
            else:
                # Frame 0 is not doubled, and the time conv's history starts after it (zeros).
                cache[self] = None
        return x


# The 3x3 taps that fall on each low-resolution row (column) an output pixel of phase 0 / 1 reads after a 2x nearest
# upsample: phase 0 (even rows) reads rows i-1 (tap 0) and i (taps 1, 2); phase 1 reads i (taps 0, 1) and i+1 (tap 2).
_PHASE_TAPS = (((0,), (1, 2)), ((0, 1), (2,)))


def _phase_weights(conv: nn.Conv2d, dtype: torch.dtype) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """`upsample2x_conv3x3`'s 2x2 weights [Co*4, Ci, 2, 2] (channel c*4 + 2*row + col) and bias in ``dtype``, made
    once per weight (kept on the module, remade when the weight is replaced, moved or changed in place) instead of
    at every decoded chunk."""
    key = (conv.weight.data_ptr(), conv.weight._version, conv.weight.device, dtype,
           None if conv.bias is None else (conv.bias.data_ptr(), conv.bias._version))
    cached = getattr(conv, "_turbowan_phase_weights", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    weight = conv.weight.to(torch.promote_types(conv.weight.dtype, torch.float32))  # [Co, Ci, 3, 3], sums in >= fp32

    def phase_kernel(rows, cols) -> torch.Tensor:  # [Co, Ci, 2, 2]: tap (i, j) sums the 3x3 taps rows[i] x cols[j]
        return torch.stack([torch.stack([weight[:, :, list(r)][:, :, :, list(c)].sum((2, 3)) for c in cols], -1)
                            for r in rows], -2)

    phases = [phase_kernel(rows, cols) for rows in _PHASE_TAPS for cols in _PHASE_TAPS]
    fused = torch.stack(phases, 1).flatten(0, 1).to(dtype)
    bias = None if conv.bias is None else conv.bias.repeat_interleave(4)
    conv._turbowan_phase_weights = (key, (fused, bias))
    return fused, bias


def upsample2x_conv3x3(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """conv(nearest_upsample_2x(x)) for a 3x3 "same" convolution, without the upsampled image: each of the four
    output phases (row, column parity) is a 2x2 convolution of x whose taps sum the 3x3 taps that read the same
    pixel of x. One 2x2 convolution with the four phases as output channels, then an interleave: 16 instead of 36
    multiply-adds per input pixel and channel pair, and no 4x-sized intermediate. The weights are summed in
    (at least) float32 and rounded once, so in bf16 the result differs from the two-step one by rounding only.

    x: [N, Ci, H, W] -> [N, Co, 2H, 2W] in x's memory layout."""
    n, _, h, w = x.shape
    fused, bias = _phase_weights(conv, x.dtype)
    co = conv.out_channels
    # padding 1 with a 2x2 kernel: position (y, x) reads rows y-1, y and columns x-1, x of x, for y in 0..H
    grid = F.conv2d(x, fused, bias, padding=1).unflatten(1, (co, 4))  # [N, Co, 4, H+1, W+1]
    out = torch.empty(n, co, 2 * h, 2 * w, dtype=x.dtype, device=x.device, memory_format=_memory_format(x))
    for a in (0, 1):
        for b in (0, 1):  # phase (a, b) at low-res (i, j) is grid position (i + a, j + b)
            out[:, :, a::2, b::2] = grid[:, :, 2 * a + b, a : a + h, b : b + w]
    return out


_CACHED_LAYERS = (CausalConv3d, ResidualBlock, Downsample, Upsample)


def _run(layers, x: torch.Tensor, cache: Cache) -> torch.Tensor:
    layers = list(layers)
    for i, layer in enumerate(layers):
        x = _in_preferred_layout(x)
        # An RMSNorm followed by a SiLU runs as one `rms_norm_silu` call (one pass on CUDA); the SiLU module stays
        # in the Sequential so the checkpoint's layer indices (residual.2, head.2, ...) keep their meaning.
        if isinstance(layer, nn.SiLU) and i > 0 and isinstance(layers[i - 1], RMSNorm):
            continue
        if isinstance(layer, RMSNorm):
            x = rms_norm_silu(layer, x, silu=i + 1 < len(layers) and isinstance(layers[i + 1], nn.SiLU))
        elif isinstance(layer, _CACHED_LAYERS):
            x = layer(x, cache)
        else:
            x = layer(x)
    return x


# ----------------------------------------------------------------------------------------------
# Encoder / decoder
# ----------------------------------------------------------------------------------------------


class Encoder(nn.Module):
    """[B, 3, T, H, W] -> [B, 2*z_dim, T', H/8, W/8]; T = 1 -> T' = 1, a later chunk of 4 frames -> 1."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3)
        blocks: List[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(cfg.dim_mult) - 1:
                blocks.append(Downsample(out_dim, temporal=cfg.temporal_downsample[stage]))
        self.downsamples = nn.ModuleList(blocks)
        mid = dims[-1]
        self.middle = nn.ModuleList([ResidualBlock(mid, mid), AttentionBlock(mid), ResidualBlock(mid, mid)])
        self.head = nn.Sequential(RMSNorm(mid, 3), nn.SiLU(), CausalConv3d(mid, cfg.z_dim * 2, 3))
        # The layers cut at the temporal downsamples: each segment runs at one frame rate (4, 2, 1 frames per chunk).
        layers = [self.conv1, *blocks, *self.middle, *self.head]
        cuts = [i for i, layer in enumerate(layers) if isinstance(layer, Downsample) and layer.time_conv is not None]
        self.segments = [layers[a:b] for a, b in zip([0, *cuts], [*cuts, len(layers)])]

    def segment_memory(self) -> List[int]:
        """Per segment, how many chunks back its output for a chunk can see (an upper bound): per layer, the
        frames its causal convolutions (or a temporal downsample's one cached frame) look back, in chunks of
        that layer's frame rate, summed. Per-frame layers add none."""
        memory, rate = [], TEMPORAL_COMPRESSION
        for segment in self.segments:
            chunks = 0
            for layer in segment:
                if isinstance(layer, Downsample) and layer.time_conv is not None:
                    chunks += math.ceil(1 / rate)  # the last frame of the previous chunk
                    rate //= 2
                past = sum(m.past_frames for m in layer.modules() if isinstance(m, CausalConv3d))
                chunks += math.ceil(past / rate)
            memory.append(chunks)
        return memory

    def run_segment(self, index: int, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        return _run(self.segments[index], x, cache)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for index in range(len(self.segments)):
            x = self.run_segment(index, x, cache)
        return x


class Decoder(nn.Module):
    """[B, z_dim, 1, h, w] -> [B, 3, 1 or 4, 8h, 8w]: latent frame 0 gives 1 frame, each later one 4."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        dims = [cfg.dim * m for m in (cfg.dim_mult[-1], *reversed(cfg.dim_mult))]
        temporal_upsample = tuple(reversed(cfg.temporal_downsample))
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3)
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]), ResidualBlock(dims[0], dims[0])])
        blocks: List[nn.Module] = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                in_dim //= 2  # the previous stage's Upsample halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(cfg.dim_mult) - 1:
                blocks.append(Upsample(out_dim, temporal=temporal_upsample[stage]))
        self.upsamples = nn.ModuleList(blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1], 3), nn.SiLU(), CausalConv3d(dims[-1], 3, 3))

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv1(x, cache)
        x = _run(self.middle, x, cache)
        x = _run(self.upsamples, x, cache)
        return _run(self.head, x, cache)


class WanVAEModel(nn.Module):
    """The network: encoder + 1x1x1 latent projections + decoder (names as in the checkpoint)."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.conv1 = nn.Conv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)  # -> (mean, log-variance); we keep the mean
        self.conv2 = nn.Conv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = Decoder(cfg)


# ----------------------------------------------------------------------------------------------
# Spatial tiling (memory): tiles on the latent grid, decoded/encoded independently, linearly blended
# ----------------------------------------------------------------------------------------------

# Peak bytes of live activations, caches included, per video pixel of one frame and per byte of the dtype,
# for the released width (dim 96), batch 1. Measured by tracking every tensor allocation of a decode
# (one latent frame -> 4 video frames) / an encode (4-frame chunks) on the meta device: 4300 / 3750,
# the same within 1% from 64x64 to 1280x720. The encode adds 240 for the repeated segment outputs it may hold
# (image-to-video): 192 channels x 4 frames at 1/4 of the pixels, and 384 x 2 at 1/16. x1.4 margin for conv
# workspaces and allocator fragmentation.
ACTIVATION_BYTES_PER_PIXEL = {"decode": 4300 * 1.4, "encode": (3750 + 240) * 1.4}


def _tile_overlap(tile: int) -> int:
    return min(8, tile // 4)


def _tile_spans(size: int, tile: int) -> List[Tuple[int, int]]:
    """[start, end) intervals of length `tile` covering [0, size), neighbours sharing >= the overlap."""
    if tile >= size:
        return [(0, size)]
    overlap = _tile_overlap(tile)
    count = math.ceil((size - overlap) / (tile - overlap))
    # Spread the starts evenly (integer steps of at most tile - overlap) so every seam overlaps alike.
    starts = [i * (size - tile) // (count - 1) for i in range(count)]
    return [(start, start + tile) for start in starts]


def _blend_weights(spans: List[Tuple[int, int]], index: int, scale: int) -> torch.Tensor:
    """1D weights (in output pixels) of tile `index`: 1 inside, linear ramps across overlaps with neighbours."""
    start, end = spans[index]
    length = (end - start) * scale
    position = torch.arange(length, dtype=torch.float32)
    weights = torch.ones(length, dtype=torch.float32)
    if index > 0:  # rises across the overlap with the previous tile
        ramp = (spans[index - 1][1] - start) * scale
        weights = torch.minimum(weights, (position + 1) / (ramp + 1))
    if index < len(spans) - 1:  # falls across the overlap with the next tile
        ramp = (end - spans[index + 1][0]) * scale
        weights = torch.minimum(weights, (length - position) / (ramp + 1))
    return weights


def tile_count(grid: Tuple[int, int], tile: Tuple[int, int]) -> int:
    """How many tiles of ``tile`` (latent pixels) cover ``grid``."""
    return len(_tile_spans(grid[0], tile[0])) * len(_tile_spans(grid[1], tile[1]))


def chunk_frames(i: int) -> Tuple[int, int]:
    """(first frame, frame count) of the video's chunk i, which is latent frame i: frame 0 alone, then 4 frames."""
    return (0, 1) if i == 0 else (1 + TEMPORAL_COMPRESSION * (i - 1), TEMPORAL_COMPRESSION)


def _segments_repeat_after(video: torch.Tensor, chunks: int, memory: List[int]) -> List[Optional[int]]:
    """Per encoder segment, the chunk after which its output is the same for every later chunk (None: never).

    Image-to-video encodes the image followed by black frames. When every frame after the first is the same, the
    input's chunks repeat from chunk 1 on (4 equal frames each), and a causal segment that sees m chunks back
    gives the same output for every chunk from m past the first repeating input chunk: its output repeats from
    there. Reusing that output is the same arithmetic as computing it again (tests/test_vae.py checks that the
    latents equal running every chunk)."""
    never = [None] * len(memory)
    if chunks < 3:
        return never
    later = video[:, :, 1:]
    if not torch.equal(later, video[:, :, 1:2].expand_as(later)):
        return never
    repeats, first = [], 1
    for m in memory:
        first += m
        repeats.append(first if first < chunks - 1 else None)
    return repeats


def _own_tiles(count: int, group) -> range:
    """The tile indices this rank of ``group`` processes (round robin; all of them without a group)."""
    if group is None:
        return range(count)
    return range(dist.get_rank(group), count, dist.get_world_size(group))


def _tiled(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    grid: Tuple[int, int],
    tile: Tuple[int, int],
    in_scale: int,
    out_scale: int,
    out_lead: Tuple[int, ...],
    out_dtype: torch.dtype,
    group=None,
) -> torch.Tensor:
    """Apply `fn` to overlapping spatial tiles of `x` and blend the results.

    Tiles are laid on a `grid` (latent pixels); `x` has `in_scale` pixels per grid cell, `fn`'s output
    `out_scale` and leading dims `out_lead`. Neighbouring tiles overlap by 1/4 of the tile (at most 8 latent
    pixels). Each output pixel is the weight-normalised sum of the tiles covering it, accumulated in float32;
    with a single tile the result equals `fn(x)` exactly. With a process ``group`` each rank runs every W-th tile
    and the weighted sums are added up over the ranks (all-reduce), so every rank returns the same blend as one
    process running all the tiles, up to float32 summation order.
    """
    tiles, weight_sum = _tile_plan(grid, tile, in_scale, out_scale, x.device)
    acc = torch.zeros(*out_lead, *weight_sum.shape, dtype=torch.float32, device=x.device)
    for index in _own_tiles(len(tiles), group):
        source, region, w = tiles[index]
        out = fn(x[source])
        acc[region].addcmul_(out, w)
        del out
    if group is not None:
        dist.all_reduce(acc, group=group)
    return acc.div_(weight_sum).to(out_dtype)


def _tile_plan(grid: Tuple[int, int], tile: Tuple[int, int], in_scale: int, out_scale: int, device):
    """The tiles of `_tiled` in order -> ([(input slices, output slices, blend weights [h, w] float32)], the sum of
    all tiles' weights [H, W]). Every rank computes the whole sum itself, in tile order, as one process does."""
    spans_y, spans_x = _tile_spans(grid[0], tile[0]), _tile_spans(grid[1], tile[1])
    weight_sum = torch.zeros(grid[0] * out_scale, grid[1] * out_scale, dtype=torch.float32, device=device)
    tiles = []
    for iy, (y0, y1) in enumerate(spans_y):
        for ix, (x0, x1) in enumerate(spans_x):
            w = _blend_weights(spans_y, iy, out_scale)[:, None] * _blend_weights(spans_x, ix, out_scale)[None, :]
            w = w.to(device)
            region = (..., slice(y0 * out_scale, y1 * out_scale), slice(x0 * out_scale, x1 * out_scale))
            weight_sum[region] += w
            tiles.append(((..., slice(y0 * in_scale, y1 * in_scale), slice(x0 * in_scale, x1 * in_scale)), region, w))
    return tiles, weight_sum


# ----------------------------------------------------------------------------------------------
# Public wrapper
# ----------------------------------------------------------------------------------------------


class WanVAE:
    """Wan2.1 VAE ready to use: weights, dtype, device, latent normalisation, chunked encode/decode.

    `encode` returns float32 latents (the reference interface returns the input's dtype, and the
    pipeline feeds it float32 video); `decode` returns video in the model dtype, not clamped.
    """

    spatial_compression = SPATIAL_COMPRESSION
    temporal_compression = TEMPORAL_COMPRESSION
    z_dim = Z_DIM

    def __init__(self, model: WanVAEModel):
        self.model = model.eval().requires_grad_(False)
        self._set_constants()

    def _set_constants(self) -> None:
        # Built in the model dtype, and 1/std computed in it, exactly as the reference does.
        self.latent_mean = torch.tensor(LATENT_MEAN, dtype=self.dtype, device=self.device).view(1, Z_DIM, 1, 1, 1)
        self.latent_inv_std = (1.0 / torch.tensor(LATENT_STD, dtype=self.dtype, device=self.device)).view(1, Z_DIM, 1, 1, 1)

    @property
    def device(self) -> torch.device:
        return self.model.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.conv2.weight.dtype

    def to(self, device: Union[str, torch.device]) -> "WanVAE":
        self.model.to(device)
        self.latent_mean = self.latent_mean.to(device)
        self.latent_inv_std = self.latent_inv_std.to(device)
        return self

    # -- encode ---------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, progress: Optional[ProgressHook] = None, tile: TileSpec = None,
               group=None) -> torch.Tensor:
        """video [B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8], float32.

        The hook gets ("encode", done, total) after each temporal chunk (frame 0, then 4 frames at a time).
        ``group`` (with a ``tile``): a `torch.distributed` group whose ranks, called alike, share the tiles out
        and all return the blended whole (`turbowan.vae_tiling.tile_for_ranks` gives one tile per rank).
        """
        _check_video(video)
        b, _, frames, height, width = video.shape
        grid = (height // SPATIAL_COMPRESSION, width // SPATIAL_COMPRESSION)
        video = video.to(device=self.device, dtype=self.dtype)
        chunks = 1 + (frames - 1) // TEMPORAL_COMPRESSION
        tile = self._resolve_tile(tile, grid)
        done = 0

        def encode_region(region: torch.Tensor) -> torch.Tensor:
            nonlocal done
            region = region.contiguous(memory_format=preferred_layout(region.device))
            encoder = self.model.encoder
            cache: Cache = {}
            latents = []
            repeats_after = _segments_repeat_after(region, chunks, encoder.segment_memory())
            repeated: List[Optional[torch.Tensor]] = [None] * len(repeats_after)
            for i in range(chunks):
                start, length = chunk_frames(i)
                # past the deepest segment whose output repeats; the segments after it run (their caches move on)
                last = max((s for s, out in enumerate(repeated) if out is not None), default=-1)
                x = region[:, :, start : start + length] if last < 0 else repeated[last]
                for s in range(last + 1, len(repeated)):
                    x = encoder.run_segment(s, x, cache)
                    if i == repeats_after[s]:
                        repeated[s] = x
                latents.append(x)
                del x
                done += 1
                report(progress, "encode", done, total)
            mean = self.model.conv1(torch.cat(latents, dim=2))[:, :Z_DIM]
            return (mean - self.latent_mean) * self.latent_inv_std

        if tile is None:
            total = chunks
            latents = encode_region(video)
        else:
            total = chunks * len(_own_tiles(tile_count(grid, tile), group))
            latents = _tiled(encode_region, video, grid, tile, in_scale=SPATIAL_COMPRESSION, out_scale=1,
                             out_lead=(b, Z_DIM, chunks), out_dtype=self.dtype, group=group)
        return latents.float()

    # -- decode ---------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, progress: Optional[ProgressHook] = None, tile: TileSpec = None,
               on_frames: Optional[Callable[[int, torch.Tensor], None]] = None, group=None) -> torch.Tensor:
        """normalised latents [B, 16, T, h, w] -> video [B, 3, 1+4(T-1), 8h, 8w] in the model dtype (not clamped).

        The hook gets ("decode", done, total) after each decoded latent frame (per tile when tiled).
        ``on_frames(start, frames)`` gets each chunk of final frames [B, 3, t, H, W] as soon as it is decoded: per
        latent frame untiled or with at most one tile per rank (a split VAE); with more tiles, the whole video at
        the end (every tile adds to every frame).
        ``group``: the tiles shared out over its ranks, as in `encode`.
        """
        if latents.ndim != 5 or latents.shape[1] != Z_DIM:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; the Wan2.1 VAE decodes [B, {Z_DIM}, T, H, W]")
        b, _, steps, h, w = latents.shape
        z = latents.to(device=self.device, dtype=self.dtype)
        tile = self._resolve_tile(tile, (h, w))
        frame_count = 1 + TEMPORAL_COMPRESSION * (steps - 1)
        done = 0

        def decoded_chunks(z: torch.Tensor):
            """(start, frames [B, 3, t, h*8, w*8]) per latent frame of the region z, in order."""
            nonlocal done
            x = self.model.conv2(z / self.latent_inv_std + self.latent_mean)
            x = x.contiguous(memory_format=preferred_layout(x.device))
            cache: Cache = {}
            for i in range(steps):
                yield chunk_frames(i)[0], self.model.decoder(x[:, :, i : i + 1], cache)
                done += 1
                report(progress, "decode", done, total)

        def decode_region(z: torch.Tensor) -> torch.Tensor:
            zh, zw = z.shape[-2:]
            video = torch.empty(b, 3, frame_count, zh * SPATIAL_COMPRESSION, zw * SPATIAL_COMPRESSION,
                                dtype=self.dtype, device=self.device)
            for start, frames in decoded_chunks(z):
                video[:, :, start : start + frames.shape[2]] = frames
                if on_frames is not None and tile is None:
                    on_frames(start, video[:, :, start : start + frames.shape[2]])
                del frames
            return video

        if tile is None:
            total = steps
            return decode_region(z)
        count = tile_count((h, w), tile)
        total = steps * len(_own_tiles(count, group))
        ranks = dist.get_world_size(group) if group is not None else 1
        if count <= ranks:
            # at most one tile per rank: blend chunk by chunk, so finished frames go out while the rest decodes
            # (whether or not this rank takes them: every rank of a group must make the same all-reduces)
            return self._decode_tile_per_rank(z, tile, group, decoded_chunks, on_frames, frame_count)
        video = _tiled(decode_region, z, (h, w), tile, in_scale=1, out_scale=SPATIAL_COMPRESSION,
                       out_lead=(b, 3, frame_count), out_dtype=self.dtype, group=group)
        if on_frames is not None:
            on_frames(0, video)
        return video

    def _decode_tile_per_rank(self, z, tile, group, decoded_chunks, on_frames, frame_count: int) -> torch.Tensor:
        """`_tiled`'s blend of a decode where each rank has at most one tile, done per latent frame: every rank
        adds its tile's frames of that chunk, the ranks sum the chunk (all-reduce), and the blended frames go to
        ``on_frames`` at once. The same sums in the same order as `_tiled`, so the same video."""
        b, _, steps, h, w = z.shape
        tiles, weight_sum = _tile_plan((h, w), tile, 1, SPATIAL_COMPRESSION, self.device)
        own = [tiles[i] for i in _own_tiles(len(tiles), group)]  # zero or one
        chunks = decoded_chunks(z[own[0][0]]) if own else None
        video = torch.empty(b, 3, frame_count, *weight_sum.shape, dtype=self.dtype, device=self.device)
        for i in range(steps):
            start, length = chunk_frames(i)
            acc = torch.zeros(b, 3, length, *weight_sum.shape, dtype=torch.float32, device=self.device)
            if chunks is not None:
                _, frames = next(chunks)
                acc[own[0][1]].addcmul_(frames, own[0][2])
                del frames
            if group is not None:
                dist.all_reduce(acc, group=group)
            video[:, :, start : start + length] = acc.div_(weight_sum)
            if on_frames is not None:
                on_frames(start, video[:, :, start : start + length])
        if chunks is not None:
            next(chunks, None)  # the last chunk's progress report
        return video

    # -- tiling ---------------------------------------------------------------------------------

    def _resolve_tile(self, tile: TileSpec, grid: Tuple[int, int]) -> Optional[Tuple[int, int]]:
        """None (whole frame) or a (tile_h, tile_w) in latent pixels."""
        if tile is None:
            return None
        if (
            isinstance(tile, (tuple, list))
            and len(tile) == 2
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 2 for t in tile)
        ):
            return (min(tile[0], grid[0]), min(tile[1], grid[1]))
        raise ValueError(f"tile={tile!r} is not understood; use None (no tiling) or (tile_h, tile_w) in latent pixels "
                         "(each >= 2), e.g. from turbowan.vae_tiling.auto_tile")

    def estimate_activations(self, stage: str, region: Tuple[int, int], batch: int = 1) -> int:
        """Estimated peak activation bytes to `stage` ("encode"/"decode") a region of latent pixels."""
        pixels = region[0] * region[1] * SPATIAL_COMPRESSION**2
        per_pixel = ACTIVATION_BYTES_PER_PIXEL[stage] * self.model.cfg.dim / 96  # activations scale with width
        return int(per_pixel * batch * pixels * _dtype_size(self.dtype))

    def memory_needed(self, stage: str, grid: Tuple[int, int], tile: Optional[Tuple[int, int]], batch: int = 1, frames: int = 1) -> int:
        """Estimated peak bytes to process a `grid` of latent pixels in `tile`s (None: whole frame).

        `frames` is the video frame count; decoding also holds the output video and, when tiled,
        a float32 blend accumulator of the same size.
        """
        need = self.estimate_activations(stage, grid if tile is None else tile, batch)
        if stage == "decode":
            video_values = batch * 3 * frames * grid[0] * grid[1] * SPATIAL_COMPRESSION**2
            need += video_values * (_dtype_size(self.dtype) + (0 if tile is None else 4))
        return need


def _dtype_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _check_video(video: torch.Tensor) -> None:
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(f"video has shape {tuple(video.shape)}; the Wan2.1 VAE encodes RGB video [B, 3, F, H, W]")
    frames, height, width = video.shape[2:]
    if frames < 1 or (frames - 1) % TEMPORAL_COMPRESSION:
        lower = 1 + TEMPORAL_COMPRESSION * max(0, (frames - 1) // TEMPORAL_COMPRESSION)
        raise ValueError(
            f"video has {frames} frames; the Wan2.1 VAE needs 1 + 4k frames, so use {lower} or {lower + TEMPORAL_COMPRESSION}"
        )
    if height % SPATIAL_COMPRESSION or width % SPATIAL_COMPRESSION:
        s = SPATIAL_COMPRESSION
        raise ValueError(
            f"video is {height}x{width} pixels; height and width must be multiples of {s}, e.g. crop to {height // s * s}x{width // s * s}"
        )


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------

EXPECTED_FILE = "the Wan2.1 VAE (Wan2.1_VAE.pth or wan_2.1_vae.safetensors, z_dim 16)"

def vae_from_state_dict(
    state_dict: Dict[str, torch.Tensor],
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.bfloat16,
    name: str = "the state dict",
) -> WanVAE:
    """Build a WanVAE from a `Wan2.1_VAE.pth`-layout state dict (also ComfyUI's VAE `first_stage_model.state_dict()`).

    The base width is read from `encoder.conv1.weight` (96 for the release); tensors are cast to `dtype`
    and moved to `device` (default: the CPU, like the other loaders).
    """
    kind, what = identify(strip_prefixes(state_dict))
    conv1, conv2 = state_dict.get("encoder.conv1.weight"), state_dict.get("conv2.weight")
    if kind != "wan21_vae" or conv2 is None or conv2.shape[0] != Z_DIM or conv1 is None or conv1.shape[1] != 3:
        raise ModelFileError(f"{name} looks like {what}; the VAE slot expects {EXPECTED_FILE}")
    cfg = VAEConfig(dim=state_dict["encoder.conv1.weight"].shape[0])
    with torch.device("meta"):
        model = WanVAEModel(cfg)
    wanted = model.state_dict()
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    if missing or unexpected:
        raise ModelFileError(
            f"{name} has a Wan VAE layout but not the Wan2.1 one (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"the VAE slot expects {EXPECTED_FILE}"
        )
    for key, tensor in wanted.items():
        if tuple(state_dict[key].shape) != tuple(tensor.shape):
            raise ModelFileError(f"{name}: '{key}' has shape {tuple(state_dict[key].shape)}, expected "
                                 f"{tuple(tensor.shape)} for {EXPECTED_FILE}")
        if state_dict[key].is_meta:
            raise ModelFileError(f"{name}: '{key}' holds no data (meta tensor); pass a state dict with loaded weights")
    device = torch.device(device if device is not None else "cpu")
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state_dict.items()}, assign=True)
    return WanVAE(model)


def load_vae(path: Union[str, Path], device: Optional[Union[str, torch.device]] = None, dtype: torch.dtype = torch.bfloat16) -> WanVAE:
    """Load `Wan2.1_VAE.pth` (torch zip, weights only) or ComfyUI's `wan_2.1_vae.safetensors` (fp32/fp16/bf16).

    device: where the weights go (default: the CPU, like `load_dit` and `load_text_encoder`).
    """
    path = Path(path)
    state_dict = read_state_dict(path, EXPECTED_FILE)
    return vae_from_state_dict(state_dict, device=device, dtype=dtype, name=path.name)
