"""Rallypoint signaling server: WebSocket protocol, rooms, presence and durable chat."""
