"""The stop signal every part of the worker shares: set once, by a signal handler (see `__main__`)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable


class Stopping:
    """A one-way switch from running to stopping, and sleeps that end early when it flips."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    async def wait(self) -> None:
        await self._event.wait()

    async def sleep(self, seconds: float) -> bool:
        """Sleep `seconds`; False, at once, when the worker is or becomes stopping meanwhile."""
        if self._event.is_set():
            return False
        try:
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, seconds))
        except TimeoutError:
            return True
        return False

    async def until(self, work: Awaitable[object]) -> bool:
        """Run `work` to its end (True), or cancel it as soon as the worker is stopping (False)."""
        task = asyncio.ensure_future(work)
        stopped = asyncio.ensure_future(self._event.wait())
        try:
            await asyncio.wait({task, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
        if task.done():
            task.result()
            return True
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return False
