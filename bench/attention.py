"""Attention benchmark for TurboWan's SLA kernels (issue 4), one run for both Wan2.2 shapes.

On an H100/H200:
    python3 bench/attention.py --ref .ref --save /tmp/attention.json
        runs the GPU tests of tests/test_sla.py and tests/test_sla_gluon_gpu.py, measures the card's bf16 matmul
        rate and copy bandwidth, then times cuDNN / flash dense SDPA, the reference SparseLinearAttention module
        (imported from the folder that holds the reference `SLA` package, when --ref is given), ours `sla` (the
        Triton kernel, and on Hopper the Gluon one that `sla` runs there) and ours `sagesla` at topk 0.1 / 0.15 /
        0.2 for 720p (L = 75,600) and 480p (L = 32,760), B = 1, 40 heads x 128, bf16; checks block maps and outputs;
        prints a table and saves every number as JSON.
    python3 bench/attention.py --render /tmp/attention.json
        writes a saved run into the attention section of bench/RESULTS.md and merges its keys into bench/results.json.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import subprocess
import sys
from pathlib import Path

import torch

from common import REPO, merge_results, median_ms

SHAPES = {"720p": 75_600, "480p": 32_760}  # tokens of an 81-frame clip: 21 latent frames x (45x80 | 30x52)
HEADS, HEAD_DIM, BLKQ, BLKK = 40, 128, 128, 64
SECTION_BEGIN, SECTION_END = "<!-- attention:begin -->", "<!-- attention:end -->"


def rel_l2(a, b) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def ceilings() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm = median_ms(lambda: a @ b, reps=10, warmup=3)
    src = torch.randn(512 * 1024 * 1024, device="cuda", dtype=torch.float32)  # 2 GiB
    dst = torch.empty_like(src)
    cp = median_ms(lambda: dst.copy_(src), reps=10, warmup=2)
    del a, b, src, dst
    return {"bf16_matmul_tflops": 2 * 8192**3 / mm / 1e9, "copy_tb_s": 2 * 2 * 2**30 / cp / 1e9}


def structured_inputs(length: int, seed: int):
    """q, k, v (1, L, 40, 128) bf16 on CUDA; key blocks carry distinct means so the top-k choice has margins."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, length, HEADS, HEAD_DIM)

    def randn(*s):
        return torch.randn(*s, generator=gen, device="cuda")

    q = randn(*shape) * 0.5 + randn(1, -(-length // BLKQ), HEADS, HEAD_DIM).repeat_interleave(BLKQ, 1)[:, :length]
    k = randn(*shape) * 0.5 + 2 * randn(1, -(-length // BLKK), HEADS, HEAD_DIM).repeat_interleave(BLKK, 1)[:, :length]
    v = randn(*shape)
    weight = randn(HEAD_DIM, HEAD_DIM) / HEAD_DIM**0.5
    bias = randn(HEAD_DIM) * 0.1
    return q.bfloat16(), k.bfloat16(), v.bfloat16(), weight, bias


def import_reference(ref_dir: str | None):
    if not ref_dir:
        return None
    sys.path.insert(0, str(Path(ref_dir).resolve()))
    try:
        from SLA import SparseLinearAttention
        from SLA.utils import get_block_map
    except Exception as err:  # noqa: BLE001 - report and go on without the reference
        print(f"reference SLA not importable from {ref_dir}: {err!r}")
        return None
    return SparseLinearAttention, get_block_map


def spargeattn_rows(q, k, v, weight, bias, topk, entry, flops, reps):
    """With SpargeAttn (`spas_sage_attn`) built: the reference's SageSLA module and our `sagesla_spargeattn` path,
    timed, with the error against the fp32 SLA of the same block shape (64-query x 128-key blocks on Hopper)."""
    from turbowan.kernels import sla_triton
    from turbowan.ops import spargeattn

    if not spargeattn.available():
        print("SpargeAttn (spas_sage_attn) not importable: no SageSLA rows")
        return []
    fp32 = sla_triton.sla_attention_triton(q.float(), k.float(), v.float(), weight, bias, topk,
                                           blkq=spargeattn.BLKQ, blkk=spargeattn.BLKK)
    rows = []
    try:
        from SLA import SageSparseLinearAttention
        module = SageSparseLinearAttention(HEAD_DIM, topk).cuda()
        with torch.no_grad():
            module.proj_l.weight.copy_(weight)
            module.proj_l.bias.copy_(bias)
        ref = torch.no_grad()(module)
        candidates = [("ref_sagesla_spargeattn", lambda: ref(q, k, v))]  # (B, L, H, D) in and out, like SLA's
    except Exception as err:  # noqa: BLE001 - no reference checkout: only our path
        print(f"reference SageSLA unavailable: {err!r}")
        candidates = []
    candidates.append(("ours_sagesla_spargeattn", lambda: spargeattn.sagesla_spargeattn(q, k, v, weight, bias, topk)))
    for name, fn in candidates:
        out = fn()
        ms = median_ms(fn, reps=reps)
        rows.append({**entry, "method": name, "ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_fp32": rel_l2(out, fp32),
                     "blocks_q_k": [spargeattn.BLKQ, spargeattn.BLKK]})
    return rows


def tie_report(scores, lut_a, lut_b, count):
    """Rows where two LUTs differ, and whether every differing block is a bf16 tie at the selection threshold."""
    differ = (lut_a != lut_b).any(dim=-1).reshape(-1)
    rows = int(differ.sum())
    report = {"rows_differ": rows, "rows": int(differ.numel()), "all_ties": True}
    if rows:
        s = scores.float().reshape(-1, scores.shape[-1])[differ]
        a, b = lut_a.reshape(-1, count)[differ], lut_b.reshape(-1, count)[differ]
        in_a = torch.zeros_like(s, dtype=torch.bool).scatter_(1, a, True)
        in_b = torch.zeros_like(s, dtype=torch.bool).scatter_(1, b, True)
        threshold = s.topk(count, dim=-1).values[:, -1:]
        off = ((s - threshold).abs() - 2.0**-7 * threshold.abs()).masked_fill(in_a == in_b, float("-inf"))
        report["all_ties"] = bool((off.amax(dim=1) <= 0).all())
    return report


def run_bench(args) -> dict:
    import triton

    from turbowan.kernels import sagesla_triton, sla_common, sla_gluon, sla_triton
    from turbowan.ops.sla import sla_attention, sla_block_map, sla_block_scores

    props = torch.cuda.get_device_properties(0)
    result = {
        "card": props.name,
        "capability": list(torch.cuda.get_device_capability(0)),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d"),
        "command": "python3 bench/attention.py " + " ".join(sys.argv[1:]),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "sla_config": dict(sla_common.DEFAULT_CONFIG),
        "sagesla_pv_fp8_default": sagesla_triton.fp8_supported(),
        # the Hopper kernel `sla` runs for these inputs (bf16, head dim 128, contiguous): timed beside the Triton one
        "sla_gluon": torch.cuda.get_device_capability(0) == (9, 0) and sla_gluon.available(),
    }
    if not args.no_tests:
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-n", "4", str(REPO / "tests" / "test_sla.py"),
             str(REPO / "tests" / "test_sla_gluon_gpu.py")],
            cwd=REPO, capture_output=True, text=True,
        )
        tail = proc.stdout.strip().splitlines()[-12:]
        print("\n".join(tail))
        result["tests"] = {"returncode": proc.returncode, "summary": tail[-1] if tail else ""}
    result["ceilings"] = ceilings()
    print("ceilings:", result["ceilings"])
    reference = import_reference(args.ref)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    for shape, length in SHAPES.items():
        if shape not in args.shapes:
            continue
        q, k, v, weight, bias = structured_inputs(length, seed=0)
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, L, D) views for SDPA
        dense_flops = 4 * HEADS * length * length * HEAD_DIM
        for name, backend in (("cudnn_dense", SDPBackend.CUDNN_ATTENTION), ("flash_dense", SDPBackend.FLASH_ATTENTION)):
            if args.skip_dense:
                break
            try:
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: sdpa(qt, kt, vt), reps=3)
                rows.append({"shape": shape, "method": name, "topk": None, "ms": ms, "tflops": dense_flops / ms / 1e9})
            except RuntimeError as err:
                rows.append({"shape": shape, "method": name, "topk": None, "ms": None, "error": str(err)[:200]})
            print(rows[-1])
        n_keyblocks = -(-length // BLKK)
        scores = sla_block_scores(q, k)
        for topk in args.topk:
            count = int(topk * n_keyblocks)
            flops = 4 * HEADS * length * count * BLKK * HEAD_DIM  # selected blocks only
            entry = {"shape": shape, "topk": topk, "blocks": count, "flops": flops}
            lut_torch, _ = sla_block_map(q, k, topk)
            lut_ours, _ = sla_triton.sla_block_map_triton(q, k, topk)
            entry["lut_ours_vs_torch"] = tie_report(scores, lut_ours, lut_torch, count)

            out = sla_triton.sla_attention_triton(q, k, v, weight, bias, topk)
            ms = median_ms(lambda: sla_triton.sla_attention_triton(q, k, v, weight, bias, topk), reps=args.reps)
            rows.append({**entry, "method": "ours_sla", "ms": ms, "tflops": flops / ms / 1e9})
            print(rows[-1])
            if result["sla_gluon"]:
                try:
                    gluon_out = sla_gluon.sla_attention_gluon(q, k, v, weight, bias, topk)
                    ms = median_ms(lambda: sla_gluon.sla_attention_gluon(q, k, v, weight, bias, topk), reps=args.reps)
                    rows.append({**entry, "method": "ours_sla_gluon", "ms": ms, "tflops": flops / ms / 1e9,
                                 "rel_l2_vs_ours_sla": rel_l2(gluon_out, out)})
                    del gluon_out
                except Exception as err:  # noqa: BLE001 - reported, not fatal
                    rows.append({**entry, "method": "ours_sla_gluon", "ms": None, "error": repr(err)[:300]})
                print(rows[-1])
            checks = {}
            if topk == args.topk[0]:
                checks["ours_vs_torch_path_rel_l2"] = rel_l2(out, sla_attention(q, k, v, weight, bias, topk))
                float_ref = sla_triton.sla_attention_triton(q.float(), k.float(), v.float(), weight, bias, topk)
                checks["ours_vs_fp32_rel_l2"] = rel_l2(out, float_ref)
            for pv_fp8 in (False, True):
                label = "ours_sagesla_fp8pv" if pv_fp8 else "ours_sagesla"
                try:
                    sage = sagesla_triton.sagesla_attention_triton(q, k, v, weight, bias, topk, pv_fp8=pv_fp8)
                    ms = median_ms(
                        lambda: sagesla_triton.sagesla_attention_triton(q, k, v, weight, bias, topk, pv_fp8=pv_fp8),
                        reps=args.reps,
                    )
                    row = {**entry, "method": label, "ms": ms, "tflops": flops / ms / 1e9}
                    row["rel_l2_vs_ours_sla"] = rel_l2(sage, out)
                    if topk == args.topk[0]:
                        row["rel_l2_vs_fp32"] = rel_l2(sage, float_ref)
                    del sage
                except Exception as err:  # noqa: BLE001 - a failing variant is reported, not fatal
                    row = {**entry, "method": label, "ms": None, "error": repr(err)[:300]}
                rows.append(row)
                print(rows[-1])
            if topk == args.topk[0]:
                del float_ref
            if reference is not None:
                module_cls, get_block_map = reference
                module = module_cls(HEAD_DIM, topk, BLKQ=BLKQ, BLKK=BLKK).cuda()
                with torch.no_grad():
                    module.proj_l.weight.copy_(weight)
                    module.proj_l.bias.copy_(bias)
                    ref_out = module(q, k, v)
                    ms = median_ms(lambda: module(q, k, v), reps=args.reps)
                    _, ref_lut, _ = get_block_map(
                        q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), topk, BLKQ, BLKK
                    )
                checks["lut_ref_vs_ours"] = tie_report(scores, ref_lut.sort(dim=-1).values, lut_ours, count)
                checks["ours_vs_ref_module_rel_l2"] = rel_l2(out, ref_out)
                rows.append({**entry, "method": "ref_sla", "ms": ms, "tflops": flops / ms / 1e9})
                print(rows[-1])
                del ref_out, module
                for sage_row in spargeattn_rows(q, k, v, weight, bias, topk, entry, flops, args.reps):
                    rows.append(sage_row)
                    print(rows[-1])
            rows.append({**entry, "method": "checks", **checks})
            print(rows[-1])
            del out
        if args.sweep and shape == "720p":
            topk = args.topk[0]
            count = int(topk * n_keyblocks)
            flops = 4 * HEADS * length * count * BLKK * HEAD_DIM
            sage = sagesla_triton.sagesla_attention_triton
            variants = [("sla", sla_triton.sla_attention_triton, {"pair": 1, "num_warps": 8, "num_stages": 3}),
                        ("sla", sla_triton.sla_attention_triton, {"pair": 2, "num_warps": 8, "num_stages": 2}),
                        ("sagesla_fp8pv", functools.partial(sage, pv_fp8=True),
                         {"pair": 1, "num_warps": 8, "num_stages": 3})]
            baseline = sla_triton.sla_attention_triton(q, k, v, weight, bias, topk)
            for label, fn, cfg in variants:
                try:
                    err_l2 = rel_l2(fn(q, k, v, weight, bias, topk, config=cfg), baseline)
                    ms = median_ms(lambda: fn(q, k, v, weight, bias, topk, config=cfg), reps=args.reps)
                    rows.append({"shape": shape, "topk": topk, "method": f"sweep_{label}", "config": cfg,
                                 "ms": ms, "tflops": flops / ms / 1e9, "rel_l2_vs_ours_sla": err_l2})
                except Exception as err:  # noqa: BLE001
                    rows.append({"shape": shape, "topk": topk, "method": f"sweep_{label}", "config": cfg,
                                 "ms": None, "error": repr(err)[:200]})
                print(rows[-1])
        # time the pieces outside the sparse kernel (each alone): key stats, pooling, scores + top-k
        k_mean, _, _ = sla_common.key_stats(k, v, torch.bfloat16)
        pooled_q, pooled_k = sla_common.pool_blocks(q, BLKQ, None), sla_common.pool_blocks(k, BLKK, k_mean)
        pooled_scores = pooled_q @ pooled_k.transpose(-1, -2)
        count = int(args.topk[0] * n_keyblocks)
        for label, fn in (
            ("key_stats", lambda: sla_common.key_stats(k, v, torch.bfloat16)),
            ("pool_q", lambda: sla_common.pool_blocks(q, BLKQ, None)),
            ("pool_k", lambda: sla_common.pool_blocks(k, BLKK, k_mean)),
            ("scores_topk_sort", lambda: torch.topk(pooled_q @ pooled_k.transpose(-1, -2), count, dim=-1,
                                                    sorted=False).indices.sort(dim=-1)),
            ("topk_sort", lambda: torch.topk(pooled_scores, count, dim=-1, sorted=False).indices.sort(dim=-1)),
        ):
            rows.append({"shape": shape, "topk": args.topk[0], "method": f"{label}_only",
                         "ms": median_ms(fn, reps=args.reps)})
            print(rows[-1])
        result["rows"] = rows
        if args.save:  # keep what is done if a later shape fails
            Path(args.save).write_text(json.dumps(result, indent=1))
        del q, k, v, qt, kt, vt, scores
        torch.cuda.empty_cache()
    result["rows"] = rows
    return result


