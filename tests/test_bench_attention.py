"""bench/attention.py's table (run on an H100/H200 by hand): the Gluon SLA row stands beside the Triton one, and the
720p target line counts the kernel `sla` runs."""

from helpers import bench_module


def _result(gluon: bool) -> dict:
    entry = {"shape": "720p", "topk": 0.1, "blocks": 118, "flops": 1.0e13}
    rows = [{**entry, "method": "ours_sla", "ms": 28.8, "tflops": 347.0, "lut_ours_vs_torch": {"rows_differ": 0}},
            {**entry, "method": "checks", "ours_vs_torch_path_rel_l2": 3e-3}]
    if gluon:
        rows.insert(1, {**entry, "method": "ours_sla_gluon", "ms": 26.8, "tflops": 373.0, "rel_l2_vs_ours_sla": 0.0})
    return {"card": "NVIDIA H200", "capability": [9, 0], "date": "2026-11-29", "command": "python3 bench/attention.py",
            "torch": "2.11", "triton": "3.6.0", "ceilings": {"bf16_matmul_tflops": 750.0, "copy_tb_s": 4.0},
            "rows": rows}


def test_table_shows_the_gluon_sla_beside_the_triton_one_and_targets_the_kernel_sla_runs():
    table = bench_module("attention").table(_result(gluon=True))
    assert "| 720p | ours_sla | 0.1 | 118 | 28.8 |" in table
    assert "| 720p | ours_sla_gluon | 0.1 | 118 | 26.8 | 373 | rel L2 vs ours_sla (Triton) 0.0000 |" in table
    assert "sla 26.8 ms against the 22 ms goal" in table


def test_without_the_gluon_row_the_target_is_the_triton_kernel():
    table = bench_module("attention").table(_result(gluon=False))
    assert "ours_sla_gluon |" not in table and "sla 28.8 ms against the 22 ms goal" in table
