"""trnft.common: config, run directory, stages shared by both platforms, CLI."""
