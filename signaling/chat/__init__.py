"""Chat: room chat and direct messages, their handlers, the store interface, the SQLite store
and its writer process."""
