"""Hostile: raises while loading."""
raise RuntimeError("boom while loading")
