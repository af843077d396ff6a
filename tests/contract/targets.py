"""The places the contract suite can run against: the mock in-process, the mock over a socket, the real
API. Each target gives an authenticated client and, for the mock, a client of its `/_mock` surface."""

from __future__ import annotations

import os
from dataclasses import dataclass

import httpx

MOCK_KEY = "contract-test-key"


@dataclass
class Target:
    name: str
    api: httpx.AsyncClient
    api_key: str
    control: httpx.AsyncClient | None
    poll_interval: float
    poll_timeout: float

    @property
    def is_mock(self) -> bool:
        return self.control is not None

    def unauthenticated(self) -> httpx.AsyncClient:
        """A client to the same API without credentials (shares the transport)."""
        return httpx.AsyncClient(transport=self.api._transport, base_url=self.api.base_url)


def live_settings() -> tuple[str, str] | None:
    """(base_url, key) when the live target is enabled, else None."""
    key = os.environ.get("SEEDANCE_API_KEY", "")
    if os.environ.get("SEEDANCE_CONTRACT_LIVE") != "1" or not key:
        return None
    return os.environ.get("SEEDANCE_API_BASE_URL", "https://api.highwayapi.ai"), key
