"""`turbowan generate --gpus N`: the command starts N rank processes itself (here on the CPU over gloo, through
TURBOWAN_RANKS_ON_CPU=1, with the tiny fixture models), rank 0 writes the one video; a stopped or killed rank
ends them all, leaves no partial file, and its status is the command's."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import REPO, decode
from test_cli import assert_refused, generate_args, no_loading, tiny  # noqa: F401 (fixtures)
from turbowan import cli, pipeline
from turbowan.vae_tiling import tile_for_ranks

av = pytest.importorskip("av")


@pytest.fixture
def cpu_ranks(monkeypatch):
    monkeypatch.setenv(cli.RANKS_ON_CPU, "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the ranks share the machine's few cores


def _ranks_args(tiny, out, **overrides):
    argv = generate_args(tiny, out, **overrides)
    i = argv.index("--device")
    return argv[:i] + argv[i + 2:]  # the ranks pick their devices


def test_two_ranks_write_one_video_matching_the_one_process_run(tiny, tmp_path, capfd, cpu_ranks):
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    assert cli.main(generate_args(tiny, one)) == 0
    capfd.readouterr()
    assert cli.main(_ranks_args(tiny, two, **{"--gpus": 2})) == 0
    out = capfd.readouterr()
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".mp4") == ["one.mp4", "two.mp4"]
    assert not [p for p in tmp_path.iterdir() if ".part." in p.name]
    a, b = decode(one).frames.astype(float), decode(two).frames.astype(float)
    assert a.shape == b.shape == (9, 48, 64, 3)
    assert abs(a - b).max() <= 1  # the same frames up to float32 rounding (8-bit values)
    assert "on 2 cpu ranks" in out.out  # one summary line, from rank 0
    assert out.out.count("wrote ") == 1
    assert sum("sampling 4/4" in line for line in out.err.splitlines()) == 1  # progress shown once


def test_ranks_that_do_not_split_the_heads_are_refused_before_any_process_starts(tiny, tmp_path, capsys, cpu_ranks,
                                                                                   no_loading, monkeypatch):
    monkeypatch.setattr(cli, "run_on_ranks", lambda *a: pytest.fail("a rank was started"))
    assert_refused(capsys, _ranks_args(tiny, tmp_path / "o.mp4", **{"--gpus": 4}), "--gpus 4",
                   "2 attention heads", "use one of: 2")
    assert_refused(capsys, generate_args(tiny, tmp_path / "o.mp4", **{"--gpus": 2}), "--gpus 2", "leave --device out")


def test_split_vae_without_gpus_is_refused(tiny, tmp_path, capsys, no_loading):
    assert_refused(capsys, generate_args(tiny, tmp_path / "o.mp4") + ["--split-vae"], "--split-vae", "--gpus 2")


def _start(tiny, out: Path) -> subprocess.Popen:
    """A run long enough to be stopped in the middle (448x448, 33 frames)."""
    argv = _ranks_args(tiny, out, **{"--gpus": 2, "--width": 448, "--height": 448, "--frames": 33})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **{cli.RANKS_ON_CPU: "1"})
    # SIGINT as in a terminal (a test runner's worker may ignore it, and an ignored signal stays so across exec)
    return subprocess.Popen([sys.executable, "-m", "turbowan"] + argv, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if text in line:
            return seen
    pytest.fail(f"the run ended before {text!r}: {''.join(seen)[-2000:]}")


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _assert_no_video_left(folder: Path):
    assert not list(folder.glob("*.mp4")) and not list(folder.glob(".*.part.*"))


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc")
def test_ctrl_c_stops_every_rank_exits_130_and_leaves_no_partial_file(tiny, tmp_path):
    proc = _start(tiny, tmp_path / "clip.mp4")
    _wait_for(proc, "VAE encode")
    ranks = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    proc.send_signal(signal.SIGINT)  # the starting process alone: it stops the ranks itself
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 130, err
    assert "interrupted: stopped, no partial video file left" in err
    assert not [r for r in ranks if Path(f"/proc/{r}").exists()]
    _assert_no_video_left(tmp_path)


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="finds the rank processes through /proc")
def test_a_killed_rank_ends_the_others_and_its_status_is_the_commands(tiny, tmp_path):
    proc = _start(tiny, tmp_path / "clip.mp4")
    _wait_for(proc, "VAE encode")
    ranks = [c for c in _children(proc.pid) if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]
    assert len(ranks) == 2
    os.kill(ranks[1], signal.SIGKILL)
    err = proc.stderr.read()
    assert proc.wait(timeout=90) == 128 + signal.SIGKILL, err
    time.sleep(0.2)
    assert not [r for r in ranks if Path(f"/proc/{r}").exists()]
    _assert_no_video_left(tmp_path)


def test_split_vae_ranks_match_the_one_process_run_tiled_the_same_way(tiny, tmp_path, capfd, cpu_ranks,
                                                                       monkeypatch):
    one, two = tmp_path / "one.mp4", tmp_path / "two.mp4"
    with monkeypatch.context() as m:  # the one-process run with its VAE tiled as the two ranks split it
        m.setattr(pipeline, "tile_for_run", lambda vae, stage, grid, *rest: tile_for_ranks(grid, 2))
        assert cli.main(generate_args(tiny, one)) == 0
    assert cli.main(_ranks_args(tiny, two, **{"--gpus": 2}) + ["--split-vae"]) == 0
    capfd.readouterr()
    a, b = decode(one).frames.astype(float), decode(two).frames.astype(float)
    assert abs(a - b).max() <= 1
