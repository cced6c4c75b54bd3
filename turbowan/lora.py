"""LoRA for TurboWan experts: `apply_lora(model, path, strength)` returns a new expert with the LoRA applied.

Key layouts read (all met for Wan2.2 A14B), each mapped onto our module names (`turbowan.models.dit`):

* ComfyUI / Wan native: ``diffusion_model.blocks.0.self_attn.q.lora_up.weight`` / ``.lora_down.weight`` (or
  ``.lora_B`` / ``.lora_A``), optional ``.alpha``;
* kohya / musubi-tuner: ``lora_unet_blocks_0_self_attn_q.lora_up.weight``, ``.alpha``;
* diffusers / PEFT: ``transformer.blocks.0.attn1.to_q.lora_A.weight`` (``attn2`` cross-attention, ``to_out.0``,
  ``ffn.net.0.proj``, ``ffn.net.2``, ``condition_embedder.*``, ``proj_out``);
* full and bias deltas: ``<layer>.diff`` / ``<layer>.diff_b`` (some trainers, the lightx2v LoRAs).

A low-rank pair adds ``strength * (alpha / rank) * up @ down`` (``alpha / rank`` = 1 without alpha); a diff adds
``strength * diff``. Float weights are merged in float32 and rounded once to their dtype. int8 ``-quant`` block
linears either get the merged weight re-quantized with the reference's 128x128 tile rule (``int8_merge=
"requantize"``, the default: no extra work per step) or keep the int8 weight and run the low-rank product as a
separate branch (``"branch"``: no re-quantization error, two thin matmuls more per layer; `Int8LoraLinear`).

Only the touched tensors are new: the returned expert is a new module tree whose untouched parameters and
buffers are the original's tensors (same storage), so the original stays usable and unchanged.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from .checkpoint import ModelFile, ModelFileError, describe, strip_prefixes
from .ops.int8 import Int8Linear, Int8LoraLinear, dequantize_int8_blockwise, quantize_int8_blockwise

log = logging.getLogger("turbowan")

INT8_MERGES = ("requantize", "branch")

# key suffix -> part of a LoRA entry
_PARTS = ((".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_B.weight", "up"),
          (".lora_A.weight", "down"), (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
          (".lora.up.weight", "up"), (".lora.down.weight", "down"), (".alpha", "alpha"), (".diff_b", "diff_b"),
          (".diff", "diff"))
# wrapper prefixes of the layouts above (stripped repeatedly: PEFT nests them)
_PREFIXES = ("base_model.model.", "model.diffusion_model.", "diffusion_model.", "transformer.", "lora_unet_",
             "lora_transformer_", "unet.")
# our name -> diffusers' name (block layers by their suffix inside a block)
_DIFFUSERS_BLOCK = {"self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
                    "self_attn.o": "attn1.to_out.0", "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k",
                    "cross_attn.v": "attn2.to_v", "cross_attn.o": "attn2.to_out.0", "ffn.0": "ffn.net.0.proj",
                    "ffn.2": "ffn.net.2"}
_DIFFUSERS_TOP = {"text_embedding.0": "condition_embedder.text_embedder.linear_1",
                  "text_embedding.2": "condition_embedder.text_embedder.linear_2",
                  "time_embedding.0": "condition_embedder.time_embedder.linear_1",
                  "time_embedding.2": "condition_embedder.time_embedder.linear_2",
                  "time_projection.1": "condition_embedder.time_proj", "head.head": "proj_out"}
# what a LoRA for another model family is recognised by, for the refusal
_OTHER_MODELS = ((r"double_blocks|single_blocks|single_transformer_blocks", "a Flux LoRA"),
                 (r"joint_blocks", "a Stable Diffusion 3 LoRA"),
                 (r"input_blocks|output_blocks|down_blocks|up_blocks|mid_block|lora_te\d?_", "a Stable Diffusion "
                  "(UNet) LoRA"))


# -- key layouts (pure functions of names and shapes) ----------------------------------------------------------

def group_lora_keys(names) -> dict[str, dict[str, str]]:
    """LoRA tensor names -> {layer name as written, prefixes stripped: {part: tensor name}}; other names dropped.

    Parts: "up", "down", "alpha", "diff", "diff_b".
    """
    groups: dict[str, dict[str, str]] = {}
    for name in names:
        for suffix, part in _PARTS:
            if name.endswith(suffix):
                groups.setdefault(_strip(name[: -len(suffix)]), {})[part] = name
                break
    return groups


def _strip(layer: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for p in _PREFIXES:
            if layer.startswith(p):
                layer, stripped = layer[len(p):], True
    return layer


def _diffusers_name(ours: str) -> str | None:
    m = re.fullmatch(r"(blocks\.\d+)\.(.+)", ours)
    if m:
        inner = _DIFFUSERS_BLOCK.get(m.group(2))
        return inner and f"{m.group(1)}.{inner}"
    return _DIFFUSERS_TOP.get(ours)


def layer_aliases(ours_names) -> dict[str, str]:
    """Every spelling of our module / parameter names a LoRA may use (ours and diffusers', dotted and kohya's
    underscored) -> our name."""
    table = {}
    for ours in ours_names:
        for alias in (ours, _diffusers_name(ours)):
            if alias:
                table[alias] = table[alias.replace(".", "_")] = ours
    return table


def looks_like(layer_names) -> str:
    """A phrase naming what a LoRA that fits no layer of a Wan2.2 expert was made for."""
    joined = "\n".join(layer_names)
    for pattern, what in _OTHER_MODELS:
        if re.search(pattern, joined):
            return what
    example = next(iter(layer_names), "?")
    return f"a LoRA for another model (layers named like {example!r})"


# -- applying ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraReport:
    """What one `apply_lora` did: ``matched`` of the file's ``total`` layers applied; ``unmatched`` names a few."""

    name: str
    strength: float
    matched: int
    total: int
    unmatched: tuple[str, ...]


