"""Rallypoint sfu package."""
