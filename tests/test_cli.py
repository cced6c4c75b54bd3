"""The `turbowan` command line: generate with the tiny fixture models, its errors and exit codes, Ctrl-C,
`doctor` on this machine and `demo`. Runs in-process through `turbowan.cli.main` (two subprocesses check the
real `python -m turbowan` exit paths)."""

from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from helpers import REPO, decode, fixtures_dir, write_tiny_lora
from turbowan import cli

av = pytest.importorskip("av")


@pytest.fixture
def tiny(tmp_path):
    """Paths of the tiny reference-layout models, an input image and a saved [1, 12, 4096] text embedding."""
    fx = fixtures_dir()
    emb = tmp_path / "prompt.safetensors"
    save_file({"text_embedding": (0.1 * torch.randn(1, 12, 4096, generator=torch.Generator().manual_seed(0)))
               .to(torch.bfloat16)}, str(emb))
    return {
        "image": fx / "pipeline" / "input_image.png",
        "high": fx / "dit" / "TurboWan2.2-I2V-tiny-high.pth",
        "low": fx / "dit" / "TurboWan2.2-I2V-tiny-low.pth",
        "vae": fx / "vae" / "Wan2.1_VAE-tiny.pth",
        "embedding": emb,
    }


def generate_args(tiny, out, **overrides):
    opts = {"--image": tiny["image"], "--text-embedding": tiny["embedding"], "--high": tiny["high"],
            "--low": tiny["low"], "--vae": tiny["vae"], "--width": 64, "--height": 48, "--frames": 9,
            "--attention": "original", "--device": "cpu", "-o": out}
    opts.update(overrides)
    return ["generate"] + [str(x) for kv in opts.items() for x in kv]


def error_lines(capsys) -> list[str]:
    """stderr without the plain progress lines (stderr is not a terminal under pytest)."""
    return [line for line in capsys.readouterr().err.splitlines() if line.strip() and not line.startswith("progress:")]


