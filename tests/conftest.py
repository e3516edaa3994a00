"""Shared test fixtures."""

from pathlib import Path

import pytest

CONFORMANCE = Path(__file__).resolve().parent / "data" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    """DeepSeek-reference conformance vectors, kept in the repository (tests/data/conformance/README.md)."""
    assert CONFORMANCE.is_dir(), f"conformance data missing at {CONFORMANCE}; restore tests/data/conformance from git"
    return CONFORMANCE
