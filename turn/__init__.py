"""Rallypoint turn package."""
