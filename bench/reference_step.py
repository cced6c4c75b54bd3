"""The reference's own per-step time at A14B size, measured the way bench/e2e.py measures ours (one GPU).

    python bench/reference_step.py --ref /path/to/TurboDiffusion/turbodiffusion [--res 720p 480p]

Builds thu-ml/TurboDiffusion's Wan2.2-A14B I2V network from a checkout you point at (never part of this repo)
the way its `inference/modify_model.py` does for `--attention_type sla --sla_topk 0.1` (its Triton SLA and its
Triton norms, bf16 weights, no int8 linears), fills the weights with random values, and times one forward (= one
sampling step) on the real latent shapes: median of --repeat after a warm-up, with the peak GPU memory.
Its compiled CUDA extension (`turbo_diffusion_ops`, used only by its int8 linears) is not needed: a placeholder
module that refuses to run stands in for it so `ops` imports. Without flash-attn its RoPE needs flash-attn's
rotary kernel; a plain-torch equivalent stands in (as in the anchors in shared/notes/gpu-anchors.md).
Merges ``ref_step_<res>_s`` into bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
import types

import torch

from common import RESULTS_JSON, merge_results

LATENT = {"720p": (21, 90, 160), "480p": (21, 60, 104)}  # (T, H/8, W/8) for 81 frames


def import_reference(ref: str):
    sys.path.insert(0, ref)

    def refuse(*_args, **_kwargs):
        raise RuntimeError("turbo_diffusion_ops is not built here; the bf16 timing must not reach the int8 ops")

    sys.modules.setdefault("turbo_diffusion_ops", types.SimpleNamespace(quant_cuda=refuse, gemm_cuda=refuse))
    from inference.modify_model import replace_attention, replace_linear_norm, select_model
    import rcm.networks.wan2pt1 as wan2pt1  # the Wan2.1 T2V network
    import rcm.networks.wan2pt2 as wan2pt2  # the Wan2.2 I2V experts

    for network in (wan2pt1, wan2pt2):
        if network.flash_apply_rotary_emb is None:  # flash-attn absent (as for the anchors): RoPE in plain torch
            network.flash_apply_rotary_emb = rotary_interleaved
    return select_model, replace_attention, replace_linear_norm


def rotary_interleaved(x, cos, sin, interleaved=True, inplace=False):
    """What flash-attn's apply_rotary_emb computes for interleaved pairs: x [B, L, H, D], cos/sin [L, D/2]."""
    assert interleaved and not inplace
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([x0 * c - x1 * s, x0 * s + x1 * c], dim=-1).flatten(-2)


def build(ref: str, topk: float, model: str = "Wan2.2-A14B"):
    """The reference's ``model`` (a `select_model` name: Wan2.2-A14B, Wan2.1-14B, Wan2.1-1.3B) as its
    modify_model.py builds it for SLA inference, bf16 random weights, on the GPU."""
    select_model, replace_attention, replace_linear_norm = import_reference(ref)
    with torch.device("meta"):
        net = select_model(model)
    net = replace_attention(net, attention_type="sla", sla_topk=topk)
    replace_linear_norm(net, replace_linear=False, replace_norm=True, quantize=False)
    net = net.to_empty(device="cuda").to(torch.bfloat16).eval().requires_grad_(False)
    g = torch.Generator(device="cuda").manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.02)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, device="cuda", generator=g) * 0.01)
        for name, b in net.named_buffers():  # the fused norms keep their weights as buffers: to_empty left them unset
            if b.is_floating_point():
                b.fill_(1.0 if name.endswith("weight") else 0.0)
    return net


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", required=True, help="folder holding the reference's inference/, rcm/, ops/, SLA/")
    ap.add_argument("--res", nargs="+", default=["720p", "480p"])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--topk", type=float, default=0.1)
    ap.add_argument("--results", default=str(RESULTS_JSON))
    args = ap.parse_args()
    net = build(args.ref, args.topk)
    out = {}
    for res in args.res:
        t, h, w = LATENT[res]
        g = torch.Generator(device="cuda").manual_seed(1)
        x = torch.randn(1, 16, t, h, w, device="cuda", generator=g).to(torch.bfloat16)
        y = torch.randn(1, 20, t, h, w, device="cuda", generator=g).to(torch.bfloat16)
        ctx = (torch.randn(1, 512, 4096, device="cuda", generator=g) * 0.1).to(torch.bfloat16)
        ts = torch.full((1, 1), 900.0, device="cuda").to(torch.bfloat16)
        times = []
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            for i in range(args.repeat + 1):
                torch.cuda.synchronize()
                start = time.perf_counter()
                v = net(x_B_C_T_H_W=x, timesteps_B_T=ts, crossattn_emb=ctx, y_B_C_T_H_W=y)
                torch.cuda.synchronize()
                if i:  # the first call compiles the Triton kernels
                    times.append(time.perf_counter() - start)
        assert v.shape == (1, 16, t, h, w) and torch.isfinite(v).all()
        step = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() / 1e9
        out[f"ref_step_{res}_s"] = round(step, 3)
        print(f"reference {res}: one forward {step:.2f} s (each {' / '.join(f'{s:.2f}' for s in times)}), "
              f"peak {peak:.1f} GB", flush=True)
        del v
    merge_results(out, torch.cuda.get_device_name(), prefix="ref_", path=args.results)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {datetime.date.today()}: {json.dumps(out)}")


if __name__ == "__main__":
    main()
