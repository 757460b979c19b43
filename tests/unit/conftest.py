"""Fixtures for the unit tests (the session-wide ones, e.g. `synth_data`, live in tests/conftest.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.fixture(scope="session")
def mmau_test_mini() -> Path:
    """The real MMAU test-mini metadata (1000 items, no audio); CI clones with ../shared beside the repo."""
    path = SHARED_DATA / "mmau" / "mmau-test-mini.json"
    assert path.is_file(), f"MMAU test-mini metadata missing at {path} (expected ../shared beside the repo)"
    return path
