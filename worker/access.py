"""Whether the API accepts this worker's key and account, and the probe that finds out when it does again.

An auth or account fault (401, 403, 404 model) is nobody's job's fault: whoever meets one reports it
here, intake stops (worker.intake watches `ok`), and a probe checks the key with back-off, re-reading it
each time (a rotated key file is picked up), until the API accepts it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from worker.api_client import ApiClient
from worker.backoff import backoff_delay
from worker.errors import ApiError
from worker.metrics import Metrics
from worker.stopping import Stopping

log = logging.getLogger(__name__)


class ApiAccess:
    def __init__(
        self,
        api: ApiClient,
        metrics: Metrics,
        stopping: Stopping,
        *,
        retry_max_seconds: float,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._api = api
        self._metrics = metrics
        self._stopping = stopping
        self._retry_max = retry_max_seconds
        self.on_change = on_change
        self.ok = True
        self._probe: asyncio.Task[None] | None = None

    def refused(self, error: ApiError) -> None:
        """The API refused the key or account: stop taking jobs and probe until it accepts them again."""
        if self.ok:
            log.error(
                "the API refuses this worker's access (%s %s): no more jobs taken until it accepts it again",
                error.status,
                error.reason,
            )
            self.ok = False
            self._metrics.api_access_ok.set(0)
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
                await self._api.check_access()
            except ApiError as exc:
                log.info(
                    "API access still refused (%s %s); next check in up to %.0f s",
                    exc.status,
                    exc.reason,
                    self._retry_max,
                )
                continue
            log.warning("the API accepts this worker's access again: taking jobs")
            self.ok = True
            self._metrics.api_access_ok.set(1)
            self.on_change()
            return
