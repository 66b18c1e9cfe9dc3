"""Storage placeholder."""
