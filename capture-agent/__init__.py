"""Agent placeholder."""
