"""Where one A14B block's time goes at 720p (random bf16 weights): torch.profiler table of the top CUDA ops.

    python bench/profile_step.py [--tokens 75600] [--attention sla]
"""

from __future__ import annotations

import argparse

import torch
from common import median_ms

from turbowan.checkpoint import DiTConfig
from turbowan.models.dit import random_dit, rope_angles


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--grid", default="21,45,80", help="latent T,H/2,W/2 token grid (720p 81 frames)")
    ap.add_argument("--attention", default="sla")
    ap.add_argument("--int8", default=None, choices=[None, "w8a16", "w8a8"])
    args = ap.parse_args()
    T, H, W = map(int, args.grid.split(","))
    dev = torch.device("cuda")
    cfg = DiTConfig(num_layers=2)
    model = random_dit(cfg, device=dev, attention=args.attention, quant=args.int8)
    L = T * H * W
    x = torch.randn(1, L, cfg.dim, device=dev, dtype=torch.bfloat16)
    _, e0 = model._time_mlp(torch.tensor([900.0], device=dev))
    ctx = model.text_embedding(torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16) * 0.1)
    ang = rope_angles(cfg.head_dim, T, H, W, dev)
    cos, sin = torch.cos(ang), torch.sin(ang)
    block = model.blocks[0]
    with torch.no_grad():
        ms = median_ms(lambda: block(x, e0, cos, sin, ctx), reps=5, warmup=2)
        print(f"block forward at L={L}: median {ms:.1f} ms -> {40 * ms / 1000:.2f} s per step (40 blocks)")
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            block(x, e0, cos, sin, ctx)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=60))

    # the block's row kernels (turbowan.kernels.dit_triton) against their PyTorch reference compiled by torch.compile
    import triton.testing

    from turbowan.kernels import dit_triton as K
    from turbowan.models import dit

    w = torch.rand(cfg.dim, device=dev) + 0.5
    shift, scale = (torch.randn(1, 1, cfg.dim, device=dev) * 0.1 for _ in range(2))
    y = torch.randn_like(x)
    ops = {
        "rms_norm_rope": (K.rms_norm_rope, lambda a, b, c, d, e, f: dit.apply_rope(
            dit._rms_norm(a, b, e).unflatten(-1, (f, -1)), c, d), (x, w, cos, sin, 1e-6, cfg.num_heads)),
        "layer_norm_rows (modulated)": (lambda a, b, c, d: K.layer_norm_rows(a, d, shift=b, scale=c),
                                        lambda a, b, c, d: (dit.layer_norm(a, d).float() * (1 + c) + b).to(a.dtype),
                                        (x, shift, scale, 1e-6)),
        "rms_norm_rows": (K.rms_norm_rows, dit._rms_norm, (x, w, 1e-6)),
        "gated_residual_rows": (K.gated_residual_rows, lambda a, b, c: a + b * c.to(a.dtype), (x, y, shift)),
    }
    for name, (kernel, reference, args_) in ops.items():
        compiled = torch.compile(reference, dynamic=False, fullgraph=True)
        differ = (kernel(*args_) != compiled(*args_)).float().mean().item()
        t_k = triton.testing.do_bench(lambda: kernel(*args_))
        t_c = triton.testing.do_bench(lambda: compiled(*args_))
        print(f"{name}: triton {t_k:.3f} ms, torch.compile {t_c:.3f} ms (L={L}; values differing {differ:.1e})")

if __name__ == "__main__":
    main()
