"""The SFU worker pool's own life cycle, with real worker processes."""

from __future__ import annotations

from typing import Any

from sfu_helpers import until

from sfu.pool import SfuPool


def _lost(events: list[dict[str, Any]]) -> list[str]:
    return sorted(e["room"] for e in events if e.get("ev") == "room_lost")


async def test_a_dead_worker_loses_its_rooms_but_closing_the_pool_does_not() -> None:
    events: list[Any] = []
    pool = SfuPool(1, events.append)
    await pool.start()
    try:
        await pool.request(
            {
                "op": "join",
                "room": "r1",
                "participant": "p1",
                "subscribe": True,
                "identity": "i",
                "name": "N",
            }
        )
        await pool.request(
            {
                "op": "join",
                "room": "r2",
                "participant": "p2",
                "subscribe": True,
                "identity": "i",
                "name": "N",
            }
        )
        # A crash: the rooms are reported lost (the media router tells clients and rejoins).
        proc = pool.workers[0].proc
        assert proc is not None
        proc.kill()
        await until(lambda: _lost(events) == ["r1", "r2"], 10)
        w = pool.workers[0]
        await until(lambda: w.proc is not proc and w.ready.is_set(), 20)  # restarted
        await pool.request(
            {
                "op": "join",
                "room": "r3",
                "participant": "p3",
                "subscribe": True,
                "identity": "i",
                "name": "N",
            }
        )
        readers = [w.reader_task for w in pool.workers]
        events.clear()
    finally:
        await pool.close()
    # Closing stops the workers on purpose: no "room_lost", or the router would announce
    # media_failed and rejoin every participant of every room while the server shuts down.
    assert _lost(events) == []
    # That means something only if the readers saw the workers' output end (close() returns
    # when they are over, but it cancels one still running) and handled the loss: r3 is gone.
    for reader in readers:
        assert reader is not None and reader.done()
        assert not reader.cancelled(), "a reader was cancelled before it saw its worker's end"
    assert pool.room_worker == {} and pool.workers[0].rooms == set()


async def test_an_event_handler_that_fails_does_not_stop_the_replies() -> None:
    """An exception from the pool's owner while it handles a worker's event (before, a send to
    a client whose socket had just closed) ended the task that reads the worker's channel: every
    later request of that worker went unanswered while the worker sat idle."""
    failures: list[str] = []

    def on_event(ev: Any) -> None:
        failures.append(ev["ev"])
        raise RuntimeError("the owner failed on this event")

    pool = SfuPool(1, on_event, timeout_s=5)
    await pool.start()
    try:
        await pool.request(
            {
                "op": "join",
                "room": "r1",
                "participant": "p1",
                "subscribe": True,
                "identity": "i",
                "name": "N",
            }
        )
        await pool.request({"op": "leave", "room": "r1", "participant": "p1"})  # -> room_closed
        await until(lambda: failures == ["room_closed"], 5)
        reply = await pool.request(
            {
                "op": "join",
                "room": "r2",
                "participant": "p2",
                "subscribe": True,
                "identity": "i",
                "name": "N",
            }
        )
        assert reply == {"tracks": []}
    finally:
        await pool.close()