@pytest.fixture
def no_loading(monkeypatch):
    """Fails the test if a model is loaded: a refusal must come before any work."""
    import turbowan

    def fail(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    for name in ("load_dit", "load_vae"):
        monkeypatch.setattr(turbowan, name, fail)
    monkeypatch.setattr("turbowan.demo.build_demo_models", fail)


def assert_refused(capsys, argv, *words):
    """The command ends with exit 2 and one line ``error: ...`` holding ``words``."""
    assert cli.main([str(a) for a in argv]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error:") and all(w in line for w in words), line


def test_generate_writes_mp4_with_requested_frames_and_size(tiny, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert cli.main(generate_args(tiny, out)) == 0
    assert decode(out).frames.shape == (9, 48, 64, 3)
    summary = capsys.readouterr().out
    assert "clip.mp4" in summary and "sampling" in summary and "VAE decode" in summary


def test_prompt_goes_through_the_embedding_cache_into_the_pipeline(tiny, tmp_path, monkeypatch):
    # a real umT5-xxl is 11 GB, so the encoder call is replaced; this checks the wiring around it
    import turbowan
    import turbowan.text_cache

    encoder = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    encoder.write_bytes(b"stand-in")
    embedding = torch.randn(1, 512, 4096).to(torch.bfloat16)
    seen = {}

    def cached(path, prompt, cache_dir=None, tokenizer=None, device=None):
        seen.update(path=path, prompt=prompt, tokenizer=tokenizer, device=torch.device(device))
        return embedding

    def generate(high, low, vae, image, context, **kw):
        seen.update(context=context, frames=kw["num_frames"])
        return torch.full((1, kw["num_frames"], kw["height"], kw["width"], 3), 0.5)

    monkeypatch.setattr(turbowan.text_cache, "cached_text_embedding", cached)
    monkeypatch.setattr(turbowan, "generate_i2v", generate)
    args = generate_args(tiny, tmp_path / "clip.mp4", **{"--text-encoder": encoder, "--tokenizer": "spiece.model"})
    i = args.index("--text-embedding")
    args[i : i + 2] = ["--prompt", "a red fox runs through snow"]
    assert cli.main(args) == 0
    assert seen["path"] == encoder and seen["prompt"] == "a red fox runs through snow"
    assert seen["tokenizer"] == "spiece.model" and seen["device"].type == "cpu"
    assert seen["context"] is embedding and seen["frames"] == 9
    assert decode(tmp_path / "clip.mp4").frames.shape == (9, 48, 64, 3)


def test_mode_option_reaches_both_expert_loaders(tiny, tmp_path, monkeypatch):
    import turbowan

    real_load, modes = turbowan.load_dit, []

    def load_dit(path, **kw):
        modes.append(kw.get("mode"))
        return real_load(path, **kw)

    monkeypatch.setattr(turbowan, "load_dit", load_dit)
    monkeypatch.setattr(turbowan, "generate_i2v", lambda *a, **kw: torch.zeros(1, 9, 48, 64, 3))
    assert cli.main(generate_args(tiny, tmp_path / "clip.mp4", **{"--mode": "stream"})) == 0
    assert modes == ["stream", "stream"]


def test_generate_with_sla_refuses_a_topk_that_keeps_no_block_before_loading(tiny, tmp_path, capsys):
    # 64x48, 9 frames = 36 tokens = one key block: int(0.1 * 1) = 0 blocks; the message names the ratio that works
    out = tmp_path / "clip.mp4"
    assert cli.main(generate_args(tiny, out, **{"--attention": "sla", "--sla-topk": 0.1})) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: ") and "sla_topk" in line and "1.0" in line
    assert not out.exists()


def test_wrong_file_in_high_slot_ends_with_one_line_and_exit_2(tiny, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    assert cli.main(generate_args(tiny, out, **{"--high": tiny["vae"]})) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: Wan2.1_VAE-tiny.pth") and "VAE" in line
    assert not out.exists()


def test_frames_80_refused_naming_77_and_81(tiny, tmp_path, capsys):
    assert cli.main(generate_args(tiny, tmp_path / "clip.mp4", **{"--frames": 80})) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: ") and "77" in line and "81" in line


def test_missing_expert_names_option_folder_and_download(tmp_path, capsys):
    assert cli.main(["generate", "--image", "x.png", "--text-embedding", "e.safetensors", "--models-dir",
                     str(tmp_path)]) == 2
    (line,) = error_lines(capsys)
    assert "--high" in line and "diffusion_models/TurboWan2.2-I2V-A14B-high-720P-quant.pth" in line
    assert "huggingface.co" in line


def test_ctrl_c_from_progress_hook_exits_130_and_leaves_no_file(tiny, tmp_path, monkeypatch, capsys):
    def interrupt(self, stage, done, total):
        if stage == "sample":
            raise KeyboardInterrupt  # what Ctrl-C raises in the main thread during a step

    monkeypatch.setattr(cli.StageProgress, "__call__", interrupt)
    out = tmp_path / "out" / "clip.mp4"
    assert cli.main(generate_args(tiny, out)) == 130
    assert "interrupted" in capsys.readouterr().err
    assert not out.parent.exists() or list(out.parent.iterdir()) == []


def test_ctrl_c_while_encoding_the_mp4_leaves_no_partial_file(tiny, tmp_path, monkeypatch):
    real = av.VideoFrame.from_ndarray
    calls = []

    def from_ndarray(*args, **kwargs):  # Ctrl-C arrives after a few frames went into the file
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)
    assert cli.main(generate_args(tiny, tmp_path / "clip.mp4")) == 130
    assert len(calls) == 5
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.safetensors"]  # no clip.mp4, no temporary file


def test_python_dash_m_turbowan_error_is_one_line_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run([sys.executable, "-m", "turbowan", "generate", "--image", "x.png", "--text-embedding",
                          "e.safetensors", "--frames", "80"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [run.stderr.strip()] and "use 77 or 81" in run.stderr
    assert "Traceback" not in run.stderr


def test_python_dash_m_turbowan_exits_zero_after_a_complete_video_and_its_summary(tiny, tmp_path):
    # the command skips the interpreter's teardown (os._exit): the video and the output must be complete first
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = tmp_path / "clip.mp4"
    run = subprocess.run([sys.executable, "-m", "turbowan"] + generate_args(tiny, out), env=env, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.startswith(f"wrote {out} (9 frames, 64x48") and run.stdout.endswith("\n")
    assert decode(out).frames.shape == (9, 48, 64, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "prompt.safetensors"]


def test_models_dir_finds_release_names_and_prefers_quant(tmp_path):
    from turbowan.model_files import find_model_files

    names = {"diffusion_models": ["TurboWan2.2-I2V-A14B-high-720P.pth", "TurboWan2.2-I2V-A14B-high-720P-quant.pth",
                                  "TurboWan2.2-I2V-A14B-low-720P.pth", "wan2.2_ti2v_5B_fp16.safetensors"],
             "vae": ["wan2.2_vae.safetensors", "wan_2.1_vae.safetensors"],
             "clip": ["t5xxl_fp16.safetensors", "nsfw_wan_umt5-xxl_fp8_scaled.safetensors"]}
    for folder, files in names.items():
        (tmp_path / folder).mkdir()
        for name in files:
            (tmp_path / folder / name).touch()
    found = {k: [p.name for p in v] for k, v in find_model_files(tmp_path).items()}
    assert found["high"] == ["TurboWan2.2-I2V-A14B-high-720P-quant.pth", "TurboWan2.2-I2V-A14B-high-720P.pth"]
    assert found["low"] == ["TurboWan2.2-I2V-A14B-low-720P.pth"]
    assert found["vae"] == ["wan_2.1_vae.safetensors"]  # the Wan2.2 (TI2V-5B) VAE is not a candidate
    assert found["text_encoder"] == ["nsfw_wan_umt5-xxl_fp8_scaled.safetensors"]


def test_doctor_runs_here_and_reports_each_check(tiny, tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "vae").mkdir()
    (tmp_path / "diffusion_models" / tiny["high"].name).symlink_to(tiny["high"])
    (tmp_path / "diffusion_models" / tiny["low"].name).symlink_to(tiny["low"])
    (tmp_path / "vae" / tiny["vae"].name).symlink_to(tiny["vae"])
    assert cli.main(["doctor", "--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for phrase in ("torch", "dense attention", "sla, our Triton kernel", "sagesla", "SpargeAttn", "int8 W8A16",
                   "int8 W8A8", "VAE RMSNorm + SiLU", "VAE 96-channel convolution", "memory per execution mode"):
        assert phrase in out
    assert out.count("[ok  ] high-noise expert (used)") == 1 and "[ok  ] Wan2.1 VAE (used)" in out
    assert "umT5-xxl text encoder: not found" in out
    if not torch.cuda.is_available():
        assert "No CUDA GPU here" in out and "turbowan demo" in out


def test_doctor_flags_a_file_in_the_wrong_slot(tiny, tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    (tmp_path / "diffusion_models" / "TurboWan2.2-I2V-A14B-high-720P.pth").symlink_to(tiny["vae"])
    assert cli.main(["doctor", "--models-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] high-noise expert (used)" in out and "looks like a video VAE" in out


def test_doctor_refuses_a_missing_models_dir_before_any_kernel_check(tmp_path, capsys, monkeypatch):
    import turbowan.doctor

    monkeypatch.setattr(turbowan.doctor, "machine_lines", lambda device: pytest.fail("checked the machine first"))
    assert cli.main(["doctor", "--models-dir", str(tmp_path / "no-such-folder")]) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: --models-dir") and "no-such-folder" in line and "not a folder" in line


def test_doctor_on_an_empty_models_dir_says_so_and_exits_1(tmp_path, capsys):
    assert cli.main(["doctor", "--models-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] model files: none found in {tmp_path}" in out and "no problems found" not in out


def test_non_finite_text_embedding_ends_in_one_line_not_a_black_video(tiny, tmp_path, capsys):
    emb = tmp_path / "nan.safetensors"
    save_file({"text_embedding": torch.full((1, 12, 4096), float("nan"), dtype=torch.bfloat16)}, str(emb))
    out = tmp_path / "clip.mp4"
    assert cli.main(generate_args(tiny, out, **{"--text-embedding": emb})) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: the text embedding went non-finite") and "bad embedding" in line
    assert not out.exists()


def test_memory_estimate_follows_the_anchors():
    from turbowan.doctor import estimate_peak_gb

    # bf16 expert resident alone at 720p reproduces the reference's measured 36.2 GB step peak (swap = one expert)
    assert estimate_peak_gb("swap", 1280, 720, 81, expert_gb=28.6) == pytest.approx(36.2, abs=0.05)
    stream, swap, resident = (estimate_peak_gb(m, 1280, 720, 81) for m in ("stream", "swap", "resident"))
    assert stream < swap < resident and stream < 10.0  # issue 5's stream target is 10 GB at 720p
    assert estimate_peak_gb("stream", 832, 480, 81) < stream


def test_demo_writes_a_playable_video(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert cli.main(["demo", "-o", str(out)]) == 0
    from turbowan.demo import DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH

    assert decode(out).frames.shape == (DEMO_FRAMES, DEMO_HEIGHT, DEMO_WIDTH, 3)
    text = capsys.readouterr().out
    assert "RANDOM weights" in text and "released model files" in text


# -- issue 12: refused before any work, one line, exit 2 --------------------------------------------------------


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write in: a read-only one, or /sys for root (who may write anywhere else)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o500)
        yield folder
        folder.chmod(0o700)
    elif os.path.isdir("/sys"):
        yield Path("/sys")
    else:
        pytest.skip("no folder that root cannot write")


def test_unwritable_output_is_refused_before_loading(tiny, tmp_path, capsys, no_loading, read_only_folder):
    assert_refused(capsys, generate_args(tiny, read_only_folder / "clip.mp4"), "-o", "cannot be written")
    assert_refused(capsys, ["demo", "-o", read_only_folder / "demo.mp4"], "cannot be written")
    assert not list(read_only_folder.glob("*.probe")) and not list(read_only_folder.glob("*.mp4"))


def test_output_whose_folder_cannot_be_created_is_refused_before_loading(tiny, tmp_path, capsys, no_loading):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the folder should be")
    assert_refused(capsys, generate_args(tiny, blocker / "sub" / "clip.mp4"), "-o", "cannot be written")
    assert_refused(capsys, ["demo", "-o", blocker / "demo.mp4"], "cannot be written")


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a size and holds no pixels: Pillow reads the size from this header alone."""
    import struct
    import zlib

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [10000, 15000])  # over Pillow's warning limit, and over its error limit
def test_huge_image_is_refused_in_one_line_before_loading(tiny, tmp_path, capsys, no_loading, side):
    image = tmp_path / "huge.png"
    image.write_bytes(png_header(side, side))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Pillow's two-line DecompressionBombWarning would fail the test
        assert_refused(capsys, generate_args(tiny, tmp_path / "clip.mp4", **{"--image": image}),
                       "--image", "megapixels", "downscale")


def test_cpu_run_that_would_not_fit_in_memory_is_refused_with_the_estimate(tiny, tmp_path, capsys, monkeypatch,
                                                                          no_loading):
    monkeypatch.setattr("turbowan.pipeline.available_ram_bytes", lambda: 16 * 10**9)
    argv = generate_args(tiny, tmp_path / "clip.mp4", **{"--frames": 10001, "--width": 1280, "--height": 720})
    assert_refused(capsys, argv, "needs about", "GB", "fewer frames")


@pytest.mark.parametrize("option, value", [("--steps", 0), ("--steps", 5), ("--seed", 2**64), ("--seed", -1),
                                           ("--sigma-max", "nan"), ("--sigma-max", "inf"), ("--sigma-max", 0),
                                           ("--boundary", "nan"), ("--boundary", 1.5), ("--fps", 0),
                                           ("--fps", "nan"), ("--fps", "inf"), ("--quality", 11), ("--samples", 0)])
def test_out_of_range_number_is_refused_naming_its_option(tiny, tmp_path, capsys, no_loading, option, value):
    assert_refused(capsys, generate_args(tiny, tmp_path / "clip.mp4", **{option: value}), option)
    assert list(tmp_path.glob("*.mp4")) == []


def test_largest_seed_is_accepted(tiny, tmp_path):
    assert cli.main(generate_args(tiny, tmp_path / "clip.mp4", **{"--seed": 2**64 - 1, "--steps": 1})) == 0


def test_device_that_cannot_run_the_models_is_refused_in_one_line(tiny, tmp_path, capsys, no_loading):
    assert_refused(capsys, generate_args(tiny, tmp_path / "clip.mp4", **{"--device": "meta"}), "--device", "meta")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_or_sighup_during_the_write_leaves_no_partial_file(tiny, tmp_path, monkeypatch, capsys, signum):
    real = av.VideoFrame.from_ndarray
    calls = []

    def from_ndarray(*args, **kwargs):  # the signal arrives after a few frames went into the file
        calls.append(1)
        if len(calls) == 5:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", from_ndarray)
    assert cli.main(generate_args(tiny, tmp_path / "clip.mp4")) == 128 + signum
    assert [p.name for p in tmp_path.iterdir()] == ["prompt.safetensors"]  # no clip.mp4, no .part file
    (line,) = error_lines(capsys)
    assert line.startswith("terminated by SIG")
    assert signal.getsignal(signum) is not None and signal.getsignal(signum).__module__ != cli.__name__


def test_plain_progress_lines_per_unit_when_stderr_is_not_a_terminal(capsys):
    progress = cli.StageProgress()
    progress("sample", 1, 4)
    progress("sample", 2, 4)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" in ")[0] for line in lines] == ["progress: sampling 1/4", "progress: sampling 2/4"]
    assert all(line.endswith(" s)") for line in lines)


def test_a_long_unit_still_reports_every_few_seconds(capsys, monkeypatch):
    monkeypatch.setattr(cli, "TICK_SECONDS", 0.05)
    progress = cli.StageProgress()
    progress.begin("sample", 4)
    time.sleep(0.4)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) >= 2 and all(line.startswith("progress: sampling 0/4 running") for line in lines)


def test_cpu_run_uses_no_more_threads_than_cpus_it_may_use(monkeypatch):
    from turbowan import devices

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(devices, "cpu_count_available", lambda: 1)
    saved = torch.get_num_threads()
    try:
        devices.set_cpu_threads()
        assert torch.get_num_threads() == 1
        torch.set_num_threads(saved)
        monkeypatch.setenv("OMP_NUM_THREADS", "3")  # the user's choice wins
        devices.set_cpu_threads()
        assert torch.get_num_threads() == saved
    finally:
        torch.set_num_threads(saved)


def test_damaged_text_encoder_is_one_error_line(tiny, tmp_path, monkeypatch, capsys):
    encoder = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    encoder.write_bytes(struct.pack("<Q", 4096) + b'{"shared.weight": ')  # a header cut off mid-way
    monkeypatch.setenv("TURBOWAN_CACHE", str(tmp_path / "cache"))
    args = generate_args(tiny, tmp_path / "clip.mp4", **{"--text-encoder": encoder, "--prompt": "a fox"})
    args.remove("--text-embedding")
    args.remove(str(tiny["embedding"]))
    assert cli.main(args) == 2
    (line,) = error_lines(capsys)
    assert line.startswith("error: umt5_xxl_fp8_e4m3fn_scaled.safetensors looks truncated")


def test_folder_given_as_a_model_option_is_called_a_folder(tiny, tmp_path, capsys, no_loading):
    argv = generate_args(tiny, tmp_path / "clip.mp4", **{"--high": tmp_path})
    assert cli.main(argv) == 2
    (line,) = error_lines(capsys)
    assert "--high" in line and "is a folder" in line and "does not exist" not in line


def test_lora_high_and_low_reach_their_own_expert_end_to_end(tiny, tmp_path, monkeypatch):
    import turbowan

    high_lora, low_lora = write_tiny_lora(tmp_path / "high.safetensors", 1), write_tiny_lora(tmp_path / "low.safetensors", 2)
    both = write_tiny_lora(tmp_path / "both.safetensors", 3)
    applied, real = [], turbowan.apply_lora

    def spy(model, path, strength=1.0):
        applied.append((Path(model.source).name, Path(path).name, strength))
        return real(model, path, strength)

    monkeypatch.setattr(turbowan, "apply_lora", spy)
    out = tmp_path / "clip.mp4"
    argv = generate_args(tiny, out) + ["--lora", both, "--lora-high", f"{high_lora}:0.5", "--lora-low", low_lora]
    assert cli.main([str(a) for a in argv]) == 0
    assert decode(out).frames.shape == (9, 48, 64, 3)
    assert applied == [(tiny["high"].name, "both.safetensors", 1.0), (tiny["high"].name, "high.safetensors", 0.5),
                       (tiny["low"].name, "both.safetensors", 1.0), (tiny["low"].name, "low.safetensors", 1.0)]


def test_missing_lora_file_is_refused_before_loading(tiny, tmp_path, capsys, no_loading):
    assert_refused(capsys, generate_args(tiny, tmp_path / "o.mp4") + ["--lora-low", tmp_path / "nope.safetensors:0.7"],
                   "nope.safetensors", "does not exist", "a LoRA file")


def test_more_gpus_than_cuda_devices_are_refused_in_one_line(tiny, tmp_path, capsys, no_loading, monkeypatch):
    out = tmp_path / "clip.mp4"
    if not torch.cuda.is_available():  # a CPU machine refuses any count
        assert_refused(capsys, generate_args(tiny, out, **{"--gpus": 1}), "--gpus 1", "sees none here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert_refused(capsys, generate_args(tiny, out, **{"--gpus": 3}), "--gpus 3", "this machine has 2", "at most 2")
    assert_refused(capsys, generate_args(tiny, out, **{"--gpus": 0}), "--gpus must be at least 1")
