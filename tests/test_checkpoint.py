"""The checkpoint reader accepts every released layout and refuses wrong or damaged files in one sentence."""

import os
import random

import pytest
import torch
from helpers import fixtures_dir
from safetensors.torch import save_file

from turbowan import ModelFileError, load_dit, load_vae
from turbowan.checkpoint import read_dit_checkpoint
from turbowan.models.umt5 import load_text_encoder
from turbowan.pipeline import read_text_embedding


def _high():
    return fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high.pth"


def _sd(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _one_line(msg: str) -> bool:
    return "\n" not in msg and len(msg) < 300


def test_safetensors_with_net_and_wrapper_prefixes_loads_like_the_pth(tmp_path):
    sd = {("net." + k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.")): v.contiguous()
          for k, v in _sd(_high()).items()}
    path = tmp_path / "expert.safetensors"
    save_file(sd, str(path))
    a, b = read_dit_checkpoint(_high()), read_dit_checkpoint(path)
    assert a.config == b.config and a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_quant_safetensors_is_recognised(tmp_path):
    sd = _sd(fixtures_dir() / "dit" / "TurboWan2.2-I2V-tiny-high-quant.pth")
    path = tmp_path / "expert-quant.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    assert read_dit_checkpoint(path).quantized


def test_conv3d_patch_embedding_is_flattened(tmp_path):
    sd = _sd(_high())
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"].reshape(128, 36, 1, 2, 2)
    path = tmp_path / "conv.pth"
    torch.save(sd, path)
    assert read_dit_checkpoint(path).state_dict["patch_embedding.weight"].shape == (128, 144)


def test_vae_in_the_model_slot_is_refused():
    with pytest.raises(ModelFileError, match="looks like a video VAE.*expects a TurboWan2.2-I2V-A14B") as e:
        load_dit(fixtures_dir() / "vae" / "Wan2.1_VAE-tiny.pth")
    assert _one_line(str(e.value))


def test_text_encoder_in_the_model_slot_is_refused():
    with pytest.raises(ModelFileError, match="looks like a text encoder"):
        load_dit(fixtures_dir() / "umt5" / "models_t5_umt5-tiny-enc-bf16.pth")


def test_truncated_download_is_refused(tmp_path):
    data = _high().read_bytes()
    path = tmp_path / "TurboWan2.2-I2V-A14B-high-720P.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="truncated or corrupt.*download it again") as e:
        load_dit(path)
    assert _one_line(str(e.value))


def test_truncated_safetensors_is_refused(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file({k: v.contiguous() for k, v in _sd(_high()).items()}, str(full))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(full.read_bytes()[:-1000])
    with pytest.raises(ModelFileError, match="truncated or corrupt"):
        load_dit(cut)


def test_checkpoint_missing_a_block_tensor_is_refused(tmp_path):
    sd = _sd(_high())
    del sd["blocks.1.ffn.2.weight"]
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match="incomplete"):
        load_dit(path)


def test_pickled_code_is_never_executed(tmp_path):
    trace = tmp_path / "pwned"

    class Boom:  # unpickling calls os.system("touch <trace>"): the file would prove the code ran
        def __reduce__(self):
            return (os.system, (f"touch {trace}",))

    path = tmp_path / "evil.pth"
    torch.save({"x": Boom()}, path)
    with pytest.raises(ModelFileError, match="refusing to execute code"):
        load_dit(path)
    assert not trace.exists()


def test_file_without_sla_weights_needs_original_attention(tmp_path):
    sd = {k: v for k, v in _sd(_high()).items() if "proj_l" not in k}
    path = tmp_path / "base.pth"
    torch.save(sd, path)
    with pytest.raises(ModelFileError, match="no SLA weights"):
        load_dit(path, attention="sla")
    assert load_dit(path, attention="original").attention == "original"


# -- issue 12: a text-encoder .safetensors that is damaged (row 3); paths that are not files (row 11) -------------


def _umt5_safetensors(tmp_path):
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    sd = _sd(fixtures_dir() / "umt5" / "models_t5_umt5-tiny-enc-bf16.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    return path


def test_truncated_text_encoder_safetensors_is_a_model_file_error(tmp_path):
    path = _umt5_safetensors(tmp_path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="umt5_xxl_fp8_e4m3fn_scaled.safetensors looks truncated") as e:
        load_text_encoder(path, expected_dim=None)
    assert _one_line(str(e.value))


def test_malformed_text_encoder_safetensors_header_is_a_model_file_error(tmp_path):
    path = _umt5_safetensors(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:8] + data[8:].replace(b'"BF16"', b'"XX16"', 1))  # a dtype safetensors does not know
    with pytest.raises(ModelFileError, match="umt5_xxl_fp8_e4m3fn_scaled.safetensors is corrupt") as e:
        load_text_encoder(path, expected_dim=None)
    assert _one_line(str(e.value))


def test_folder_given_as_model_file_is_called_a_folder(tmp_path):
    folder = tmp_path / "TurboWan2.2-I2V-A14B-high-720P.pth"
    folder.mkdir()
    for load in (load_dit, load_vae, load_text_encoder, read_text_embedding):
        with pytest.raises(ModelFileError, match="is a folder, not a model file") as e:
            load(folder)
        assert not isinstance(e.value, FileNotFoundError)


def test_symlink_loop_given_as_model_file_is_called_a_loop(tmp_path):
    loop = tmp_path / "Wan2.1_VAE.pth"
    loop.symlink_to(loop)
    with pytest.raises(ModelFileError, match="symbolic link loop") as e:
        load_vae(loop)
    assert "does not exist" not in str(e.value)


def test_random_bytes_named_pth_are_not_called_pickled_objects(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    path.write_bytes(b"\x80\x02" + random.Random(0).randbytes(4000))  # pickle's magic, then noise
    with pytest.raises(ModelFileError, match="Wan2.1_VAE.pth is corrupt or not the Wan2.1 VAE") as e:
        load_vae(path)
    assert "pickled" not in str(e.value)
