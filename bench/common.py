"""What every bench script shares: the checkout on sys.path, one GPU timer, one merge into bench/results.json and
the random full-size models (real shapes, random weights: timing needs no model files)."""

from __future__ import annotations

import datetime
import json
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS_JSON = REPO / "bench" / "results.json"

from turbowan.checkpoint import DiTConfig  # noqa: E402
from turbowan.models.dit import random_dit  # noqa: E402
from turbowan.models.vae import VAEConfig, WanVAE, WanVAEModel  # noqa: E402


def median_ms(fn, reps: int = 10, warmup: int = 1) -> float:
    """Median time of one fn() call on the GPU in ms: CUDA events around each call, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def merge_results(values: dict, card: str, prefix: str = "", date: str | None = None,
                  path: Path | str = RESULTS_JSON) -> None:
    """Read-modify-write of results.json (other benches keep their keys): `values`, plus `<prefix>card` and
    `<prefix>date` (today unless given)."""
    path = Path(path)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(values)
    data[f"{prefix}card"], data[f"{prefix}date"] = card, date or str(datetime.date.today())
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def gemm_shape(description: str) -> tuple[int, int, int]:
    """(M, K, N) from the command line (--shape M K N), by default the 720p FFN up-projection."""
    import argparse

    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--shape", nargs=3, type=int, default=[75600, 5120, 13824], metavar=("M", "K", "N"))
    return tuple(ap.parse_args().shape)


def random_w8a8_operands(m: int, k: int, n: int, generator: torch.Generator, scale: float = 1e-2):
    """Random quantized W8A8 GEMM operands on the generator's device: x int8 [m, k], its tile scales
    [ceil(m/128), k/128], weight int8 [n, k] and its tile scales (scales uniform in [0, scale))."""
    dev = generator.device
    xq = torch.randint(-128, 128, (m, k), dtype=torch.int8, device=dev, generator=generator)
    wq = torch.randint(-128, 128, (n, k), dtype=torch.int8, device=dev, generator=generator)
    xs = torch.rand(-(-m // 128), k // 128, device=dev, generator=generator) * scale
    ws = torch.rand(-(-n // 128), k // 128, device=dev, generator=generator) * scale
    return xq, xs, wq, ws


def random_experts(device, attention: str = "sla", quant: str | None = None, config: DiTConfig | None = None):
    """The two A14B experts (high noise, then low noise) with random bf16 weights, built on `device`."""
    return [random_dit(config or DiTConfig(), dtype=torch.bfloat16, quant=quant, attention=attention,
                       device=device, seed=seed) for seed in (0, 1)]


def random_vae(device, config: VAEConfig | None = None) -> WanVAE:
    """The Wan2.1 VAE with random bf16 weights (unit norm gains, fan-in scaled kernels, zero biases)."""
    with torch.device(device):
        model = WanVAEModel(config or VAEConfig())
    g = torch.Generator(device=device).manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.fill_(1.0)
            elif p.ndim > 1:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, device=device, generator=g) / fan_in ** 0.5)
            else:
                p.zero_()
    return WanVAE(model.to(torch.bfloat16))
