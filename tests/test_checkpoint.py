"""The checkpoint reader accepts every released layout and refuses wrong or damaged files in one sentence."""

import os

import pytest
import torch
from helpers import fixtures_dir
from safetensors.torch import save_file

from turbowan import ModelFileError, load_dit
from turbowan.checkpoint import read_dit_checkpoint


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


def test_wan21_t2v_model_is_refused(tmp_path):
    sd = _sd(_high())
    sd["patch_embedding.weight"] = sd["patch_embedding.weight"][:, :64]  # 16 input channels x (1,2,2)
    path = tmp_path / "wan2.1_t2v_1.3B.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    with pytest.raises(ModelFileError, match="text-to-video DiT") as e:
        load_dit(path)
    assert _one_line(str(e.value))


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
