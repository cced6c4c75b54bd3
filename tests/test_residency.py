"""Models stay on the device between runs until memory is needed or they are released; the staging ring copies
pageable and memory-mapped weights exactly.

CUDA is simulated on the CPU (the ``fake_gpu`` fixture in conftest.py)."""

import pytest
import torch
from helpers import tiny_dit_inputs

from turbowan.checkpoint import DiTConfig
from turbowan.models.dit import random_dit
from turbowan import placement
from turbowan.placement import Placement, release, release_all, resident_models, tensor_bytes
from turbowan.staging import StagingRing

TINY = DiTConfig(dim=128, ffn_dim=256, num_heads=2, num_layers=3)
CUDA = torch.device("cuda")


def _experts(seed=0):
    return random_dit(TINY, attention="original", seed=seed), random_dit(TINY, attention="original", seed=seed + 1)


def _run(high, low, mode="resident", ok=True):
    place = Placement(CUDA)
    for m in (high, low):
        place.load_expert(m, mode)
    place.finish(ok)


def test_experts_stay_loaded_after_a_run(fake_gpu):
    high, low = _experts()
    _run(high, low)
    assert resident_models(CUDA) == [high, low]


def test_second_run_with_the_same_experts_copies_nothing(fake_gpu):
    high, low = _experts()
    _run(high, low)
    copied = fake_gpu["uploads"]
    _run(high, low)
    assert fake_gpu["uploads"] == copied


def test_release_puts_the_home_copy_back(fake_gpu):
    high, low = _experts()
    home = {k: v.data_ptr() for k, v in high.state_dict().items()}
    _run(high, low)
    assert any(v.data_ptr() != home[k] for k, v in high.state_dict().items())  # running on the copies
    release(high)
    assert {k: v.data_ptr() for k, v in high.state_dict().items()} == home
    assert resident_models() == [low]


def test_release_all_empties_the_device(fake_gpu):
    _run(*_experts())
    release_all(CUDA)
    assert resident_models() == []


def test_failed_run_releases_what_it_loaded(fake_gpu):
    high, low = _experts()
    _run(high, low, ok=False)
    assert resident_models() == []


def test_run_that_does_not_keep_models_releases_them(fake_gpu):
    high, low = _experts()
    place = Placement(CUDA, keep_loaded=False)
    place.load_expert(high, "resident")
    place.finish(True)
    assert resident_models() == []


def test_loading_evicts_idle_models_least_recently_used_first(fake_gpu):
    old_high, old_low = _experts(seed=0)
    new_high, new_low = _experts(seed=10)
    one = tensor_bytes(old_high)
    fake_gpu["free"] = int(2.5 * one)  # room for two experts, not three
    _run(old_high, old_low)
    _run(new_high, new_low)
    assert resident_models() == [new_high, new_low]


def test_models_of_the_running_job_are_never_evicted(fake_gpu):
    high, low = _experts()
    fake_gpu["free"] = tensor_bytes(high)  # too small for both: the second load asks for room it cannot get
    place = Placement(CUDA)
    place.load_expert(high, "resident")
    place.load_expert(low, "resident")
    assert set(resident_models()) == {high, low}
    place.finish(True)


def test_streamed_expert_keeps_only_its_small_parts_between_runs(fake_gpu):
    high, low = _experts()
    _run(high, low, mode="stream")
    entry = placement._residents[id(high)]
    assert entry.how == "stream" and entry.streamer.pending == {}
    assert entry.nbytes == tensor_bytes(high) - tensor_bytes(high.blocks)


def test_auto_counts_memory_its_own_resident_experts_hold(fake_gpu):
    high, low = _experts()
    two = 2 * tensor_bytes(high)
    fake_gpu["free"] = int(2.5 * two)
    _run(high, low)
    assert Placement(CUDA).resolve_mode(high, low, tokens=16) == "resident"


@pytest.mark.parametrize("threads", [1, 3])
def test_ring_copies_pageable_tensors_exactly(threads):
    g = torch.Generator().manual_seed(0)
    sources = [torch.randn(1000, 37, generator=g).to(torch.bfloat16), torch.randint(-128, 127, (5003,), dtype=torch.int8),
               torch.randn(3, generator=g), torch.randn(64, 64, generator=g).t()]  # last one not contiguous
    ring = StagingRing(torch.device("cpu"), slot_bytes=1000, slots=2, threads=threads)
    try:
        out = ring.upload(sources).wait()
    finally:
        ring.close()
    assert all(torch.equal(o, s) and o.dtype == s.dtype for o, s in zip(out, sources))
    assert all(o.data_ptr() != s.data_ptr() for o, s in zip(out, sources))


