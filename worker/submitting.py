"""The broker's part of submitting a job: around each attempt the handler makes (worker.handler), take the
account's permits (worker.limits) and record, once, for every replica, that the job is taken
(worker.job_ids); wait as the handler says between attempts. The handler decides; this module only takes,
records and waits, so that no decision about a job is made beside broker I/O.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

from contracts.api import ServiceTier
from worker.errors import LimitReached
from worker.handler import Defer, Duplicate, JobHandler, Outcome, Submit, Track, Wait
from worker.limits import TierLimits

Pause = Callable[[float], Awaitable[bool]]
Taken = Callable[[str, int], Awaitable[bool]]


class Submitter:
    def __init__(
        self,
        handler: JobHandler,
        limits: Mapping[ServiceTier, TierLimits],
        pause: Pause,
        *,
        taken: Taken | None = None,
    ) -> None:
        """`pause(seconds)` waits and says False when the worker is stopping instead; `taken(job_id, take)`
        records the job as taken and says whether that record was the job's first (worker.job_ids): a copy
        whose record came second is a duplicate, never submitted."""
        self._handler = handler
        self._limits = limits
        self._pause = pause
        self._taken = taken

    async def submit(self, submit: Submit) -> Outcome:
        """Attempt `submit` until the handler gives an outcome: its first tracking state once the API
        accepted it (the running slot kept), or a terminal event, a duplicate, or the job put back."""
        limits = self._limits[submit.state.tier]
        while True:
            stop = self._handler.check(submit)
            if stop is not None:
                return stop
            try:
                async with limits.slot(submit.state.tokens) as slot:
                    if not submit.recorded and self._taken is not None:
                        # Every replica learns of this job before the API does: a copy is no new job.
                        if not await self._taken(submit.job.job_id, submit.take):
                            return Duplicate(submit.job.job_id, submit.state.tier)
                        submit = replace(submit, recorded=True)
                    outcome = await self._handler.attempt(submit)
                    if isinstance(outcome, Track):
                        slot.keep()  # the task runs upstream: its slot is freed when it ends
            except LimitReached as full:
                outcome = self._handler.limit_reached(submit, full)
            if not isinstance(outcome, Wait):
                return outcome
            submit = outcome.submit
            if not await self._pause(outcome.seconds):
                return Defer("worker stopping", submit.state.created_at, submit.state.attempts, submit.take)
            submit = replace(submit, held=submit.held + outcome.seconds)
