"""Execution modes: the auto choice, host-resident weights, block streaming, and nothing left behind."""

import pytest
import torch
from helpers import tiny_dit_inputs

import turbowan
from turbowan.checkpoint import DiTConfig
from turbowan.models.dit import random_dit
from turbowan.placement import BlockStreamer, HostWeights, Placement, choose_mode, tensor_bytes

GB = 1 << 30
TINY = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=3)


def test_auto_picks_resident_when_both_experts_fit():
    assert choose_mode(80 * GB, 15 * GB, 15 * GB, 8 * GB) == "resident"


def test_auto_picks_swap_when_one_expert_fits():
    assert choose_mode(24 * GB, 15 * GB, 15 * GB, 6 * GB) == "swap"


def test_auto_picks_stream_on_a_small_card():
    assert choose_mode(12 * GB, 15 * GB, 15 * GB, 6 * GB) == "stream"


def test_auto_never_holds_both_experts_when_told_one_at_a_time(monkeypatch):
    high = random_dit(TINY, attention="original", seed=0)
    low = random_dit(TINY, attention="original", seed=1)
    place = Placement(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    assert place.resolve_mode(high, low, tokens=1000) == "resident"
    assert place.resolve_mode(high, low, tokens=1000, allow_resident=False) == "swap"


def test_auto_frees_host_memory_before_measuring(monkeypatch):
    high = random_dit(TINY, attention="original", seed=0)
    calls = []
    place = Placement(torch.device("cuda"), before_load=lambda n, d: calls.append(n))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (1 << 40, 1 << 40))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    place.resolve_mode(high, high, tokens=1000)
    assert calls and calls[0] >= tensor_bytes(high)


def test_explicit_mode_is_kept():
    high = random_dit(TINY, attention="original")
    high.execution_mode = "stream"
    assert Placement(torch.device("cuda")).resolve_mode(high, high, tokens=10) == "stream"


def test_host_weights_round_trip_without_copying_back():
    model = random_dit(TINY, attention="original")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hw = HostWeights(model)
    hw.attach(hw.upload(torch.device("cpu")).wait())
    hw.detach()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(v.data_ptr() == h.data_ptr() for (_, _, v), h in zip(hw.entries, hw.host))


def test_streamed_blocks_give_the_same_output():
    model = random_dit(TINY, attention="original")
    args = tiny_dit_inputs()
    expected = model(*args)
    streamer = BlockStreamer(model.blocks, torch.device("cpu"))
    try:
        assert torch.equal(model(*args), expected)
        assert torch.equal(model(*args), expected)  # a second step starts from the wrapped-around prefetch
    finally:
        streamer.close()


def test_chunked_ffn_gives_the_same_output():
    model = random_dit(TINY, attention="original", dtype=torch.float32)
    args = tiny_dit_inputs()
    expected = model(*args)
    for block in model.blocks:
        block.ffn.chunk = 50  # 3 * 4 * 4 = 48 tokens per frame x 3 frames -> 4 chunks
    assert torch.allclose(model(*args), expected, atol=1e-6)


def test_cancelled_run_leaves_models_where_they_were():
    high = random_dit(TINY, attention="original", seed=0)
    low = random_dit(TINY, attention="original", seed=1)
    high.source, low.source = "a-high", "a-low"
    from turbowan.models.vae import VAEConfig, WanVAE, WanVAEModel

    vae = WanVAE(WanVAEModel(VAEConfig(dim=4)))

    def cancel(stage, done, total):
        if stage == "sample":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        turbowan.generate_i2v(high, low, vae, torch.rand(48, 64, 3), torch.zeros(1, 4, 4096), num_frames=5,
                              width=64, height=48, device="cpu", progress=cancel)
    assert high.device.type == low.device.type == vae.device.type == "cpu"
    assert turbowan.placement.resident_models() == []


def _fake_free_memory(monkeypatch, free):
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, free))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)


def test_resident_with_room_to_spare_runs_the_ffn_in_one_piece(monkeypatch):
    high = random_dit(TINY, attention="original")
    _fake_free_memory(monkeypatch, 1 << 40)
    place = Placement(torch.device("cuda"))
    assert place.resolve_mode(high, high, tokens=75600) == "resident"
    assert place.ffn_chunk is None


def test_tight_memory_keeps_the_ffn_chunked(monkeypatch):
    from turbowan.placement import FFN_CHUNK_TOKENS, activation_bytes

    high = random_dit(TINY, attention="original")
    high.execution_mode = "resident"  # explicit: resident even though the unchunked FFN would not fit
    whole = activation_bytes(75600, TINY.dim, TINY.ffn_dim, None)
    _fake_free_memory(monkeypatch, 2 * tensor_bytes(high) + whole // 2)
    place = Placement(torch.device("cuda"))
    assert place.resolve_mode(high, high, tokens=75600) == "resident"
    assert place.ffn_chunk == FFN_CHUNK_TOKENS
    high.execution_mode = "stream"
    _fake_free_memory(monkeypatch, 1 << 40)
    assert place.resolve_mode(high, high, tokens=75600) == "stream" and place.ffn_chunk == FFN_CHUNK_TOKENS


def test_each_sequence_parallel_rank_counts_only_its_share_of_the_activations(monkeypatch):
    from turbowan.placement import FFN_CHUNK_TOKENS, activation_bytes

    high = random_dit(TINY, attention="original")
    tokens = 75600
    one_rank = activation_bytes(tokens, TINY.dim, TINY.ffn_dim, FFN_CHUNK_TOKENS)
    two_ranks = activation_bytes(tokens, TINY.dim, TINY.ffn_dim, FFN_CHUNK_TOKENS, ranks=2)
    assert two_ranks == activation_bytes(tokens // 2, TINY.dim, TINY.ffn_dim, FFN_CHUNK_TOKENS)
    # room for one expert and half the activations: a whole-sequence run streams, a rank of two holds the expert
    _fake_free_memory(monkeypatch, int(1.1 * (tensor_bytes(high) + two_ranks)) + (1 << 20))
    place = Placement(torch.device("cuda"))
    assert one_rank > two_ranks
    assert place.resolve_mode(high, high, tokens=tokens) == "stream"
    assert place.resolve_mode(high, high, tokens=tokens, ranks=2) == "swap"
