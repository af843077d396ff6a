"""Whether the services the worker depends on accept its credentials: the API (its key and account) and,
when one is configured, the video store. A refusal is nobody's job's fault: whoever meets one reports it
here, intake stops (worker.intake watches `ok`), and a probe checks again with back-off until the service
accepts the worker again (the API key is re-read each time, so a rotated key file is picked up).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import Gauge

from worker.backoff import backoff_delay
from worker.stopping import Stopping

log = logging.getLogger(__name__)


class Access:
    def __init__(
        self,
        service: str,
        check: Callable[[], Awaitable[None]],
        gauge: Gauge,
        stopping: Stopping,
        *,
        retry_max_seconds: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        """`check()` returns once `service` accepts the worker, and raises while it does not."""
        self.service = service
        self._check = check
        self._gauge = gauge
        self._stopping = stopping
        self._retry_max = retry_max_seconds
        self.on_change = on_change
        self.ok = True
        self._probe: asyncio.Task[None] | None = None

    def refused(self, why: str) -> None:
        """The service refused the worker (`why`: status and reason, never a secret): stop taking jobs
        and probe until it accepts the worker again."""
        if self.ok:
            log.error(
                "%s refuses this worker's access (%s): no more jobs taken until it accepts it again", self.service, why
            )
            self.ok = False
            self._gauge.set(0)
            self.on_change()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_accepted())

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    async def _until_accepted(self) -> None:
        attempt = 0
        while True:
            attempt += 1
            if not await self._stopping.sleep(backoff_delay(attempt, base=1.0, cap=self._retry_max)):
                return
            try:
                await self._check()
            except Exception as exc:
                log.info(
                    "%s still refuses access (%s); next check in up to %.0f s",
                    self.service,
                    str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__,
                    self._retry_max,
                )
                continue
            log.warning("%s accepts this worker's access again: taking jobs", self.service)
            self.ok = True
            self._gauge.set(1)
            self.on_change()
            return
