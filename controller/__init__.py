"""Controller placeholder."""
