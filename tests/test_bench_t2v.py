"""bench/t2v.py (run once on an H200 by hand) works end to end in its tiny CPU mode, and refuses a missing
reference checkout before any work."""


import pytest
from helpers import bench_module


def _bench():
    return bench_module("t2v")


def test_tiny_cpu_run_gives_every_figure_of_ours(tmp_path):
    results = _bench().main(["--tiny", "--device", "cpu", "--videos", "2", "--repeat", "1",
                             "--results", str(tmp_path / "results.json")])
    assert set(results) == {"t2v_1p3b_step_480p_s", "t2v_1p3b_next_video_480p_s", "t2v_14b_step_720p_s"}
    assert all(v > 0 for v in results.values())
    assert not (tmp_path / "results.json").exists()  # tiny figures never reach the results file


def test_missing_reference_checkout_is_refused_up_front(tmp_path):
    with pytest.raises(SystemExit, match="no TurboDiffusion checkout there"):
        _bench().reference_dir(tmp_path)
