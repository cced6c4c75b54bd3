"""``turbowan doctor``: what will work on this machine, checked rather than guessed.

Sections of the report:

* machine: GPU(s) with free memory, host RAM, and the versions of torch, CUDA, cuDNN, Triton and PyAV;
* kernels: every attention backend and int8 path is run on a tiny input and compared with the PyTorch path
  (dense SDPA backends against an fp32 softmax; our Triton SLA / SageSLA against `turbowan.ops.sla`; the Triton
  W8A8 layer against the exact emulation in `turbowan.ops.int8`); SpargeAttn is only checked for import (its compiled modules);
* model files: what is found in a ComfyUI models folder and whether each file is the right kind for its slot,
  reading only the .safetensors header or a memory-mapped .pth (seconds, even for 14 GB files);
* memory: per execution mode, the longest clip at 720p and 480p that should fit the free GPU memory, from
  `turbowan.memory.estimate_peak_gb` (an estimate from measured anchors, not a measurement), with the command to run.

Exit code 0 when nothing failed, 1 when a kernel disagrees with the PyTorch path, a file is in the wrong slot or the
models folder holds no model file; 2 (before any check) when the models folder does not exist.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import math
import platform
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from .memory import (ALLOCATOR_FACTOR, CONTEXT_SLACK_GB, GB, INT8_EXPERT_GB, PLACED_MODES, estimate_peak_gb,
                     needed_free_gb)
from .options import RESOLUTIONS, TEXT_WIDTH
from .checkpoint import ModelFile, ModelFileError, identify, read_dit_checkpoint, strip_prefixes
from .devices import indexed, pick_device
from .model_files import MODEL_SLOTS, SLOTS_BY_KEY, expert_role_from_name, find_model_files
from .models.tokenizer import TOKENIZER_NEIGHBOURS

# the doctor's table: 81 frames first, then shorter clips; 720p and 480p at 16:9
PRESETS = tuple((name, *RESOLUTIONS[name]["16:9"]) for name in ("720p", "480p"))
FRAME_CHOICES = (81, 61, 49, 33, 17)


# -- report ------------------------------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: Optional[bool]  # True works, False broken (counts as a failure), None not available here
    detail: str

    def line(self) -> str:
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[self.ok]
        return f"  [{mark}] {self.name}: {self.detail}"


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _compare(name: str, out: torch.Tensor, ref: torch.Tensor, tol: float, against: str) -> Check:
    if not torch.isfinite(out).all():
        return Check(name, False, f"non-finite output (compared with {against})")
    err = _rel_err(out, ref)
    exact = " (bit-exact)" if torch.equal(out.cpu(), ref.cpu().to(out.dtype)) else ""
    return Check(name, err <= tol, f"relative error {err:.1e} vs {against} (tolerance {tol:.0e}){exact}")


@contextmanager
def _captured_notices():
    """Collect the library's one-line notices (why a kernel is unavailable) instead of printing them."""
    log = logging.getLogger("turbowan")
    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    saved, saved_level, saved_propagate = log.handlers[:], log.level, log.propagate
    log.handlers, log.propagate = [Collect()], False
    log.setLevel(logging.WARNING)
    try:
        yield records
    finally:
        log.handlers, log.propagate = saved, saved_propagate
        log.setLevel(saved_level)


def _dispatch(getter) -> tuple[object, str]:
    with _captured_notices() as notes:
        fn = getter()
    reason = notes[-1].replace("turbowan: ", "") if notes else "unavailable on this machine"
    return fn, reason


# -- machine -----------------------------------------------------------------------------------------------------


def _version(dist: str) -> Optional[str]:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return None


def _host_ram_gb() -> tuple[Optional[float], Optional[float]]:
    """(total, available) host RAM in GB (Linux /proc/meminfo; None elsewhere)."""
    try:
        info = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, value = line.split(":", 1)
            info[key] = int(value.split()[0]) * 1024
        return info["MemTotal"] / GB, info.get("MemAvailable", info["MemFree"]) / GB
    except (OSError, KeyError, ValueError):
        return None, None


