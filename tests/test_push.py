"""The push webhook against a real HTTP receiver: incoming-call and cancel events for offline
callees, message events for offline recipients, HMAC signatures, retries after a failure, no
duplicates, and the bounded queue."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp.test_utils import TestServer
from call_helpers import Phone
from push_helpers import PUSH_SECRET, push_barrier, push_server

from signaling.config import PushSection
from signaling.notify.push import PushQueue, verify

Start = Callable[..., Awaitable[TestServer]]


async def test_call_push_and_cancel_after_a_failed_attempt(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory(fail_first=1)
    server = await push_server(start_server, url)
    alice = await phones(server, "alice")
    await (await phones(server, "bob")).close()  # bob is known but offline
    call = await alice.call("bob", video=True)
    (incoming,) = await receiver.wait_for(1)
    assert incoming["type"] == "call.incoming" and incoming["identity"] == "bob"
    assert incoming["call"] == {"id": call.id, "from": "alice", "video": True, "group": False}
    assert receiver.attempts.count(incoming["id"]) == 2  # 500 once, then delivered
    bob = await phones(server, "bob")  # the push woke bob's phone
    await (await bob.next_call()).accept()
    _, cancel = await receiver.wait_for(2)
    assert cancel["type"] == "call.cancelled" and cancel["reason"] == "answered"
    assert cancel["call"]["id"] == call.id and cancel["id"] != incoming["id"]
    await call.hangup()
    await call.wait_ended()
    # The call log is stored (and its message hooks have run) when it reaches a device.
    await alice.next_message("dm:alice|bob", where=lambda m: m["kind"] == "call")
    counters = await push_barrier(server, receiver)
    # Nothing else arrived: no duplicates, no third event.
    assert [e["type"] for e in receiver.delivered] == ["call.incoming", "call.cancelled"]
    assert len({e["id"] for e in receiver.delivered}) == 2 and receiver.bad_signatures == 0
    assert counters["sent"] == 2 and counters["retries"] == 1
    assert counters["failed"] == 0


async def test_cancelled_and_missed_calls_send_cancel_events(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, calls__ring_timeout_s=0.3)
    alice = await phones(server, "alice")
    for who in ("bob", "carol"):
        await (await phones(server, who)).close()
    first = await alice.call("bob")
    await receiver.wait_for(1)
    await first.cancel()
    second = await alice.call("carol")
    assert await second.wait_ended(timeout=5) == "missed"
    events = await receiver.wait_for(4)
    got = [(e["type"], e["identity"], e.get("reason")) for e in events]
    assert got == [
        ("call.incoming", "bob", None),
        ("call.cancelled", "bob", "cancelled"),
        ("call.incoming", "carol", None),
        ("call.cancelled", "carol", "missed"),
    ]


async def test_direct_messages_push_ids_and_counts_only(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url)
    alice = await phones(server, "alice")
    carol = await phones(server, "carol")  # online: no push for her
    await (await phones(server, "bob")).close()
    s1 = await alice.send("dm:alice|bob", "secret words")
    await alice.send("dm:alice|bob", "more", cid="fixed-cid")
    await alice.send("dm:alice|bob", "more", cid="fixed-cid")  # a retry: stored once
    await alice.send("dm:alice|carol", "hi carol")
    await carol.next_message("dm:alice|carol")
    # Delivered in any order (the webhook's workers run side by side): by seq.
    first, second = sorted(await receiver.wait_for(2), key=lambda e: e["seq"])
    assert first == {
        "id": f"message.{s1['mid']}.bob",
        "type": "message.new",
        "ts": s1["ts"],
        "identity": "bob",
        "conversation": "dm:alice|bob",
        "seq": 1,
        "mid": s1["mid"],
        "from": "alice",
        "unread": 1,
    }
    assert second["seq"] == 2 and second["unread"] == 2 and "text" not in second
    # No push for the retry (stored once) nor for carol (online).
    counters = await push_barrier(server, receiver)
    assert len(receiver.delivered) == 2 and counters["sent"] == 2


async def test_message_text_only_when_enabled(
    start_server: Start, receiver_factory: Any, phones: Phone
) -> None:
    receiver, url = await receiver_factory()
    server = await push_server(start_server, url, push__include_text=True)
    alice = await phones(server, "alice")
    await (await phones(server, "bob")).close()
    await alice.send("dm:alice|bob", "hello bob")
    (event,) = await receiver.wait_for(1)
    assert event["text"] == "hello bob"


async def test_queue_is_bounded_and_deduplicates() -> None:
    q = PushQueue(PushSection(webhook_url="http://127.0.0.1:9/", secret=PUSH_SECRET, queue_size=2))
    assert q.submit({"id": "a"}) and q.submit({"id": "b"})
    assert not q.submit({"id": "a"})  # same event id: once only
    assert not q.submit({"id": "c"})  # queue full: dropped and counted
    assert q.counters.duplicates == 1 and q.counters.dropped == 1
    body = b'{"id":"x"}'
    header = (
        f"t={int(time.time())},v1="
        + hmac.new(
            PUSH_SECRET.encode(), f"{int(time.time())}.".encode() + body, hashlib.sha256
        ).hexdigest()
    )
    assert verify(PUSH_SECRET, header, body, now=time.time())
    assert not verify(PUSH_SECRET, header, body + b" ", now=time.time())
    assert not verify(PUSH_SECRET, header, body, now=time.time() + 3600)
