"""Group-call media: the bridge between the hub's rooms and the SFU worker processes."""
