"""Make the checkout importable (`import turbowan`) and the shared helpers (`from helpers import ...`)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
for p in (TESTS.parent, TESTS):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from helpers import fixtures_dir  # noqa: E402


@pytest.fixture
def fixtures() -> Path:
    return fixtures_dir()
