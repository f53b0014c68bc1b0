"""Background tasks an object owns (rooms, routers, clients): kept referenced until they end,
failures reported, all cancelled or awaited when the owner closes.

Plain asyncio; in ``sfu`` because it is the package everything else already imports from.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


class TaskSet:
    """A set of running tasks; ``on_error`` gets the exception of a task that failed."""

    def __init__(self, on_error: Callable[[BaseException], None] | None = None) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._on_error = on_error

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if self._on_error is not None and not task.cancelled():
            exc = task.exception()
            if exc is not None:
                self._on_error(exc)

    def __len__(self) -> int:
        return len(self._tasks)

    async def wait(self) -> None:
        """Let every task finish (their failures are reported, not raised)."""
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def cancel(self) -> None:
        """Cancel every task and wait until they have ended."""
        for task in list(self._tasks):
            task.cancel()
        await self.wait()
