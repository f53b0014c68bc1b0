"""The network edge: the WebSocket endpoint, its fast frame path, the HTTP API, metrics and the
web page."""
