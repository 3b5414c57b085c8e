"""trnft.examples: shipped run configs and the bundled tiny instruction dataset (data only)."""
