"""The worker's life on the broker: connect (retrying, and giving up at once on shutdown), declare the
topology, build the publisher and the consumer, hand the queues to intake, and drain on the way out.

    connect -> declare -> Publisher -> Consumer -> Intake.run ... stopping ... Intake.close -> drain -> close
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection

from contracts.api import ServiceTier
from contracts.brokers import ClusterConnection, broker_version, default_max_message_size, describe_failure
from worker import topology
from worker.access import Access
from worker.backoff import backoff_delay
from worker.consumer import Consumer
from worker.handler import JobHandler
from worker.intake import Intake
from worker.job_ids import JobIds
from worker.limits import Permits, TierLimits
from worker.metrics import Metrics
from worker.publisher import Publisher
from worker.settings import Settings
from worker.stopping import Stopping
from worker.submitting import Submitter

log = logging.getLogger(__name__)

SUMMARY_SECONDS = 60.0
RECONNECT_SECONDS = 1.0  # after a lost connection, the next attempt (on the next node of a cluster)
CONNECT_TIMEOUT_SECONDS = 10.0  # a node that does not answer at all (a black-holed host) is left for the next


class Service:
    def __init__(
        self,
        settings: Settings,
        handler: JobHandler,
        intake: Intake,
        limits: Mapping[ServiceTier, TierLimits],
        metrics: Metrics,
        stopping: Stopping,
        api_access: Access,
        store_access: Access | None = None,
        ids: JobIds | None = None,
    ) -> None:
        self._settings = settings
        self._ids = ids
        self._handler = handler
        self._intake = intake
        self._limits = limits
        self._metrics = metrics
        self._stopping = stopping
        self._api_access = api_access
        self._store_access = store_access
        self._connection: AbstractRobustConnection | None = None
        self.declared = False

    @property
    def connected(self) -> bool:
        return self._connection is not None and self._connection.connected.is_set()

    def readiness(self) -> dict[str, Any]:
        """What /readyz reports: ready when connected, declared, accepted by the API and not stopping."""
        api_ok = self._api_access.ok
        store_ok = self._store_access is None or self._store_access.ok
        unconsumed = self._intake.unconsumed()
        unreachable = {tier: limits.unreachable for tier, limits in self._limits.items() if limits.unreachable}
        ready = (
            self.declared
            and self.connected
            and api_ok
            and store_ok
            and not unconsumed
            and not unreachable
            and (self._ids is None or self._ids.current)
            and not self._stopping.is_set()
        )
        self._metrics.worker_ready.set(1 if ready else 0)
        if self._ids is not None:
            self._metrics.remembered_jobs.set(len(self._ids))
        return {
            "ready": ready,
            "broker_connected": self.connected,
            "topology_declared": self.declared,
            "api_access_ok": api_ok,
            "api_access_problem": self._api_access.problem,
            "storage_access_ok": store_ok,
            "stopping": self._stopping.is_set(),
            "consuming": self._intake.consuming(),
            "not_consumed": unconsumed,
            "permits_unreachable": unreachable,
            "job_ids_current": self._ids is None or self._ids.current,
            "job_ids_remembered": len(self._ids) if self._ids is not None else 0,
            "broker_node": self._connection.node if isinstance(self._connection, ClusterConnection) else None,
            "max_message_bytes": self._handler.max_message_bytes,
        }

    async def _task_ended(self, tier: ServiceTier) -> None:
        await self._limits[tier].task_ended()

    async def run(self) -> None:
        """Serve until stopping; /healthz stays up meanwhile, /readyz says whether jobs are taken."""
        connection = await self._connect()
        if connection is None:
            return
        self._connection = connection
        self._follow_message_size(connection)
        try:
            channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
            await topology.declare(channel, self._settings)
            publisher = await Publisher.open(channel, self._settings.tracking_delays_ms)
            maintaining = None
            if self._ids is not None:
                # Every job id taken, ended or cancelled is known before the first job is taken.
                if not await self._stopping.until(self._ids.open(connection, self._intake.leads)):
                    return
                maintaining = asyncio.create_task(self._ids.maintain())
            permits = Permits(connection)
            claim = self._ids.claim if self._ids is not None else None
            for limits in self._limits.values():
                await limits.attach(permits, claim)
            taken = self._ids.taken if self._ids is not None else None
            consumer = Consumer(
                self._handler,
                Submitter(self._handler, self._limits, self._stopping.sleep, taken=taken),
                publisher,
                self._metrics,
                delivery_limit=self._settings.delivery_limit,
                tracking_delays_ms=self._settings.tracking_delays_ms,
                pause=self._stopping.sleep,
                ended=self._ids.ended if self._ids is not None else None,
                freed=self._ids.freed if self._ids is not None else None,
                slot_freed=self._task_ended,
            )
            self.declared = True
            log.info("worker started", extra={"tiers": "default,flex"})
            intake = asyncio.create_task(self._intake.run(connection, consumer))
            ready = asyncio.create_task(self._report(consumer))
            await self._stopping.wait()
            await self._intake.close()
            await consumer.drain(self._settings.drain_timeout_seconds)
            ready.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(intake, timeout=5)
            await asyncio.gather(ready, return_exceptions=True)
            if maintaining is not None:
                maintaining.cancel()
                await asyncio.gather(maintaining, return_exceptions=True)
        finally:
            if self._ids is not None:
                await self._ids.close()
            self._metrics.worker_ready.set(0)
            await connection.close()

    def _follow_message_size(self, connection: AbstractRobustConnection) -> None:
        """Job messages as large as the broker takes by default for its version, unless set."""
        properties = connection.transport.connection.server_properties if connection.transport else None
        limit = self._settings.max_message_bytes or default_max_message_size(properties)
        self._handler.max_message_bytes = limit
        where = "SEEDANCE_MAX_MESSAGE_BYTES" if self._settings.max_message_bytes else "the broker's default"
        log.info("broker: %s; job messages up to %d bytes (%s)", broker_version(properties), limit, where)

    async def _report(self, consumer: Consumer) -> None:
        """Keep the readiness gauge current, and log a summary of the work done every SUMMARY_SECONDS."""
        last = time.monotonic()
        while True:
            self.readiness()
            if time.monotonic() - last >= SUMMARY_SECONDS:
                last = time.monotonic()
                line = consumer.summary()
                if line is not None:
                    log.info("last %.0f s: %s", SUMMARY_SECONDS, line)
            await asyncio.sleep(self._settings.in_flight_refresh_seconds)

    async def _connect(self) -> AbstractRobustConnection | None:
        """Connect to RabbitMQ, retrying with back-off until it answers; None as soon as stopping."""
        attempt = 0
        urls = self._settings.amqp_urls
        while not self._stopping.is_set():
            # Each attempt starts at the next node of a cluster; once connected, a lost node's connection
            # is restored on the next one that answers (ClusterConnection).
            connection = ClusterConnection(
                urls,
                start=attempt,
                client_properties={"connection_name": "seedance-worker"},
                reconnect_interval=RECONNECT_SECONDS,
            )
            connecting = asyncio.ensure_future(connection.connect(timeout=CONNECT_TIMEOUT_SECONDS))
            stopped = asyncio.ensure_future(self._stopping.wait())
            await asyncio.wait({connecting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            if not connecting.done():
                # close(), not just cancel: a cancelled robust connect would schedule a reconnect of its own.
                connecting.cancel()
                await connection.close()
                await asyncio.gather(connecting, return_exceptions=True)
                return None
            try:
                connecting.result()
            except (ConnectionError, OSError, aio_pika.exceptions.AMQPError) as exc:
                await connection.close()
                attempt += 1
                delay = backoff_delay(attempt, base=1.0, cap=30.0)
                log.warning(
                    "%s at %s; retrying in %.0f s", describe_failure(exc, self._settings.vhost), connection.node, delay
                )
                await self._stopping.sleep(delay)
                continue
            return connection
        return None
