"""The job layer: one executor interface (local, Slurm), the one watcher, admission and usage
accounting."""