def machine_lines(device: Optional[torch.device]) -> list[str]:
    import turbowan

    triton = _version("triton")
    if triton is not None:
        try:
            importlib.import_module("triton")
        except Exception as exc:  # installed but broken
            triton += f" (does not import: {type(exc).__name__})"
    lines = [
        f"  turbowan {turbowan.__version__}, Python {platform.python_version()}, torch {torch.__version__}, "
        f"CUDA {torch.version.cuda or 'none (CPU build)'}, "
        f"cuDNN {torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else 'none'}, "
        f"Triton {triton or 'not installed'}, PyAV {_version('av') or 'not installed'}",
    ]
    total, avail = _host_ram_gb()
    if total is not None:
        lines.append(f"  host RAM {total:.1f} GB, {avail:.1f} GB available; {torch.get_num_threads()} CPU threads")
    if device is None:
        lines.append("  GPU: none: no CUDA device is visible to torch")
        return lines
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        free, total_b = torch.cuda.mem_get_info(i)
        mark = "*" if i == device.index else " "
        lines.append(f" {mark}GPU {i}: {p.name}, compute capability {p.major}.{p.minor}, "
                     f"{total_b / GB:.1f} GB, {free / GB:.1f} GB free, bf16 {'yes' if p.major >= 8 else 'no'}")
    return lines


# -- kernels -----------------------------------------------------------------------------------------------------


