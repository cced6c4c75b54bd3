"""Wan DiT: one TurboWan2.2-I2V-A14B expert, or a TurboWan2.1-T2V model (the same blocks, no image input).

Precision follows the reference inference path (thu-ml/TurboDiffusion, bf16 weights on GPU):
  * time embedding, block modulation and the output head run in fp32; the output is fp32;
  * the residual stream, attention and FFN run in the compute dtype (bf16 on GPU, or fp32 for exact CPU checks);
  * LayerNorm / RMSNorm compute in fp32 and cast back; RoPE rotates in fp32.

Shapes at the boundary (patch (1, 2, 2)):
  x [B, 16, T, H, W] noisy latents, y [B, 20, T, H, W] = [mask(4), image latents(16)] (I2V; None for T2V),
  t [B] network timestep (= flow time x 1000, already rounded to the compute dtype by the sampler),
  context [B, 512, 4096] umT5 embedding  ->  velocity [B, 16, T, H, W] float32.
Inside: L = T * H/2 * W/2 tokens of width `dim`, `num_heads` heads of `head_dim`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import DiTConfig
from ..ops.attention import dense_attention, self_attention
from ..ops.int8 import Int8Linear, apply_linear, shared_int8_input
from ..ops.sequence_parallel import SequenceSplit
from ..options import ATTENTION_KINDS, EXECUTION_MODES, QUANT_MODES
from .random_weights import random_parameters


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, dim] as [cos, sin] of t * 10000^(-i/half), computed in float64 like the reference."""
    half = dim // 2
    t = t.double()
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def rope_angles(head_dim: int, T: int, H: int, W: int, device) -> torch.Tensor:
    """3D RoPE angles [T*H*W, head_dim/2] (fp32): the head dim is split t/h/w = d-4(d//6), 2(d//6), 2(d//6)."""
    d_hw = head_dim // 6 * 2
    d_t = head_dim - 2 * d_hw

    def axis(n: int, d: int) -> torch.Tensor:
        inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=device)[: d // 2].float() / d))
        return torch.outer(torch.arange(n, device=device).float(), inv)

    at, ah, aw = axis(T, d_t), axis(H, d_hw), axis(W, d_hw)
    return torch.cat(
        [
            at[:, None, None, :].expand(T, H, W, -1),
            ah[None, :, None, :].expand(T, H, W, -1),
            aw[None, None, :, :].expand(T, H, W, -1),
        ],
        dim=-1,
    ).reshape(T * H * W, -1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, L, H, D] in fp32; cos/sin [L, D/2]."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = torch.stack([x0 * c - x1 * s, x1 * c + x0 * s], dim=-1).flatten(-2)
    return out.to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float, weight=None, bias=None) -> torch.Tensor:
    """LayerNorm computed in fp32 (affine parameters fp32 too), cast back to x's dtype."""
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    return F.layer_norm(x.float(), (x.shape[-1],), w, b, eps).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the full width: (x * rsqrt(mean(x^2) + eps) * w) in fp32, cast back to x's dtype."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class AffineLayerNorm(nn.Module):
    """LayerNorm with fp32 weight and bias (the block's norm3 before cross-attention)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return affine_layer_norm(x, self.weight, self.bias, self.eps)


# -- the block's row-wise operations -------------------------------------------------------------------------
# Each is one Triton pass over a token's row on CUDA (`turbowan.kernels.dit_triton`, same roundings); the PyTorch
# code below is their reference and runs on the CPU and wherever Triton is missing. In eager PyTorch these chains
# of fp32 elementwise passes took a third of a 720p block's time.


def _cuda_kernel(name: str, x: torch.Tensor):
    if not x.is_cuda:
        return None
    from ..kernels import dit_dispatch

    return dit_dispatch(name)


def modulated_norm(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm (no affine, fp32) then ``* (1 + scale) + shift`` in fp32, cast to x's dtype. x [B, L, dim]."""
    fast = _cuda_kernel("layer_norm_rows", x)
    if fast is not None:
        return fast(x, eps, shift=shift, scale=scale)
    return (layer_norm(x, eps).float() * (1 + scale) + shift).to(x.dtype)


