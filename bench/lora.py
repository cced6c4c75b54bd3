"""LoRA on int8 experts: re-quantizing the merged weight vs a separate bf16 low-rank branch (issue 13).

    python bench/lora.py [--rank 64] [--res 720p 480p] [--repeats 3]

One A14B expert with random int8 W8A8 block linears (the `-quant` layout, built on the GPU), and a random LoRA file
in the ComfyUI/Wan layout that touches every block linear (q, k, v, o of self- and cross-attention, both FFN
layers: 400 layers), alpha = rank. For each way of applying it (`turbowan.apply_lora(int8_merge=...)`):
  * the time to apply it;
  * the weight error of the int8 result against a float32 merge of the same LoRA, over all touched layers
    (relative L2 of dequantized int8 weight (+ branch) vs float32 merged weight), beside the error the int8 base
    itself has against its own dequantization (zero by definition) and the error of re-quantizing an unchanged weight;
  * one DiT forward (= one sampling step) at each resolution, 81 frames, sla 0.1: median of --repeats, against the
    expert without a LoRA.
Merges ``lora_<merge>_step_<res>_s`` and ``lora_<merge>_weight_rel_err`` into bench/results.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import merge_results
from turbowan.checkpoint import DiTConfig
from turbowan.lora import apply_lora
from turbowan.models.dit import random_dit
from turbowan.ops.int8 import Int8Linear, Int8LoraLinear, dequantize_int8_blockwise

LATENT = {"720p": (21, 90, 160), "480p": (21, 60, 104)}  # (T, H/8, W/8) for 81 frames
BLOCK_LINEARS = ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                 "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")


def write_random_lora(model, rank: int, path: Path, seed: int = 0) -> None:
    """A LoRA in the ComfyUI/Wan layout for every block linear; up/down scaled so the delta is ~1% of the weight."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, _ in enumerate(model.blocks):
        for name in BLOCK_LINEARS:
            layer = model.get_submodule(f"blocks.{i}.{name}")
            key = f"diffusion_model.blocks.{i}.{name}"
            tensors[key + ".lora_down.weight"] = (torch.randn(rank, layer.in_features, generator=g)
                                                  / layer.in_features ** 0.5).to(torch.bfloat16)
            tensors[key + ".lora_up.weight"] = (torch.randn(layer.out_features, rank, generator=g)
                                                * 1e-3).to(torch.bfloat16)
            tensors[key + ".alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))


def effective_weight(layer) -> torch.Tensor:
    """The float32 weight a layer applies: dequantized int8, plus the low-rank branch where there is one."""
    w = dequantize_int8_blockwise(layer.int8_weight, layer.scale, torch.float32)
    if isinstance(layer, Int8LoraLinear):
        w = w + (layer.lora_up.float() * layer.lora_scale) @ layer.lora_down.float()
    return w


def weight_error(base, lora_model, lora_file: Path) -> float:
    """Relative L2 over all touched layers of the applied weight vs float32 base + float32 delta."""
    from safetensors import safe_open

    num = den = 0.0
    dev = base.blocks[0].ffn[0].int8_weight.device
    with safe_open(str(lora_file), "pt") as f:
        for i, _ in enumerate(base.blocks):
            for name in BLOCK_LINEARS:
                key = f"diffusion_model.blocks.{i}.{name}"
                down = f.get_tensor(key + ".lora_down.weight").float().to(dev)
                up = f.get_tensor(key + ".lora_up.weight").float().to(dev)
                alpha = float(f.get_tensor(key + ".alpha")) / down.shape[0]
                ref = effective_weight(base.get_submodule(f"blocks.{i}.{name}")) + alpha * up @ down
                got = effective_weight(lora_model.get_submodule(f"blocks.{i}.{name}"))
                num += float((got - ref).square().sum())
                den += float(ref.square().sum())
    return (num / den) ** 0.5


def step_time(model, res: str, repeats: int) -> float:
    T, H, W = LATENT[res]
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 16, T, H, W, device="cuda", generator=g)
    y = torch.randn(1, 20, T, H, W, device="cuda", generator=g)
    ctx = torch.randn(1, 512, 4096, device="cuda", generator=g) * 0.1
    t = torch.tensor([0.9], device="cuda")
    times = []
    with torch.no_grad():
        for i in range(repeats + 1):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(x, t, ctx, y)
            torch.cuda.synchronize()
            if i:  # the first call compiles and warms up
                times.append(time.perf_counter() - start)
            assert torch.isfinite(out).all()
            del out
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--res", nargs="+", default=["720p", "480p"], choices=list(LATENT))
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/lora.py times GPU steps: run it on a CUDA machine")
    card = torch.cuda.get_device_name()
    base = random_dit(DiTConfig(), quant="w8a8", attention="sla", device="cuda")
    assert all(isinstance(base.get_submodule(f"blocks.0.{n}"), Int8Linear) for n in BLOCK_LINEARS)
    rows, out = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        lora_file = Path(tmp) / "random_lora.safetensors"
        write_random_lora(base, args.rank, lora_file)
        for res in args.res:
            rows.append(("none", res, step_time(base, res, args.repeats), 0.0, 0.0))
        for merge in ("requantize", "branch"):
            t0 = time.perf_counter()
            model = apply_lora(base, lora_file, 1.0, int8_merge=merge)
            torch.cuda.synchronize()
            apply_s = time.perf_counter() - t0
            err = weight_error(base, model, lora_file)
            out[f"lora_{merge}_weight_rel_err"] = err
            for res in args.res:
                s = step_time(model, res, args.repeats)
                rows.append((merge, res, s, apply_s, err))
                out[f"lora_{merge}_step_{res}_s"] = s
            del model
            torch.cuda.empty_cache()
    for res in args.res:
        out[f"lora_none_step_{res}_s"] = next(r[2] for r in rows if r[0] == "none" and r[1] == res)
    print(f"\n{card}, torch {torch.__version__}, A14B int8 W8A8 expert, sla 0.1, 81 frames, LoRA rank {args.rank} "
          f"on all 400 block linears")
    print("| int8 merge | res | step s (median) | vs no LoRA | apply s | weight rel err vs fp32 merge |")
    print("|---|---|---|---|---|---|")
    for merge, res, s, apply_s, err in rows:
        base_s = out[f"lora_none_step_{res}_s"]
        print(f"| {merge} | {res} | {s:.3f} | {s / base_s:.3f}x | {apply_s:.1f} | {err:.2e} |")
    merge_results(out, card, prefix="lora_")


if __name__ == "__main__":
    main()
