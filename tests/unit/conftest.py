from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _no_seedance_environment(clean_env: None) -> None:
    """Unit tests build Settings from explicit values only."""