def affine_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    fast = _cuda_kernel("layer_norm_rows", x)
    if fast is not None:
        return fast(x, eps, weight=weight, bias=bias)
    return layer_norm(x, eps, weight, bias)


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + y * gate in x's dtype (the gate is fp32 modulation, rounded first as the reference does)."""
    fast = _cuda_kernel("gated_residual_rows", x)
    if fast is not None:
        return fast(x, y, gate)
    return x + y * gate.to(x.dtype)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, cast back to x's dtype (cross-attention's q and k)."""
    fast = _cuda_kernel("rms_norm_rows", x)
    return fast(x, weight, eps) if fast is not None else _rms_norm(x, weight, eps)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, eps: float,
                  heads: int) -> torch.Tensor:
    """RMSNorm over the full width (fp32) then 3D RoPE per head: [B, L, dim] -> [B, L, heads, head_dim]."""
    fast = _cuda_kernel("rms_norm_rope", x)
    if fast is not None:
        return fast(x, weight, cos, sin, eps, heads)
    return apply_rope(_rms_norm(x, weight, eps).unflatten(-1, (heads, -1)), cos, sin)


def make_linear(in_f: int, out_f: int, quant: str | None) -> nn.Module:
    return nn.Linear(in_f, out_f) if quant is None else Int8Linear(in_f, out_f, True, quant)


class SelfAttention(nn.Module):
    def __init__(self, c: DiTConfig, quant: str | None, with_proj_l: bool):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q, self.k, self.v, self.o = (make_linear(c.dim, c.dim, quant) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(c.dim, c.eps), RMSNorm(c.dim, c.eps)
        # SLA's learned projection of the linear-attention branch ([head_dim, head_dim], shared by all heads)
        self.proj_l = nn.Linear(c.head_dim, c.head_dim) if with_proj_l else None
        self.attention = "original"
        self.sla_topk = 0.1

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                sp: SequenceSplit | None = None) -> torch.Tensor:
        B, L, _ = x.shape  # [B, L, dim] (L: this rank's tokens under sequence parallelism)
        shared = shared_int8_input(x, self.q, self.k, self.v)  # W8A8 on CUDA: quantize x once for all three
        # Ulysses (sp): each of q, k, v starts its all-to-all (token split -> head split) as soon as it is made,
        # so the exchange of q and k runs while k and v are computed; then every rank attends over the whole
        # sequence with its share of the heads
        to_heads = (lambda t: t) if sp is None else sp.start_tokens_to_heads
        q = to_heads(rms_norm_rope(apply_linear(self.q, x, shared), self.norm_q.weight, cos, sin, self.norm_q.eps,
                                   self.num_heads))
        k = to_heads(rms_norm_rope(apply_linear(self.k, x, shared), self.norm_k.weight, cos, sin, self.norm_k.eps,
                                   self.num_heads))
        v = to_heads(apply_linear(self.v, x, shared).view(B, L, self.num_heads, self.head_dim))
        del shared
        if sp is not None:
            q, k, v = q(), k(), v()  # wait for the three exchanges
        out = self_attention(q, k, v, self.attention, self.proj_l, self.sla_topk)  # [B, L, H, D]
        if sp is not None:
            out = sp.heads_to_tokens(out)
        return self.o(out.flatten(2))


class CrossAttention(nn.Module):
    """Dense attention from video tokens to the 512 text tokens (no mask: padded rows take part, as in training)."""

    def __init__(self, c: DiTConfig, quant: str | None):
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q, self.k, self.v, self.o = (make_linear(c.dim, c.dim, quant) for _ in range(4))
        self.norm_q, self.norm_k = RMSNorm(c.dim, c.eps), RMSNorm(c.dim, c.eps)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        q = self.norm_q(self.q(x)).view(B, -1, self.num_heads, self.head_dim)
        k = self.norm_k(self.k(context)).view(B, -1, self.num_heads, self.head_dim)
        v = self.v(context).view(B, -1, self.num_heads, self.head_dim)
        return self.o(dense_attention(q, k, v).flatten(2))


class FeedForward(nn.Sequential):
    """Linear -> GELU(tanh) -> Linear; `chunk` tokens at a time bounds the [L, ffn_dim] activation."""

    def __init__(self, c: DiTConfig, quant: str | None):
        super().__init__(make_linear(c.dim, c.ffn_dim, quant), nn.GELU(approximate="tanh"),
                         make_linear(c.ffn_dim, c.dim, quant))
        self.chunk: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.chunk is None or x.shape[1] <= self.chunk:
            return super().forward(x)
        return torch.cat([super(FeedForward, self).forward(part) for part in x.split(self.chunk, dim=1)], dim=1)


class DiTBlock(nn.Module):
    def __init__(self, c: DiTConfig, quant: str | None, with_proj_l: bool):
        super().__init__()
        self.eps = c.eps
        self.modulation = nn.Parameter(torch.zeros(1, 6, c.dim))
        self.self_attn = SelfAttention(c, quant, with_proj_l)
        self.norm3 = AffineLayerNorm(c.dim, c.eps)
        self.cross_attn = CrossAttention(c, quant)
        self.ffn = FeedForward(c, quant)

    def forward(self, x, e0, cos, sin, context, sp: SequenceSplit | None = None):
        # x [B, L, dim] compute dtype; e0 [B, 6, dim] fp32
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e0).chunk(6, dim=1)
        x = gated_residual(x, self.self_attn(modulated_norm(x, shift1, scale1, self.eps), cos, sin, sp), gate1)
        x = x + self.cross_attn(self.norm3(x), context)
        return gated_residual(x, self.ffn(modulated_norm(x, shift2, scale2, self.eps)), gate2)


class Head(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.eps = c.eps
        self.modulation = nn.Parameter(torch.zeros(1, 2, c.dim))
        self.head = nn.Linear(c.dim, math.prod(c.patch_size) * c.out_dim)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)  # fp32 [B, 1, dim]
        h = layer_norm(x, self.eps) * (1 + scale) + shift  # fp32
        return F.linear(h, self.head.weight.float(), self.head.bias.float())


class WanI2VDiT(nn.Module):
    """One Wan2.2 I2V expert, called as ``model(x, t, context, y)``, or a Wan2.1 T2V model (``config.in_dim`` 16,
    `text_to_video`), called as ``model(x, t, context)`` (shapes in the module docstring).

    ``sequence_group=group``, given with the same inputs on every rank of a `torch.distributed` group, splits the
    tokens over the ranks (Ulysses, `turbowan.ops.sequence_parallel`) and returns the whole velocity on every rank.
    """

    def __init__(self, config: DiTConfig, quant: str | None = None, with_proj_l: bool = True):
        super().__init__()
        c = self.config = config
        patch_in = c.in_dim * math.prod(c.patch_size)
        self.patch_embedding = nn.Linear(patch_in, c.dim)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, 6 * c.dim))
        self.blocks = nn.ModuleList(DiTBlock(c, quant, with_proj_l) for _ in range(c.num_layers))
        self.head = Head(c)
        self.dtype = torch.float32  # compute dtype of the residual stream; set by the loader
        self.quant = quant  # how the block linears run: None (float weights), "w8a16" or "w8a8"
        self.source = ""  # file the weights came from (for messages and slot checks)
        self.execution_mode = "auto"  # the loader's choice; see turbowan.placement

    # -- configuration -------------------------------------------------------------------------------------
    def set_attention(self, attention: str, sla_topk: float = 0.1) -> None:
        for block in self.blocks:
            block.self_attn.attention = attention
            block.self_attn.sla_topk = sla_topk

    @property
    def attention(self) -> str:
        return self.blocks[0].self_attn.attention if len(self.blocks) else "original"

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    @property
    def text_to_video(self) -> bool:
        return self.config.text_to_video

    def _time_mlp(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 time embedding e [B, dim] and block modulation input e0 [B, 6, dim]."""
        def lin(layer, x):
            return F.linear(x, layer.weight.float(), layer.bias.float())

        e = lin(self.time_embedding[2], F.silu(lin(self.time_embedding[0], sinusoidal_embedding(self.config.freq_dim, t).float())))
        e0 = lin(self.time_projection[1], F.silu(e)).unflatten(1, (6, self.config.dim))
        return e, e0

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None = None,
                sequence_group=None) -> torch.Tensor:
        c = self.config
        dt = self.dtype
        kt, kh, kw = c.patch_size
        if (y is None) != c.text_to_video:
            raise ValueError("a text-to-video model takes no image conditioning y" if c.text_to_video else
                             "an image-to-video expert needs its image conditioning y [B, 20, T, H, W]")
        xy = x.to(dt) if y is None else torch.cat([x.to(dt), y.to(dt)], dim=1)  # [B, in_dim, T, H, W]
        B, C, T_in, H_in, W_in = xy.shape
        if T_in % kt or H_in % kh or W_in % kw:
            raise ValueError(f"latent size {T_in}x{H_in}x{W_in} is not divisible by the patch size {c.patch_size}")
        T, H, W = T_in // kt, H_in // kh, W_in // kw
        # patchify in (c kt kh kw) order -> [B, L, 36*kt*kh*kw]
        tokens = xy.reshape(B, C, T, kt, H, kh, W, kw).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(B, T * H * W, -1)
        angles = rope_angles(c.head_dim, T, H, W, tokens.device)
        sp = None
        if sequence_group is not None:  # from here to the head each rank works on its own tokens only
            sp = SequenceSplit(T * H * W, c.num_heads, sequence_group)
            tokens, angles = sp.split(tokens), sp.split(angles, dim=0)
        h = self.patch_embedding(tokens)

        e, e0 = self._time_mlp(t.reshape(B, -1)[:, 0])
        ctx = self.text_embedding(context.to(dt))
        cos, sin = torch.cos(angles), torch.sin(angles)
        for block in self.blocks:  # (streamed execution attaches each block's weights in forward hooks)
            h = block(h, e0, cos, sin, ctx, sp)
        out = self.head(h, e)  # [B, L, kt*kh*kw*out] fp32
        if sp is not None:
            out = sp.gather(out)  # every rank gets the whole velocity, so the sampler runs alike everywhere
        # unpatchify in (kt kh kw c) order
        out = out.reshape(B, T, H, W, kt, kh, kw, c.out_dim).permute(0, 7, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, c.out_dim, T * kt, H * kh, W * kw)