def check_dense_attention(device: torch.device) -> list[Check]:
    """Each SDPA backend on a tiny bf16 input against an fp32 softmax computed step by step."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 256, 128, generator=g) for _ in range(3))  # [B, H, L, D]
    ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(128), dim=-1) @ v
    qd, kd, vd = (t.to(device, torch.bfloat16) for t in (q, k, v))
    if device.type != "cuda":
        out = F.scaled_dot_product_attention(qd, kd, vd)
        return [_compare("dense attention (PyTorch SDPA on CPU)", out, ref, 1e-2, "fp32 softmax")]
    from torch.nn.attention import SDPBackend, sdpa_kernel

    checks = []
    for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH):
        name = f"dense attention, SDPA {backend.name.lower().replace('_attention', '')}"
        try:
            with sdpa_kernel([backend]):
                out = F.scaled_dot_product_attention(qd, kd, vd)
            torch.cuda.synchronize(device)
        except RuntimeError as exc:
            checks.append(Check(name, None, f"not available ({str(exc).splitlines()[0][:100]})"))
            continue
        checks.append(_compare(name, out, ref, 1e-2, "fp32 softmax"))
    return checks


def sla_test_inputs(device, dtype=torch.bfloat16, length: int = 1024, heads: int = 2, head_dim: int = 128):
    """q, k, v [1, L, H, D] whose block means make SLA's top-k choice unambiguous (margin ~9 vs noise < 1),
    so a kernel and the PyTorch path must select the same blocks; plus a small proj_l."""
    g = torch.Generator().manual_seed(0)
    nq, nk = length // 128, length // 64
    k_mean = torch.zeros(nk, head_dim)
    k_mean[torch.arange(nk), torch.arange(nk)] = 3.0  # key block j points along axis j
    q_mean = torch.zeros(nq, head_dim)
    for i in range(nq):  # each query block points at 4 of the 16 key blocks
        q_mean[i, torch.randperm(nk, generator=g)[:4]] = 3.0
    q = 0.5 * torch.randn(1, length, heads, head_dim, generator=g) + q_mean.repeat_interleave(128, 0)[None, :, None]
    k = 0.5 * torch.randn(1, length, heads, head_dim, generator=g) + k_mean.repeat_interleave(64, 0)[None, :, None]
    v = torch.randn(1, length, heads, head_dim, generator=g)
    w = 0.1 * torch.randn(head_dim, head_dim, generator=g) / math.sqrt(head_dim)
    b = torch.zeros(head_dim)
    return [t.to(device, dtype) for t in (q, k, v, w, b)]


SLA_TEST_TOPK = 0.25  # 4 of 16 key blocks, the ones the test inputs point at


def sla_dense_restatement(q, k, v, w, b) -> torch.Tensor:
    """SLA at topk 1 in fp32, written out: softmax(q k^T / sqrt(D)) v + proj_l(linear attention), where the
    linear attention is phi(q) (phi(k)^T v) / (1e-5 + phi(q) . sum phi(k)) with phi = softmax over D."""
    qh, kh, vh = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    dense = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1) @ vh
    fq, fk = torch.softmax(qh, dim=-1), torch.softmax(kh, dim=-1)
    linear = (fq @ (fk.transpose(-1, -2) @ vh)) / (1e-5 + fq @ fk.sum(dim=2, keepdim=True).transpose(-1, -2))
    out = dense + F.linear(linear, w.float(), b.float())
    return out.transpose(1, 2)


def check_sla(device: torch.device) -> list[Check]:
    from .kernels import sagesla_dispatch, sla_dispatch
    from .ops.sla import sla_attention

    q, k, v, w, b = sla_test_inputs(device)
    ref = sla_attention(q, k, v, w, b, SLA_TEST_TOPK)
    # with every key block kept, SLA is dense softmax attention plus the projected linear branch
    checks = [_compare("sla, PyTorch path (all blocks kept)", sla_attention(q, k, v, w, b, 1.0),
                       sla_dense_restatement(q, k, v, w, b), 1e-2, "an fp32 dense re-statement")]
    for name, getter, tol in (("sla, our Triton kernel", sla_dispatch, 1e-2),
                              ("sagesla, our Triton kernel (quantized Q/K and P.V)", sagesla_dispatch, 1e-1)):
        if device.type != "cuda":
            checks.append(Check(name, None, "needs a CUDA GPU (here the PyTorch path runs instead)"))
            continue
        fn, reason = _dispatch(getter)
        if fn is None:
            checks.append(Check(name, None, f"{reason}; the PyTorch path runs instead"))
            continue
        if getter is sla_dispatch:
            name = sla_kernel_name(q, k, v)
        checks.append(try_kernel(name, fn, (q, k, v, w, b, SLA_TEST_TOPK), ref, tol, "the PyTorch sla"))
    checks.append(check_spargeattn())
    return checks


def sla_kernel_name(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str:
    """The check's name after the SLA kernel that runs these inputs (the test inputs are the model's: bf16, head dim
    128); where the Gluon kernel should run but does not load, the Triton one is named with the reason."""
    from .kernels import cuda_capability, sla_kernel, tma_row_matrix
    from .kernels.sla_triton import attention_kernel  # importable: the dispatch loaded it

    with _captured_notices() as notes:
        kernel = attention_kernel(q, k, v)
    if kernel == "gluon":
        return "sla, our Gluon kernel (Hopper, warp-specialized)"
    if sla_kernel(cuda_capability(q), q.dtype, q.shape[-1], all(map(tma_row_matrix, (q, k, v)))) == "gluon":
        reason = notes[-1].replace("turbowan: ", "").split(";")[0] if notes else "it did not load"
        return f"sla, our Triton kernel (the Gluon one does not run here: {reason})"
    return "sla, our Triton kernel"


def try_kernel(name: str, fn, args: tuple, ref: torch.Tensor, tol: float, against: str) -> Check:
    """Run a fast kernel once; a crash is a failure, otherwise compare with the reference output."""
    try:
        out = fn(*args)
        if out.is_cuda:
            torch.cuda.synchronize(out.device)
    except ValueError as exc:  # the kernel refusing this GPU (e.g. no fp8 tensor cores): not available, not broken
        return Check(name, None, f"not for this GPU: {str(exc).splitlines()[0][:140]}")
    except Exception as exc:
        return Check(name, False, f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    return _compare(name, out, ref, tol, against)


def check_spargeattn() -> Check:
    name = "SpargeAttn (optional, package spas_sage_attn)"
    if importlib.util.find_spec("spas_sage_attn") is None:
        return Check(name, None, "not installed (not needed: turbowan's own kernels cover sla and sagesla)")
    from .ops import spargeattn

    if not spargeattn.available():
        return Check(name, False, "installed, but its compiled modules do not import here (built for another torch / "
                                  "CUDA?); attention_type 'sagesla_spargeattn' will refuse to load")
    return Check(name, True, f"imports (version {_version('spas_sage_attn') or 'unknown'}); "
                             "attention_type 'sagesla_spargeattn' can use it on H100/H200")


def check_int8(device: torch.device) -> list[Check]:
    """W8A8 (Triton, or Gluon on Hopper) against the exact emulation; W8A16 against an fp32 matmul of the same weights."""
    from .kernels import int8_dispatch
    from .ops.int8 import Int8Linear, dequantize_int8_blockwise, quantize_int8_blockwise, w8a8_linear_reference

    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 512, generator=g).to(torch.bfloat16)  # ragged M, as token counts are
    weight = torch.randn(384, 512, generator=g) / math.sqrt(512)
    w_q, w_s = quantize_int8_blockwise(weight)
    bias = (0.1 * torch.randn(384, generator=g)).to(torch.bfloat16)
    exact = w8a8_linear_reference(x, w_q, w_s, bias)  # on the CPU: the definition
    w_float = dequantize_int8_blockwise(w_q, w_s, torch.float32)
    dense = F.linear(x.float(), w_float, bias.float())
    checks = []

    layer = Int8Linear(512, 384, True, "w8a16")
    layer.int8_weight, layer.scale, layer.bias = w_q, w_s, bias
    checks.append(try_kernel(f"int8 W8A16 (dequantize + {device.type} matmul)", layer.to(device), (x.to(device),),
                             dense, 1e-2, "fp32 matmul"))

    name = "int8 W8A8, our Triton kernel"
    if device.type != "cuda":
        # the same int8 operands multiplied in fp32: differs only by accumulation order and the bf16 output
        x_q, x_s = quantize_int8_blockwise(x.float())
        operands = F.linear(dequantize_int8_blockwise(x_q, x_s, torch.float32), w_float, bias.float())
        checks.append(_compare("int8 W8A8, exact emulation (what runs on CPU)", exact, operands, 1e-2,
                               "an fp32 matmul of the same int8 operands"))
        checks.append(Check(name, None, "needs a CUDA GPU"))
        return checks
    fn, reason = _dispatch(int8_dispatch)
    if fn is None:
        checks.append(Check(name, None, f"{reason}; W8A8 falls back to the slow exact emulation (use --quant w8a16)"))
        return checks
    args = (x.to(device), w_q.to(device), w_s.to(device), bias.to(device))
    from .kernels.int8_triton import gemm_kernel  # importable: the dispatch above loaded it

    if gemm_kernel(args[0], x.dtype, {}) == "gluon":
        name = "int8 W8A8, our Gluon GEMM (Hopper)"
    checks.append(try_kernel(name, fn, args, exact, 1e-2, "the exact emulation"))
    return checks


def check_vae(device: torch.device) -> list[Check]:
    """The VAE's CUDA kernels on tiny channels-last bf16 inputs: the fused RMSNorm + SiLU and the causal convolution
    (the Triton implicit GEMM where `kernels.conv3d_kernel` picks it, else cuDNN, against float32)."""
    from .kernels import conv3d_dispatch, conv3d_kernel, cuda_capability, vae_norm_dispatch

    norm_name, conv_name = "VAE RMSNorm + SiLU, our Triton kernel", "VAE 96-channel convolution"
    if device.type != "cuda":
        return [Check(norm_name, None, "needs a CUDA GPU (here the PyTorch path runs instead)"),
                Check(conv_name, None, "needs a CUDA GPU (here PyTorch's convolution runs)")]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 96, 3, 8, 12, generator=g)  # the full-resolution width; 3 frames = 1 + the 2 past ones
    gamma = torch.rand(96, 1, 1, 1, generator=g) + 0.5
    weight = torch.randn(96, 96, 3, 3, 3, generator=g) / math.sqrt(96 * 27)
    bias = 0.1 * torch.randn(96, generator=g)
    checks = []
    xc = x.to(device, torch.bfloat16).contiguous(memory_format=torch.channels_last_3d)
    fn, reason = _dispatch(vae_norm_dispatch)
    if fn is None:
        checks.append(Check(norm_name, None, f"{reason}; the PyTorch path runs instead"))
    else:
        want = F.silu(F.normalize(x, dim=1) * 96**0.5 * gamma)
        checks.append(try_kernel(norm_name, fn, (xc, gamma.to(device, torch.bfloat16), True), want.to(device), 1e-2,
                                 "fp32 PyTorch"))
    want = F.conv3d(x, weight, bias, padding=(0, 1, 1))
    wc, bc = weight.to(device, torch.bfloat16), bias.to(device, torch.bfloat16)
    if conv3d_kernel(cuda_capability(xc), 96, 96, (3, 3, 3)) == "triton":
        fn, reason = _dispatch(conv3d_dispatch)
        if fn is not None:
            checks.append(try_kernel(f"{conv_name}, our Triton implicit GEMM (Hopper)", fn, (xc, wc, bc), want.to(device),
                                     1e-2, "fp32 PyTorch"))
            return checks
        conv_name += f", cuDNN (the Triton kernel does not run here: {reason})"
    else:
        conv_name += ", cuDNN (our Triton kernel is measured faster on Hopper only)"
    checks.append(try_kernel(conv_name, lambda a, b, c: F.conv3d(a, b, c, padding=(0, 1, 1)), (xc, wc, bc),
                             want.to(device), 1e-2, "fp32 PyTorch"))
    return checks


# -- model files -------------------------------------------------------------------------------------------------

def inspect_model_file(path: Path, slot_key: str) -> Check:
    """Is this file the right kind for its slot? Headers or memory-mapped tensors only."""
    size = path.stat().st_size
    shown = f"{size / GB:.1f} GB" if size >= GB else f"{size / 1e6:.1f} MB"
    label = f"{path.parent.name}/{path.name} ({shown})"
    try:
        sd = strip_prefixes(ModelFile(path, SLOTS_BY_KEY[slot_key].what).meta())
    except ModelFileError as exc:
        return Check(label, False, str(exc))
    kind, what = identify(sd)
    if slot_key in ("high", "low", "t2v"):
        return _inspect_dit(path, sd, kind, what, slot_key, label)
    if slot_key == "vae":
        w, z = sd.get("encoder.conv1.weight"), sd.get("conv2.weight")
        if kind == "wan21_vae" and z is not None and z.shape[0] == 16 and w is not None and w.shape[1] == 3:
            size_note = "" if w.shape[0] == 96 else ", not the release size 96"
            return Check(label, True, f"Wan2.1 VAE (base width {w.shape[0]}{size_note})")
        return Check(label, False, f"looks like {what}; the VAE slot needs the Wan2.1 VAE")
    return _inspect_text_encoder(path, sd, kind, what, label)


def _inspect_dit(path: Path, sd: dict, kind: str, what: str, slot_key: str, label: str) -> Check:
    t2v = slot_key == "t2v"
    slot = "text-to-video" if t2v else f"{slot_key}-noise"
    if kind != ("wan_t2v_dit" if t2v else "wan22_i2v_dit"):
        needed = "TurboWan2.1-T2V model" if t2v else "TurboWan2.2-I2V-A14B expert"
        return Check(label, False, f"looks like {what}; the {slot} slot needs a {needed}")
    if path.suffix != ".safetensors":  # memory-mapped: cheap to check every tensor is there
        try:
            read_dit_checkpoint(path, slot=f"{slot} model" if t2v else f"{slot} expert")
        except ModelFileError as exc:
            return Check(label, False, str(exc))
    dim = sd["patch_embedding.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    quant = any(k.endswith(".int8_weight") for k in sd)
    sla = any("proj_l" in k for k in sd)
    sizes = {(1536, 30): "1.3B", (5120, 40): "14B"} if t2v else {(5120, 40): "A14B"}
    size = sizes.get((dim, blocks), f"dim {dim}, {blocks} blocks: not a released size (a test model?)")
    detail = f"{'Wan2.1 T2V model' if t2v else 'Wan2.2 I2V expert'}, {size}, {'int8 (-quant)' if quant else 'bf16'}"
    detail += ", SLA weights present" if sla else ", no SLA weights: only --attention original works"
    role = None if t2v else expert_role_from_name(path.name)
    if role is not None and role != slot_key:
        return Check(label, False, f"{detail}, but its name says '{role}': it belongs in the {role}-noise slot")
    return Check(label, True, detail)


def _inspect_text_encoder(path: Path, sd: dict, kind: str, what: str, label: str) -> Check:
    embedding_keys = ("token_embedding.weight", "shared.weight", "encoder.embed_tokens.weight")
    emb = next((sd[k] for k in embedding_keys if k in sd), None)
    if emb is None or kind != "text_encoder":
        return Check(label, False, f"looks like {what}; the text-encoder slot needs umT5-xxl")
    vocab, width = emb.shape
    if vocab < 250_000:
        return Check(label, False, f"a T5-family encoder with a {vocab:,}-token vocabulary, not umT5-xxl (256,384; "
                                   "Flux's t5xxl has 32,128)")
    if width != TEXT_WIDTH:
        return Check(label, False, f"a umT5 encoder {width} wide; Wan needs the {TEXT_WIDTH}-wide umT5-xxl")
    # one-byte float weights (the reader keeps unknown one-byte dtypes as uint8)
    fp8 = any(t.element_size() == 1 and t.dtype != torch.int8 and k.endswith(".weight") and t.ndim == 2
              for k, t in sd.items())
    if "spiece_model" in sd:
        tok = "tokenizer embedded"
    elif any((path.parent / n).is_file() for n in TOKENIZER_NEIGHBOURS):
        tok = "tokenizer found beside it"
    else:
        tok = "no tokenizer inside: pass --tokenizer spiece.model (or tokenizer.json)"
    return Check(label, True, f"umT5-xxl{', fp8 (dequantized to bf16 at load)' if fp8 else ''}, {tok}")


def model_file_lines(models_dir, found: dict[str, list[Path]]) -> tuple[list[str], list[Check]]:
    if not any(found.values()):  # an empty folder, or the wrong one: nothing here would run
        check = Check("model files", False, f"none found in {models_dir} (is it ComfyUI's models folder?)")
        return [check.line()], [check]
    lines, checks = [], []
    for slot in MODEL_SLOTS:
        if not found[slot.key]:
            where = ", ".join(f"{slot.folders[0]}/{n}" for n in slot.names[:2])
            lines.append(f"  [--  ] {slot.what}: not found (looked for {where}, ...); download: {slot.download}")
            continue
        for i, path in enumerate(found[slot.key]):
            check = inspect_model_file(path, slot.key)
            check.name = f"{slot.what}{' (used)' if i == 0 else ' (other candidate)'}: {check.name}"
            checks.append(check)
            lines.append(check.line())
    return lines, checks


# -- memory ------------------------------------------------------------------------------------------------------


def memory_lines(device: torch.device, found: dict[str, list[Path]], models_dir) -> list[str]:
    free_gb = torch.cuda.mem_get_info(device)[0] / GB
    expert_gb, kind = INT8_EXPERT_GB, "int8 -quant experts assumed"
    if found.get("high") and found["high"][0].stat().st_size > GB:  # (smaller: a test model)
        expert_gb = found["high"][0].stat().st_size / GB
        kind = f"expert file {found['high'][0].name}"
    lines = [f"  {free_gb:.1f} GB free on {device}; one expert {expert_gb:.1f} GB ({kind})",
             "  estimates, not measurements (formula: turbowan.memory.estimate_peak_gb; a run needs "
             f"{ALLOCATOR_FACTOR:g} x peak + {CONTEXT_SLACK_GB:g} GB free)"]
    header = "  mode      " + "".join(f"{name} ({w}x{h})".ljust(30) for name, w, h in PRESETS)
    lines.append(header)
    best = None
    for mode in PLACED_MODES:
        cells = []
        for name, w, h in PRESETS:
            fit = next((f for f in FRAME_CHOICES
                        if needed_free_gb(estimate_peak_gb(mode, w, h, f, expert_gb)) <= free_gb), None)
            if fit is None:
                smallest = estimate_peak_gb(mode, w, h, FRAME_CHOICES[-1], expert_gb)
                cells.append(f"no (17 frames ~{smallest:.1f} GB)")
                continue
            cells.append(f"{fit} frames, ~{estimate_peak_gb(mode, w, h, fit, expert_gb):.1f} GB")
            # the full 81 frames first, then the larger picture, then the longer clip; ties go to the faster mode
            key = (fit != FRAME_CHOICES[0], PRESETS.index((name, w, h)), -fit)
            if best is None or key < best[0]:
                best = (key, mode, (name, w, h), fit)
        lines.append(f"  {mode:<10}" + "".join(c.ljust(30) for c in cells))
    if best is None:
        lines.append("  nothing is expected to fit; free GPU memory (close other programs) or use a larger card")
        return lines
    _, mode, (name, _, _), frames = best
    models = f"--models-dir {models_dir}" if models_dir else "--models-dir ComfyUI/models"
    mode_option = f" --mode {mode}"
    lines.append(f"  suggested (fastest mode for the largest clip): turbowan generate {models} --image IMG "
                 f"--prompt \"...\"{mode_option} --resolution {name} --frames {frames}")
    if free_gb < 13.5:
        lines.append("  the 11 GB text encoder will run on the CPU (slow once; each prompt's embedding is cached)")
    return lines


# -- entry point -------------------------------------------------------------------------------------------------


def run_doctor(models_dir=None, device=None) -> int:
    # the folder first: a missing one raises ModelFileError (one line, exit 2) before minutes of kernel checks
    found = find_model_files(models_dir) if models_dir is not None else {}
    if device is not None:
        dev = pick_device(device)
    else:
        dev = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    dev = indexed(dev)
    cuda = dev if dev.type == "cuda" else None
    checks: list[Check] = []

    print("machine")
    for line in machine_lines(cuda):
        print(line)
    stream_720p = needed_free_gb(estimate_peak_gb("stream", 1280, 720, 81))
    if cuda is None:
        print(f"  No CUDA GPU here. The released 14B experts need an NVIDIA GPU (about {stream_720p:.0f} GB free for "
              "720p,\n"
              "  81 frames in stream mode, by the estimate below). On this machine use `turbowan demo` (tiny random\n"
              "  weights, seconds) and the test suite (`pytest tests`); the CPU checks below still run.")

    print(f"kernels (each run on a tiny input on {dev} and compared with the PyTorch path)")
    for group in (check_dense_attention, check_sla, check_int8, check_vae):
        try:
            results = group(dev)
        except Exception as exc:  # a broken install should be reported, not crash the doctor
            results = [Check(group.__name__.replace("check_", ""), False, f"{type(exc).__name__}: {exc}")]
        for c in results:
            print(c.line())
        checks += results

    if models_dir is not None:
        print(f"model files in {models_dir}")
        lines, file_checks = model_file_lines(models_dir, found)
        for line in lines:
            print(line)
        checks += file_checks
    else:
        print("model files: not checked (pass --models-dir ComfyUI/models)")

    print("memory per execution mode")
    if cuda is None:
        print(f"  not applicable without a CUDA GPU; on a GPU, stream mode is estimated to need ~{stream_720p:.0f} GB "
              "free for 720p, 81 frames")
    else:
        for line in memory_lines(cuda, found, models_dir):
            print(line)

    failed = [c for c in checks if c.ok is False]
    if failed:
        print(f"summary: {len(failed)} problem(s): " + "; ".join(c.name for c in failed))
    else:
        print("summary: no problems found ([--] marks what is not available here; the PyTorch path covers it)")
    return 1 if failed else 0
