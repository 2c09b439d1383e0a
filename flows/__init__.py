"""Prefect flows of the pipeline (ingest, preprocess, train, register, pipeline)."""

from aifactory.tasks.doors.runtime import quick_heartbeat_shutdown

quick_heartbeat_shutdown()  # flow runs end without waiting on the heartbeat thread's sleep
