"""Hand data frames to the hub as aiohttp parses them, without a task switch per frame.

aiohttp's ``WebSocketResponse`` puts every parsed frame into a queue and wakes the handler task,
which takes it with ``receive()``: a future, a loop callback and a task step per frame. For the
chat hot path that is most of the per-message cost outside our own code. ``FastWebSocket``
installs a queue whose ``feed_data`` first offers each data frame of the connection's encoding
(text for JSON, binary for MessagePack) to a *sink* (a plain function
called inside ``data_received``); frames the sink declines (anything it cannot finish without
awaiting, or that would overtake a frame still being handled) go into the queue as usual, and
the handler task takes them with ``receive()`` in order.

This is the only module that touches aiohttp internals (``WebSocketResponse._post_start``,
the reader and queue classes of ``aiohttp._websocket.reader``). ``available()`` checks at
start-up that they are there and that ``_post_start`` is the one mirrored here (by a hash of
its source); otherwise the server uses plain ``WebSocketResponse``, which works the same, a
little slower. Measured with bench/signaling.py, eight alternating single steps at 4,000-5,000
msgs/s against the previous commit: the server's core 79.6 % -> 75.4 % on average, lower ack
p99 in seven of the eight.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import textwrap
from collections.abc import Callable
from typing import Any

from aiohttp import WSMsgType, web

from ..wire.errors import CloseCode
from ..wire.framing import close_frame

log = logging.getLogger(__name__)

# A sink takes a data frame's bytes and says whether it handled it.
Sink = Callable[[bytes], bool]

try:
    from aiohttp._websocket.reader import WebSocketDataQueue, WebSocketReader
    from aiohttp.helpers import DEFAULT_CHUNK_SIZE

    _IMPORTED = True
except ImportError:  # pragma: no cover - another aiohttp
    _IMPORTED = False


# sha256 of aiohttp's WebSocketResponse._post_start source (dedented) that FastWebSocket
# mirrors: aiohttp 3.14.5.
KNOWN_POST_START = {"4059bd10d782dcbb"}


def available() -> bool:
    """Whether this aiohttp has the internals ``FastWebSocket`` relies on, as mirrored here."""
    if not _IMPORTED:
        return False
    post = getattr(web.WebSocketResponse, "_post_start", None)
    try:
        src = textwrap.dedent(inspect.getsource(post))  # type: ignore[arg-type]
    except (OSError, TypeError):
        return False
    digest = hashlib.sha256(src.encode()).hexdigest()[:16]
    if digest not in KNOWN_POST_START:
        log.info(
            "aiohttp's WebSocketResponse._post_start changed (%s): frames go by receive()", digest
        )
        return False
    return all(hasattr(WebSocketDataQueue, a) for a in ("feed_data", "read", "_buffer"))


if _IMPORTED:

    class _SinkQueue(WebSocketDataQueue):
        """aiohttp's frame queue, offering frames of type ``kind`` to ``sink`` first."""

        __slots__ = ("kind", "sink")  # one per connection: no instance dict

        def __init__(self, protocol: Any, limit: int, *, loop: Any) -> None:
            super().__init__(protocol, limit, loop=loop)
            self.sink: Sink | None = None
            self.kind = WSMsgType.TEXT

        def feed_data(self, data: Any, size: int) -> None:
            sink = self.sink
            if sink is not None and data[0] is self.kind and not self._buffer and sink(data[1]):
                return
            super().feed_data(data, size)


class MaskCheck:
    """Stands before aiohttp's frame parser and closes the connection with 1002 at the first
    frame a client sent unmasked (RFC 6455 section 5.1: "The server MUST close the connection
    upon receiving a frame that is not masked"; aiohttp's parser accepts them).

    It reads only frame headers: per read, the bytes of the frame in progress are skipped
    (``_skip``), and a header split over two reads waits in ``_head``.
    """

    __slots__ = ("_head", "_on_unmasked", "_parser", "_skip", "failed")

    def __init__(self, parser: Any, on_unmasked: Callable[[], None]) -> None:
        self._parser = parser
        self._on_unmasked = on_unmasked
        self._skip = 0  # bytes of the current frame still to come
        self._head = b""  # the start of a header the last read cut off
        self.failed = False

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        if self.failed:
            return True, b""
        n = len(data)
        if self._skip >= n and not self._head:  # inside one frame's payload: nothing to check
            self._skip -= n
        else:
            bad = self._scan(data)
            if bad is not None:  # the frames before it are handled; nothing after it
                if bad > 0:
                    self._parser.feed_data(data[:bad])
                self.failed = True
                self._on_unmasked()
                return True, b""
        result: tuple[bool, bytes] = self._parser.feed_data(data)
        return result

    def feed_eof(self) -> None:
        self._parser.feed_eof()

    def _scan(self, data: bytes) -> int | None:
        """Check every frame header that starts in ``data``; where an unmasked frame starts
        (an offset in ``data``, negative if its header began in the last read), else None."""
        held = len(self._head)
        buf = self._head + data if held else data
        pos = 0 if held else self._skip
        n = len(buf)
        while pos < n:
            if n - pos < 2:
                break
            second = buf[pos + 1]
            if not second & 0x80:
                return pos - held
            length = second & 0x7F
            head = 8 if length == 126 else 14 if length == 127 else 6  # with the mask key
            if n - pos < head:
                break
            if length == 126:
                length = int.from_bytes(buf[pos + 2 : pos + 4], "big")
            elif length == 127:
                length = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            pos += head + length
        else:
            self._head = b""
            self._skip = pos - n
            return None
        self._head = buf[pos:]  # a header cut off by the end of this read
        self._skip = 0
        return None


class FastWebSocket(web.WebSocketResponse):
    """A ``WebSocketResponse`` whose data frames can be taken by a sink (``set_sink``), and
    that closes with 1002 on an unmasked client frame (``MaskCheck``)."""

    def _post_start(self, request: web.BaseRequest, protocol: str | None, writer: Any) -> None:
        # aiohttp 3.14's _post_start with our queue class; keep in step with it.
        self._ws_protocol = protocol
        self._writer = writer
        self._reset_heartbeat()
        loop = self._loop
        assert loop is not None
        self._reader = _SinkQueue(request._protocol, DEFAULT_CHUNK_SIZE, loop=loop)
        self._parser = WebSocketReader(
            self._reader,
            self._max_msg_size,
            compress=bool(self._compress),
            decode_text=self._decode_text,
        )
        cb = None if self._heartbeat is None else self._on_data_received
        transport = request.transport

        def unmasked() -> None:
            if transport is not None and not transport.is_closing():
                transport.write(close_frame(CloseCode.PROTOCOL_ERROR, "frames must be masked"))
                transport.close()

        request.protocol.set_parser(MaskCheck(self._parser, unmasked), data_received_cb=cb)  # type: ignore[arg-type]
        request.protocol.keep_alive(False)

    def set_sink(self, sink: Sink | None, kind: WSMsgType = WSMsgType.TEXT) -> None:
        """Offer frames of type ``kind`` (text or binary) to ``sink`` as they are parsed."""
        reader = self._reader
        if isinstance(reader, _SinkQueue):
            reader.sink = sink
            reader.kind = kind
