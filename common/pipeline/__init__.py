"""The stage machinery: run directory, staging and manifests, fingerprints, checkpoints, the backend registry."""
