"""Sessions, rooms, presence, the bus, tokens, ICE servers and the device directory: the state
every feature shares. No web framework here (``signaling.net`` is the edge)."""
