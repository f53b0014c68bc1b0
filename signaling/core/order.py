"""Delivering a conversation's events in ``seq`` order on a node of a cluster (issue 14).

The store numbers a conversation's events without gaps, but in a cluster two nodes that
store events of one conversation publish them on their own Redis connections, so a node may
get ``seq`` 6 (its own, or another node's) before 5. ``Sequencer`` puts them back in order
per topic and conversation before they reach the node's sessions: the next ``seq`` goes at
once (with any held ones that follow it); one that comes early is held until the ones before
it arrive, or for at most ``hold_s`` (a frame the bus lost, or one withheld from this topic:
then the held ones go, in order, and clients fill the gap through ``history``/``sync`` as
docs/PROTOCOL.md says). One that comes late (after that) goes at once.

Pure: time is the caller's ``call_later`` (``loop.call_later``); no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final, Protocol

#: How long an early event waits for the ones before it (seconds).
HOLD_S: Final = 0.1


class Handle(Protocol):
    def cancel(self) -> None: ...


#: ``deliver(topic, frame, exclude)``: hand ``frame`` to the topic's local sinks but ``exclude``.
Deliver = Callable[[str, bytes, "str | None"], None]
CallLater = Callable[..., Handle]


class _Stream:
    __slots__ = ("held", "last", "timer")

    def __init__(self, last: int) -> None:
        self.last = last
        self.held: dict[int, tuple[bytes, str | None]] = {}
        self.timer: Handle | None = None


class Sequencer:
    """Per (topic, conversation): the last ``seq`` delivered and the early ones held."""

    def __init__(self, deliver: Deliver, call_later: CallLater, hold_s: float = HOLD_S) -> None:
        self._deliver = deliver
        self._call_later = call_later
        self.hold_s = hold_s
        self._topics: dict[str, dict[str, _Stream]] = {}
        self.held = 0  # events that came early (counter)
        self.flushed = 0  # events delivered after their hold ran out, a gap before them

    def offer(self, topic: str, stream: str, seq: int, frame: bytes, exclude: str | None) -> None:
        """Deliver ``frame`` (event ``seq`` of conversation ``stream``) in order."""
        streams = self._topics.get(topic)
        if streams is None:
            streams = self._topics[topic] = {}
        st = streams.get(stream)
        if st is None:  # the first this node sees of it here: nothing to wait for
            streams[stream] = _Stream(seq)
            self._deliver(topic, frame, exclude)
            return
        last = st.last
        if seq > last + 1:
            st.held[seq] = (frame, exclude)
            self.held += 1
            if st.timer is None:
                st.timer = self._call_later(self.hold_s, self._flush, topic, stream)
            return
        self._deliver(topic, frame, exclude)
        if seq != last + 1:
            return  # late: after its hold ran out (or a repeat)
        held = st.held
        while held:
            nxt = held.pop(seq + 1, None)
            if nxt is None:
                break
            seq += 1
            self._deliver(topic, nxt[0], nxt[1])
        st.last = seq
        if not held and st.timer is not None:
            st.timer.cancel()
            st.timer = None

    def _flush(self, topic: str, stream: str) -> None:
        st = self._topics.get(topic, {}).get(stream)
        if st is None:
            return
        st.timer = None
        for seq in sorted(st.held):
            frame, exclude = st.held[seq]
            self._deliver(topic, frame, exclude)
            st.last = seq
        self.flushed += len(st.held)
        st.held.clear()

    def drop(self, topic: str) -> None:
        """The topic has no local sinks any more: forget its streams (held events too)."""
        streams = self._topics.pop(topic, None)
        if streams:
            for st in streams.values():
                if st.timer is not None:
                    st.timer.cancel()

    def streams(self) -> int:
        """How many (topic, conversation) pairs are tracked (a gauge)."""
        return sum(len(s) for s in self._topics.values())


def encode_order(stream: str, seq: int) -> bytes:
    """The prefix of an ordered frame on the bus: ``\\x00``, the conversation's length (2
    bytes) and name, ``seq`` (8 bytes). Frames otherwise start with a WebSocket header or ``{``."""
    s = stream.encode()
    return b"\x00" + len(s).to_bytes(2, "big") + s + seq.to_bytes(8, "big")


def decode_order(data: bytes) -> tuple[str, int, bytes] | None:
    """(conversation, seq, frame) of an ordered frame; None for any other frame."""
    if not data or data[0] != 0:
        return None
    end = 3 + int.from_bytes(data[1:3], "big")
    return data[3:end].decode(), int.from_bytes(data[end : end + 8], "big"), data[end + 8 :]
