"""The doors to external systems: Slurm, object storage (the lake), Prefect, Dask on Slurm,
MLflow."""
