"""Small test helpers shared by the test modules (`from helpers import ...`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The reference fixtures: $TURBOWAN_FIXTURES, else the copy in tests/fixtures (data made by the reference)."""
    path = Path(os.environ.get("TURBOWAN_FIXTURES", REPO / "tests" / "fixtures"))
    if not (path / "manifest.json").exists():
        pytest.skip(f"reference fixtures not found at {path} (set TURBOWAN_FIXTURES)")
    return path


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, computed in float64."""
    a = a.double()
    b = b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def max_abs(a, b) -> float:
    return float((a.double() - b.double()).abs().max())
