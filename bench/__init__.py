"""Benchmarks: timing targets live here, not in tests. ``python -m bench`` (``make bench``) runs them all."""
