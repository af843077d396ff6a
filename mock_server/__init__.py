"""A stateful mock of the Seedance `/v3/async` API: `create_app()` for in-process use, `seedance-mock`
for a real server. See `mock_server.state` for what it simulates and which choices are its own."""

from mock_server.app import MockApp, create_app
from mock_server.state import Faults, MockConfig, MockState, ResultFault

__all__ = ["Faults", "MockApp", "MockConfig", "MockState", "ResultFault", "create_app"]
