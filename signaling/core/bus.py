"""The message bus: who receives a frame published on a topic.

Topics are ``room:<name>`` (sessions in the room) and ``user:<identity>`` (every session of that
identity). ``LocalBus`` delivers within this process; ``signaling.cluster.redisbus.RedisBus``
also carries topics between nodes. Publishing is the fan-out hot path: a frame is encoded once and
handed to every sink as the same bytes object.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Protocol


class Sink(Protocol):
    def deliver(self, frame: bytes) -> None: ...


#: What ``local_subscribers`` answers for a topic nobody here follows.
NOBODY: Final[Mapping[str, Sink]] = MappingProxyType({})


class MessageBus(Protocol):
    """Topics and their sinks. ``signaling.app`` picks the implementation: ``LocalBus`` for
    one node, ``signaling.cluster.redisbus.RedisBus`` for a cluster."""

    def subscribe(self, topic: str, key: str, sink: Sink) -> None:
        """Deliver ``topic``'s frames to ``sink`` (``key``: a session id, unique per topic)."""

    def unsubscribe(self, topic: str, key: str) -> None:
        """Stop delivering ``topic`` to the sink subscribed under ``key``."""

    def publish(
        self,
        topic: str,
        frame: bytes,
        exclude: str | None = None,
        order: tuple[str, int] | None = None,
    ) -> None:
        """Deliver ``frame`` to every sink of ``topic`` but the one under ``exclude`` (a sink
        of this node); never awaits, never raises for the transport. ``order`` = (conversation,
        seq) for a conversation's events: each node's sinks get them in ``seq`` order
        (``signaling.core.order``; one node publishes them in that order already)."""

    def local_subscribers(self, topic: str) -> Mapping[str, Sink]:
        """The sinks of ``topic`` on this node, by key (read-only; empty if none): what a
        node can answer without asking the others."""
        ...


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

    def publish(
        self,
        topic: str,
        frame: bytes,
        exclude: str | None = None,
        order: tuple[str, int] | None = None,
    ) -> None:
        subs = self.topics.get(topic)
        if subs is None:
            return
        for key, sink in subs.items():
            if key != exclude:
                sink.deliver(frame)

    def local_subscribers(self, topic: str) -> Mapping[str, Sink]:
        return self.topics.get(topic, NOBODY)