# -- loading ------------------------------------------------------------------------------------------------

_FP32_PARAMETERS = (".norm_q.", ".norm_k.", ".norm3.")


def parameter_dtype(name: str, dtype: torch.dtype) -> torch.dtype:
    """Norm parameters stay fp32, as the reference's fused norms keep them; the rest is in the compute dtype."""
    return torch.float32 if any(s in name for s in _FP32_PARAMETERS) else dtype



def load_dit(
    path,
    attention: str = "sla",
    sla_topk: float = 0.1,
    quant: str = "auto",
    device=None,
    dtype: torch.dtype = torch.bfloat16,
    mode: str = "auto",
) -> WanI2VDiT:
    """Load one TurboWan2.2 I2V expert or a TurboWan2.1 T2V model (any size) for inference.

    * ``attention``: ``"sla"`` (default), ``"sagesla"``, ``"sagesla_spargeattn"`` (needs SpargeAttn installed) or
      ``"original"`` (dense; the SLA weights go unused).
    * ``quant``: how int8 weights run: ``"w8a16"`` (dequantize to ``dtype``) or ``"w8a8"`` (int8 activations,
      the reference's numerics). A bf16 file with ``"w8a8"`` is quantized at load with the reference's rule.
      ``"auto"`` (default): ``"w8a8"`` for a ``-quant`` file where our int8 kernel runs (a CUDA GPU of sm80+ with
      Triton, bf16), else ``"w8a16"``; a bf16 file stays bf16. ``model.quant`` says what was chosen.
    * ``device``: where the weights go; ``None`` keeps them on the CPU, to be placed on the GPU by the pipeline
      one expert at a time.
    * ``dtype``: compute dtype (bf16 like the reference; float32 for exact CPU checks).
    * ``mode``: execution mode on CUDA: ``"auto"``, ``"resident"``, ``"swap"`` or ``"stream"`` (see
      `turbowan.placement`).
    """
    from ..checkpoint import ModelFileError, read_dit_checkpoint

    if attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {attention!r}")
    if attention == "sagesla_spargeattn":
        from ..ops.spargeattn import SPARGEATTN_MISSING, spargeattn_dispatch

        if spargeattn_dispatch() is None:
            raise ValueError(SPARGEATTN_MISSING)
    if quant not in QUANT_MODES:
        raise ValueError(f"quant must be one of {QUANT_MODES}, got {quant!r}")
    if mode not in EXECUTION_MODES:
        raise ValueError(f"mode must be one of {EXECUTION_MODES}, got {mode!r}")
    if not 0.0 < sla_topk <= 1.0:
        raise ValueError(f"sla_topk must be in (0, 1], got {sla_topk}")
    ckpt = read_dit_checkpoint(path)
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    if attention != "original" and not ckpt.has_sla:
        raise ModelFileError(
            f"{name} has no SLA weights (proj_l), so it is not a TurboWan checkpoint for attention_type "
            f"{attention!r}; use the TurboWan files, or attention_type 'original'"
        )
    if quant == "auto":
        quant = "w8a8" if ckpt.quantized and dtype == torch.bfloat16 and w8a8_kernel_runs() else "w8a16"
    with_proj_l = attention != "original"
    with torch.device("meta"):
        model = WanI2VDiT(ckpt.config, quant if ckpt.quantized else None, with_proj_l)

    sd = {}
    for k, v in ckpt.state_dict.items():
        if ".proj_l." in k and not with_proj_l:
            continue  # dense attention does not use SLA's projection
        sd[k] = v if v.dtype == torch.int8 or k.endswith(".scale") else v.to(parameter_dtype(k, dtype))
    for k, want in model.state_dict().items():  # a damaged file can hold tensors of the wrong shape or kind
        have = sd[k]
        if have.shape != want.shape or (have.dtype == torch.int8) != (want.dtype == torch.int8):
            raise ModelFileError(f"{name}: tensor {k!r} is {have.dtype} {tuple(have.shape)}, expected {want.dtype} "
                                 f"{tuple(want.shape)}; the file is damaged or not a TurboWan model, download "
                                 "it again")
    model.load_state_dict(sd, strict=True, assign=True)
    if quant == "w8a8" and not ckpt.quantized:  # bf16 file run as w8a8: quantize the block linears now
        _quantize_block_linears(model, quant)
        model.quant = quant
    model.dtype = dtype
    model.source = str(path)
    model.execution_mode = mode
    model.set_attention(attention, sla_topk)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model


