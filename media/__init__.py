"""Rallypoint media package."""
