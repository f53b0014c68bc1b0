"""Calls that ring devices (1:1 and group): the pure state machine and the service around it."""
