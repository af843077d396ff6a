"""How a RabbitMQ is reached, the same for the worker, `seedance` and the producer's client: one AMQP URL
(a single node, or a load balancer in front of a cluster), or several URLs of one cluster's nodes
separated by commas, tried in turn.

    urls = broker_urls("amqp://u:p@rabbit-0:5672/prod,amqp://u:p@rabbit-1:5672/prod")
    connection = ClusterConnection(urls, client_properties={"connection_name": "me"})
    await connection.connect(timeout=10)   # the first node that answers
    # ... its node dies: aio-pika restores the connection, channels and consumers on the next node

Passwords never leave this module in text: `redact` and `where` are what logs and errors may print.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aio_pika
from yarl import URL

log = logging.getLogger(__name__)

URL_SHAPE = "amqp://user:password@host:5672/vhost (or amqps://; several of one cluster separated by commas)"


class BrokerUrlError(ValueError):
    """A value that is no AMQP URL (list); its message never quotes the value (it holds passwords)."""


def broker_urls(value: str) -> list[str]:
    """The URLs in `value` (one, or several separated by commas), checked; BrokerUrlError otherwise.

    Several URLs must name one virtual host: they are nodes of one cluster, not different brokers."""
    urls = [part.strip() for part in value.split(",") if part.strip()]
    if not urls:
        raise BrokerUrlError(f"is empty; expected {URL_SHAPE}")
    for index, url in enumerate(urls, 1):
        which = f"URL {index} of {len(urls)} " if len(urls) > 1 else ""
        parts = urlsplit(url)
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if parts.scheme not in ("amqp", "amqps") or not parts.hostname:
            raise BrokerUrlError(f"{which}must look like {URL_SHAPE}")
        if not port_ok:
            raise BrokerUrlError(f"{which}has a port that is not a number")
    hosts = {vhost(url) for url in urls}
    if len(hosts) > 1:
        raise BrokerUrlError("names different virtual hosts: several URLs must be nodes of one cluster and vhost")
    return urls


def vhost(url: str) -> str:
    """The virtual host a URL names (`/` when it names none)."""
    return unquote(urlsplit(url).path[1:]) or "/"


def redact(url: str) -> str:
    """The URL with its password replaced by `***` (several URLs: each of them)."""
    if "," in url:
        return ",".join(redact(part.strip()) for part in url.split(","))
    parts = urlsplit(url)
    if parts.password is None:
        return url
    try:
        port = parts.port
    except ValueError:
        port = None
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{port}" if port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def where(url: str | URL) -> str:
    """`host:port` of a URL, for a log line: never the user or password."""
    parts = urlsplit(str(url))
    try:
        port = parts.port or (5671 if parts.scheme == "amqps" else 5672)
    except ValueError:
        port = 5672
    return f"{parts.hostname}:{port}"


def describe_failure(exc: BaseException, vhost_name: str) -> str:
    """What went wrong connecting, in words an operator can act on; never the URL (it holds a password)."""
    text = str(exc)
    if "Connection.Close" in text and "Connection.OpenOk" in text:
        # RabbitMQ closes the connection at Connection.Open when the vhost is missing or not permitted.
        return f"RabbitMQ refused the virtual host {vhost_name!r}: it does not exist, or the user has no access to it"
    if "ACCESS_REFUSED" in text or "authentication" in text.lower():
        return "RabbitMQ refused the user name or password"
    if "message size" in text and "max size" in text:
        return f"RabbitMQ refused the message's size ({text[:200]})"
    return f"cannot reach RabbitMQ ({type(exc).__name__}: {text[:200]})" if text else type(exc).__name__


MIB = 1024 * 1024


def default_max_message_size(server_properties: Mapping[str, Any] | None) -> int:
    """The `max_message_size` a RabbitMQ of this version has unless its operator changed it: 16 MiB from
    4.0 on, 128 MiB before. The broker does not say its configured value over AMQP, so a raised limit is
    something the operator also tells the worker (SEEDANCE_MAX_MESSAGE_BYTES)."""
    major = _announced(server_properties, "version").split(".", 1)[0]
    return 16 * MIB if major.isdigit() and int(major) >= 4 else 128 * MIB


def broker_version(server_properties: Mapping[str, Any] | None) -> str:
    """The product and version the broker announced (for logs): 'RabbitMQ 4.0.5'."""
    parts = (_announced(server_properties, "product"), _announced(server_properties, "version"))
    return " ".join(part for part in parts if part) or "unknown"


def _announced(server_properties: Mapping[str, Any] | None, key: str) -> str:
    """One of the server properties of Connection.Start, as text (aiormq gives bytes or str)."""
    value = (server_properties or {}).get(key, "")
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class ClusterConnection(aio_pika.RobustConnection):
    """A robust connection (aio-pika restores channels, queues and consumers after a loss) that knows
    several nodes: each attempt that fails moves to the next URL, so when the node it is connected to
    dies, the next reconnection lands on one that lives. With one URL it is aio-pika's own behaviour.
    """

    def __init__(self, urls: list[str], *, start: int = 0, **kwargs: Any) -> None:
        self._urls = [aio_pika.connection.make_url(url) for url in urls]
        self._index = start % len(self._urls)
        super().__init__(self._urls[self._index], **kwargs)
        self.node = where(self._urls[self._index])

    @property
    def url(self) -> URL:
        return self._urls[self._index]

    @url.setter
    def url(self, value: URL) -> None:
        # aio-pika sets it at construction and when a password is rotated (update_secret): every node
        # of a cluster has the same users.
        if hasattr(self, "_urls") and value != self._urls[self._index]:
            self._urls = [url.with_password(value.password) for url in self._urls]

    async def _RobustConnection__connect_transport(self) -> None:
        url = self._urls[self._index]
        try:
            await super()._RobustConnection__connect_transport()  # type: ignore[misc]
        except BaseException:
            if len(self._urls) > 1:
                self._index = (self._index + 1) % len(self._urls)
                log.info("RabbitMQ at %s does not answer; next attempt: %s", where(url), where(self.url))
            raise
        self.node = where(url)
        log.info("connected to RabbitMQ at %s", self.node)


async def connect_first(urls: list[str], *, connect_timeout: float = 10.0, **kwargs: Any) -> ClusterConnection:
    """A connection to the first of `urls` that answers (each tried once, in order); the last failure
    when none does."""
    failure: BaseException | None = None
    for start in range(len(urls)):
        connection = ClusterConnection(urls, start=start, **kwargs)
        try:
            await connection.connect(timeout=connect_timeout)
        except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
            await connection.close()
            failure = exc
            continue
        return connection
    assert failure is not None  # noqa: S101 - urls is never empty (broker_urls)
    raise failure
