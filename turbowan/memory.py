"""How much GPU memory a run needs: the one memory model behind ``auto`` mode, the nodes and ``turbowan doctor``.

Two views of the same model:

* at run time, in bytes, from the loaded experts' sizes and the DiT's widths: `activation_bytes` and
  `choose_mode` (what ``auto`` picks in `turbowan.placement`; what the nodes ask ComfyUI to free);
* before anything is loaded, in GB, from measured anchors: `estimate_peak_gb` (``turbowan doctor``'s table).

Both keep the same slack on top of the estimate (`ALLOCATOR_FACTOR`).
"""

from __future__ import annotations

from typing import Optional

from .options import EXECUTION_MODES, latent_tokens

GB = 1e9
ALLOCATOR_FACTOR = 1.10  # reserved / allocated seen in practice: what a run needs free on top of its estimate
FFN_CHUNK_TOKENS = 16384  # tokens per FFN pass when memory is tight (bounds its [L, ffn_dim] activation)


# -- at run time (bytes) ------------------------------------------------------------------------------------------


def activation_bytes(tokens: int, dim: int, ffn_dim: int, ffn_chunk: Optional[int], ranks: int = 1) -> int:
    """Rough peak of one block's activations in bf16 (residual, normed input, q/k/v, fp32 temporaries, FFN).

    ``ranks``: sequence parallelism over that many ranks, each holding ``ceil(tokens / ranks)`` tokens. Its
    self-attention sees every token but only ``heads / ranks`` of the heads, the same number of values, so a
    rank's share is the whole estimate at its token count (the all-to-all buffers are among the temporaries)."""
    tokens = -(-tokens // ranks)
    width = 2 * tokens * dim  # one bf16 [L, dim] tensor
    ffn_rows = tokens if ffn_chunk is None else min(tokens, ffn_chunk)
    return 10 * width + 2 * 2 * ffn_rows * ffn_dim


def choose_mode(free_bytes: int, expert_bytes: int, other_expert_bytes: int, act_bytes: int) -> str:
    """auto: resident if both experts and the activations fit, else swap if one does, else stream."""
    if (expert_bytes + other_expert_bytes + act_bytes) * ALLOCATOR_FACTOR < free_bytes:
        return "resident"
    if (expert_bytes + act_bytes) * ALLOCATOR_FACTOR < free_bytes:
        return "swap"
    return "stream"


# -- CPU runs (bytes) ------------------------------------------------------------------------------------------------


def cpu_run_bytes(frames: int, width: int, height: int, samples: int, dim: int, ffn_dim: int) -> int:
    """Rough peak host memory of a float32 CPU run besides the weights: the VAE's pixel input [3, F, H, W] and
    one decoded video plus its RGB copy, the latents, and a DiT block's activations (float32: twice the bf16)."""
    pixels = 3 * frames * width * height * 4
    tokens = samples * latent_tokens(frames, width, height)
    return 3 * pixels + 2 * activation_bytes(tokens, dim, ffn_dim, FFN_CHUNK_TOKENS)


def available_ram_bytes() -> Optional[int]:
    """Memory the system can give this process now (Linux MemAvailable); None where it cannot be read."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# -- before loading (GB, from measured anchors) --------------------------------------------------------------------
# Measured on one H200 for this project (shared/notes/gpu-anchors.md): the reference TurboDiffusion's one-step
# peak at 720p, 81 frames (75,600 tokens) with a bf16 expert resident is 36.2 GB; the bf16 expert is 28.6 GB,
# so 7.6 GB are activations (about 100 KB per token). At 480p (32,760 tokens) it peaks at 30.8 GB, i.e. 2.2 GB
# of activations, so the per-token figure is on the safe side below 720p.
REF_PEAK_720P_GB = 36.2
BF16_EXPERT_GB = 28.6
INT8_EXPERT_GB = 14.5
TOKENS_720P_81F = latent_tokens(81, 1280, 720)  # 75,600
TOKENS_480P_81F = latent_tokens(81, 832, 480)  # 32,760
ACTIVATION_GB_PER_TOKEN = (REF_PEAK_720P_GB - BF16_EXPERT_GB) / TOKENS_720P_81F
# Our stream mode's peaks (allocated) at 81 frames with the released int8 experts run W8A8: measured on an H200
# on 2026-11-27 by `python bench/e2e.py --res 720p 480p --modes resident stream --weights int8-w8a8`
# (bench/RESULTS.md, bench/logs/e2e_int8_w8a8_h200.log).
STREAM_PEAK_720P_GB = 7.28
STREAM_PEAK_480P_GB = 4.09
# The reference decodes 720p untiled at a 10.6 GB peak; our VAE tiles to fit, and is assumed to need about this:
VAE_TILED_GB = 2.0
CONTEXT_SLACK_GB = 0.5  # CUDA context and allocator slack on top of the allocated peak

PLACED_MODES = tuple(m for m in EXECUTION_MODES if m != "auto")  # what ``auto`` resolves to


def estimate_peak_gb(mode: str, width: int, height: int, frames: int, expert_gb: float = INT8_EXPERT_GB) -> float:
    """Estimated peak GPU memory (GB allocated) of one ``turbowan generate`` run. An ESTIMATE, not a measurement.

        peak     = max(sampling, VAE)
        sampling = resident: both experts + activations; swap: one expert + activations, where
                   activations = tokens x (36.2 - 28.6) GB / 75,600 tokens   (the reference's measured 720p step;
                   it over-estimates 480p by about 1 GB, and our chunked FFN only lowers it);
                   stream: the straight line in tokens through our measured stream peaks at 480p and 720p
        VAE      = about 2 GB: encode and decode run after/before the experts leave the GPU, tiled to fit

    ``expert_gb`` is one expert's size (14.5 int8, 28.6 bf16). The text encoder is not counted: it runs before
    the experts load, on the GPU only when it fits there.
    """
    if mode not in PLACED_MODES:
        raise ValueError(f"mode must be one of {PLACED_MODES}, got {mode!r}")
    tokens = latent_tokens(frames, width, height)
    if mode == "stream":
        slope = (STREAM_PEAK_720P_GB - STREAM_PEAK_480P_GB) / (TOKENS_720P_81F - TOKENS_480P_81F)
        return max(VAE_TILED_GB, STREAM_PEAK_480P_GB + slope * (tokens - TOKENS_480P_81F))
    experts = 2 if mode == "resident" else 1
    return max(experts * expert_gb + ACTIVATION_GB_PER_TOKEN * tokens, VAE_TILED_GB)


def needed_free_gb(peak_gb: float) -> float:
    """Free memory a run with this allocated peak needs: allocator slack and the CUDA context on top."""
    return ALLOCATOR_FACTOR * peak_gb + CONTEXT_SLACK_GB
