"""Shared test fixtures: the conformance data that sits beside the repository."""

from pathlib import Path

import pytest

CONFORMANCE = Path(__file__).resolve().parents[2] / "shared" / "conformance"


@pytest.fixture(scope="session")
def conformance_dir() -> Path:
    if not CONFORMANCE.is_dir():
        pytest.fail(f"conformance data not found at {CONFORMANCE}; the tests expect ../shared beside the repo")
    return CONFORMANCE
