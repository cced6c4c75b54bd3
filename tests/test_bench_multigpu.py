"""bench/multigpu.py's parts on tiny models with its ranks on the CPU over gloo, so the GPU run is not untried."""

from __future__ import annotations

import sys

import pytest

from helpers import REPO

pytest.importorskip("av")
sys.path.insert(0, str(REPO / "bench"))


def test_every_part_runs_on_tiny_models_with_cpu_ranks_and_prints_the_table(tmp_path, capfd, monkeypatch):
    import multigpu

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert multigpu.main(["--tiny", "--cpu", "--ranks", "1,2", "--res", "720p", "--repeats", "1", "--dir",
                          str(tmp_path), "--no-save"]) == 0
    out = capfd.readouterr().out
    for figure in ("sp2_step_720p_ratio", "sp2_a2a_share_720p", "sp2_next_video_720p_s", "sp2_vae_decode_720p_s",
                   "sp2_frames_whole_vae_vs_1_max_720p", "cli_gpus2_vs_1_mean", "cli_codec_floor_mean",
                   "comfy_two_cards_vs_one_max"):
        assert f"| {figure} |" in out, figure
    # the DiT split alone changes no 8-bit value beyond rounding (float32 on the CPU)
    line = next(x for x in out.splitlines() if x.startswith("| sp2_frames_whole_vae_vs_1_max_720p |"))
    assert float(line.split("|")[2]) <= 1


def test_bad_arguments_are_refused_with_the_reason(capsys):
    import multigpu

    with pytest.raises(SystemExit):
        multigpu.parse_args(["--tiny", "--cpu", "--ranks", "1,3"])
    assert "do not divide the 4 attention heads" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        multigpu.parse_args(["--cpu", "--ranks", "1,2"])
    assert "add --tiny" in capsys.readouterr().err


def test_the_rank_comparison_can_run_on_the_commands_expert_files(tmp_path, capfd, monkeypatch):
    import multigpu

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert multigpu.main(["--tiny", "--cpu", "--ranks", "1,2", "--res", "720p", "--repeats", "1", "--parts", "sp",
                          "--sp-from-files", "--dir", str(tmp_path), "--no-save"]) == 0
    assert (tmp_path / "TurboWan2.2-I2V-A14B-high-720P-quant.pth").exists()  # written first, then loaded by each rank
    out = capfd.readouterr().out
    assert "[2 ranks] loaded the experts from the command's files" in out
    line = next(x for x in out.splitlines() if x.startswith("| sp2_frames_whole_vae_vs_1_max_720p |"))
    assert float(line.split("|")[2]) <= 1
