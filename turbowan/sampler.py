"""rCM sampling with two experts (high-noise, then low-noise), as TurboDiffusion's Wan2.2 I2V script does it,
or with one text-to-video model (its Wan2.1 T2V script: the same loop, ``boundary=None``, no image input).

Flow times: TrigFlow angles ``[atan(sigma_max), 1.5, 1.4, 1.0][:num_steps]`` then 0, mapped to rectified-flow
time ``t = sin(a) / (sin(a) + cos(a))``. The state starts at ``x = t0 * noise`` and is kept in float64.
Per step the network sees ``x`` and the timestep ``1000 * t`` in its compute dtype (bf16 rounds 995.02 to 996)
and predicts a velocity ``v``:
  * SDE (default): ``x = (1 - t_next) * (x - t * v) + t_next * fresh_noise``
  * ODE:           ``x = x - (t - t_next) * v``
The low-noise expert takes over, for good, at the first step whose ``t`` is below ``boundary`` (0.9): with 4
steps the experts run high, high, low, low. Note that ``boundary`` is a threshold on the flow time, not a
fraction of the steps.

Noise draw order (one seeded CPU ``torch.Generator``, so a seed gives the same video on every device):
  1. one ``randn([num_samples, 16, T, H, W], float32)`` for the initial noise;
  2. SDE only: after each network call, one ``randn(x.shape, float32)`` for that step (also on the last step).
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Sequence

import torch

from .progress import ProgressHook, report

MID_ANGLES = (1.5, 1.4, 1.0)


class NonFiniteError(ValueError):
    """A stage produced NaN or Inf values: an error, never an all-black video."""


def finite_flag(t: torch.Tensor) -> torch.Tensor:
    """A 0-dim bool on ``t``'s device, True when every value is finite. One reduction (a float64 sum cannot
    overflow for finite bf16/fp16/fp32 values; a NaN or Inf anywhere makes it non-finite); no host sync yet."""
    return torch.isfinite(t.sum(dtype=torch.float64))


def require_finite(flag: torch.Tensor, stage: str, cause: str) -> None:
    """Raise one sentence naming the ``stage`` that went non-finite and its likely ``cause`` (reads ``flag``)."""
    if not bool(flag):
        raise NonFiniteError(f"{stage} went non-finite (NaN or Inf); likely cause: {cause}")


def rcm_timesteps(num_steps: int, sigma_max: float = 200.0) -> torch.Tensor:
    """Flow times for ``num_steps`` (1-4) rCM steps, float64, ending with 0: ``num_steps + 1`` values."""
    if not 1 <= num_steps <= 4:
        raise ValueError(f"num_steps must be between 1 and 4 (the models were distilled for 4), got {num_steps}")
    if not (math.isfinite(sigma_max) and sigma_max > 0):  # NaN would pass a `<= 0` test
        raise ValueError(f"sigma_max must be a finite positive number (200 for image-to-video, 80 for text-to-video), got {sigma_max}")
    angles = torch.tensor([math.atan(sigma_max), *MID_ANGLES[: num_steps - 1], 0.0], dtype=torch.float64)
    return torch.sin(angles) / (torch.cos(angles) + torch.sin(angles))


def expert_schedule(t_steps: torch.Tensor, boundary: float) -> list[str]:
    """Which expert runs each step: 'high' until the first t below ``boundary``, then 'low' for good."""
    out, switched = [], False
    for t in t_steps[:-1].tolist():
        switched = switched or t < boundary
        out.append("low" if switched else "high")
    return out


def initial_noise(shape: Sequence[int], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32, generator=generator)


# called as select(name) before the steps of an expert run; returns the callable network on the right device
ExpertSelector = Callable[[str], Callable[..., torch.Tensor]]


def sample_rcm(
    select_expert: ExpertSelector,
    noise: torch.Tensor,
    context: torch.Tensor,
    y: Optional[torch.Tensor],
    *,
    num_steps: int = 4,
    sigma_max: float = 200.0,
    boundary: Optional[float] = 0.9,
    ode: bool = False,
    generator: Optional[torch.Generator] = None,
    dtype: torch.dtype = torch.bfloat16,
    device=None,
    progress: Optional[ProgressHook] = None,
) -> torch.Tensor:
    """Run the rCM loop and return the final latents (float32, on ``device``).

    ``noise`` [B, 16, T, H, W] float32 (drawn on the CPU), ``context`` [B, 512, 4096], ``y`` [B, 20, T, H, W]
    (None for a text-to-video model). ``generator`` supplies the SDE noise (the same CPU generator that drew
    ``noise``). ``boundary=None``: one model runs every step (``select_expert("model")``). A network with a
    ``device`` other than the state's (one expert per card) gets the state moved there at the switch.
    """
    if not ode and generator is None:
        raise ValueError("SDE sampling needs the seeded generator that drew the initial noise")
    device = torch.device(device) if device is not None else noise.device
    t_steps = rcm_timesteps(num_steps, sigma_max)
    experts = expert_schedule(t_steps, boundary) if boundary is not None else ["model"] * num_steps
    x = noise.to(device=device, dtype=torch.float64) * t_steps[0].item()
    context = context.to(device=device, dtype=dtype)
    if y is not None:
        y = y.to(device=device, dtype=dtype)
    ones = torch.ones(x.shape[0], 1, dtype=torch.float64, device=device)
    net, current = None, None
    pending = None  # (step, finite flag) of the last step's latents, read once the next network call is queued
    for i in range(num_steps):
        t_cur, t_next = t_steps[i].item(), t_steps[i + 1].item()
        if experts[i] != current:
            current = experts[i]
            net = select_expert(current)
            here = getattr(net, "device", x.device)
            if here != x.device:  # the latents follow the expert to its card
                x, context, ones = x.to(here), context.to(here), ones.to(here)
                y = None if y is None else y.to(here)
        timestep = (torch.tensor(t_cur, dtype=torch.float64).float().item() * ones * 1000).to(dtype)
        # the expert's card is the current device while it runs: cuBLAS handles and Triton launches follow it
        with torch.no_grad(), (torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()):
            v = net(x.to(dtype), timestep, context, y).to(torch.float64)
        _check_step(pending, experts, num_steps)  # the GPU works on this step meanwhile: no bubble
        if ode:
            x = x - (t_cur - t_next) * v
        else:
            eps = torch.randn(*x.shape, dtype=torch.float32, generator=generator).to(x.device)
            x = (1 - t_next) * (x - t_cur * v) + t_next * eps
        pending = (i, finite_flag(x))
        report(progress, "sample", i + 1, num_steps)
    _check_step(pending, experts, num_steps)
    return x.float().to(device)


def _check_step(pending, experts: list[str], num_steps: int) -> None:
    if pending is not None:
        i, flag = pending
        which = "the model" if experts[i] == "model" else f"{experts[i]}-noise expert"
        require_finite(flag, f"sampling at step {i + 1} of {num_steps} ({which})",
                       "a broken model checkpoint, fp16 overflow (load the models in bf16 or float32), or a "
                       "non-finite text embedding or image latent")
