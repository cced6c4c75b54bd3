"""`turbowan generate` without --image: text-to-video with a TurboWan2.1-T2V model, end to end on tiny models;
`turbowan doctor` recognises T2V files."""

import torch
from helpers import decode, fixtures_dir, write_tiny_t2v
from safetensors.torch import save_file

from turbowan import cli
from turbowan.model_files import find_model_files


def _embedding(tmp_path):
    path = tmp_path / "prompt.safetensors"
    save_file({"text_embedding": 0.1 * torch.randn(1, 12, 4096, generator=torch.Generator().manual_seed(0))},
              str(path))
    return path


def _args(tmp_path, **overrides):
    opts = {"--text-embedding": _embedding(tmp_path), "--vae": fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth",
            "--width": 64, "--height": 48, "--frames": 9, "--attention": "original", "--device": "cpu",
            "-o": tmp_path / "t2v.mp4"}
    opts.update(overrides)
    return ["generate"] + [str(x) for kv in opts.items() for x in kv]


def test_generate_without_image_writes_a_text_to_video(tmp_path, capsys):
    model = write_tiny_t2v(tmp_path / "TurboWan2.1-T2V-tiny-quant.pth", quant=True)
    assert cli.main(_args(tmp_path, **{"--model": model})) == 0
    assert decode(tmp_path / "t2v.mp4").frames.shape == (9, 48, 64, 3)
    assert "wrote" in capsys.readouterr().out


def test_models_dir_finds_the_t2v_file_quant_first(tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    write_tiny_t2v(tmp_path / "diffusion_models" / "TurboWan2.1-T2V-1.3B-480P.pth")
    write_tiny_t2v(tmp_path / "diffusion_models" / "TurboWan2.1-T2V-1.3B-480P-quant.pth", quant=True)
    found = find_model_files(tmp_path)["t2v"]
    assert [p.name for p in found] == ["TurboWan2.1-T2V-1.3B-480P-quant.pth", "TurboWan2.1-T2V-1.3B-480P.pth"]
    assert cli.main(_args(tmp_path, **{"--models-dir": tmp_path, "--frames": 5})) == 0
    assert decode(tmp_path / "t2v.mp4").frames.shape[0] == 5


def test_t2v_without_a_model_or_with_i2v_options_is_one_error_line(tmp_path, capsys):
    assert cli.main(_args(tmp_path)) == 2
    assert "no TurboWan2.1-T2V model given: pass --model FILE" in capsys.readouterr().err
    model = write_tiny_t2v(tmp_path / "t2v.pth")
    assert cli.main(_args(tmp_path, **{"--model": model, "--boundary": 0.8})) == 2
    assert "--boundary is an image-to-video option" in capsys.readouterr().err


def test_an_i2v_expert_given_as_the_t2v_model_is_refused(tmp_path, capsys):
    expert = fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high.pth"
    assert cli.main(_args(tmp_path, **{"--model": expert})) == 2
    assert "image-to-video expert" in capsys.readouterr().err


def test_doctor_recognises_t2v_files(tmp_path, capsys):
    (tmp_path / "diffusion_models").mkdir()
    write_tiny_t2v(tmp_path / "diffusion_models" / "TurboWan2.1-T2V-1.3B-480P-quant.pth", quant=True)
    (tmp_path / "diffusion_models" / "TurboWan2.1-T2V-14B-720P.pth").symlink_to(
        fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high.pth")
    cli.main(["doctor", "--models-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "Wan2.1 T2V model, dim 128, 2 blocks" in out and "int8 (-quant)" in out
    assert "the text-to-video slot needs a TurboWan2.1-T2V model" in out