def apply_lora(model: nn.Module, path: str | os.PathLike, strength: float = 1.0, int8_merge: str = "requantize"):
    """A new expert: ``model`` with the LoRA file at ``path`` applied at ``strength``; ``model`` is not changed.

    Untouched tensors are shared with ``model`` (no second copy of the expert). ``int8_merge`` chooses how int8
    block linears take the LoRA: ``"requantize"`` (merge, then re-quantize the tiles) or ``"branch"`` (a separate
    low-rank branch in the forward). The result's ``loras`` attribute lists a `LoraReport` per LoRA applied so far.
    A file that fits none of the expert's layers raises `ModelFileError`; one that fits some applies those and
    logs how many.
    """
    if int8_merge not in INT8_MERGES:
        raise ValueError(f"int8_merge must be one of {INT8_MERGES}, got {int8_merge!r}")
    if not math.isfinite(strength):
        raise ValueError(f"the LoRA strength must be a finite number, got {strength}")
    name = Path(path).name
    lora = ModelFile(path, "a LoRA for Wan2.2 I2V A14B (.safetensors)")
    groups = group_lora_keys(lora.names)
    if not groups:
        raise ModelFileError(f"{name} holds no LoRA weights (lora_up/lora_down, lora_A/lora_B or .diff); it looks "
                             f"like {describe(strip_prefixes(lora.meta()))}, not a LoRA")

    from .placement import release

    release(model)  # a model kept on the GPU after a run: share its host copies, not the GPU ones
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, Int8Linear))}
    # a diff may also touch a norm's weight ("blocks.0.norm3.diff") or a bare parameter ("head.modulation.diff")
    aliases = layer_aliases([*layers, *(n[: -len(".weight")] for n in tensors if n.endswith(".weight")), *tensors])
    deltas, misfits, unknown = {}, [], []
    for layer, parts in groups.items():
        ours = aliases.get(layer)
        if ours is None:
            unknown.append(layer)
            continue
        try:
            deltas[ours] = _deltas(lora, parts, layers.get(ours), ours, tensors, strength)
        except _Misfit as exc:
            misfits.append(str(exc))
    if not deltas:
        what = f"a LoRA for a Wan model of another size ({misfits[0]})" if misfits else looks_like(unknown)
        raise ModelFileError(f"{name} looks like {what}: it fits none of this Wan2.2 A14B expert's layers")

    new = share_tensors(model)
    for ours, delta in deltas.items():
        _merge(new, ours, delta, int8_merge)
    unmatched = tuple(unknown + misfits)
    report = LoraReport(name, float(strength), len(deltas), len(groups), unmatched[:5])
    new.loras = (*getattr(model, "loras", ()), report)
    if unmatched:
        log.warning("turbowan: LoRA %s: applied %d of its %d layers; %d fit no layer of this expert (e.g. %s)",
                    name, len(deltas), len(groups), len(unmatched), unmatched[0])
    else:
        log.info("turbowan: LoRA %s: applied to %d layers at strength %g", name, len(deltas), strength)
    return new


class _Misfit(Exception):
    """A LoRA layer whose name is one of ours but whose shape is not."""


