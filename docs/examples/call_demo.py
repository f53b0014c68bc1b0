"""Two simulated phones make a 1:1 video call through a Rallypoint server.

    python docs/examples/call_demo.py ws://127.0.0.1:8080/ws

Alice calls Bob, who has two devices: both ring, the tablet answers, the phone stops ringing.
Alice's device sends video peer to peer (aiortc), Bob's tablet decodes some frames, Alice hangs
up, and every device receives the call log message. Needs an open-mode server (no tokens).
"""

from __future__ import annotations

import asyncio
import sys

from aiortc.mediastreams import VideoStreamTrack

from signaling.sdk import RallypointClient
from signaling.sdk.media import P2PMedia


async def main(url: str) -> None:
    alice = RallypointClient(url, identity="alice", name="Alice", device="alice-phone")
    bob_phone = RallypointClient(url, identity="bob", name="Bob", device="bob-phone")
    bob_tablet = RallypointClient(url, identity="bob", name="Bob", device="bob-tablet")
    for device in (alice, bob_phone, bob_tablet):
        await device.connect()
    try:
        call = await alice.call("bob", video=True)
        print("alice is calling bob:", call.id)

        ringing_phone = await bob_phone.next_call()
        ringing_tablet = await bob_tablet.next_call()
        await ringing_phone.ringing()
        await ringing_tablet.ringing()
        await ringing_tablet.accept()
        await call.next_event("call_accepted")
        print("bob answered on his tablet; his phone got:", (await ringing_phone.ended)["type"])

        # P2P media: the caller offers, the callee answers, both through `call_signal`.
        # Empty ice_servers (no STUN) keeps this on the local network; a real app passes nothing
        # and uses the STUN/TURN servers the server hands out with the call.
        sender = P2PMedia(call, tracks=[VideoStreamTrack()], ice_servers=[])
        receiver = P2PMedia(ringing_tablet, ice_servers=[])
        await receiver.start()
        await sender.start()
        track = await asyncio.wait_for(receiver.remote_tracks.get(), 20)
        for _ in range(10):
            frame = await asyncio.wait_for(track.recv(), 10)
        print(f"bob's tablet decoded 10 frames of {frame.width}x{frame.height} video")
        await sender.close()
        await receiver.close()

        await call.hangup()
        print("call ended:", await call.wait_ended())
        for name, device in (
            ("alice", alice),
            ("bob-phone", bob_phone),
            ("bob-tablet", bob_tablet),
        ):
            log = await device.next_message("dm:alice|bob", where=lambda m: m["kind"] == "call")
            print(f"{name} sees in dm:alice|bob: {log['text']!r} ({log['call']['outcome']})")
    finally:
        for device in (alice, bob_phone, bob_tablet):
            await device.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "ws://127.0.0.1:8080/ws"))
