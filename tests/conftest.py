"""Shared fixtures. Markers (gpu, slow) are registered in pyproject.toml."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh, fixed-seed generator per test, so every test is deterministic on its own."""
    return np.random.default_rng(1234)
