"""Seeded random weights at the scale real ones have: the tiny demo models, benchmarks and tests.

Not a model that makes videos: with these weights the pipeline runs end to end and every activation stays
finite through any depth, which is all the demo, the benchmarks (timing and memory at the real sizes) and the
placement tests need.
"""

from __future__ import annotations

import math
from typing import Callable

import torch


@torch.no_grad()
def random_parameters(module: torch.nn.Module, generator: torch.Generator,
                      dtype_of: Callable[[str], torch.dtype], device=None) -> dict[str, torch.Tensor]:
    """A value for every parameter of ``module`` (which may live on the meta device), for
    ``module.load_state_dict(..., assign=True)``: zero biases, unit-gain norms, the Wan modulation tables
    ~ N(0, 1/dim) as Wan initialises them, matrices and convolution kernels ~ N(0, 1/fan_in) (activations keep
    their size layer to layer). ``dtype_of(name)`` gives each tensor's dtype; drawn on ``generator``'s device."""
    device = generator.device if device is None else device
    out = {}
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if "modulation" in leaf:
            v = torch.randn(p.shape, generator=generator, device=device) / math.sqrt(p.shape[-1])
        elif leaf == "bias":
            v = torch.zeros(p.shape, device=device)
        elif leaf == "gamma" or "norm" in name:
            v = torch.ones(p.shape, device=device)
        elif p.ndim < 2:
            v = torch.zeros(p.shape, device=device)
        else:
            v = torch.randn(p.shape, generator=generator, device=device) / math.sqrt(p[0].numel())
        out[name] = v.to(dtype_of(name))
    return out
