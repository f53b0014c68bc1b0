"""One write per connection for a batch of frames (``signaling.core.writes``) and how a
client connection (``signaling.net.connection``) keeps its frames while a batch is held. The
transport is a fake (the I/O seam): it records each write, as the system call it would be."""

from __future__ import annotations

import asyncio

import pytest

from signaling.core.metrics import HubCounters
from signaling.core.ratelimit import TokenBucket
from signaling.core.writes import WriteBatch
from signaling.net.connection import Connection
from signaling.wire.errors import CloseCode


class FakeTransport:
    """What ``Connection`` uses of an ``asyncio.Transport``: each ``write`` recorded."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.buffered = 0  # what a client that does not read leaves in the buffer
        self.closed = False

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def get_write_buffer_size(self) -> int:
        return self.buffered + sum(map(len, self.writes))

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True


def connection(batch: WriteBatch, limit: int = 1 << 20) -> tuple[Connection, FakeTransport]:
    t = FakeTransport()
    bucket = TokenBucket(100, 100, 0.0)
    conn = Connection(None, t, limit, bucket, 0.0, HubCounters(), batch)  # type: ignore[arg-type]
    return conn, t


def test_frames_go_at_once_when_no_batch_is_held() -> None:
    conn, t = connection(WriteBatch())
    conn.write(b"a")
    conn.write(b"b")
    assert t.writes == [b"a", b"b"]


def test_a_batch_gives_each_connection_one_write_in_order() -> None:
    batch = WriteBatch()
    (a, ta), (b, tb) = connection(batch), connection(batch)
    with batch:
        a.write(b"1")
        b.write(b"x")
        a.write(b"2")
        with batch:  # nested: only the outermost hold ends the batch
            a.write(b"3")
        assert ta.writes == [] and tb.writes == []
    assert ta.writes == [b"123"]
    assert tb.writes == [b"x"]
    a.write(b"4")  # after the batch: at once again
    assert ta.writes == [b"123", b"4"]


def test_a_batch_that_raises_still_writes_what_it_kept() -> None:
    batch = WriteBatch()
    a, ta = connection(batch)
    with pytest.raises(RuntimeError), batch:
        a.write(b"kept")
        raise RuntimeError("a bug in the middle of a batch")
    assert ta.writes == [b"kept"] and not batch.waiting


def test_the_outbox_limit_holds_for_a_batch() -> None:
    batch = WriteBatch()
    slow, t = connection(batch, limit=10)

    async def run() -> None:
        with batch:
            for _ in range(3):
                slow.write(b"0123456")
        assert slow.closing  # 21 bytes > 10: cut off as a slow consumer
        assert t.writes[0] == b"0123456" * 3
        slow.write(b"more")  # nothing after the cut-off
        assert t.writes[-1].startswith(b"\x88")  # the close frame last

    asyncio.run(run())
    assert slow.counters.slow_consumers == 1


def test_closing_during_a_batch_sends_the_kept_frames_before_the_close_frame() -> None:
    batch = WriteBatch()
    conn, t = connection(batch)

    async def run() -> None:
        with batch:
            conn.write(b"before")
            conn.abandon(CloseCode.GOING_AWAY, "bye")
            conn.write(b"after")
        assert t.writes[0] == b"before"
        assert t.writes[1][0] == 0x88 and len(t.writes) == 2

    asyncio.run(run())


def test_one_connection_failing_does_not_keep_the_others_frames() -> None:
    batch = WriteBatch()
    good, t = connection(batch)

    class Broken:
        def flush(self) -> None:
            raise RuntimeError("broken")

    with batch:
        batch.hold(Broken())
        good.write(b"x")
    assert t.writes == [b"x"]
