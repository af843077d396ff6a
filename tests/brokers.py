"""Real RabbitMQ brokers for the tests, started and stopped by the tests (by process group):

- `Cluster`: three RabbitMQ nodes of the host's installation on ports of their own, each with its own
  data directory and configuration, joined with `rabbitmqctl join_cluster`; any one can be SIGKILLed and
  started again.
- `start_rabbitmq4`: RabbitMQ 4.0 (Debian 13's package, Erlang 27) in the Debian 13 root that
  `scripts/ensure-rabbitmq4.sh` builds, with its own EPMD port so it never meets the host's nodes, and
  every deprecated feature denied.

Nodes share one Erlang cookie (a copy of the host's, in a home directory of the cluster's own).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers import free_port

HOST_COOKIE = Path("/var/lib/rabbitmq/.erlang.cookie")
RABBITMQ_BIN = Path("/usr/lib/rabbitmq/bin")
RABBITMQ4_ROOT = Path(os.environ.get("SEEDANCE_RABBITMQ4_ROOT", "/var/cache/seedance/rabbitmq4-root"))

# Every deprecated feature RabbitMQ 4.0 knows, denied: the product must use none of them.
DEPRECATED_FEATURES = (
    "classic_queue_mirroring",
    "global_qos",
    "ram_node_type",
    "transient_nonexcl_queues",
    "management_metrics_collection",
    "queue_master_locator",
)


def _reachable(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Node:
    """One RabbitMQ node: `start()`, `kill()` (SIGKILL, the whole process group), `ctl(...)`."""

    name: str
    port: int
    base: Path
    config: str
    dist_port: int = field(default_factory=free_port)
    root: Path | None = None  # a root to chroot into (RabbitMQ 4), or None for the host's RabbitMQ
    epmd_port: int | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def _inner(self, path: Path) -> str:
        """`path` as the node's processes see it (inside the root when there is one)."""
        return "/" + str(path.relative_to(self.root)) if self.root is not None else str(path)

    def _env(self) -> dict[str, str]:
        home = self.base / "home"
        env = {
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "HOME": self._inner(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": self._inner(self.base / "mnesia"),
            "RABBITMQ_LOG_BASE": self._inner(self.base / "log"),
            "RABBITMQ_CONFIG_FILE": self._inner(self.base / "rabbitmq.conf"),
            "RABBITMQ_CONF_ENV_FILE": self._inner(self.base / "rabbitmq-env.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": self._inner(self.base / "enabled_plugins"),
            "RABBITMQ_PID_FILE": self._inner(self.base / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        if self.epmd_port is not None:
            env["ERL_EPMD_PORT"] = str(self.epmd_port)
        return env

    def _prepare(self) -> None:
        home = self.base / "home"
        home.mkdir(parents=True, exist_ok=True)
        cookie = home / ".erlang.cookie"
        if not cookie.exists():
            shutil.copyfile(HOST_COOKIE, cookie)
            cookie.chmod(0o400)
        (self.base / "rabbitmq.conf").write_text(self.config)
        (self.base / "rabbitmq-env.conf").write_text("")
        (self.base / "enabled_plugins").write_text("[].\n")

    def _command(self, program: str, *args: str) -> list[str]:
        if self.root is not None:
            return ["chroot", str(self.root), f"/usr/lib/rabbitmq/bin/{program}", *args]
        return [str(RABBITMQ_BIN / program), *args]

    def start(self, timeout: float = 90.0) -> None:
        """Start the node and wait until it runs. RabbitMQ 4.0.5, rejoining its cluster after a SIGKILL
        with every deprecated feature denied, at times fails to boot: its check whether a denied feature
        is in use runs before its metadata store answers ("Mnesia function failed 99 times"), and the
        failed check counts as "in use" (`failed_to_deny_deprecated_features`). Such a boot is tried again."""
        for attempt in range(3):
            out = self.base / "server.out"
            seen = out.stat().st_size if out.exists() else 0
            try:
                self._start(timeout)
                return
            except RuntimeError:
                booted = out.read_bytes()[seen:] if out.exists() else b""
                if attempt == 2 or b"failed_to_deny_deprecated_features" not in booted:
                    raise
                self._end(signal.SIGKILL, 0.0)

    def _start(self, timeout: float) -> None:
        self._prepare()
        log = open(self.base / "server.out", "ab")  # noqa: SIM115 - the node's output, for a failing test
        self.proc = subprocess.Popen(
            self._command("rabbitmq-server"),
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=self.base,  # where a crashing node leaves its dump
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not _reachable(self.port):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}; see {self.base / 'server.out'}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not listen on {self.port} within {timeout} s")
            time.sleep(0.2)
        self.ctl("await_startup", timeout=timeout)

    def _beam_pid(self) -> int | None:
        try:
            return int((self.base / "node.pid").read_text().strip())
        except (OSError, ValueError):
            return None

    def _end(self, sig: signal.Signals, grace: float) -> None:
        """Send `sig` to the node's process group and wait until the Erlang VM itself is gone (its
        listening sockets with it), SIGKILL after `grace` seconds."""
        if self.proc is None:
            return
        beam = self._beam_pid()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)
        deadline = time.monotonic() + grace
        while self.proc.poll() is None or (beam is not None and Path(f"/proc/{beam}").exists()):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                if beam is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(beam, signal.SIGKILL)
                deadline = time.monotonic() + 30
            time.sleep(0.05)
        self.proc = None
        with contextlib.suppress(FileNotFoundError):
            (self.base / "node.pid").unlink()

    def kill(self) -> None:
        """SIGKILL the node (the Erlang VM and its wrapper): what a crashed machine looks like to the others."""
        self._end(signal.SIGKILL, 0.0)

    def stop(self) -> None:
        """SIGTERM (a clean stop), then SIGKILL after a while."""
        self._end(signal.SIGTERM, 30.0)

    def ctl(self, *args: str, timeout: float = 60.0, program: str = "rabbitmqctl") -> str:
        done = subprocess.run(
            self._command(program, "-q", "-n", self.name, *args),
            check=False,
            env=self._env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} on {self.name}: {done.stderr.strip() or done.stdout}")
        return done.stdout


def _config(port: int, extra: Sequence[str] = ()) -> str:
    lines = [
        f"listeners.tcp.1 = 127.0.0.1:{port}",
        "loopback_users = none",
        "log.console = false",
        "log.file.level = warning",
        # The test machine's disk may be nearly full: the nodes must not block publishers for it.
        "disk_free_limit.absolute = 1MB",
        *extra,
    ]
    return "\n".join(lines) + "\n"


@dataclass
class Cluster:
    nodes: list[Node]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """All the nodes' URLs, comma-separated, as SEEDANCE_AMQP_URL takes them."""
        return ",".join(self.urls)

    def running(self) -> list[Node]:
        return [node for node in self.nodes if node.proc is not None and node.proc.poll() is None]

    def ctl(self, *args: str) -> str:
        return self.running()[0].ctl(*args)

    def version(self) -> tuple[int, ...]:
        """RabbitMQ's version, as (major, minor, patch)."""
        text = self.ctl("eval", "rabbit_misc:version().").strip().strip('"')
        return tuple(int(part) for part in text.split(".")[:3])

    def node_of(self, node_name: str) -> Node:
        return next(node for node in self.nodes if node.name == node_name)

    def queue_leaders(self, vhost: str) -> dict[str, str]:
        """queue name -> the node that leads it (quorum) or hosts it (classic)."""
        out = self.ctl("list_queues", "-p", vhost, "name", "leader", "--no-table-headers")
        leaders = {}
        for line in out.splitlines():
            parts = line.split()
            if len(parts) == 2:
                leaders[parts[0]] = parts[1]
        return leaders

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def start_cluster(base: Path, size: int = 3, *, rabbitmq4: bool = False) -> Cluster:
    """Start `size` nodes and join them into one cluster (about 20 s a node here): of the host's RabbitMQ,
    or with `rabbitmq4` of RabbitMQ 4 in its Debian 13 root (data under the root, `base` unused; one EPMD
    of their own, every deprecated feature denied)."""
    nodes = []
    epmd_port = free_port() if rabbitmq4 else None
    for index in range(1, size + 1):
        port = free_port()
        if rabbitmq4:
            node_base = _rabbitmq4_base(f"seedance-c4-{index}-{port}")
            config = _config(port, _DENIED)
        else:
            node_base, config = base / f"node{index}", _config(port)
        name = f"seedance-c{'4-' if rabbitmq4 else ''}{index}-{port}@localhost"
        root = RABBITMQ4_ROOT if rabbitmq4 else None
        nodes.append(Node(name, port, node_base, config, root=root, epmd_port=epmd_port))
    cluster = Cluster(nodes)
    try:
        for node in nodes:
            node.start()
        first = nodes[0]
        for node in nodes[1:]:
            node.ctl("stop_app")
            node.ctl("join_cluster", first.name)
            node.ctl("start_app")
            node.ctl("await_startup")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def rabbitmq4_available() -> bool:
    return (RABBITMQ4_ROOT / "usr/lib/rabbitmq/bin/rabbitmq-server").exists()


_DENIED = [f"deprecated_features.permit.{feature} = false" for feature in DEPRECATED_FEATURES]


def _rabbitmq4_base(name: str) -> Path:
    """A node's directory inside the RabbitMQ 4 root, with /proc and /dev mounted there."""
    base = RABBITMQ4_ROOT / "srv" / name
    base.mkdir(parents=True, exist_ok=True)
    for mount in ("proc", "dev"):
        target = RABBITMQ4_ROOT / mount
        if not os.path.ismount(target):
            subprocess.run(["mount", "--bind", f"/{mount}", str(target)], check=True)
    return base


def start_rabbitmq4(name: str = "seedance-four") -> Node:
    """One RabbitMQ 4 node in its Debian 13 root, every deprecated feature denied."""
    port = free_port()
    base = _rabbitmq4_base(f"{name}-{port}")
    node = Node(f"{name}-{port}@localhost", port, base, _config(port, _DENIED), root=RABBITMQ4_ROOT)
    node.epmd_port = free_port()
    node.start()
    return node
