"""trnft.jobspecs: the Kubernetes specs of every stage: Jinja templates, rendering from a run config
(:mod:`.render`) and offline validation (:mod:`.validate`). Above the platforms in the dependency order."""
