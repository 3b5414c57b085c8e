"""The run config (strict, typed, layered YAML + overrides) and the adapter config trnft reads back."""