def _deltas(lora: ModelFile, parts: dict[str, str], layer, ours: str, tensors, strength: float) -> dict:
    """{"weight": low-rank (down [r, K], up [N, r], scale [r] fp32) or a full fp32 delta, "bias": fp32 delta}."""
    if layer is not None:
        out_f, in_f = layer.out_features, layer.in_features
    else:  # a plain parameter (a norm's weight, a modulation): only diffs can touch it
        shape = (tensors[ours] if ours in tensors else tensors[ours + ".weight"]).shape
        out_f, in_f = shape[0], math.prod(shape[1:])
    out = {}
    if "up" in parts and "down" in parts:
        up, down = lora.tensor(parts["up"]).float(), lora.tensor(parts["down"]).float()
        up, down = up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)  # conv-style [.., 1, 1, 1] too
        rank = down.shape[0]
        if up.shape != (out_f, rank) or down.shape[1] != in_f:
            raise _Misfit(f"its {ours} maps {down.shape[1]} to {up.shape[0]} features, this expert's {in_f} to "
                          f"{out_f}")
        alpha = float(lora.tensor(parts["alpha"])) / rank if "alpha" in parts else 1.0
        out["weight"] = (down, up, torch.full((rank,), alpha * strength))
    elif "diff" in parts:
        diff = lora.tensor(parts["diff"]).float()
        if diff.numel() != out_f * in_f:
            raise _Misfit(f"its {ours} delta has {diff.numel()} values, this expert's weight {out_f * in_f}")
        out["weight"] = diff.reshape(out_f, in_f) * strength
    if "diff_b" in parts:
        diff_b = lora.tensor(parts["diff_b"]).float().flatten()
        if diff_b.numel() != out_f:
            raise _Misfit(f"its {ours} bias delta has {diff_b.numel()} values, this expert's {out_f}")
        out["bias"] = diff_b * strength
    if not out:
        raise _Misfit(f"its {ours} has only {', '.join(parts)} (no up/down pair or diff)")
    return out


def _merge(model: nn.Module, ours: str, delta: dict, int8_merge: str) -> None:
    """Replaces the touched tensors of layer / parameter ``ours`` in ``model`` (a `share_tensors` copy)."""
    if ours in dict(model.named_parameters()) | dict(model.named_buffers()):  # a bare parameter (modulation)
        owner, attr = _owner(model, ours)
        _replace(owner, attr, _add(getattr(owner, attr), _full(delta["weight"])))
        return
    module = model.get_submodule(ours)
    if "bias" in delta:
        _replace(module, "bias", _add(module.bias, delta["bias"]))
    weight = delta.get("weight")
    if weight is None:
        return
    if not isinstance(module, Int8Linear):
        _replace(module, "weight", _add(module.weight, _full(weight)))
    elif int8_merge == "requantize" or not isinstance(weight, tuple):
        base = dequantize_int8_blockwise(module.int8_weight, module.scale, torch.float32)
        merged = base + _full(weight).to(base.device)
        q, s = quantize_int8_blockwise(merged)
        _replace(module, "int8_weight", q)
        _replace(module, "scale", s)
    else:
        _add_branch(model, ours, module, weight)


def _full(weight) -> torch.Tensor:
    """A weight delta as one fp32 [N, K] matrix: up @ diag(scale) @ down for a low-rank pair."""
    if not isinstance(weight, tuple):
        return weight
    down, up, scale = weight
    return (up * scale) @ down


def _add(t: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """t + delta in float32, rounded once to t's dtype."""
    return (t.float() + delta.reshape(t.shape).to(t.device)).to(t.dtype)


def _add_branch(model: nn.Module, ours: str, layer: Int8Linear, weight: tuple) -> None:
    down, up, scale = weight
    dtype = getattr(model, "dtype", torch.bfloat16)  # the branch runs in the compute dtype
    device = layer.int8_weight.device
    down, up, scale = down.to(device, dtype), up.to(device, dtype), scale.to(device)
    if isinstance(layer, Int8LoraLinear):  # a LoRA branch already there: one longer branch (ranks concatenated)
        down, up = torch.cat([layer.lora_down, down]), torch.cat([layer.lora_up, up], dim=1)
        scale = torch.cat([layer.lora_scale, scale])
    parent, attr = _owner(model, ours)
    parent.register_module(attr, Int8LoraLinear.wrapping(layer, down, up, scale))


def _owner(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    parent, _, attr = dotted.rpartition(".")
    return (model.get_submodule(parent) if parent else model), attr


def _replace(module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        module._buffers[attr] = value


def share_tensors(module: nn.Module) -> nn.Module:
    """A new module tree like ``module`` whose parameters and buffers are new tensor objects over the same storage.

    New objects, not the same ones: placement swaps a tensor's ``.data`` to attach GPU copies, which must not move
    the other model's weights. Hooks (block streaming) and placement's cached host views are not carried over.
    """
    new = copy.copy(module)  # a new __dict__ holding the same values; the containers are replaced below
    for key, value in module.__dict__.items():
        if "hooks" in key and isinstance(value, dict):
            new.__dict__[key] = type(value)()
    new.__dict__.pop("_turbowan_host", None)
    new._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    new._parameters = {k: None if p is None else nn.Parameter(p.data, requires_grad=p.requires_grad)
                       for k, p in module._parameters.items()}
    new._buffers = {k: None if b is None else b.detach() for k, b in module._buffers.items()}
    new._modules = {k: None if m is None else share_tensors(m) for k, m in module._modules.items()}
    return new
