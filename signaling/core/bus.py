"""The message bus: who receives a frame published on a topic.

Topics are ``room:<name>`` (sessions in the room) and ``user:<identity>`` (every session of that
identity). ``LocalBus`` delivers within this process; a Redis implementation of ``MessageBus`` can
later carry topics between nodes. Publishing is the fan-out hot path: a frame is encoded once and
handed to every sink as the same bytes object.
"""

from __future__ import annotations

from typing import Protocol


class Sink(Protocol):
    def deliver(self, frame: bytes) -> None: ...


class MessageBus(Protocol):
    def subscribe(self, topic: str, key: str, sink: Sink) -> None: ...

    def unsubscribe(self, topic: str, key: str) -> None: ...

    def publish(self, topic: str, frame: bytes, exclude: str | None = None) -> None: ...


class LocalBus:
    """In-process topics: a dict of sinks per topic, keyed by session id."""

    def __init__(self) -> None:
        self.topics: dict[str, dict[str, Sink]] = {}

    def subscribe(self, topic: str, key: str, sink: Sink) -> None:
        subs = self.topics.get(topic)
        if subs is None:
            subs = self.topics[topic] = {}
        subs[key] = sink

    def unsubscribe(self, topic: str, key: str) -> None:
        subs = self.topics.get(topic)
        if subs is not None:
            subs.pop(key, None)
            if not subs:
                del self.topics[topic]

    def publish(self, topic: str, frame: bytes, exclude: str | None = None) -> None:
        subs = self.topics.get(topic)
        if subs is None:
            return
        for key, sink in subs.items():
            if key != exclude:
                sink.deliver(frame)