def _fmt(x, digits=1):
    return "-" if x is None else f"{x:.{digits}f}"


def table(result: dict) -> str:
    lines = [
        f"Card: {result['card']} (sm{''.join(map(str, result['capability']))}), date {result['date']}, "
        f"torch {result['torch']}, triton {result['triton']}.",
        f"Command: `{result['command']}`.",
        f"Measured ceilings: bf16 matmul {result['ceilings']['bf16_matmul_tflops']:.0f} TFLOP/s (8192^3), "
        f"copy {result['ceilings']['copy_tb_s']:.2f} TB/s (read + write).",
        "",
        "| shape | method | topk | blocks | ms | TFLOP/s (selected blocks) | checks |",
        "|---|---|---|---|---|---|---|",
    ]
    checks = {(r["shape"], r["topk"]): r for r in result["rows"] if r["method"] == "checks"}
    for r in result["rows"]:
        if r["method"] == "checks" or r["method"].startswith("sweep_") or r["method"].endswith("_only"):
            continue
        note = ""
        if r["method"] == "ours_sla":
            c = checks.get((r["shape"], r["topk"]), {})
            lut = r.get("lut_ours_vs_torch", {})
            note = f"LUT = torch path: {lut.get('rows_differ', '?')} rows differ"
            for key in ("ours_vs_torch_path_rel_l2", "ours_vs_fp32_rel_l2", "ours_vs_ref_module_rel_l2"):
                if key in c:
                    note += f"; {key.replace('ours_vs_', 'vs ').replace('_rel_l2', '')} rel L2 {c[key]:.2e}"
            if "lut_ref_vs_ours" in c:
                ref = c["lut_ref_vs_ours"]
                note += f"; LUT vs reference: {ref['rows_differ']}/{ref['rows']} rows differ (all bf16 ties: {ref['all_ties']})"
        elif r["method"] == "ours_sla_gluon":
            note = (r["error"][:80] if r.get("error")
                    else f"rel L2 vs ours_sla (Triton) {_fmt(r['rel_l2_vs_ours_sla'], 4)}")
        elif r["method"].endswith("_spargeattn"):
            note = f"rel L2 vs fp32 SLA with {r['blocks_q_k'][0]}x{r['blocks_q_k'][1]} blocks {_fmt(r['rel_l2_vs_fp32'], 4)}"
        elif r["method"].startswith("ours_sagesla"):
            note = f"rel L2 vs ours sla {_fmt(r.get('rel_l2_vs_ours_sla'), 4)}"
            if "rel_l2_vs_fp32" in r:
                note += f", vs fp32 {_fmt(r['rel_l2_vs_fp32'], 4)}"
            if r.get("error"):
                note = r["error"][:80]
        elif r.get("error"):
            note = r["error"][:80]
        lines.append(
            f"| {r['shape']} | {r['method']} | {r['topk'] if r['topk'] is not None else '-'} | {r.get('blocks', '-')} "
            f"| {_fmt(r.get('ms'))} | {_fmt(r.get('tflops'), 0)} | {note} |"
        )
    lines += [
        "",
        "ours_sagesla: int8 q.k^T + bf16 P.V (the path on cards without fp8 tensor cores); ours_sagesla_fp8pv: int8 "
        "q.k^T + fp8 P.V (the default on compute capability 8.9+). ours_sla: the Triton kernel; ours_sla_gluon: the "
        "warp-specialized Gluon kernel that `sla` runs on Hopper. TFLOP/s count 4 * L * (blocks * 64) * D per head.",
    ]
    by = {(r["shape"], r["method"], r["topk"]): r.get("ms") for r in result["rows"]}
    # the kernel `sla` runs: the Gluon one where it was timed (Hopper), else the Triton one
    sla_ms = by.get(("720p", "ours_sla_gluon", 0.1)) or by.get(("720p", "ours_sla", 0.1))
    ref_ms = by.get(("720p", "ref_sla", 0.1))
    sage_ms = by.get(("720p", "ours_sagesla_fp8pv", 0.1))
    if sla_ms:
        line = f"Targets at 720p, topk 0.1: sla {sla_ms:.1f} ms against the 22 ms goal"
        if ref_ms:
            line += f" ({ref_ms / sla_ms:.2f}x the reference module's speed)"
        if sage_ms:
            line += f"; sagesla {sla_ms / sage_ms:.2f}x our sla against the 1.5x goal"
        lines += ["", line + ". Gap analysis: bench/ATTENTION_NOTES.md."]
    sweep = [r for r in result["rows"] if r["method"].startswith("sweep_") or r["method"].endswith("_only")]
    if sweep:
        lines += ["", "| shape | variant / piece | config | ms | TFLOP/s | rel L2 vs ours sla |", "|---|---|---|---|---|---|"]
        for r in sweep:
            note = r.get("error", "")[:80] or _fmt(r.get("rel_l2_vs_ours_sla"), 4)
            lines.append(f"| {r['shape']} | {r['method']} | {r.get('config', '-')} | {_fmt(r.get('ms'), 2)} "
                         f"| {_fmt(r.get('tflops'), 0)} | {note} |")
    if "tests" in result:
        lines += ["", f"GPU tests (tests/test_sla.py on the card): {result['tests']['summary']}"]
    return "\n".join(lines)


