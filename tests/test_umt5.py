"""umT5 text encoder: parity with the reference fixtures, both checkpoint layouts (Wan .pth and
ComfyUI fp8 safetensors), the tokenizer and prompt cleaning, the embedding cache, wrong files."""

from __future__ import annotations

import base64
import io
import json
import math
import os
import random
import unicodedata
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import turbowan.text_cache as text_cache
from helpers import fixtures_dir, max_abs, rel_err
from turbowan.checkpoint import ModelFileError
from turbowan.models.tokenizer import EOS_ID, PAD_ID, TEXT_LEN, UMT5Tokenizer, clean_prompt
from turbowan.models.umt5 import load_text_encoder, relative_position_buckets

# The fixture model is 64 wide; the width check (4096 for Wan) is exercised in its own test.
TINY = dict(expected_dim=None)


@pytest.fixture(scope="module")
def umt5_dir():
    return fixtures_dir() / "umt5"


@pytest.fixture(scope="module")
def tiny_pth(umt5_dir):
    return umt5_dir / "models_t5_umt5-tiny-enc-bf16.pth"


@pytest.fixture(scope="module")
def reference(umt5_dir):
    return load_file(str(umt5_dir / "umt5_io.safetensors"))


@pytest.fixture(scope="module")
def wan_state(tiny_pth):
    return torch.load(tiny_pth, map_location="cpu", weights_only=True)


def valid_rows(reference):
    return reference["attention_mask"].bool()  # [B, 512]


# --------------------------------------------------------------------------------------------
# Parity with the reference embeddings
# --------------------------------------------------------------------------------------------


def test_encode_ids_matches_reference_bf16(tiny_pth, reference):
    enc = load_text_encoder(tiny_pth, **TINY)
    out = enc.encode_ids(reference["input_ids"], reference["attention_mask"])
    assert out.shape == reference["embeddings_bf16"].shape and out.dtype == torch.bfloat16
    err = max_abs(out, reference["embeddings_bf16"])
    print(f"bf16 vs reference bf16: max abs {err:.3e}")
    # Same op order and roundings as the reference, so bit-exact on CPU (measured 0.0). Allowed:
    # the reference's own bf16 error vs float64 (README: 2.505e-2), so a different CPU's bf16
    # matmul rounding may not fail the test while a wrong formula (errors ~0.1-1) does.
    assert err <= 2.5e-2


def test_encode_ids_float32_matches_reference_within_its_bf16_error(tiny_pth, reference):
    enc = load_text_encoder(tiny_pth, dtype=torch.float32, **TINY)
    out = enc.encode_ids(reference["input_ids"], reference["attention_mask"])
    assert out.dtype == torch.float32
    err = max_abs(out, reference["embeddings_bf16"])
    print(f"fp32 vs reference bf16: max abs {err:.3e}")
    # A float32 run sits at float64 accuracy (next test), so its distance to the bf16 reference
    # is the reference's own bf16-vs-float64 error, 2.505e-2 (README), plus float32 rounding.
    assert err <= 2.6e-2


def test_float32_matches_float64(tiny_pth, reference):
    out32 = load_text_encoder(tiny_pth, dtype=torch.float32, **TINY).encode_ids(
        reference["input_ids"], reference["attention_mask"])
    out64 = load_text_encoder(tiny_pth, dtype=torch.float64, **TINY).encode_ids(
        reference["input_ids"], reference["attention_mask"])
    err = max_abs(out32, out64)
    print(f"fp32 vs fp64: max abs {err:.3e}")
    # Two layers of float32 arithmetic on O(1) values: ~1e-6 (measured 1.3e-6); 1e-4 leaves room.
    assert err <= 1e-4


def test_rows_past_each_prompt_are_zero(tiny_pth, reference):
    out = load_text_encoder(tiny_pth, **TINY).encode_ids(reference["input_ids"], reference["attention_mask"])
    rows = valid_rows(reference)
    assert torch.all(out[~rows] == 0)
    assert torch.all(out[rows].abs().sum(-1) > 0)


