"""Int8 layers on CUDA: the Triton W8A8 kernel checked against the exact emulation, then timed at the A14B FFN shapes.

    python bench/int8.py                      # checks, config sweep, table; updates bench/RESULTS.md + results.json
    python bench/int8.py --out DIR            # also saves int8_results.json, the log tail and the kernel's SASS in DIR
    python bench/int8.py --record FILE.json   # no GPU: merge a saved int8_results.json into RESULTS.md/results.json

Shapes: FFN up (K=5120 -> N=13824) and down (K=13824 -> N=5120) at 720p (M = 21 x 45 x 80 = 75,600 tokens) and
480p (M = 21 x 30 x 52 = 32,760). Columns: bf16 cuBLAS (F.linear with bias), bare torch._int_mm (int32 out, no
scales), our activation quantization alone, our GEMM alone, our whole W8A8 layer (quantize + GEMM + bias + cast),
and W8A16 (Triton dequantize + cuBLAS bf16). Times are medians of CUDA-event timings after warm-up.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import common
from common import REPO, RESULTS_JSON, merge_results

median_ms = functools.partial(common.median_ms, warmup=3)  # the GEMMs' clocks settle over a few calls

from turbowan.ops.int8 import (dequantize_int8_blockwise, quantize_int8_blockwise,  # noqa: E402
                               w8a8_linear_reference, w8a8_matmul_reference)

SHAPES = [  # name, M, K, N
    ("720p up", 75600, 5120, 13824),
    ("720p down", 75600, 13824, 5120),
    ("480p up", 32760, 5120, 13824),
    ("480p down", 32760, 13824, 5120),
]
BEGIN, END = "<!-- int8:begin -->", "<!-- int8:end -->"
# GEMM variants tried on the 720p up shape (overrides of GEMM_CONFIG); offline ptxas reports are in INT8_NOTES.md
SWEEP = [
    {},                                                   # 128 x 256 tile in two 128-wide chunks, 4 stages, 232 regs
    {"num_stages": 3},
    {"CHUNK": 64, "N_CHUNKS": 4},                         # four 64-wide chunks: smaller partial in flight
    {"CHUNK": 64, "N_CHUNKS": 4, "num_stages": 3},
    {"N_CHUNKS": 1, "num_stages": 5, "maxnreg": None},     # 128 x 128 tile, one CTA per SM
    {"N_CHUNKS": 1, "num_stages": 3, "maxnreg": 128},      # 128 x 128 tile, two CTAs per SM
    {"maxnreg": None},                                    # 255 registers: ptxas spills in the loop
    {"GROUP_M": 16},
]


# ---------------------------------------------------------------------------------------------------------------
# correctness


def mismatches(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((a.cpu() != b.cpu()).sum())


def run_checks(K, fixtures: Path | None, config: dict) -> dict:
    """Bit-exactness of the CUDA kernels against the CPU emulation; returns {check: mismatching elements}."""
    dev = "cuda"
    out = {}
    if fixtures is not None and (fixtures / "dit" / "int8_linear_unit.safetensors").exists():
        from safetensors.torch import load_file

        d = load_file(fixtures / "dit" / "int8_linear_unit.safetensors")
        q, s = K.quantize_activations(d["x"].to(dev))
        out["fixture act quant (q, scale)"] = mismatches(q, d["x_int8"]) + mismatches(s, d["x_scale"])
        g = K.w8a8_gemm(d["x_int8"].to(dev), d["x_scale"].to(dev), d["w_int8"].to(dev), d["w_scale"].to(dev),
                        None, torch.bfloat16, **config)
        out["fixture gemm_out"] = mismatches(g, d["gemm_out"])
        y = K.w8a8_linear(d["x"].to(dev), d["w_int8"].to(dev), d["w_scale"].to(dev), d["bias"].to(dev))
        out["fixture linear_out"] = mismatches(y, d["linear_out"])
    gen = torch.Generator().manual_seed(0)
    for m, n, k, dt in [(1, 136, 128, torch.bfloat16), (77, 200, 256, torch.bfloat16), (300, 257, 384, torch.float16),
                        (1000, 640, 5120, torch.bfloat16), (129, 13824, 5120, torch.bfloat16)]:
        x = (torch.randn(m, k, generator=gen) * 2).to(dt)
        wq, ws = quantize_int8_blockwise(torch.randn(n, k, generator=gen))
        b = torch.randn(n, generator=gen).to(torch.bfloat16)
        y = K.w8a8_gemm(*K.quantize_activations(x.to(dev)), wq.to(dev), ws.to(dev), b.to(dev), dt, **config)
        out[f"random {m}x{k}x{n} {str(dt)[6:]}"] = mismatches(y, w8a8_linear_reference(x, wq, ws, b))
        w = K.dequantize_int8_blockwise_cuda(wq.to(dev), ws.to(dev), torch.bfloat16)
        out[f"dequant {n}x{k}"] = mismatches(w, dequantize_int8_blockwise(wq, ws, torch.bfloat16))
    return out


def check_full_shape(y, x, wq, ws, b) -> int:
    """Rows of a full-size output against the emulation (first two tiles and the ragged last tile)."""
    m = x.shape[0]
    bad = 0
    for lo, hi in [(0, 256), ((m - 1) // 128 * 128, m)]:
        ref = w8a8_linear_reference(x[lo:hi], wq, ws, b)  # on the GPU; the emulation is device-independent
        bad += mismatches(y[lo:hi], ref)
    return bad


# ---------------------------------------------------------------------------------------------------------------
# speed


def sass_summary(kernel) -> tuple[dict, str]:
    """Registers, spills and instruction counts of a compiled kernel (what the main loop runs on)."""
    info = {"regs": getattr(kernel, "n_regs", None), "spills": getattr(kernel, "n_spills", None),
            "shared_bytes": getattr(getattr(kernel, "metadata", None), "shared", None)}
    try:
        sass = kernel.asm["sass"]
    except Exception as exc:  # nvdisasm missing: keep the register report
        info["sass_error"] = str(exc)
        return info, ""
    for op in ("IGMMA", "IMMA", "I2FP", "FFMA", "LDL", "STL", "UTMALDG", "BAR"):
        info[op] = len(re.findall(rf"\b{op}\b", sass))
    return info, sass


def sweep(K, shape, out_dir: Path | None, checks_small) -> tuple[dict, list]:
    """Time GEMM configs on one shape; each must also be bit-exact on a small ragged case. -> (best, rows)."""
    name, m, k, n = shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    xq, xs = K.quantize_activations(x)
    del x
    wq = torch.randint(-128, 128, (n, k), device="cuda", dtype=torch.int8)
    ws = torch.rand(n // 128, k // 128, device="cuda") * 1e-3 + 1e-4
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    rows = []

    def try_config(cfg):
        try:
            bad = checks_small(cfg)
            ms = median_ms(lambda: K.w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16, **cfg), reps=6, warmup=2)
            _, kern = K._launch_w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16, cfg)
            info, sass = sass_summary(kern)
            row = {"config": cfg, "ms": ms, "mismatches": bad, **info}
            row["_sass"] = sass
        except Exception as exc:  # a config that does not compile (shared memory, warp specialization) is skipped
            row = {"config": cfg, "ms": None, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        rows.append(row)
        print(f"  sweep {cfg}: " + (f"{row['ms']:.3f} ms, mismatches {row['mismatches']}, regs {row.get('regs')}, "
                                    f"spills {row.get('spills')}" if row["ms"] else row["error"]), flush=True)
        return row

    def ok(r):
        return r["ms"] is not None and r["mismatches"] == 0

    base = dict(K.GEMM_CONFIG)
    for extra in SWEEP:
        try_config({**base, **extra})
    good = [r for r in rows if ok(r)]
    best = min(good, key=lambda r: r["ms"]) if good else None
    if best and out_dir is not None and best.get("_sass"):
        (out_dir / "gemm_best.sass").write_text(best["_sass"])
    for r in rows:
        r.pop("_sass", None)
    return (best["config"] if best else None), rows


def bench_shape(K, shape, cfg) -> dict:
    name, m, k, n = shape
    dev = "cuda"
    torch.manual_seed(0)
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
    bias = torch.randn(n, device=dev, dtype=torch.bfloat16) * 0.1
    wq, ws = quantize_int8_blockwise(w)  # the export rule, on the GPU
    r = {"shape": name, "M": m, "K": k, "N": n}
    r["bf16_ms"] = median_ms(lambda: F.linear(x, w, bias))
    xq, xs = K.quantize_activations(x)
    wq_t = wq.t()  # column-major B: the layout cuBLAS's int8 path wants
    r["int_mm_ms"] = median_ms(lambda: torch._int_mm(xq, wq_t))
    r["quant_ms"] = median_ms(lambda: K.quantize_activations(x))
    r["gemm_ms"] = median_ms(lambda: K.w8a8_gemm(xq, xs, wq, ws, bias, torch.bfloat16, **cfg))

    def layer():
        q, s = K.quantize_activations(x)
        return K.w8a8_gemm(q, s, wq, ws, bias, torch.bfloat16, **cfg)

    r["w8a8_ms"] = median_ms(layer)
    r["dequant_ms"] = median_ms(lambda: K.dequantize_int8_blockwise_cuda(wq, ws, torch.bfloat16))
    r["dequant_torch_ms"] = median_ms(lambda: dequantize_int8_blockwise(wq, ws, torch.bfloat16), reps=5)
    r["w8a16_ms"] = median_ms(lambda: F.linear(x, K.dequantize_int8_blockwise_cuda(wq, ws, torch.bfloat16), bias))
    r["speedup_vs_bf16"] = r["bf16_ms"] / r["w8a8_ms"]
    ops = 2.0 * m * n * k
    r["gemm_tops"] = ops / r["gemm_ms"] / 1e9
    r["int_mm_tops"] = ops / r["int_mm_ms"] / 1e9
    if name == "720p up":
        y = layer()
        r["full_shape_mismatches"] = check_full_shape(y, x, wq, ws, bias)
        r["w8a16_dequant_equal"] = mismatches(K.dequantize_int8_blockwise_cuda(wq, ws, torch.bfloat16),
                                              dequantize_int8_blockwise(wq, ws, torch.bfloat16))
    del x, w, xq, xs
    torch.cuda.empty_cache()
    return r


def card_rates() -> dict:
    """Measured ceilings: int8 and bf16 tensor-core rates on a large square product, copy bandwidth."""
    a8 = torch.randint(-128, 128, (8192, 8192), device="cuda", dtype=torch.int8)
    b8 = torch.randint(-128, 128, (8192, 8192), device="cuda", dtype=torch.int8).t()
    int8 = 2 * 8192**3 / median_ms(lambda: torch._int_mm(a8, b8)) / 1e9
    a16 = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    bf16 = 2 * 8192**3 / median_ms(lambda: a16 @ a16) / 1e9
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    bw = 2 * src.numel() / median_ms(lambda: dst.copy_(src)) / 1e6  # GB/s (bytes per ms / 1e6), read + written
    del a8, b8, a16, src, dst
    torch.cuda.empty_cache()
    return {"int8_tops": int8, "bf16_tflops": bf16, "copy_gbs": bw}


def floor_720p(rates: dict, row: dict) -> dict:
    m, k, n = row["M"], row["K"], row["N"]
    ops = 2.0 * m * n * k
    compute_ms = ops / (rates["int8_tops"] * 1e9)
    # bytes: read x (bf16) + write x_q + read x_q once + read int8 weight + write y (bf16)
    layer_bytes = 2 * m * k + m * k + m * k + n * k + 2 * m * n
    quant_bytes = 2 * m * k + m * k
    return {"compute_floor_ms": compute_ms, "layer_bytes_gb": layer_bytes / 1e9,
            "memory_floor_ms": layer_bytes / (rates["copy_gbs"] * 1e6),
            "quant_floor_ms": quant_bytes / (rates["copy_gbs"] * 1e6),
            "gemm_vs_compute_floor": row["gemm_ms"] / compute_ms}


# ---------------------------------------------------------------------------------------------------------------
# report


def render(rep: dict) -> str:
    L = [BEGIN, "## Int8 layers: Triton W8A8 and W8A16 (`bench/int8.py`)", "",
         f"Card: {rep['card']}; torch {rep['torch']}, triton {rep['triton']}; date {rep['date']}.  ",
         f"Command: `{rep['command']}`  ",
         f"GEMM config: `{rep['config']}`", "",
         "| shape (M x K -> N) | bf16 cuBLAS | torch._int_mm (bare) | act quant | W8A8 GEMM | **W8A8 layer** | "
         "vs bf16 | W8A8 GEMM TOP/s | W8A16 dequant | W8A16 layer |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["rows"]:
        L.append(f"| {r['shape']} ({r['M']} x {r['K']} -> {r['N']}) | {r['bf16_ms']:.2f} ms | {r['int_mm_ms']:.2f} ms"
                 f" | {r['quant_ms']:.3f} ms | {r['gemm_ms']:.2f} ms | **{r['w8a8_ms']:.2f} ms** | "
                 f"{r['speedup_vs_bf16']:.2f}x | {r['gemm_tops']:.0f} | {r['dequant_ms']:.3f} ms "
                 f"(torch ops {r['dequant_torch_ms']:.2f} ms) | {r['w8a16_ms']:.2f} ms |")
    rt, fl = rep["rates"], rep["floor"]
    L += ["", f"Card ceilings measured in the same run: int8 {rt['int8_tops']:.0f} TOP/s (torch._int_mm 8192^3), "
          f"bf16 {rt['bf16_tflops']:.0f} TFLOP/s (8192^3), copy {rt['copy_gbs']:.0f} GB/s (read + write).",
          f"720p FFN up floor: compute {fl['compute_floor_ms']:.2f} ms at that int8 rate (our GEMM is "
          f"{fl['gemm_vs_compute_floor']:.2f}x it); bytes {fl['layer_bytes_gb']:.2f} GB -> "
          f"{fl['memory_floor_ms']:.2f} ms; activation quant alone {fl['quant_floor_ms']:.3f} ms of bytes.",
          "", "Checks (mismatching elements against the exact CPU emulation; 0 = bit-exact): " +
          ", ".join(f"{k}: {v}" for k, v in rep["checks"].items()) + ".", END]
    return "\n".join(L) + "\n"


def record(rep: dict, results_md: Path, results_json: Path) -> None:
    """Read-modify-write: replace only the int8 section and the int8 keys (other benches share these files)."""
    text = results_md.read_text() if results_md.exists() else "# Benchmarks\n"
    section = render(rep)
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + section.rstrip("\n") + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_md.write_text(text)
    up = next(r for r in rep["rows"] if r["shape"] == "720p up")
    merge_results({
        "w8a8_ffn_720p_ms": round(up["w8a8_ms"], 3),
        "bf16_ffn_720p_ms": round(up["bf16_ms"], 3),
        "w8a8_gemm_720p_ms": round(up["gemm_ms"], 3),
        "w8a8_act_quant_720p_ms": round(up["quant_ms"], 3),
        "int_mm_ffn_720p_ms": round(up["int_mm_ms"], 3),
        "w8a16_ffn_720p_ms": round(up["w8a16_ms"], 3),
        "w8a8_speedup_vs_bf16_720p": round(up["speedup_vs_bf16"], 3),
    }, rep["card"], prefix="int8_", date=rep["date"], path=results_json)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for int8_results.json and the kernel's SASS")
    ap.add_argument("--record", type=Path, default=None, help="merge a saved int8_results.json and exit (no GPU)")
    ap.add_argument("--no-sweep", action="store_true", help="time only the module's GEMM_CONFIG")
    ap.add_argument("--results-md", type=Path, default=REPO / "bench" / "RESULTS.md")
    ap.add_argument("--results-json", type=Path, default=RESULTS_JSON)
    args = ap.parse_args()
    if args.record:
        record(json.loads(args.record.read_text()), args.results_md, args.results_json)
        print(render(json.loads(args.record.read_text())))
        return
    if not torch.cuda.is_available():
        sys.exit("bench/int8.py needs a CUDA GPU (use --record FILE to merge results measured elsewhere)")
    import triton

    from turbowan.kernels import int8_triton as K

    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    fixtures = Path(os.environ.get("TURBOWAN_FIXTURES", REPO / "tests" / "fixtures"))
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs, torch {torch.__version__}, triton {triton.__version__}",
          flush=True)

    small = [(77, 200, 256), (300, 257, 384)]
    gen = torch.Generator().manual_seed(1)
    cases = []
    for m, n, k in small:
        x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
        xq, xs = quantize_int8_blockwise(x)
        wq, ws = quantize_int8_blockwise(torch.randn(n, k, generator=gen))
        b = torch.randn(n, generator=gen).to(torch.bfloat16)
        ref = (w8a8_matmul_reference(xq, xs, wq, ws).to(torch.bfloat16) + b)
        cases.append([t.cuda() for t in (xq, xs, wq, ws, b)] + [ref])

    def checks_small(cfg):
        return sum(mismatches(K.w8a8_gemm(*c[:5], torch.bfloat16, **cfg), c[5]) for c in cases)

    cfg = dict(K.GEMM_CONFIG)
    sweep_rows = []
    if not args.no_sweep:
        best, sweep_rows = sweep(K, SHAPES[0], args.out, checks_small)
        if best is None:
            sys.exit("no GEMM config compiled and matched the emulation; see the sweep lines above")
        cfg = best
    print(f"config: {cfg}", flush=True)
    checks = run_checks(K, fixtures, cfg)
    print("checks:", checks, flush=True)
    rates = card_rates()
    print("rates:", rates, flush=True)
    rows = []
    for shape in SHAPES:
        rows.append(bench_shape(K, shape, cfg))
        print(rows[-1], flush=True)
    for r in rows:
        if "full_shape_mismatches" in r:
            checks["720p up rows (first 256, last tile)"] = r["full_shape_mismatches"]
            checks["720p weight dequant"] = r["w8a16_dequant_equal"]
    rep = {"card": f"{props.name} ({props.multi_processor_count} SMs)", "torch": torch.__version__,
           "triton": triton.__version__, "date": str(datetime.date.today()),
           "command": "python bench/int8.py", "config": cfg, "sweep": sweep_rows, "checks": checks,
           "rates": rates, "rows": rows, "floor": floor_720p(rates, rows[0])}
    if args.out:
        (args.out / "int8_results.json").write_text(json.dumps(rep, indent=2))
    record(rep, args.results_md, args.results_json)
    print()
    print(render(rep))


if __name__ == "__main__":
    main()
