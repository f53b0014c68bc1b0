"""TaskSet: owned background tasks, failures reported, cancelled together."""

from __future__ import annotations

import asyncio

from sfu.tasks import TaskSet


async def test_reports_failures_and_forgets_finished_tasks() -> None:
    failures: list[BaseException] = []
    tasks = TaskSet(failures.append)

    async def fail() -> None:
        raise ValueError("boom")

    async def ok() -> None:
        return None

    tasks.spawn(fail())
    tasks.spawn(ok())
    assert len(tasks) == 2
    await tasks.wait()
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert len(tasks) == 0
    assert [type(e) for e in failures] == [ValueError]


async def test_cancel_ends_every_task_without_reporting_it() -> None:
    failures: list[BaseException] = []
    tasks = TaskSet(failures.append)
    started = [tasks.spawn(asyncio.sleep(60)) for _ in range(3)]
    await tasks.cancel()
    assert all(t.cancelled() for t in started)
    await asyncio.sleep(0)
    assert len(tasks) == 0 and failures == []
