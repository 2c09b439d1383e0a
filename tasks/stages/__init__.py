"""The pipeline's stages behind the Prefect flows: ingest, features and preprocess, training,
sweeps, replay."""
