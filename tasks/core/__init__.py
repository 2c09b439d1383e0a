"""What every part shares: configuration (profiles), errors, manifests, provenance, a start-
up's project file and tenancy."""
