"""A Celery configuration for Airflow workers that run this package's tasks: TensorFlow imported once.

Example (every Celery worker, and the scheduler, read the same setting)::

    export AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS=tf_export_pipeline.operators.celery_worker.CELERY_CONFIG
    airflow celery worker

On Linux, Airflow 3 runs each task in a process forked from the worker's pool
process, and every export or validate task imports TensorFlow and Keras
(seconds of CPU each time). With this configuration Celery imports
:mod:`tf_export_pipeline.operators.worker_preload` when the worker starts,
before its pool forks, so every task starts with them already in memory. It is
Airflow's own default configuration otherwise (``[celery]`` options still
apply). This module imports neither TensorFlow nor Keras: the scheduler reads
it too.
"""

from __future__ import annotations

from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

#: The module a worker imports at start-up (see :mod:`tf_export_pipeline.operators.worker_preload`).
PRELOAD_MODULE = "tf_export_pipeline.operators.worker_preload"

CELERY_CONFIG = {
    **DEFAULT_CELERY_CONFIG,
    "imports": [*DEFAULT_CELERY_CONFIG.get("imports", ()), PRELOAD_MODULE],
}
