from __future__ import annotations

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SEEDANCE_* variable of the caller's shell leaks into a test's Settings()."""
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("SEEDANCE_"):
            monkeypatch.delenv(name)