def t5_bucket(relative, buckets=32, max_distance=128):
    """The T5 rule in plain Python: direction half, 8 exact distances, then log bins up to 128."""
    half = buckets // 2
    exact = half // 2
    distance = abs(relative)
    if distance >= exact:
        distance = min(half - 1, exact + int(math.log(distance / exact) / math.log(max_distance / exact)
                                             * (half - exact)))
    return distance + (half if relative > 0 else 0)


def test_relative_position_buckets_follow_t5_rule():
    # The fixture's prompts (<= 19 tokens) only reach the exact buckets; check every distance a
    # 512-token prompt meets, both directions, against the rule written out.
    b = relative_position_buckets(TEXT_LEN, 32)
    assert b.shape == (TEXT_LEN, TEXT_LEN)
    assert [int(v) for v in b[0]] == [t5_bucket(j) for j in range(TEXT_LEN)]
    assert [int(v) for v in b[-1]] == [t5_bucket(j - TEXT_LEN + 1) for j in range(TEXT_LEN)]
    assert b[200, 0] == 15 and b[0, 299] == 31 and b[20, 0] == 10


# --------------------------------------------------------------------------------------------
# ComfyUI / Hugging Face layout with fp8 weights
# --------------------------------------------------------------------------------------------

WAN_TO_HF = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
LINEARS = {"attn.q.weight", "attn.k.weight", "attn.v.weight", "attn.o.weight",
           "ffn.gate.0.weight", "ffn.fc1.weight", "ffn.fc2.weight"}


def quantize_fp8(w):
    """ComfyUI's per-tensor scaled fp8: weight ~= fp8 * scale, scale = amax / 448 (e4m3 max)."""
    scale = w.float().abs().max() / 448.0
    return (w.float() / scale).to(torch.float8_e4m3fn), scale.reshape(())


def dequantize(q, scale):
    return (q.float() * scale).to(torch.bfloat16)


