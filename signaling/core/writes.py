"""One write per connection for a batch of frames (issue 14).

A write to a client connection is a system call, and on a busy node those calls are most of
its CPU (one per delivery: ~45 % of a cluster node's samples at 5,000 chat msgs/s, the kernel's
TCP send path included). Frames come in batches: the store settles a whole transaction's
results without an ``await`` (an acknowledgement and a fan-out per message), and the Redis bus
hands on every frame of one read the same way; a room's members get several frames of one
batch. While a ``WriteBatch`` is held (``with batch:``), a connection keeps what is written to
it and joins the batch's list (``hold``); when the outermost hold ends, each of those
connections writes what it kept in one go (``Held.flush``). A connection's frames keep their
order, and none waits longer than the batch it belongs to takes to settle.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Protocol

log = logging.getLogger(__name__)


class Held(Protocol):
    """A connection that kept frames while a batch was held."""

    def flush(self) -> None:
        """Write the frames kept (one write)."""


class WriteBatch:
    """Held while a batch of frames is handed out (see the module docstring); re-entrant."""

    __slots__ = ("depth", "waiting")

    def __init__(self) -> None:
        self.depth = 0  # nested holds; frames are kept while > 0
        self.waiting: list[Held] = []  # connections with frames kept, in first-write order

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.depth -= 1
        if not self.depth and self.waiting:
            self.flush()

    def hold(self, conn: Held) -> None:
        """``conn`` kept its first frame of this batch: flush it when the batch ends."""
        self.waiting.append(conn)

    def flush(self) -> None:
        """Let every connection that kept frames write them."""
        waiting, self.waiting = self.waiting, []
        for conn in waiting:
            try:
                conn.flush()
            except Exception:  # one connection's failure must not keep the others' frames
                log.exception("a connection's batched write failed")
