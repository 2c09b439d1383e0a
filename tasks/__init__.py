"""The functions behind the Prefect flows (flows/), by part of the architecture:

- ``core``: configuration (profiles), errors, manifests, provenance, projects, tenancy;
- ``data``: data spaces: catalog, usage policies, formats and contracts, demo generators;
- ``stages``: ingest, features and preprocess, training, sweeps, replay;
- ``jobs``: the job layer: executors (local, Slurm), the watcher, admission, usage;
- ``doors``: the external systems: Slurm, the lake's object storage, Prefect, Dask, MLflow;
- ``models``: flavours, the registered pyfunc classes, model cards, promotion;
- ``payloads``: the job runtime and the reference trainers, run inside the jobs (no Prefect);
- ``cli``: the `aif` command.
"""