def comfy_file(wan_sd, path, style, spiece=None, vocab_rows=None, quantize=True):
    """Write wan_sd in HF/ComfyUI names; returns the Wan-layout weights the file stands for.

    style "scale_weight": older ComfyUI files (top-level `scaled_fp8` marker, `<layer>.scale_weight`,
    bf16 `shared.weight`); style "weight_scale": newer ones (`<layer>.weight_scale` + uint8 JSON
    `<layer>.comfy_quant`), with the embedding quantized too and named encoder.embed_tokens.
    """
    out, equivalent = {}, {}
    marker = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()), dtype=torch.uint8)

    def put(hf_name, wan_name, w, as_fp8):
        if as_fp8 and quantize:
            q, scale = quantize_fp8(w)
            out[hf_name] = q
            layer = hf_name[: -len(".weight")]
            if style == "scale_weight":
                out[layer + ".scale_weight"] = scale
            else:
                out[layer + ".weight_scale"] = scale
                out[layer + ".comfy_quant"] = marker.clone()
            equivalent[wan_name] = dequantize(q, scale)
        else:
            out[hf_name] = w.clone()
            equivalent[wan_name] = w.clone()

    emb = wan_sd["token_embedding.weight"]
    if vocab_rows is not None:  # the real file also has more rows (256384) than the tokenizer (256000)
        extra = torch.randn(vocab_rows - emb.shape[0], emb.shape[1], generator=torch.Generator().manual_seed(1))
        emb = torch.cat([emb, extra.to(emb.dtype)])
    if style == "scale_weight":
        out["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
        put("shared.weight", "token_embedding.weight", emb, as_fp8=False)
    else:
        put("encoder.embed_tokens.weight", "token_embedding.weight", emb, as_fp8=True)
    for name, w in wan_sd.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            put(f"encoder.block.{index}.{WAN_TO_HF[rest]}", name, w, as_fp8=rest in LINEARS)
    put("encoder.final_layer_norm.weight", "norm.weight", wan_sd["norm.weight"], as_fp8=False)
    if spiece is not None:
        out["spiece_model"] = torch.frombuffer(bytearray(spiece), dtype=torch.uint8)
    save_file(out, str(path))
    return equivalent


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfyui_fp8_file_loads_as_its_dequantized_weights(wan_state, reference, tmp_path, style):
    equivalent = comfy_file(wan_state, tmp_path / "umt5_fp8.safetensors", style)
    torch.save(equivalent, tmp_path / "dequantized.pth")
    ids, mask = reference["input_ids"], reference["attention_mask"]
    fp8 = load_text_encoder(tmp_path / "umt5_fp8.safetensors", **TINY).encode_ids(ids, mask)
    dequantized = load_text_encoder(tmp_path / "dequantized.pth", **TINY).encode_ids(ids, mask)
    # Same weights once dequantized (weight * scale in float32, one rounding to bf16): identical.
    assert torch.equal(fp8, dequantized)


@pytest.mark.parametrize("style", ["scale_weight", "weight_scale"])
def test_comfyui_fp8_file_matches_reference_within_fp8_error(wan_state, reference, tmp_path, style):
    comfy_file(wan_state, tmp_path / "umt5_fp8.safetensors", style)
    enc = load_text_encoder(tmp_path / "umt5_fp8.safetensors", **TINY)
    out = enc.encode_ids(reference["input_ids"], reference["attention_mask"])
    rows = valid_rows(reference)
    err = rel_err(out[rows], reference["embeddings_bf16"][rows])
    worst = max_abs(out, reference["embeddings_bf16"])
    print(f"fp8 ({style}) vs reference bf16: rel err {err:.3e}, max abs {worst:.3e}")
    # e4m3 keeps 3 mantissa bits: each weight moves by up to 1/16 of itself (rms ~3.6%), and the
    # 7-8 quantized matrices on the path add up to a few percent at the output (measured 4.2e-2
    # with a bf16 embedding, 5.5e-2 with an fp8 one). A missing scale (values up to 448x off) or
    # a misplaced one gives errors of order 1; 0.1 separates the two.
    assert err <= 0.1
    assert torch.all(out[~rows] == 0)


def test_comfyui_bf16_file_equals_wan_file(wan_state, tiny_pth, reference, tmp_path):
    comfy_file(wan_state, tmp_path / "umt5_bf16.safetensors", "scale_weight", quantize=False)
    ids, mask = reference["input_ids"], reference["attention_mask"]
    comfy = load_text_encoder(tmp_path / "umt5_bf16.safetensors", **TINY).encode_ids(ids, mask)
    # Only the tensor names differ: the same weights give the same bits.
    assert torch.equal(comfy, load_text_encoder(tiny_pth, **TINY).encode_ids(ids, mask))


def test_prefixed_comfyui_save_loads(wan_state, tiny_pth, reference, spiece_bytes, tmp_path):
    comfy_file(wan_state, tmp_path / "plain.safetensors", "weight_scale", spiece=spiece_bytes)
    prefix = "text_encoders.umt5xxl.transformer."
    save_file({prefix + k: v for k, v in load_file(str(tmp_path / "plain.safetensors")).items()},
              str(tmp_path / "prefixed.safetensors"))
    ids, mask = reference["input_ids"], reference["attention_mask"]
    prefixed = load_text_encoder(tmp_path / "prefixed.safetensors", **TINY)
    assert prefixed.tokenizer is not None
    assert torch.equal(prefixed.encode_ids(ids, mask),
                       load_text_encoder(tmp_path / "plain.safetensors", **TINY).encode_ids(ids, mask))


def test_unsupported_quantization_format_is_refused(wan_state, tmp_path):
    comfy_file(wan_state, tmp_path / "q.safetensors", "weight_scale")
    sd = load_file(str(tmp_path / "q.safetensors"))
    sd["encoder.block.0.layer.0.SelfAttention.q.comfy_quant"] = torch.tensor(
        list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_file(sd, str(tmp_path / "q.safetensors"))
    with pytest.raises(ModelFileError, match="nvfp4"):
        load_text_encoder(tmp_path / "q.safetensors", **TINY)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

SAMPLES = {
    "ascii": "A red fox runs through the snowy forest at sunset.",
    "accents": "Le château près de la rivière, où les élèves étudient. Der große Bär, el niño.",
    "cjk": "一只红色的狐狸在雪地里奔跑，猫が桜の木の下で眠っている",
    "emoji": "🦊 in the 🌲 at sunset 🎬 🐙",
}


def _training_lines(count=400):
    rng = random.Random(0)
    words = {
        "en": "a red fox jumps over the lazy dog in snowy forest at sunset camera pans left".split(),
        "fr": "le château près de la rivière où les élèves étudient café crème déjà été garçon".split(),
        "de": "der große Bär läuft über die Brücke schöne Straße grün Mädchen".split(),
        "es": "el niño pequeño camina por la montaña año mañana corazón canción".split(),
    }
    cjk = "一只红色的狐狸在雪地里奔跑夕阳下的森林镜头缓慢移动猫が桜の木の下で眠っているカメラ"
    lines = []
    for i in range(count):
        lang = ["en", "fr", "de", "es", "cjk"][i % 5]
        if lang == "cjk":
            lines.append("".join(rng.choices(cjk, k=10)))
        else:
            lines.append(" ".join(rng.choices(words[lang], k=10)) + rng.choice(["", " 🦊", " 🌲"]))
    return lines


@pytest.fixture(scope="session")
def spiece_bytes():
    """A small real SentencePiece Unigram model with umT5's conventions (pad 0, </s> 1, unk 2,
    no <s>, byte fallback, NFKC normalizer), trained on generated multilingual text."""
    sentencepiece = pytest.importorskip("sentencepiece")
    buf = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_lines()), model_writer=buf, vocab_size=384, model_type="unigram",
        byte_fallback=True, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        num_threads=1, minloglevel=2)
    return buf.getvalue()


