"""Contacts and blocks: the client messages that change them, the HTTP API's changes, and what
follows a change (events, the block cache, live watches). The rules are
``signaling.core.privacy``."""
