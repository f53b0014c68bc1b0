"""The Rallypoint client SDK: one object per device, for apps, tests and benchmarks.

``RallypointClient`` connects (with heartbeat, and resume after a dropped socket), joins rooms,
sends chat with retries under a stable client id and de-duplicates what it receives, and makes and
answers calls (``Call``). ``signaling.sdk.media.P2PMedia`` runs a 1:1 call's media between two
devices with aiortc. See docs/SDK.md.
"""

from .client import Call, CallError, RallypointClient

__all__ = ["Call", "CallError", "RallypointClient"]
