"""Start real servers for tests: the mock API as a process, or on a real socket in a thread of the test
process (one per test: its journal and tasks are that test's alone)."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx
import uvicorn

from mock_server import MockConfig, create_app
from mock_server.__main__ import DropSimulatedResets
from mock_server.app import MockApp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_http(url: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=0.5).status_code < 500:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout} s")


@dataclass
class MockProcess:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_mock(
    *, time_scale: float = 0.001, api_key: str | None = None, seed: int | None = 7, extra: Sequence[str] = ()
) -> MockProcess:
    port = free_port()
    cmd = [sys.executable, "-m", "mock_server", "--port", str(port), "--time-scale", str(time_scale)]
    cmd += ["--log-level", "warning"]
    if api_key:
        cmd += ["--api-key", api_key]
    if seed is not None:
        cmd += ["--seed", str(seed)]
    proc = subprocess.Popen([*cmd, *extra], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", proc)
    except BaseException:
        proc.kill()
        raise
    return MockProcess(proc, url)


@dataclass
class MockThread:
    """The mock served by uvicorn on 127.0.0.1 in a thread; `app.state` is its state."""

    app: MockApp
    url: str
    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def start_mock_thread(*, time_scale: float = 0.001, api_key: str | None = None, seed: int | None = 7) -> MockThread:
    logging.getLogger("uvicorn.error").addFilter(DropSimulatedResets())
    app = create_app(MockConfig(api_key=api_key, time_scale=time_scale), seed=seed)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"mock-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the mock did not start on port {port}")
        time.sleep(0.01)
    return MockThread(app, f"http://127.0.0.1:{port}", server, thread)