@pytest.fixture(scope="session")
def spiece_file(spiece_bytes, tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer") / "spiece.model"
    path.write_bytes(spiece_bytes)
    return path


@pytest.mark.parametrize("case", SAMPLES)
def test_tokenizer_ends_with_eos_then_padding(spiece_file, case):
    tok = UMT5Tokenizer.from_file(spiece_file)
    ids, mask = tok(SAMPLES[case])
    assert ids.shape == mask.shape == (1, TEXT_LEN) and ids.dtype == torch.long
    n = int(mask.sum())
    assert torch.all(mask[0, :n] == 1) and torch.all(mask[0, n:] == 0)
    assert ids[0, n - 1] == EOS_ID and torch.all(ids[0, n:] == PAD_ID)
    assert EOS_ID not in ids[0, : n - 1].tolist() and 2 not in ids[0, : n - 1].tolist()  # no <unk>
    # the pieces spell the cleaned prompt as the NFKC normalizer leaves it (full-width comma ->
    # ","), characters the vocabulary lacks included (byte pieces)
    assert tok.sp.decode(ids[0, : n - 1].tolist()) == unicodedata.normalize("NFKC", clean_prompt(SAMPLES[case]))


def test_tokenizer_falls_back_to_bytes_for_unseen_emoji(spiece_file):
    tok = UMT5Tokenizer.from_file(spiece_file)
    ids, mask = tok("🐙")
    pieces = [tok.sp.id_to_piece(i) for i in ids[0, : int(mask.sum()) - 1].tolist()]
    assert [p for p in pieces if p != "▁"] == ["<0xF0>", "<0x9F>", "<0x90>", "<0x99>"]


def test_long_prompt_is_cut_to_512_tokens_with_eos_last(spiece_file):
    tok = UMT5Tokenizer.from_file(spiece_file)
    rng = random.Random(1)
    words = " ".join(rng.choice(["fox", "château", "狐狸", "🦊", "forest", "niño"]) for _ in range(2000))
    ids, mask = tok(words)
    assert int(mask.sum()) == TEXT_LEN and ids[0, -1] == EOS_ID
    full = tok.sp.encode(clean_prompt(words), out_type=int)
    assert len(full) > TEXT_LEN
    assert ids[0, :-1].tolist() == full[: TEXT_LEN - 1]


def test_tokenizer_batches_prompts(spiece_file):
    tok = UMT5Tokenizer.from_file(spiece_file)
    ids, mask = tok([SAMPLES["ascii"], SAMPLES["cjk"]])
    assert ids.shape == (2, TEXT_LEN)
    assert torch.equal(ids[1:], tok(SAMPLES["cjk"])[0])


def _proto_field(buf: bytes, wanted: int) -> bytes:
    """The first length-delimited field `wanted` of a serialized protobuf message."""
    pos = 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        field, wire = key >> 3, key & 7
        if wire == 0:
            varint()
        elif wire == 5:
            pos += 4
        elif wire == 1:
            pos += 8
        else:
            length = varint()
            if field == wanted:
                return buf[pos:pos + length]
            pos += length
    raise KeyError(wanted)


def hf_tokenizer_json(spiece_bytes) -> dict:
    """The tokenizer.json Hugging Face's converter writes for a SentencePiece Unigram model."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=spiece_bytes)
    charsmap = _proto_field(_proto_field(spiece_bytes, 3), 2)  # normalizer_spec.precompiled_charsmap
    return {
        "version": "1.0",
        "added_tokens": [{"id": i, "content": sp.id_to_piece(i), "special": True, "normalized": False}
                         for i in range(3)],
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()},
            {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "WhitespaceSplit"},
            {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}]},
        "model": {"type": "Unigram", "unk_id": 2, "byte_fallback": True,
                  "vocab": [[sp.id_to_piece(i), sp.get_score(i)] for i in range(sp.get_piece_size())]},
    }


def test_tokenizer_json_gives_the_same_ids_as_spiece_model(spiece_bytes, spiece_file, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(hf_tokenizer_json(spiece_bytes)), encoding="utf-8")
    from_json = UMT5Tokenizer.from_file(path)
    from_spm = UMT5Tokenizer.from_file(spiece_file)
    prompts = [*SAMPLES.values(), "ＦＵＬＬ width ﬁne"]  # the last one needs the NFKC charsmap
    assert torch.equal(from_json(prompts)[0], from_spm(prompts)[0])


def test_clean_prompt_follows_reference_rules():
    assert clean_prompt("  a\t\tred \n\n fox\u3000 ") == "a red fox"
    assert clean_prompt("fish &amp;amp;amp; chips") == "fish & chips"  # no '<': entities to a fixed point
    assert clean_prompt("<b>&amp;amp;amp;</b>") == "<b>&amp;</b>"  # markup: html.unescape twice only
    assert clean_prompt("\u201cquoted\u201d and \u2018single\u2019") == "\"quoted\" and 'single'"
    assert clean_prompt("\x1b[31mred\x1b[0m text\x00\ufeff") == "red text"
    assert clean_prompt("\x93smart\x94") == "\"smart\""  # C1 controls read as Windows-1252
    assert clean_prompt("cafe\u0301") == "caf\u00e9"  # NFC


def test_bad_tokenizer_file_is_refused(tmp_path):
    (tmp_path / "spiece.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        UMT5Tokenizer.from_file(tmp_path / "spiece.model")
    with pytest.raises(ValueError, match="does not exist"):
        UMT5Tokenizer.from_file(tmp_path / "missing.model")


# --------------------------------------------------------------------------------------------
# encode() with the tokenizer the file carries or sits beside
# --------------------------------------------------------------------------------------------


@pytest.fixture
def comfy_with_tokenizer(wan_state, spiece_bytes, tmp_path):
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    comfy_file(wan_state, path, "scale_weight", spiece=spiece_bytes, vocab_rows=448)
    return path


def test_encode_uses_embedded_spiece_model(comfy_with_tokenizer):
    enc = load_text_encoder(comfy_with_tokenizer, **TINY)
    prompts = [SAMPLES["ascii"], SAMPLES["cjk"]]
    out = enc.encode(prompts)
    ids, mask = enc.tokenizer(prompts)
    assert out.shape == (2, TEXT_LEN, 64)
    assert torch.equal(out, enc.encode_ids(ids, mask))
    assert torch.all(out[~mask.bool()] == 0) and torch.all(out[mask.bool()].abs().sum(-1) > 0)
    # a prompt's rows do not depend on its batch neighbours (padding is masked out); bf16 matmuls
    # of different shapes may round differently, so allow a bf16 ulp at |v| < 4.
    alone = enc.encode(SAMPLES["cjk"])
    assert max_abs(alone[0], out[1]) <= 1.6e-2


def test_wan_checkpoint_finds_tokenizer_in_google_umt5_xxl_folder(tiny_pth, spiece_bytes, tmp_path):
    (tmp_path / "google" / "umt5-xxl").mkdir(parents=True)
    (tmp_path / "google" / "umt5-xxl" / "spiece.model").write_bytes(spiece_bytes)
    ckpt = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    ckpt.write_bytes(tiny_pth.read_bytes())
    enc = load_text_encoder(ckpt, **TINY)
    assert enc.tokenizer is not None
    assert enc.tokenizer.sp.serialized_model_proto() == spiece_bytes
    ids, mask = enc.tokenizer("fox")
    assert ids[0, : int(mask.sum())].tolist() == enc.tokenizer.sp.encode("fox") + [EOS_ID]


def test_wan_checkpoint_finds_tokenizer_in_hugging_face_cache(tiny_pth, spiece_bytes, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--google--umt5-xxl" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (snapshot / "spiece.model").write_bytes(spiece_bytes)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    enc = load_text_encoder(tiny_pth, **TINY)
    assert enc.tokenizer is not None and enc.tokenizer.sp.serialized_model_proto() == spiece_bytes


def test_encode_without_tokenizer_says_how_to_get_one(tiny_pth, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    enc = load_text_encoder(tiny_pth, **TINY)
    with pytest.raises(ValueError, match="tokenizer="):
        enc.encode("a fox")


def test_to_moves_encoder_and_reports_device_and_dtype(tiny_pth):
    enc = load_text_encoder(tiny_pth, dtype=torch.float32, **TINY)
    assert enc.device == torch.device("cpu") and enc.dtype == torch.float32
    enc = enc.to(torch.float64)
    assert enc.dtype == torch.float64
    assert all(not p.requires_grad for p in enc.parameters())


# --------------------------------------------------------------------------------------------
# Embedding cache
# --------------------------------------------------------------------------------------------


@pytest.fixture
def counted_loads(monkeypatch):
    calls = []

    def load(path, tokenizer=None, device=None, expected_dim=None):
        calls.append(path)
        return load_text_encoder(path, tokenizer=tokenizer, device=device, expected_dim=expected_dim)

    monkeypatch.setattr(text_cache, "load_text_encoder", load)
    return calls


def test_cache_hit_does_not_load_the_encoder(comfy_with_tokenizer, counted_loads, tmp_path):
    cache = tmp_path / "cache"
    first = text_cache.cached_text_embedding(comfy_with_tokenizer, SAMPLES["accents"], cache_dir=cache, width=64)
    assert len(counted_loads) == 1
    again = text_cache.cached_text_embedding(comfy_with_tokenizer, SAMPLES["accents"], cache_dir=cache, width=64)
    assert len(counted_loads) == 1  # served from disk
    assert first.shape == (1, TEXT_LEN, 64) and torch.equal(first, again)
    direct = load_text_encoder(comfy_with_tokenizer, **TINY).encode(SAMPLES["accents"])
    assert torch.equal(first, direct)
    text_cache.cached_text_embedding(comfy_with_tokenizer, SAMPLES["ascii"], cache_dir=cache, width=64)
    assert len(counted_loads) == 2  # another prompt is another entry
    assert len(list(cache.glob("*.safetensors"))) == 2 and not list(cache.glob("*.tmp"))


def test_cache_defaults_to_turbowan_cache_env(comfy_with_tokenizer, counted_loads, tmp_path, monkeypatch):
    monkeypatch.setenv("TURBOWAN_CACHE", str(tmp_path / "root"))
    text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", width=64)
    assert len(list((tmp_path / "root" / "text").glob("*.safetensors"))) == 1


def test_cache_key_depends_on_encoder_file_content(comfy_with_tokenizer, wan_state, spiece_bytes, tmp_path):
    key = text_cache.cache_key(comfy_with_tokenizer, "a fox")
    assert key == text_cache.cache_key(comfy_with_tokenizer, "a fox")
    assert key != text_cache.cache_key(comfy_with_tokenizer, "a fox.")
    other = tmp_path / "other.safetensors"
    changed = dict(wan_state, **{"norm.weight": wan_state["norm.weight"] * 2})
    comfy_file(changed, other, "scale_weight", spiece=spiece_bytes, vocab_rows=448)
    assert key != text_cache.cache_key(other, "a fox")


def test_unreadable_cache_entry_is_encoded_again(comfy_with_tokenizer, counted_loads, tmp_path):
    cache = tmp_path / "cache"
    good = text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    (entry,) = cache.glob("*.safetensors")
    entry.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{broken")
    again = text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    assert len(counted_loads) == 2 and torch.equal(good, again)


def _one_notice(caplog, words):
    notices = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(notices) == 1 and words in notices[0], notices


BF16 = dict(dtype=torch.bfloat16)


@pytest.mark.parametrize("stored", [
    torch.zeros(1, 5, 64, **BF16), torch.zeros(5, 1024, **BF16), torch.zeros(5, 64, dtype=torch.float32),
    torch.full((5, 64), float("nan"), **BF16), torch.zeros(0, 64, **BF16)],
    ids=["3-d", "1024-wide", "float32", "nan", "0-rows"])
def test_invalid_cache_entry_is_replaced_with_one_notice(stored, comfy_with_tokenizer, counted_loads, tmp_path,
                                                         caplog):
    cache = tmp_path / "cache"
    good = text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    (entry,) = cache.glob("*.safetensors")
    save_file({"prefix": stored}, str(entry))
    again = text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    assert len(counted_loads) == 2 and torch.equal(good, again)
    _one_notice(caplog, "encoding the prompt again")
    text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    assert len(counted_loads) == 2  # the replacement entry is used from now on


def test_cache_entry_that_is_a_folder_is_replaced(comfy_with_tokenizer, counted_loads, tmp_path, caplog):
    cache = tmp_path / "cache"
    entry = cache / f"{text_cache.cache_key(comfy_with_tokenizer, 'a fox')}.safetensors"
    (entry / "inside").mkdir(parents=True)
    text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", cache_dir=cache, width=64)
    assert entry.is_file()
    _one_notice(caplog, "is a folder")


def _not_writable_folder(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    return folder


@pytest.mark.parametrize("where", ["a-file", "proc", "read-only"])
def test_unusable_cache_location_runs_without_the_cache_with_one_notice(where, comfy_with_tokenizer, counted_loads,
                                                                        tmp_path, monkeypatch, caplog):
    if where == "a-file":
        root = tmp_path / "cache-file"
        root.write_text("not a folder")
    else:
        root = Path("/proc") if where == "proc" else _not_writable_folder(tmp_path)
    monkeypatch.setenv("TURBOWAN_CACHE", str(root))
    out = text_cache.cached_text_embedding(comfy_with_tokenizer, "a fox", width=64)
    assert out.shape == (1, TEXT_LEN, 64) and len(counted_loads) == 1
    _one_notice(caplog, "running without it")


# --------------------------------------------------------------------------------------------
# Wrong files
# --------------------------------------------------------------------------------------------


def _t5_v11(wan_state, path):
    comfy_file(wan_state, path, "scale_weight", quantize=False)
    sd = load_file(str(path))
    for name in list(sd):
        if "relative_attention_bias" in name and not name.startswith("encoder.block.0."):
            del sd[name]
    save_file(sd, str(path))


def _clip_l(path):
    save_file({"text_model.embeddings.token_embedding.weight": torch.zeros(8, 4),
               "text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4),
               "text_model.final_layer_norm.weight": torch.zeros(4)}, str(path))


@pytest.mark.parametrize("kind, expected", [
    ("dit", "diffusion model"),
    ("vae", "VAE"),
    ("clip", "CLIP"),
    ("t5_v11", "T5 v1.1"),
    ("narrow_umt5", "width 64"),
    ("garbage", "neither a .safetensors nor a PyTorch checkpoint"),
])
def test_wrong_file_is_refused_with_what_it_looks_like(kind, expected, wan_state, tmp_path):
    fixtures = fixtures_dir()
    if kind == "dit":
        path = fixtures / "dit" / "TurboWan2.2-I2V-tiny-high.pth"
    elif kind == "vae":
        path = fixtures / "vae" / "Wan2.1_VAE-tiny.pth"
    else:
        path = tmp_path / f"{kind}.safetensors"
        if kind == "clip":
            _clip_l(path)
        elif kind == "t5_v11":
            _t5_v11(wan_state, path)
        elif kind == "narrow_umt5":
            comfy_file(wan_state, path, "scale_weight")
        else:
            path.write_bytes(b"hello world, not weights")
    with pytest.raises(ModelFileError, match=expected) as err:
        load_text_encoder(path)  # default expected_dim: Wan's 4096
    assert "umT5-xxl" in str(err.value)