def test_ring_copies_memory_mapped_weights_exactly(tmp_path):
    sd = {"w": torch.randn(300, 300).to(torch.bfloat16), "q": torch.randint(-128, 127, (777, 3), dtype=torch.int8)}
    torch.save(sd, tmp_path / "m.pth")
    mapped = torch.load(tmp_path / "m.pth", weights_only=True, mmap=True)
    ring = StagingRing(torch.device("cpu"), slot_bytes=4096, slots=3, threads=2)
    try:
        out = ring.upload(list(mapped.values())).wait()
    finally:
        ring.close()
    assert all(torch.equal(o, sd[k]) for o, k in zip(out, mapped))


def test_ring_raises_a_failed_copy():
    ring = StagingRing(torch.device("cpu"), slot_bytes=16, slots=1, threads=1)
    try:
        ring.buffers[0] = torch.empty(0, dtype=torch.uint8)  # too small for any chunk: the copy fails
        with pytest.raises(ValueError):
            ring.upload([torch.ones(8)]).wait()
    finally:
        ring.close()


def test_ring_reads_memory_mapped_weights_from_their_file(tmp_path):
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "m.pth")
    mapped = torch.load(tmp_path / "m.pth", weights_only=True, mmap=True)["w"]
    ring = StagingRing(torch.device("cpu"), slot_bytes=4096, slots=2, threads=1)
    try:
        if ring.files is None:
            pytest.skip("no os.preadv on this platform: mapped weights are copied like any other")
        found, anonymous = ring.locate([mapped, torch.randn(64, 64)])
        assert found is not None and anonymous is None
        (out,) = ring.upload([mapped], [found]).wait()
        assert torch.equal(out, mapped)
    finally:
        ring.close()


def test_ring_never_reads_a_file_that_replaced_the_mapped_one(tmp_path):
    path = tmp_path / "m.pth"
    torch.save({"w": torch.ones(64, 64)}, path)
    mapped = torch.load(path, weights_only=True, mmap=True)["w"]
    ring = StagingRing(torch.device("cpu"), slot_bytes=4096, slots=2, threads=1)
    try:
        if ring.files is None:
            pytest.skip("no os.preadv on this platform")
        (found,) = ring.locate([mapped])
        path.unlink()
        torch.save({"w": torch.zeros(64, 64)}, path)  # a new file (new inode) under the same name
        (later,) = ring.locate([mapped])
        assert later == found  # still the mapped file's descriptor
        (out,) = ring.upload([mapped], [later]).wait()
        assert torch.equal(out, torch.ones(64, 64))
    finally:
        ring.close()


def test_plain_cuda_and_its_index_name_the_same_residents(fake_gpu, monkeypatch):
    # on a GPU machine a run places on "cuda:N"; asking with plain "cuda" must find the same models
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    high, low = _experts()
    _run(high, low)
    assert resident_models("cuda") == resident_models("cuda:0") == [high, low]
    release_all("cuda")
    assert resident_models() == []


def _on_host(block, host_ptrs) -> bool:
    return all(p.data_ptr() in host_ptrs for p in block.parameters())


def test_a_loaded_expert_attaches_each_block_when_its_first_forward_reaches_it(fake_gpu):
    high, _ = _experts()
    args = tiny_dit_inputs()
    expected = high(*args)
    host = {p.data_ptr() for p in high.parameters()}
    place = Placement(CUDA)
    place.load_expert(high, "resident")
    assert not any(p.data_ptr() in host for p in high.patch_embedding.parameters())  # small parts: attached now
    assert all(_on_host(b, host) for b in high.blocks)  # blocks: still being copied, not waited for
    reached = []
    high.blocks[1].register_forward_pre_hook(lambda m, a: reached.append([_on_host(b, host) for b in high.blocks]))
    assert torch.equal(high(*args), expected)
    assert reached == [[False, False, True]]  # block 1 runs on its device copy; block 2 not attached yet
    assert not any(_on_host(b, host) for b in high.blocks)
    place.finish(True)
    assert torch.equal(high(*args), expected)


def test_releasing_an_expert_before_its_blocks_were_reached_leaves_no_hooks(fake_gpu):
    high, _ = _experts()
    args = tiny_dit_inputs()
    expected = high(*args)
    hooks = [len(b._forward_pre_hooks) for b in high.blocks]
    place = Placement(CUDA)
    place.load_expert(high, "resident")
    place.finish(False)  # a failed run: released
    assert [len(b._forward_pre_hooks) for b in high.blocks] == hooks
    assert torch.equal(high(*args), expected)  # on its home copy again
