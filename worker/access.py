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
from worker.errors import ApiError, TransientApiError
from worker.logs import Repeats
from worker.stopping import Stopping

log = logging.getLogger(__name__)


# A refusal that goes on is said again at most this often (the first time, and every change, at once).
REMIND_SECONDS = 300.0


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
        checked_at_start: bool = False,
    ) -> None:
        """`check()` returns once `service` accepts the worker, and raises while it does not.

        With `checked_at_start`, access is not granted until `start()`'s first check has passed; without,
        it is assumed until a refusal is reported.
        """
        self.service = service
        self._check = check
        self._gauge = gauge
        self._stopping = stopping
        self._retry_max = retry_max_seconds
        self.on_change = on_change
        self.ok = not checked_at_start
        self.problem: str | None = "not checked yet" if checked_at_start else None
        self._repeats = Repeats(REMIND_SECONDS)
        self._gauge.set(1 if self.ok else 0)
        self._probe: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Check at once (at start-up, before any job is taken), then with back-off until accepted."""
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_accepted(first_at_once=True))

    def refused(self, why: str) -> None:
        """The service refused the worker (`why`: status and reason, never a secret): stop taking jobs
        and probe until it accepts the worker again."""
        if self.ok:
            self.ok = False
            self._gauge.set(0)
            self.on_change()
        self._say(why, first=logging.ERROR)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.create_task(self._until_accepted(first_at_once=False))

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            await asyncio.gather(self._probe, return_exceptions=True)

    def _say(self, why: str, *, first: int, verb: str = "refuses this worker's access") -> None:
        """Log a problem once, then at most every REMIND_SECONDS while it lasts unchanged."""
        self.problem = why
        news = self._repeats.news(why)
        if news:
            log.log(first, "%s %s (%s): no jobs taken until it accepts the worker", self.service, verb, why)
        elif news is False:
            log.warning("%s still %s (%s)", self.service, verb, why)

    async def _until_accepted(self, *, first_at_once: bool) -> None:
        attempt = 0
        while True:
            attempt += 1
            at_once = first_at_once and attempt == 1
            if not at_once and not await self._stopping.sleep(backoff_delay(attempt, base=1.0, cap=self._retry_max)):
                return
            try:
                await self._check()
            except TransientApiError as exc:
                # The API cannot say yet (5xx, 429, unreachable): not a refusal, still not ready.
                self._say(f"cannot check yet: {_why(exc)}", first=logging.WARNING, verb="does not answer")
                continue
            except Exception as exc:
                self._say(_why(exc), first=logging.ERROR)
                continue
            if self._repeats.clear():
                log.warning("%s accepts this worker's access again: taking jobs", self.service)
            else:
                log.info("%s accepts this worker's access", self.service)
            self.problem = None
            self.ok = True
            self._gauge.set(1)
            self.on_change()
            return


def _why(exc: Exception) -> str:
    """One line on a failed check: the error's own first line (worker errors never hold secrets)."""
    if isinstance(exc, ApiError):
        return exc.summary[:200]
    text = str(exc).splitlines()[0][:200] if str(exc) else ""
    return text or type(exc).__name__
