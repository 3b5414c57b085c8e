"""trnft.jobspecs: Jinja templates of the Kubernetes specs and the instance-type table (data only)."""
