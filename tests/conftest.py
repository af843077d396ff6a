from __future__ import annotations

import pytest


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No SEEDANCE_* variable of the caller's shell leaks into a test's Settings()."""
    import os  # noqa: PLC0415

    for name in list(os.environ):
        if name.startswith("SEEDANCE_"):
            monkeypatch.delenv(name)


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, object]:
    """Tests marked `both_loops` run on asyncio's event loop and on uvloop's (the worker's)."""
    import asyncio  # noqa: PLC0415

    if item.get_closest_marker("both_loops") is None:
        return {"asyncio": asyncio.new_event_loop}
    import uvloop  # noqa: PLC0415

    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["aiohttp", "httpx"])
def transport_kind(request: pytest.FixtureRequest) -> str:
    """Each transport SEEDANCE_HTTP_TRANSPORT offers, the default first."""
    kind: str = request.param
    return kind
