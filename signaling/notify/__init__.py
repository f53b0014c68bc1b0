"""Notifications for devices that are offline: the push webhook."""