def w8a8_kernel_runs() -> bool:
    """Our fused W8A8 kernel runs on this machine's default GPU (it falls back with a one-line notice otherwise)."""
    if not torch.cuda.is_available():
        return False
    from ..kernels import int8_dispatch

    return int8_dispatch() is not None


def _quantize_block_linears(model: WanI2VDiT, quant: str) -> None:
    for block in model.blocks:
        for parent in (block.self_attn, block.cross_attn):
            for name in ("q", "k", "v", "o"):
                lin = getattr(parent, name)
                setattr(parent, name, Int8Linear.from_weight(lin.weight.data, lin.bias.data, quant))
        for idx in (0, 2):
            lin = block.ffn[idx]
            block.ffn[idx] = Int8Linear.from_weight(lin.weight.data, lin.bias.data, quant)


def random_dit(
    config: DiTConfig,
    *,
    dtype: torch.dtype = torch.bfloat16,
    quant: str | None = None,
    attention: str = "sla",
    sla_topk: float = 0.1,
    device="cpu",
    seed: int = 0,
) -> WanI2VDiT:
    """An expert with seeded random weights (`turbowan.models.random_weights`) for the demo, benchmarks and tests.

    ``quant`` quantizes the block linears as a bf16 file run int8 is quantized at load (``None``: float weights).
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.device("meta"):
        model = WanI2VDiT(config, None, with_proj_l=attention != "original")
    model.load_state_dict(random_parameters(model, generator, lambda name: parameter_dtype(name, dtype)),
                          strict=True, assign=True)
    if quant is not None:
        _quantize_block_linears(model, quant)
        model.quant = quant
    model.dtype = dtype
    model.source = f"random(seed={seed})"
    model.set_attention(attention, sla_topk)
    return model.eval().requires_grad_(False)
