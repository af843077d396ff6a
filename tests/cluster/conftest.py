"""A real three-node RabbitMQ cluster for the whole session (about 40 s to start), a vhost per test on
it, and worker processes spread over its nodes. The cluster is of the host's RabbitMQ, or with
SEEDANCE_TEST_BROKER=rabbitmq4 of RabbitMQ 4 in its Debian 13 root (scripts/ensure-rabbitmq4.sh)."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import Cluster, rabbitmq4_available, start_cluster
from tests.integration.conftest import BROKER, WorkerProcess, kill_worker_processes, start_worker_process
from tests.servers import MockThread, start_mock_thread

pytestmark = [pytest.mark.broker, pytest.mark.server, pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture(autouse=True)
def _no_seedance_environment(clean_env: None) -> None:
    """Workers here get their settings from the test, never from the shell."""


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if BROKER == "rabbitmq4" and not rabbitmq4_available():
        pytest.fail("SEEDANCE_TEST_BROKER=rabbitmq4 needs the RabbitMQ 4 root: run scripts/ensure-rabbitmq4.sh")
    the_cluster = start_cluster(Path(tmp_path_factory.mktemp("cluster")), rabbitmq4=BROKER == "rabbitmq4")
    yield the_cluster
    the_cluster.stop()


@pytest.fixture
def cluster_vhost(cluster: Cluster) -> Iterator[str]:
    """A vhost of its own on the cluster; its name."""
    for node in cluster.nodes:  # a node a previous test killed is back before the next test
        if node.proc is None:
            node.start()
    name = f"seedance-cluster-{uuid.uuid4().hex[:10]}"
    cluster.ctl("add_vhost", name)
    cluster.ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
    yield name
    cluster.ctl("delete_vhost", name)


@pytest.fixture
def cluster_mock() -> Iterator[MockThread]:
    server = start_mock_thread(time_scale=0.02, api_key="cluster-key", seed=11)
    yield server
    server.stop()


def urls_from(cluster: Cluster, vhost: str, first: int) -> str:
    """All the nodes' URLs for `vhost`, starting at node `first`: comma-separated, as operators give them."""
    urls = [f"{url}{vhost}" for url in cluster.urls]
    return ",".join(urls[first:] + urls[:first])


@pytest.fixture
def spawn_cluster_worker(
    cluster: Cluster, cluster_vhost: str, cluster_mock: MockThread, tmp_path: Path
) -> Iterator[Callable[..., WorkerProcess]]:
    """Factory: `seedance-worker` as a real process given every node's URL, starting at node `first`."""
    procs: list[WorkerProcess] = []

    def spawn(first: int, **overrides: Any) -> WorkerProcess:
        url = urls_from(cluster, cluster_vhost, first)
        values = {
            "api_key": "cluster-key",
            "log_level": "DEBUG",
            "poll_scale": 0.02,
            "in_flight_refresh_seconds": 0.5,
            **overrides,
        }
        return start_worker_process(procs, tmp_path, url, cluster_mock.url, **values)

    yield spawn
    kill_worker_processes(procs)
