"""Make the checkout importable (`import turbowan`) and the shared helpers (`from helpers import ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for p in (TESTS.parent, TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import torch  # noqa: E402

from helpers import fixtures_dir  # noqa: E402
from turbowan import placement  # noqa: E402
from turbowan.staging import StagingRing  # noqa: E402


@pytest.fixture
def fixtures() -> Path:
    return fixtures_dir()


@pytest.fixture
def fake_gpu(monkeypatch):
    """CUDA simulated on the CPU for placement: a 'cuda' device whose copies land in CPU memory. ``state['free']``
    is the free memory it reports, minus what resident models hold. Returns the state, with the number of tensors
    uploaded so far."""
    state = {"free": 1 << 40, "uploads": 0}
    ring = StagingRing(torch.device("cpu"), slot_bytes=4096, slots=3, threads=2)
    real_upload = ring.upload

    def counting_upload(sources, files=None):
        state["uploads"] += len(sources)
        return real_upload(sources, files)

    ring.upload = counting_upload
    monkeypatch.setattr("turbowan.placement.staging_ring", lambda device: ring)
    held = lambda: sum(e.nbytes for e in placement._residents.values())  # noqa: E731
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (state["free"] - held(), state["free"]))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    # no fraction on the simulated cards (on a one-GPU machine the real call would fail for a second card)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0, raising=False)
    yield state
    placement.release_all()
    ring.close()