def render(path: str) -> None:
    result = json.loads(Path(path).read_text())
    body = "## Attention (SLA, issue 4)\n\n" + table(result) + "\n"
    md = REPO / "bench" / "RESULTS.md"
    text = md.read_text() if md.exists() else "# Benchmarks\n"
    section = f"{SECTION_BEGIN}\n{body}{SECTION_END}"
    if SECTION_BEGIN in text and SECTION_END in text:
        head, rest = text.split(SECTION_BEGIN, 1)
        text = head + section + rest.split(SECTION_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    md.write_text(text)

    def pick(shape, method, topk=0.1):
        for r in result["rows"]:
            if r["shape"] == shape and r["method"] == method and (r["topk"] == topk or r["topk"] is None):
                return r.get("ms")
        return None

    sage_method = "ours_sagesla_fp8pv" if result.get("sagesla_pv_fp8_default") else "ours_sagesla"
    headline = {  # sla_*: the kernel `sla` runs (Gluon on Hopper); sla_triton_*: the Triton one
        "sla_720p_topk0.1_ms": pick("720p", "ours_sla_gluon") or pick("720p", "ours_sla"),
        "sla_480p_topk0.1_ms": pick("480p", "ours_sla_gluon") or pick("480p", "ours_sla"),
        "sla_triton_720p_topk0.1_ms": pick("720p", "ours_sla"),
        "sla_triton_480p_topk0.1_ms": pick("480p", "ours_sla"),
        "sagesla_720p_topk0.1_ms": pick("720p", sage_method),
        "ref_sla_720p_topk0.1_ms": pick("720p", "ref_sla"),
        "cudnn_dense_720p_ms": pick("720p", "cudnn_dense"),
    }
    merge_results({key: round(ms, 2) for key, ms in headline.items() if ms is not None}, result["card"],
                  date=result["date"])
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", help="folder holding the reference `SLA` package (thu-ml/TurboDiffusion)")
    parser.add_argument("--save", help="write the raw results as JSON here")
    parser.add_argument("--render", help="write a saved JSON run into bench/RESULTS.md and bench/results.json")
    parser.add_argument("--shapes", default="720p,480p", type=lambda s: s.split(","))
    parser.add_argument("--topk", default="0.1,0.15,0.2", type=lambda s: [float(x) for x in s.split(",")])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--sweep", action="store_true", help="also time kernel tile configurations at 720p")
    parser.add_argument("--skip-dense", action="store_true")
    parser.add_argument("--no-tests", action="store_true")
    args = parser.parse_args()
    if args.render:
        render(args.render)
        return
    if not torch.cuda.is_available():
        sys.exit("bench/attention.py times CUDA kernels: run it on a machine with an NVIDIA GPU.")
    result = run_bench(args)
    if args.save:
        Path(args.save).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
