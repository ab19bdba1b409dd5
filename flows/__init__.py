"""Prefect flows: decide shards, map tasks over Dask workers, call the ddr library."""

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "ddr")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
