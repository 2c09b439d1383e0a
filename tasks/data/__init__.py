"""Data spaces: the catalog, usage policies, formats and contracts, the demo generators."""
